"""The serving package's network at run time, without torch: the graph's contract (inputs, outputs), the
rules a graph must pass before ONNX Runtime sees it, the probe, and the ONNX Runtime session.

`training.onnx_export` writes graphs (it needs torch); this module is all that reading, checking and
running one needs (numpy, onnx and onnxruntime), so that a predictor with a graph can check it against
its package's probe without torch.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

ONNX_FILE = "detector.onnx"
INPUTS = ("images", "image_size")
OUTPUTS = ("boxes", "labels", "scores", "masks")  # `model.roi_heads`'s keys; masks are 28x28 probabilities
# How far ONNX Runtime's detections may be from eager PyTorch's in scores, box pixels and mask
# probabilities (float32 rounding in a different operator order gives ~1e-5 on scores, ~1e-4 px on boxes).
ATOL = 1e-3
STANDARD_DOMAINS = ("", "ai.onnx")
FORBIDDEN_OPS = ("Loop", "Scan")
MAX_GRAPH_NODES = 50_000  # the default model's graph has ~2,000
MAX_OPSET = 22
MAX_PROBE_INPUTS = 8


log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
CPU_EP, CUDA_EP, TENSORRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


class GraphError(RuntimeError):
    """A graph that breaks the rules a package's graph must follow, or that ran past its time limit."""


def gpu_visible(dev: Path = Path("/dev")) -> bool:
    """Whether an NVIDIA GPU is visible to this process (its device files; no driver call, no torch)."""
    return any(p.name[len("nvidia"):].isdigit() for p in dev.glob("nvidia[0-9]*"))


def execution_providers(device: str, available: Sequence[str], gpu: bool) -> tuple[list[str], str]:
    """ONNX Runtime's providers for `device`, and why (logged by the caller). `available`: what the installed
    onnxruntime offers (`onnxruntime.get_available_providers()`; the CPU wheel has the CPU provider only,
    `onnxruntime-gpu` adds CUDA and TensorRT); `gpu`: whether a GPU is visible.

    - cpu: the CPU provider.
    - cuda: TensorRT (when offered), CUDA, then CPU for the operators they lack; GraphError without a GPU
      or without a CUDA-enabled onnxruntime: asked for a GPU, it does not quietly run on the CPU.
    - auto: as cuda when both are there, else the CPU, saying which one was missing.
    """
    if device not in DEVICES:
        raise GraphError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    gpu_chain = [p for p in (TENSORRT_EP, CUDA_EP) if p in available] + [CPU_EP]
    missing = ("no NVIDIA GPU is visible (/dev/nvidia*)" if not gpu else
               f"this onnxruntime has no {CUDA_EP} (offered: {', '.join(available)}; install onnxruntime-gpu)"
               if CUDA_EP not in available else "")
    if device == "cpu":
        return [CPU_EP], "on the CPU (--device cpu)"
    if not missing:
        return gpu_chain, f"on the GPU: {', '.join(gpu_chain)}"
    if device == "cuda":
        raise GraphError(f"--device cuda: {missing}")
    return [CPU_EP], f"on the CPU: {missing} (--device auto falls back)"


def providers_here(device: str) -> tuple[list[str], str]:
    """`execution_providers` for this machine: the installed onnxruntime's providers and its visible GPUs."""
    import onnxruntime as ort

    return execution_providers(device, ort.get_available_providers(), gpu_visible())


def detection_mismatch(got: dict[str, Any], expected: dict[str, Any], atol: float = ATOL) -> str:
    """Why two sets of detections (`OUTPUTS` keys; numpy arrays or tensors) differ beyond `atol`, or "" when
    they agree. Order is free among detections whose scores tie within `atol` (float rounding may swap
    them), and so is which of several tied detections at the lowest kept score made the cut."""
    boxes, labels, scores, masks = (np.asarray(got[k]) for k in OUTPUTS)
    e_boxes, e_labels, e_scores, e_masks = (np.asarray(expected[k]) for k in OUTPUTS)
    if len(scores) != len(e_scores):
        return f"{len(scores)} detections, expected {len(e_scores)}"
    if (boxes.shape[1:], masks.shape[1:]) != (e_boxes.shape[1:], e_masks.shape[1:]):
        return f"boxes {boxes.shape} and masks {masks.shape}, expected {e_boxes.shape} and {e_masks.shape}"
    unused = list(range(len(scores)))
    floor = float(np.concatenate([scores, e_scores]).min()) + atol if len(scores) else 0.0
    for i in range(len(e_scores)):
        for j in unused:
            if (labels[j] == e_labels[i] and abs(float(scores[j]) - float(e_scores[i])) <= atol
                    and np.allclose(boxes[j], e_boxes[i], atol=atol, rtol=0)):
                if not np.allclose(masks[j], e_masks[i], atol=atol, rtol=0):
                    diff = float(np.abs(masks[j] - e_masks[i]).max())
                    return f"the mask of detection {i} differs by {diff:.2e} (expected at most {atol})"
                unused.remove(j)
                break
        else:
            if float(e_scores[i]) > floor:  # not a tie at the cut
                return (f"detection {i} (label {int(e_labels[i])}, score {float(e_scores[i]):.5f}, box "
                        f"{[round(float(v), 3) for v in e_boxes[i]]}) has no counterpart within {atol}")
    return ""


@dataclass(frozen=True)
class Probe:
    """A few inputs of the network (normalised, padded images with their sizes before padding) and the
    detections the package's weights give on them in eager PyTorch: stored in the package as `probe.npz`,
    so that whoever loads it can check that the network it is about to serve answers as the weights did."""

    inputs: list[dict[str, np.ndarray]]
    expected: list[dict[str, np.ndarray]]

    def mismatch(self, run: Any, timeout_s: float | None = None) -> str:
        """Run `run(images, image_size, timeout_s)` on every input; why its answers differ from the expected
        ones, or "" when they agree within `ATOL`."""
        for n, (feed, expected) in enumerate(zip(self.inputs, self.expected)):
            got = run(feed["images"], feed["image_size"], timeout_s)
            problem = detection_mismatch(dict(zip(OUTPUTS, got)), expected)
            if problem:
                return f"probe input {n} ({'x'.join(map(str, feed['images'].shape))}): {problem}"
        return ""

    def to_bytes(self) -> bytes:
        arrays = {f"{k}_{n}": v for n, feed in enumerate(self.inputs) for k, v in feed.items()}
        arrays.update({f"{k}_{n}": v for n, out in enumerate(self.expected) for k, v in out.items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # stored, not deflated: the reader refuses compressed records
        return buf.getvalue()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Probe:
        """Rebuild from `probe.npz`'s arrays, checking names, dtypes and shapes (ValueError names the array)."""
        count = len(arrays) // (len(INPUTS) + len(OUTPUTS))
        if not 1 <= count <= MAX_PROBE_INPUTS or len(arrays) != count * (len(INPUTS) + len(OUTPUTS)):
            raise ValueError(f"expected 1 to {MAX_PROBE_INPUTS} inputs of {INPUTS + OUTPUTS}, got arrays {sorted(arrays)[:20]}")
        inputs, expected = [], []
        for n in range(count):
            try:
                feed = {k: arrays[f"{k}_{n}"] for k in INPUTS}
                out = {k: arrays[f"{k}_{n}"] for k in OUTPUTS}
            except KeyError as exc:
                raise ValueError(f"array {exc.args[0]} is missing") from None
            images, size = feed["images"], feed["image_size"]
            if images.dtype != np.float32 or images.ndim != 4 or images.shape[:2] != (1, 3):
                raise ValueError(f"images_{n}: expected float32 1x3xHxW, got {images.dtype} {images.shape}")
            if size.dtype != np.int64 or size.shape != (2,) or not (0 < size[0] <= images.shape[2] and 0 < size[1] <= images.shape[3]):
                raise ValueError(f"image_size_{n}: expected int64 [h, w] within the image, got {size.dtype} {size.tolist()}")
            k = len(out["scores"])
            shapes = {"boxes": (k, 4), "labels": (k,), "scores": (k,), "masks": (k, 1, 28, 28)}
            for name, shape in shapes.items():
                if out[name].shape != shape:
                    raise ValueError(f"{name}_{n}: expected shape {shape}, got {out[name].shape}")
            inputs.append(feed)
            expected.append(out)
        return cls(inputs, expected)


class OnnxDetector:
    """An ONNX Runtime session for `detector.onnx` on `threads` intra-op threads, on the CPU or the GPU
    (`device`, see `execution_providers`). Loads from bytes, so the graph that runs is the one whose
    checksum was verified."""

    backend = "onnxruntime"

    def __init__(self, graph: bytes, threads: int, device: Device = "cpu"):
        import onnxruntime as ort

        providers, why = providers_here(device)
        log.info("the graph runs %s", why)

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(graph, options, providers=providers)
        self.providers = self.session.get_providers()
        inputs = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if inputs != INPUTS or outputs != OUTPUTS:
            raise GraphError(f"not a detector graph: inputs {inputs}, outputs {outputs}; expected {INPUTS}, {OUTPUTS}")
        self.threads = options.intra_op_num_threads

    def run(self, images: Any, image_size: Any, timeout_s: float | None = None) -> tuple[np.ndarray, ...]:
        """The graph's outputs (numpy) for one normalized, padded image `1x3xHxW` and its size before padding.
        With `timeout_s`, a run still going after that many seconds is stopped (GraphError)."""
        import onnxruntime as ort

        feeds = {"images": np.ascontiguousarray(np.asarray(images), dtype=np.float32),
                 "image_size": np.asarray(image_size, dtype=np.int64)}
        if timeout_s is None:
            return tuple(self.session.run(None, feeds))
        options = ort.RunOptions()
        timer = threading.Timer(timeout_s, lambda: setattr(options, "terminate", True))
        timer.start()
        try:
            return tuple(self.session.run(None, feeds, options))
        except Exception:
            if options.terminate:
                raise GraphError(f"the graph ran longer than {timeout_s:g} s and was stopped") from None
            raise
        finally:
            timer.cancel()


def check_graph(graph: bytes, where: str, names: Sequence[str] = ()) -> dict[str, tuple[int, ...]]:
    """Refuse a graph that could reach outside its bytes or run without bound, before ONNX Runtime sees
    it: external data (a tensor whose bytes live in a file, resolved from the working folder), operators
    outside the standard ONNX domain, loops (`Loop`, `Scan`: the exporter never writes them), more than
    `MAX_GRAPH_NODES` nodes, or an opset newer than `MAX_OPSET`. Raises GraphError naming the rule.

    Returns the shapes of the main graph's initializers named in `names` that it has (the exporter keeps
    the weights' names: the package checks its head's size against the label map there)."""
    import onnx

    try:
        model = onnx.load_model_from_string(graph)  # never reads external data itself
    except Exception as exc:  # protobuf's DecodeError and friends
        raise GraphError(f"{where}: not an ONNX model ({type(exc).__name__})") from None
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise GraphError(f"{where}: imports operator domain {opset.domain!r}; only the standard ONNX domain is allowed")
        if opset.version > MAX_OPSET:
            raise GraphError(f"{where}: opset {opset.version}; at most {MAX_OPSET} is allowed")
    if model.functions:
        raise GraphError(f"{where}: defines {len(model.functions)} local function(s); none are allowed")
    nodes = 0
    pending = [model.graph]
    while pending:
        g = pending.pop()
        tensors = [*g.initializer, *(s.values for s in g.sparse_initializer)]
        for node in g.node:
            nodes += 1
            if node.domain not in STANDARD_DOMAINS:
                raise GraphError(f"{where}: node {node.name!r} uses operator domain {node.domain!r}; only the "
                                      f"standard ONNX domain is allowed")
            if node.op_type in FORBIDDEN_OPS:
                raise GraphError(f"{where}: node {node.name!r} is a {node.op_type}; loops are not allowed in a "
                                      f"detector graph")
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors, *(s.values for s in attr.sparse_tensors)]
                pending += [attr.g, *attr.graphs] if attr.g.ByteSize() or attr.graphs else []
        if nodes > MAX_GRAPH_NODES:
            raise GraphError(f"{where}: more than {MAX_GRAPH_NODES} nodes")
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise GraphError(f"{where}: tensor {tensor.name!r} keeps its data in an external file "
                                      f"({[e.value for e in tensor.external_data if e.key == 'location'][:1]}); a "
                                      f"package's graph must be self-contained")
    return {t.name: tuple(t.dims) for t in model.graph.initializer if t.name in names}
