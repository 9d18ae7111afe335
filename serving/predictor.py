"""The KServe predictor: Mask R-CNN from a serving package, over V1 and V2 (Open Inference Protocol).

Requests (images as base64; JPG, PNG or TIFF):
- V1 `POST /v1/models/<name>:predict`:
  `{"instances": [{"image": {"b64": "..."}}], "parameters": {"score_threshold": 0.5, "max_detections": 100, "overlay": false}}`
- V2 `POST /v2/models/<name>/infer`: one BYTES input named `image` (base64 strings in JSON), the same
  parameters in the request's `parameters`.

Each image's result: `{"width", "height", "model_version", "detections": [{"label", "category_id",
"score", "box": [x0, y0, x1, y1], "mask": COCO RLE}]}`, plus `overlay_png` (base64 PNG) when asked.
V2 returns the same JSON, one string per image, in the BYTES output `detections`.
Decoding (`maskrcnn.images`), pre- and post-processing (`maskrcnn.processing`, with the mask threshold
from the package's config) are evaluation's own, not copies.

The network runs in ONNX Runtime when the package has `detector.onnx` (backend `auto`, the default, or
`onnxruntime`, which refuses a package without it), else in eager PyTorch (`eager`). With the graph, torch
is never imported: the lean serving image (the Dockerfile's `serving` target) has none. The package is read
through `maskrcnn.package.open_package` and is served only when the network answers its probe as the
weights did when it was exported (and, with public keys configured, only when it is signed by one).
A label outside the package's label map is a model failure (500), never some class.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import pybase64
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from PIL import Image

from serving.admission import TICKET, Ticket
from serving.bodies import LargeText
from serving.limits import MAX_ANSWER_BYTES, MAX_PIXELS, ServingLimits, memory_budget, workers_for_memory
from serving.observe import ModelMetrics, model_labels
from maskrcnn.reference import MAX_DETECTIONS, SCORE_THRESHOLD
from maskrcnn.labels import LabelError
from maskrcnn.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from maskrcnn.processing import MASK_BUDGET_BYTES, Network, detect
from maskrcnn.onnx_runtime import CPU_EP, DEVICES, OnnxDetector, providers_here
from maskrcnn.names import cache_dir
from maskrcnn.package import PackageError, open_package
from maskrcnn.signature import load_public_keys

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnxruntime", "eager"]  # where the network runs (see the module's docstring)
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
PROBE_TIMEOUT_S = 60.0  # one probe input through the graph at load; a graph that runs longer is refused
FORWARD_LIMIT_S = ServingLimits.forward_limit_s  # one forward pass longer: an inference thread is stuck
MAX_INFERENCE_WORKERS = 8  # images in flight at most by default (each holds its pixels and masks: see serving.limits)
IMAGE_INPUT = {"name": "image", "datatype": "BYTES", "shape": [-1]}  # base64 JPG/PNG/TIFF, one per element
DETECTIONS_OUTPUT = {"name": "detections", "datatype": "BYTES", "shape": [-1]}  # one JSON result per image


class MaskRCNNPredictor(Model):
    """Serves a serving package from a folder, `s3://` or `gs://` prefix, once it is verified (checksums,
    limits, the signature when public keys are configured) and its network answers the package's probe."""

    def __init__(self, name: str, model_dir: str = DEFAULT_MODEL_DIR, *, score_threshold: float = SCORE_THRESHOLD,
                 max_detections: int = MAX_DETECTIONS, max_pixels: int = MAX_PIXELS, max_images: int = 8,
                 mask_budget_bytes: int = MASK_BUDGET_BYTES, backend: Backend = "auto", threads: int | None = None,
                 public_keys: str | Path | list[str | Path] | None = None, probe_timeout_s: float = PROBE_TIMEOUT_S,
                 forward_limit_s: float = FORWARD_LIMIT_S, device: str = "auto", workers: int | None = None,
                 memory_budget_bytes: int | None = None, expect_version: str = "", expect_digest: str = "",
                 max_answer_bytes: int = MAX_ANSWER_BYTES):
        super().__init__(name, return_response_headers=True)
        self.model_dir = model_dir
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.max_pixels, self.max_images = min(max_pixels, DEFAULT_MAX_PIXELS), max_images
        self.mask_budget_bytes = mask_budget_bytes
        self.max_answer_bytes = max_answer_bytes
        self.mask_threshold = 0.5  # replaced by the package's eval.mask_threshold on load
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        if device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
        self.device = device  # where the network runs: the graph by maskrcnn.onnx_runtime.execution_providers, eager by maskrcnn.eager.on_device
        if threads is not None and threads < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {threads}")
        self.threads = threads  # None: the CPUs this process may use (`cpu_budget`)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"inference workers: expected an integer >= 1, got {workers!r}")
        self.workers_asked = workers  # None: one image per core with a graph on the CPU, else one (see `load`)
        self.memory_budget_bytes = memory_budget_bytes  # None: the container's limit (`serving.limits.memory_budget`)
        self.workers = 1
        # Trusted signing keys (PEM files or folders of them): with any, only packages they signed are served.
        sources = [public_keys] if isinstance(public_keys, (str, Path)) else list(public_keys or [])
        self.public_keys = [key for source in sources for key in load_public_keys(source)] or None
        # What the release that pointed the InferenceService here promised (its annotations): the version and
        # the digest of SHA256SUMS, so that a signed package copied under another version's prefix is refused
        if expect_digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", expect_digest):
            raise ValueError(f"expected digest: sha256:<64 hex digits>, got {expect_digest[:80]!r}")
        self.expect_version, self.expect_digest = expect_version, expect_digest
        self.probe_timeout_s = probe_timeout_s
        self.forward_limit_s = forward_limit_s  # the watchdog's: see `forward_seconds` and serving.app's Health
        self._running: dict[int, float] = {}  # inference thread -> monotonic time its running forward pass began
        self.network: Network | None = None  # the graph's or the eager model's run (maskrcnn.processing.Network)
        self.graph: OnnxDetector | None = None
        # With several workers: the graph on all threads, for an image that starts while no other runs (so
        # light traffic keeps one image's latency on every core); None with one worker (`graph` is that)
        self.wide_graph: OnnxDetector | None = None
        self._running_lock = threading.Lock()
        self.torch_threads: int | None = None
        self.version = ""
        self.signer = ""
        # `workers` forward passes at once (set by `load`); requests queue holding their compressed bodies
        # only, not decoded images
        self._slots = threading.BoundedSemaphore(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._timing = threading.local()  # each inference thread's last forward pass, in seconds
        self.metrics: ModelMetrics | None = None  # the served version's series, made by `load` (none before)

    @property
    def metric_labels(self) -> tuple[str, str]:
        """`model_name` and `model_version` of this predictor's series (serving.observe.MODEL)."""
        return self.metrics.model if self.metrics is not None else model_labels(self.name, self.version)

    def load(self) -> bool:
        """Read and verify the package (checksums, limits, signature when keys are configured), build the
        network, and run it on the package's probe: ready only when it answers as the weights did at export."""
        cache = cache_dir()  # the serving image sets $MASKRCNN_CACHE to /tmp/maskrcnn-serving (its one writable place)
        # the weights (torch) only for the eager network: with a graph, torch is never imported
        package = open_package(self.model_dir, public_keys=self.public_keys, cache_dir=cache,
                               weights=True if self.backend == "eager" else None)  # raises PackageError
        if self.expect_version and package.version != self.expect_version:
            raise PackageError(f"{self.model_dir}: the package is model version {package.version or '?'}, and this "
                               f"predictor was told to serve version {self.expect_version} (the release's annotation): "
                               f"another version's package under this prefix is never served")
        if self.expect_digest and package.digest != self.expect_digest:
            raise PackageError(f"{self.model_dir}: SHA256SUMS digest {package.digest} differs from the {self.expect_digest} "
                               f"the release published: not the package that was scored and signed")
        self.config, self.label_map = package.config, package.label_map
        self.mask_threshold = self.config.eval.mask_threshold  # the threshold the model was evaluated with
        self.version, self.signer = package.version, package.signer
        cores = self.threads or cpu_budget()
        graph_wanted = self.backend != "eager" and package.graph is not None
        on_cpu = graph_wanted and providers_here(self.device)[0] == [CPU_EP]
        self.workers = self._workers_for(cores, graph_wanted, on_cpu)
        per_image = max(1, cores // self.workers)  # each image's intra-op threads
        # the one package -> network step, probe-checked; the eager network on all the cores, one image at a time
        runner = package.network(self.backend, self.device, per_image if graph_wanted else cores, self.probe_timeout_s)
        graph = runner if graph_wanted else None
        # the same graph on more threads, for an image that starts alone (the CPU only: on the GPU a second
        # session would only take its memory); probe-checked all the same
        wide = (package.network("onnxruntime", self.device, cores, self.probe_timeout_s)
                if on_cpu and per_image < cores else None)
        network: Network = runner.run
        self.metrics = ModelMetrics(model_labels(package.metadata.get("model_name") or self.name, self.version),
                                    self.label_map.names, package.reference)  # before the model: infer needs both
        self.network, self.graph, self.wide_graph = network, graph, wide
        self.torch_threads = None if self.graph is not None else cores  # the eager network sets them per forward pass
        self._slots = threading.BoundedSemaphore(self.workers)
        self._executor.shutdown(wait=False)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self.ready = True
        log.info("model %s ready: version %s, classes %s, network on %s, probe matched, %s", self.name,
                 self.version or "?", self.label_map.names,
                 f"ONNX Runtime (inference workers {self.workers}, threads per image {per_image}"
                 f"{f', {cores} for an image that starts alone' if wide else ''})" if self.graph
                 else f"eager PyTorch (inference workers 1, threads per image {cores})",
                 f"signed by key {self.signer}" if self.signer else "signature not checked (no public key configured)")
        return self.ready

    def _workers_for(self, cores: int, graph: bool, graph_on_cpu: bool) -> int:
        """How many images are inferred at once. Default: with the graph on the CPU, one image per core, each
        on one intra-op thread (this model's per-image work is partly serial, so two single-thread images
        on two cores give 1.3x the network's images per second of one image on two threads:
        benchmarks/RESULTS.md), at most `MAX_INFERENCE_WORKERS` and as many as the memory budget holds at `max_pixels` each
        (`serving.limits.workers_for_memory`); on the GPU, or in eager PyTorch, one."""
        if self.workers_asked is None:
            if not graph_on_cpu:
                return 1
            budget = self.memory_budget_bytes or memory_budget()
            return min(cores, MAX_INFERENCE_WORKERS, workers_for_memory(budget, self.max_pixels))
        if self.workers_asked > 1 and not graph:
            raise PackageError(f"{self.model_dir}: --inference-workers {self.workers_asked} needs the package's graph "
                               f"in ONNX Runtime; eager PyTorch (backend {self.backend}"
                               f"{'' if self.backend == 'eager' else ', the package has no detector.onnx'}) runs "
                               f"one image at a time on all its threads: use --inference-workers 1")
        return self.workers_asked

    # -- health and metadata -------------------------------------------------------------------
    def forward_seconds(self) -> float:
        """How long the longest forward pass running now has run (0 when none runs): the watchdog's reading."""
        started = tuple(self._running.values())  # copied at once: inference threads add and remove theirs
        return 0.0 if not started else time.monotonic() - min(started)

    def stuck_problem(self, ready: bool) -> str | None:
        """The watchdog: what is wrong when the running forward pass has run past the limit (liveness), or
        past half of it (`ready`: readiness fails first, so that traffic moves away); else None."""
        running, limit = self.forward_seconds(), self.forward_limit_s
        if ready and running > limit / 2:
            return f"a forward pass has run {running:.0f} s, past half the limit of {limit:g} s"
        if running > limit:
            return f"a forward pass has run {running:.0f} s, past the limit of {limit:g} s: an inference thread is stuck"
        return None

    async def healthy(self) -> bool:
        """kserve's model readiness, checked before each prediction: loaded, and no forward pass stuck past
        half the limit (a request would only queue behind it)."""
        return self.ready and self.stuck_problem(ready=True) is None

    def get_input_types(self) -> list[dict[str, Any]]:
        return [IMAGE_INPUT]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [DETECTIONS_OUTPUT]

    def metadata(self) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata: the served version, where the network runs, the
        `image` input (BYTES: base64 images, one per element) and the `detections` output (BYTES: one JSON
        result per image)."""
        return {"name": self.name, "versions": [self.version] if self.version else [],
                "platform": "onnxruntime_onnx" if self.graph is not None else "pytorch_torchvision",
                "inputs": self.get_input_types(), "outputs": self.get_output_types()}

    # -- request parsing -------------------------------------------------------------------------
    def _options(self, params: Any) -> tuple[float, int, bool]:
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise InvalidInput(f"parameters: expected an object such as {{\"score_threshold\": 0.5}}, got {type(params).__name__}")
        try:
            threshold = float(params.get("score_threshold", self.score_threshold))
            raw_max = params.get("max_detections", self.max_detections)
            max_det = int(raw_max)
            if isinstance(raw_max, bool) or (isinstance(raw_max, float) and raw_max != max_det):
                raise ValueError(f"{raw_max!r} is not a whole number")
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"parameters: score_threshold must be a number and max_detections an integer ({exc})") from None
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInput(f"parameters.score_threshold: expected a number in [0, 1], got {threshold}")
        if max_det < 1:
            raise InvalidInput(f"parameters.max_detections: expected an integer >= 1, got {max_det}")
        return threshold, max_det, bool(params.get("overlay", False))

    @staticmethod
    def _bytes_of(item: Any, where: str) -> bytes:
        if isinstance(item, dict):
            if "b64" in item:
                item = item["b64"]
            elif "image" in item:
                return MaskRCNNPredictor._bytes_of(item["image"], f"{where}.image")
            else:
                raise InvalidInput(f"{where}: expected an object with 'image' or 'b64' (base64 image), got keys {sorted(item)}")
        if isinstance(item, bytes):
            return item
        if not isinstance(item, (str, LargeText)):
            raise InvalidInput(f"{where}: expected a base64 string, got {type(item).__name__}")
        if item.startswith("data:"):  # a data URL, as browsers produce them
            head = str(bytes(item.view[:100]), "ascii", "replace") if isinstance(item, LargeText) else item[:100]
            if ";base64," in head:
                cut = head.index(",") + 1
                item = LargeText(item.view[cut:]) if isinstance(item, LargeText) else item[cut:]
        try:
            return b64decode(item)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: not valid base64") from None

    def _images_v1(self, payload: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        instances = payload.get("instances")
        expected = "expected a non-empty list of {\"image\": {\"b64\": ...}}"
        if "instances" not in payload:
            raise InvalidInput(f"missing field 'instances': {expected}")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput(f"field 'instances': {expected}, got {_shown(instances)}")
        return [self._bytes_of(x, f"instances[{i}]") for i, x in enumerate(instances)], payload.get("parameters")

    def _images_v2(self, request: InferRequest) -> tuple[list[bytes], dict[str, Any]]:
        inputs = [i for i in request.inputs if i.name == "image"]
        if not inputs:
            raise InvalidInput(f"missing input 'image' (BYTES, base64 images); got {[i.name for i in request.inputs]}")
        tensor = inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input 'image': expected datatype BYTES, got {tensor.datatype}")
        data = tensor.data if tensor.data is not None else []
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).tolist()
        if not isinstance(data, list) or not data:
            raise InvalidInput("input 'image': no data, expected a list of base64 strings")
        shape = list(tensor.shape or [])
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"input 'image': shape {shape} is not a list of non-negative integers; expected [{len(data)}]")
        if int(np.prod(shape)) != len(data):
            raise InvalidInput(f"input 'image': shape {shape} holds {int(np.prod(shape))} element(s), but data has "
                               f"{len(data)}; expected shape [{len(data)}]")
        params = dict(request.parameters or {})
        return [self._bytes_of(x, f"image[{i}]") for i, x in enumerate(data)], params

    # -- inference -------------------------------------------------------------------------------
    def _decode(self, blob: bytes, index: int) -> np.ndarray:
        try:
            image = decode_image(blob, self.max_pixels, name=f"image[{index}]")
        except ImageError as exc:
            raise InvalidInput(str(exc)) from None
        self._check_shape(image, index)
        return image

    def _check_shape(self, image: np.ndarray, index: int) -> None:
        """The model resizes the shorter side to min_size, capped by max_size on the longer side; a strip so
        thin that its shorter side would round to 0 pixels cannot be run."""
        h, w = image.shape[:2]
        cfg = self.config.model
        scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))
        if int(min(h, w) * scale) < 1:
            raise InvalidInput(f"image[{index}]: {w}x{h} pixels (aspect ratio {max(h, w) / min(h, w):.0f}:1) is too "
                               f"elongated: the model resizes its longer side to {cfg.max_size} px, leaving the shorter "
                               f"side under 1 px; expected an aspect ratio of at most {cfg.max_size}:1")

    def _run(self, blobs: list[bytes], threshold: float, max_det: int, overlay: bool,
             ticket: Ticket | None = None) -> tuple[list[dict[str, Any]], float]:
        """Decode and infer one image at a time, so one request holds one decoded image (and its masks) at
        once; returns the results and the seconds spent in forward passes. Before each image the request's
        ticket is checked: work for a client that left, or past its deadline, is dropped, not computed."""
        if len(blobs) > self.max_images:
            raise InvalidInput(f"{len(blobs)} images in one request; at most {self.max_images}")
        results, forward_s, pictures = [], 0.0, 0
        for i, blob in enumerate(blobs):
            if ticket is not None:
                ticket.check()
            results += self.infer([self._decode(blob, i)], threshold, max_det, overlay)
            forward_s += self._timing.seconds  # this inference thread's last forward pass
            pictures += len(results[-1].get("overlay_png", "")) + len(results[-1].get("mask_png", ""))
            if pictures > self.max_answer_bytes:
                raise InvalidInput(f"the overlay pictures of this answer reach {pictures} bytes (at image[{i}]), above the "
                                   f"limit of {self.max_answer_bytes} for one answer; ask without 'overlay', or for fewer "
                                   "or smaller images")
        return results, forward_s

    def infer(self, images: list[np.ndarray], threshold: float, max_det: int, overlay: bool) -> list[dict[str, Any]]:
        """Detections for decoded RGB images (the same code path for both protocols and the web page)."""
        if self.network is None or self.metrics is None:
            raise InferenceError("model is not loaded")
        results = []
        for img in images:
            self.metrics.image(img)
            try:
                with self._slots, self.metrics.forward():
                    start, me = time.perf_counter(), threading.get_ident()
                    with self._running_lock:  # alone: every thread for this image; else one worker's share
                        network = self.wide_graph.run if self.wide_graph and not self._running else self.network
                        self._running[me] = time.monotonic()
                    try:
                        pred = detect(network, img, self.config.model.min_size, self.config.model.max_size,
                                      self.mask_threshold, threshold, max_det, self.mask_budget_bytes)
                    finally:
                        with self._running_lock:
                            del self._running[me]
                    self._timing.seconds = time.perf_counter() - start
            except Exception as exc:
                log.exception("forward pass failed")
                raise InferenceError(f"model failure: {type(exc).__name__}: {exc}") from exc
            # whole arrays to Python lists once: element-wise indexing costs microseconds each
            labels, scores, boxes = pred["labels"].tolist(), pred["scores"].tolist(), pred["boxes"].tolist()
            try:
                detections = [{"label": self.label_map.name_of(label), "category_id": self.label_map.category_of(label),
                               "score": round(score, 5), "box": [round(v, 2) for v in box], "mask": rle}
                              for label, score, box, rle in zip(labels, scores, boxes, pred["masks"])]
            except LabelError as exc:  # never served as some class: the network is not the one that was scored
                log.error("the network returned a label outside the label map: %s", exc)
                raise InferenceError(f"model failure: {exc}") from None
            result = {"width": int(img.shape[1]), "height": int(img.shape[0]), "model_version": self.version,
                      "detections": detections}
            if overlay:
                result["overlay_png"], result["mask_png"] = self._overlay(img, detections)
            self.metrics.detections(detections)
            results.append(result)
        return results

    def _overlay(self, image: np.ndarray, detections: list[dict[str, Any]]) -> tuple[str, str]:
        """(the image with masks, boxes, labels and scores drawn; the masks alone, one colour each), as base64 PNGs."""
        from maskrcnn.masks import decode_segmentation
        from maskrcnn.visualize import colour, draw_predictions

        pred = {"boxes": np.array([d["box"] for d in detections]).reshape(-1, 4),
                "scores": np.array([d["score"] for d in detections]),
                "labels": np.array([self.label_map.label_of(d["category_id"]) for d in detections]),
                "masks": [d["mask"] for d in detections]}
        h, w = image.shape[:2]
        masks = np.zeros((h, w, 3), np.uint8)
        for n, d in enumerate(detections):
            masks[decode_segmentation(d["mask"], h, w).astype(bool)] = colour(n)
        return (_png_b64(draw_predictions(image, pred, self.label_map, score_threshold=0.0)),
                _png_b64(Image.fromarray(masks)))

    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        # Reading the images (base64), decoding and the forward pass are CPU-bound: they run on the inference
        # threads, so the event loop keeps answering liveness and readiness probes (and other requests' I/O).
        if isinstance(payload, InferRequest):
            results, forward_s = await self._queued(lambda: self._images_v2(payload))
            self._timing_header(response_headers, forward_s)
            data = [json.dumps(r, separators=(",", ":")) for r in results]
            output = InferOutput("detections", [len(data)], "BYTES", data)
            # kserve 0.21 fails to build a response without an id: generate one when the client sent none
            return InferResponse(payload.id or str(uuid.uuid4()), self.name, [output], model_version=self.version or None)
        if not isinstance(payload, dict):
            raise InvalidInput(f"expected a JSON object, got {type(payload).__name__}")
        results, forward_s = await self._queued(lambda: self._images_v1(payload))
        self._timing_header(response_headers, forward_s)
        return {"predictions": results}

    async def _queued(self, read: Callable[[], tuple[list[bytes], Any]]) -> tuple[list[dict[str, Any]], float]:
        """Run `read` (the request's images and parameters) and `_run` on an inference thread; with an
        admission ticket (requests through the app), give up as soon as the client leaves or the deadline
        passes, dropping work not yet started. The request's data is reachable from the queued work only
        through `held`, emptied when the request ends: a dropped request's body is released at once, not
        when the executor's queue reaches its cancelled work."""
        ticket = TICKET.get()
        held = [read]

        def job() -> tuple[list[dict[str, Any]], float]:
            if not held:
                raise InferenceError("the request ended before its work started")
            blobs, params = held[0]()
            return self._run(blobs, *self._options(params), ticket)

        work = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            return await (ticket.outcome(work) if ticket is not None else work)
        finally:
            held.clear()

    @staticmethod
    def _timing_header(response_headers: dict[str, str] | None, forward_s: float) -> None:
        """`x-forward-ms`: this request's forward passes and mask post-processing."""
        if response_headers is not None:
            response_headers["x-forward-ms"] = f"{forward_s * 1000:.2f}"


def b64decode(text: str | LargeText) -> bytes:
    """Strict base64 (the alphabet only, padding only at the end) decoded by pybase64, which releases the GIL
    while it decodes (3 ms for 26 MB, against 75 ms holding it in `binascii`): the event loop is never kept
    waiting for a large body's image."""
    return pybase64.b64decode(text.view if isinstance(text, LargeText) else text, validate=True)


def _shown(value: Any) -> str:
    return "an empty list" if value == [] else f"a {type(value).__name__}"


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by its container's CPU quota rounded up
    (a Kubernetes CPU limit: cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`). A pod
    limited to 2 CPUs on a 16-core node then runs 2 inference threads, not 16 throttled ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(cgroup: Path) -> float | None:
    """CPUs allowed by the cgroup's CFS quota, or None when unlimited or unreadable."""
    try:
        if (cgroup / "cpu.max").is_file():  # v2: "max 100000" or "<quota> <period>"
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for folder in (cgroup / "cpu", cgroup / "cpu,cpuacct"):  # v1: quota -1 means unlimited
            if (folder / "cpu.cfs_quota_us").is_file():
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
