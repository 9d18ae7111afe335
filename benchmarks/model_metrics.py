"""The cost of the predictor's model metrics (`serving/observe.py`) per image, in one run.

    uv run python benchmarks/model_metrics.py [--images 24] [--rounds 5] [--image-size 320]

The predictor (ONNX Runtime, the default config's architecture with seeded weights) runs the same decoded
images with its metrics on and with them replaced by no-ops, in alternating rounds; the table gives images/s
for each and their ratio. Then the metrics' own calls alone (input statistics, the forward pass's timer,
detections, scores and classes, the request's latency) are timed per image at 0.25, 1 and 4 megapixels.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving_vs_flask import images, make_package  # noqa: E402


class NoMetrics:
    """ModelMetrics' interface, doing nothing."""

    def image(self, image) -> None:
        pass

    @contextlib.contextmanager
    def forward(self):
        yield

    def detections(self, detections) -> None:
        pass


def throughput(predictor, decoded: list[np.ndarray]) -> float:
    began = time.perf_counter()
    for image in decoded:
        predictor.infer([image], 0.05, 100, False)
    return len(decoded) / (time.perf_counter() - began)


def metric_calls_us(metrics, megapixels: float, detections: int, repeats: int = 200) -> float:
    from serving.observe import REQUEST_SECONDS

    side = int((megapixels * 1e6) ** 0.5)
    image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    found = [{"label": "circle", "score": 0.5 + 0.4 * (i % 2)} for i in range(detections)]
    latency = REQUEST_SECONDS.labels("v1", "200", metrics.version)
    began = time.perf_counter()
    for _ in range(repeats):
        metrics.image(image)
        with metrics.forward():
            pass
        metrics.detections(found)
        latency.observe(0.1)
    return (time.perf_counter() - began) / repeats * 1e6


def main() -> None:
    from serving.predictor import MaskRCNNPredictor
    from maskrcnn.images import decode_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=320)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package = make_package(Path(tmp), args.image_size)
        predictor = MaskRCNNPredictor("maskrcnn", str(package))
        assert predictor.load()
        decoded = [decode_image(base64.b64decode(b)) for b in images(args.images, args.image_size)]
        real = predictor.metrics
        throughput(predictor, decoded[:4])  # warm-up
        on, off = [], []
        for _ in range(args.rounds):
            predictor.metrics = real
            on.append(throughput(predictor, decoded))
            predictor.metrics = NoMetrics()
            off.append(throughput(predictor, decoded))
        predictor.metrics = real
    print(f"{args.images} images of {args.image_size} px per round, {args.rounds} rounds alternating (median):")
    print("| | images/s without metrics | images/s with metrics | ratio |")
    print("|---|---|---|---|")
    print(f"| predictor.infer | {statistics.median(off):.2f} | {statistics.median(on):.2f} | "
          f"{statistics.median(on) / statistics.median(off):.3f} |")
    print()
    print("| the metrics' calls per image | 10 detections | 100 detections |")
    print("|---|---|---|")
    for mp in (0.25, 1.0, 4.0):
        print(f"| {mp:g} MP | {metric_calls_us(real, mp, 10):.0f} µs | {metric_calls_us(real, mp, 100):.0f} µs |")


if __name__ == "__main__":
    main()
