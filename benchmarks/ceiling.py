"""The default model's work beside this machine's ceiling.

    uv run python benchmarks/ceiling.py [--config default] [--threads N]

Prints, on the same threads:
  - the machine's measured float32 matmul FLOP/s (the best of several square products): the ceiling;
  - the default model's FLOPs per image at its configured size, for inference and for one training step
    (forward + backward, counted by torch's FlopCounterMode on real synthetic images and targets);
  - the measured images/s of each, the FLOP/s they achieve, and that as a share of the ceiling;
  - inference again with the network as the serving package's ONNX graph in ONNX Runtime (what the
    predictor runs), at PyTorch's FLOP count for the same work; PyTorch keeps one thread, as in the predictor.

FlopCounterMode counts matmuls and convolutions (and a few others), not element-wise work, RoI Align or
NMS, so the shares are of the dense arithmetic only: an upper bound on what faster kernels can win.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_flops_per_s(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sample_batch(cfg, count: int):
    """Images and targets from the embedded synthetic dataset, at the configured size."""
    from training.data.prepare import prepare_data
    from training.data.coco import CocoDataset

    data = prepare_data(cfg.data, validate=False)
    dataset = CocoDataset(data.train, None, max_pixels=cfg.data.max_image_pixels)
    items = [dataset[i] for i in range(count)]
    return [image for image, _ in items], [target for _, target in items], data.label_map.num_classes


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_inference_seconds(model, image, threads: int, repeats: int) -> float:
    """Seconds per image for the transform plus the network as an ONNX graph in ONNX Runtime."""
    import tempfile
    from pathlib import Path

    from training.onnx_detector import OnnxDetector, export_onnx

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        graph = OnnxDetector(export_onnx(model, Path(tmp) / "detector.onnx").read_bytes(), threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timed(lambda: graph(model.transform([image])[0]), repeats)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from training.config import load_config
    from training.model import build_model

    cfg = load_config(args.config, [])
    batch = cfg.train.batch_size
    images, targets, num_classes = sample_batch(cfg, batch)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer_one() -> None:
        model.eval()
        with torch.inference_mode():
            model([images[0]])

    def train_step() -> None:
        model.train()
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    ceiling = matmul_flops_per_s()
    infer_flops = count_flops(infer_one)
    train_flops = count_flops(train_step) / batch
    infer_s = timed(infer_one, args.repeats)
    train_s = timed(train_step, args.repeats) / batch
    graph_s = onnx_inference_seconds(model, images[0], args.threads, args.repeats)

    print(f"threads {args.threads}; config {args.config}: {cfg.model.backbone}, {cfg.model.min_size}-{cfg.model.max_size} px, "
          f"training batch {batch}")
    print(f"ceiling: float32 matmul 1024x1024, best of 10: {ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'work':<22}{'GFLOP/img':>11}{'ms/img':>9}{'img/s':>8}{'GFLOP/s':>9}{'of ceiling':>12}")
    for name, flops, seconds in (("inference (1 image)", infer_flops, infer_s),
                                 ("inference, ONNX Runtime", infer_flops, graph_s),
                                 (f"training step (/{batch})", train_flops, train_s)):
        achieved = flops / seconds
        print(f"{name:<22}{flops / 1e9:>11.3f}{seconds * 1e3:>9.1f}{1 / seconds:>8.1f}{achieved / 1e9:>9.1f}"
              f"{achieved / ceiling:>11.1%}")


if __name__ == "__main__":
    main()
