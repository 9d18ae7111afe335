"""The predictor's forward pass on CPU: eager PyTorch against in-process alternatives, speed and mAP.

For one trained serving package, each backend is timed on the same threads with `maskrcnn.processing.detect`
(the predictor's own pre-processing, network and post-processing, at the package's score threshold) on validation images
resized to each `--sizes` square, and scored (segm/bbox mAP) on the validation split at its native size.
A backend is a candidate only if its segm mAP is within 0.005 of eager.

Backends: eager float32; channels_last (weights and the backbone's input in NHWC); dynamic int8 (the box
head's Linear layers, `torch.ao.quantization.quantize_dynamic`); torch.compile of the backbone (inductor);
ONNX Runtime on the package's `detector.onnx` (what the predictor runs; PyTorch then keeps one thread for
pre- and post-processing, as in the predictor); OpenVINO on the same graph at its default precision (bf16
on CPUs with native bf16) and at float32, when `openvino` is importable (not a dependency: add
`--with openvino`). "false dets": detections a graph backend returns / images where eager finds none.
"network" times the network alone (backbone to mask head, or the graph) on the resized image; "detect" adds
pre-processing and mask pasting at the upload's size.

    uv run [--with openvino] python benchmarks/forward_backends.py --package DIR [--threads 2] [--sizes 256 640] [--runs 20]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.data.prepare import prepare_data
from maskrcnn.model import input_sizes
from maskrcnn.eager import eager_runner
from maskrcnn.processing import detect
from training.evaluate import evaluate_model
from maskrcnn.package import open_package
from maskrcnn.logs import setup_logging
from maskrcnn.onnx_runtime import ONNX_FILE, OUTPUTS, OnnxDetector

log = logging.getLogger("benchmark")


def _channels_last(model: torch.nn.Module) -> torch.nn.Module:
    model = model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(lambda _, args: (args[0].contiguous(memory_format=torch.channels_last),))
    return model


def _int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    model.backbone = torch.compile(model.backbone, dynamic=False)
    return model


BACKENDS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "eager": lambda m: m,
    "channels_last": _channels_last,
    "int8 dynamic": _int8_dynamic,
    "torch.compile": _compiled,
}


class OpenVinoDetector:
    """`detector.onnx` compiled by OpenVINO's CPU plugin at `precision` ("f32", or "auto": bf16 on CPUs with
    native bf16), with `OnnxDetector`'s call signature."""

    def __init__(self, path: str, threads: int, precision: str):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.model = ov.Core().compile_model(path, "CPU", config)
        self.precision = self.model.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.request = self.model.create_infer_request()

    def run(self, images: np.ndarray, image_size: np.ndarray, timeout_s: float | None = None) -> tuple[np.ndarray, ...]:
        result = self.request.infer({"images": images, "image_size": np.asarray(image_size, dtype=np.int64)})
        return tuple(np.array(result[self.model.output(n)]) for n in OUTPUTS)


def graph_backends(package: str, threads: int) -> dict[str, Callable[[], object]]:
    """The package's graph in ONNX Runtime (the predictor's runtime), and in OpenVINO when importable."""
    found: dict[str, Callable[[], object]] = {"onnxruntime": lambda: OnnxDetector(open_package(package).graph, threads)}
    if importlib.util.find_spec("openvino") is not None:
        for precision in ("auto", "f32"):
            found[f"openvino {precision}"] = lambda p=precision: OpenVinoDetector(f"{package}/{ONNX_FILE}", threads, p)
    return found


def empty_image_errors(model, graph, count: int = 30) -> str:
    """"D/E": detections the graph returns (D, must be 0) on the E images, of `count` flat grey and
    uniform-noise images, where eager PyTorch finds none; "-" for the PyTorch variants (no graph)."""
    if graph is None:
        return "-"
    rng = np.random.default_rng(0)
    errors = empty = 0
    for k in range(count):
        if k % 2:
            image = torch.full((3, 128, 128), float(rng.uniform()))
        else:
            image = torch.from_numpy(rng.uniform(0, 1, (3, 96, 128)).astype(np.float32))
        batch, _ = model.transform([image])
        with torch.inference_mode():
            features = model.backbone(batch.tensors)
            (expected,), _ = model.roi_heads(features, model.rpn(batch, features)[0], batch.image_sizes)
        if len(expected["scores"]) == 0:
            empty += 1
            errors += len(_graph_run(graph, batch)[2])
    return f"{errors}/{empty}"


def _graph_run(graph, batch) -> tuple[np.ndarray, ...]:
    return graph.run(batch.tensors[:1].numpy(), np.asarray(batch.image_sizes[0], np.int64))


def _detect(model, graph, image: torch.Tensor, mask_threshold: float, threshold: float):
    network = graph.run if graph is not None else eager_runner(model)
    return detect(network, image.permute(1, 2, 0).numpy(), *input_sizes(model), mask_threshold, threshold)


@torch.inference_mode()
def network(model, graph, image: torch.Tensor) -> None:
    batch, _ = model.transform([image])
    if graph is not None:
        _graph_run(graph, batch)
        return
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    model.roi_heads(features, proposals, batch.image_sizes)


def median_ms(fn, images: list[torch.Tensor]) -> float:
    for image in images[:3]:
        fn(image)
    ms = []
    for image in images[3:]:
        t0 = time.perf_counter()
        fn(image)
        ms.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ms)


def score(model, graph, val, config) -> float:
    metrics, _ = evaluate_model(model, val, config.eval, network=graph)
    return metrics["segm_mAP"]


def _images(split, size: int, count: int) -> list[torch.Tensor]:
    from training.data.dataset import CocoDataset

    dataset = CocoDataset(split)
    out = []
    for i in range(min(count, len(dataset))):
        image, _ = dataset[i]
        out.append(F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True, help="a serving package folder (`uv run -m training.export CKPT OUT`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 640])
    p.add_argument("--runs", type=int, default=20, help="timed images per size and pass (after 3 warm-up)")
    p.add_argument("--passes", type=int, default=2, help="passes over all backends, in the same order (drift is shared)")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, "%(message)s")
    torch.set_num_threads(args.threads)
    opened = open_package(args.package)
    base, config = opened.build_model(), opened.config
    base.eval()
    val = prepare_data(config.data, validate=False).val
    threshold, mask_threshold = config.eval.score_threshold, config.eval.mask_threshold
    images = {size: _images(val, size, args.runs + 3) for size in args.sizes}
    backends = []  # (name, model, graph, PyTorch threads, setup seconds, segm mAP)
    for name, make in BACKENDS.items():
        started = time.perf_counter()
        model = make(copy.deepcopy(base))
        _detect(model, None, images[args.sizes[0]][0], mask_threshold, threshold)  # compiles, for torch.compile
        backends.append((name, model, None, args.threads, time.perf_counter() - started))
    for name, make_graph in graph_backends(args.package, args.threads).items():
        started = time.perf_counter()
        try:
            graph = make_graph()
        except Exception as exc:  # a runtime that cannot take the graph is a result too
            print(f"{name}: not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        name = f"openvino {graph.precision}" if name == "openvino auto" else name  # what `auto` chose on this CPU
        backends.append((name, base, graph, 1, time.perf_counter() - started))
    timings: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.passes):
        for name, model, graph, threads, _ in backends:
            torch.set_num_threads(threads)
            for size, batch in images.items():
                timings.setdefault((name, "network", size), []).append(median_ms(lambda i: network(model, graph, i), batch))
                timings.setdefault((name, "detect", size), []).append(
                    median_ms(lambda i: _detect(model, graph, i, mask_threshold, threshold), batch))
    rows = []
    for name, model, graph, threads, setup_s in backends:
        torch.set_num_threads(threads)
        rows.append((name, {k[1:]: statistics.median(v) for k, v in timings.items() if k[0] == name},
                     score(model, graph, val, config), setup_s, empty_image_errors(model, graph)))
    print(f"\npackage {args.package}: {config.model.backbone} at {config.model.min_size} px, {args.threads} threads, "
          f"score threshold {threshold}, median over {args.passes} passes of the median of {args.runs} images")
    eager = rows[0]
    head = "".join(f"{f'{part} @{s}':>14}{'x eager':>8}" for part in ("network", "detect") for s in args.sizes)
    print(f"{'backend':<15}{head}{'segm mAP':>10}{'delta':>8}{'setup s':>9}{'false dets':>12}")
    for name, ms, segm, setup_s, false_dets in rows:
        cells = "".join(f"{ms[(part, s)]:>11.1f} ms{eager[1][(part, s)] / ms[(part, s)]:>7.2f}x"
                        for part in ("network", "detect") for s in args.sizes)
        print(f"{name:<15}{cells}{segm:>10.4f}{segm - eager[2]:>+8.4f}{setup_s:>9.1f}{false_dets:>12}")
    if importlib.util.find_spec("openvino") is None:
        print("OpenVINO: not measured: `openvino` is not installed (not a dependency: `uv run --with openvino ...`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
