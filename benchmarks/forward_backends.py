"""The predictor's forward pass on CPU: eager PyTorch against in-process alternatives, speed and mAP.

For one trained serving package, each backend is timed on the same threads with `training.engine.detect`
(the predictor's own inference and post-processing, at the package's score threshold) on validation images
resized to each `--sizes` square, and scored (segm/bbox mAP) on the validation split at its native size.
A backend is a candidate only if its segm mAP is within 0.005 of eager.

Backends: eager float32; channels_last (weights and the backbone's input in NHWC); dynamic int8 (the box
head's Linear layers, `torch.ao.quantization.quantize_dynamic`); torch.compile of the backbone (inductor).
ONNX Runtime and OpenVINO are listed as not measured unless importable (neither is a dependency).

    uv run python benchmarks/forward_backends.py --package DIR [--threads 2] [--sizes 256 640] [--runs 20]
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

import torch
import torch.nn.functional as F

from training.data.prepare import prepare_data
from training.engine import detect
from training.evaluate import evaluate_model
from training.export import load_package
from training.logs import setup_logging

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


def _images(split, size: int, count: int) -> list[torch.Tensor]:
    from training.data.coco import CocoDataset

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
    p.add_argument("--runs", type=int, default=20, help="timed images per size (after 3 warm-up)")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, "%(message)s")
    torch.set_num_threads(args.threads)
    base, config, _ = load_package(args.package)
    base.eval()
    val = prepare_data(config.data, validate=False).val
    score = config.eval.score_threshold
    images = {size: _images(val, size, args.runs + 3) for size in args.sizes}
    rows = []
    for name, make in BACKENDS.items():
        started = time.perf_counter()
        model = make(copy.deepcopy(base))
        detect(model, images[args.sizes[0]][:1], config.eval.mask_threshold, score)  # compiles, for torch.compile
        setup_s = time.perf_counter() - started
        metrics, _ = evaluate_model(model, val, config.eval)
        timings = {}
        for size, batch in images.items():
            for image in batch[:3]:
                detect(model, [image], config.eval.mask_threshold, score)
            ms = []
            for image in batch[3:]:
                t0 = time.perf_counter()
                detect(model, [image], config.eval.mask_threshold, score)
                ms.append(1000 * (time.perf_counter() - t0))
            timings[size] = statistics.median(ms)
        rows.append((name, timings, metrics["segm_mAP"], metrics["bbox_mAP"], setup_s))
    print(f"\npackage {args.package}: {config.model.backbone} at {config.model.min_size} px, {args.threads} threads, "
          f"score threshold {score}, median of {args.runs} images per size")
    eager = rows[0]
    head = "".join(f"{f'ms @ {s}px':>12}{'vs eager':>9}" for s in args.sizes)
    print(f"{'backend':<15}{head}{'segm mAP':>10}{'delta':>8}{'bbox mAP':>10}{'setup s':>9}")
    for name, timings, segm, bbox, setup_s in rows:
        cells = "".join(f"{timings[s]:>12.1f}{eager[1][s] / timings[s]:>8.2f}x" for s in args.sizes)
        print(f"{name:<15}{cells}{segm:>10.4f}{segm - eager[2]:>+8.4f}{bbox:>10.4f}{setup_s:>9.1f}")
    for name, module in (("ONNX Runtime", "onnxruntime"), ("OpenVINO", "openvino")):
        if importlib.util.find_spec(module) is None:
            print(f"{name:<15}not measured: `{module}` is not installed (not a dependency of this project)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
