"""The default model's work beside this machine's ceiling.

    uv run python benchmarks/ceiling.py [--config default] [--threads N] [--set key=value ...]
    uv run python benchmarks/ceiling.py --device cuda --config gpu --set data.synthetic.image_size=800

Prints, on the same threads (or the one GPU):
  - the machine's measured float32 matmul FLOP/s (the best of several square products): the ceiling;
  - the default model's FLOPs per image at its configured size, for inference and for one training step
    (forward + backward, counted by torch's FlopCounterMode on real synthetic images and targets);
  - the measured images/s of each, the FLOP/s they achieve, and that as a share of the ceiling;
  - inference again with the network as the serving package's ONNX graph in ONNX Runtime (what the
    predictor runs), at PyTorch's FLOP count for the same work; PyTorch keeps one thread, as in the predictor
    (CPU only): one image at a time on all threads, and as the predictor runs it by default, one image per
    thread at once on a single-thread session (images/s over all of them).

On `--device cuda` the training step runs under autocast with a GradScaler when the config has
`train.amp` (the `gpu` config does), as the training loop does, and a second ceiling is measured: the
float16 matmul (tensor cores), against which the mixed-precision rows are also reported. Timings
synchronize the device. This path has not yet run on a GPU here (issue 12, item 5).

FlopCounterMode counts matmuls and convolutions (and a few others), not element-wise work, RoI Align or
NMS, so the shares are of the dense arithmetic only: an upper bound on what faster kernels can win.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_flops_per_s(size: int = 1024, repeats: int = 10, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sample_batch(cfg, count: int):
    """Images and targets from the embedded synthetic dataset, at the configured size."""
    from training.data.prepare import prepare_data
    from training.data.dataset import CocoDataset

    data = prepare_data(cfg.data, validate=False)
    dataset = CocoDataset(data.train, None, max_pixels=cfg.data.max_image_pixels)
    items = [dataset[i] for i in range(count)]
    return [image for image, _ in items], [target for _, target in items], data.label_map.num_classes


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_inference_seconds(model, image, threads: int, repeats: int) -> tuple[float, float]:
    """Seconds per image for the transform plus the network as an ONNX graph in ONNX Runtime: one image at a
    time on `threads` intra-op threads, and `threads` images at once on one single-thread session (the
    predictor's default, `--inference-workers`), over `threads` x 4 images."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from maskrcnn.onnx_runtime import OnnxDetector
    from maskrcnn.model import input_sizes
    from training.onnx_export import export_onnx
    from maskrcnn.processing import preprocess

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        graph_bytes = export_onnx(model, Path(tmp) / "detector.onnx").read_bytes()
    one_at_a_time, per_thread = OnnxDetector(graph_bytes, threads), OnnxDetector(graph_bytes, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pixels = image.permute(1, 2, 0).cpu().numpy()
        sizes = input_sizes(model)
        single = timed(lambda: one_at_a_time.run(*preprocess(pixels, *sizes)), repeats)
        count = threads * 4
        with ThreadPoolExecutor(threads) as pool:
            def side_by_side() -> None:
                list(pool.map(lambda _: per_thread.run(*preprocess(pixels, *sizes)), range(count)))
            concurrent = timed(side_by_side, repeats) / count
        return single, concurrent
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the main command's --set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    from maskrcnn.config import load_config
    from maskrcnn.model import build_model

    cfg = load_config(args.config, args.overrides)
    batch = cfg.train.batch_size
    images, targets, num_classes = sample_batch(cfg, batch)
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    amp = bool(cfg.train.amp) and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def infer_one() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            model([images[0]])

    def train_step() -> None:
        model.train()
        with torch.autocast("cuda", enabled=amp):
            losses = model(images, targets)
        optimizer.zero_grad()
        loss = sum(losses.values())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    ceiling = matmul_flops_per_s(device=device)
    half_ceiling = matmul_flops_per_s(4096, device=device, dtype=torch.float16) if amp else None
    infer_flops = count_flops(infer_one)
    train_flops = count_flops(train_step) / batch
    infer_s = timed(infer_one, args.repeats, device)
    train_s = timed(train_step, args.repeats, device) / batch
    rows = [("inference (1 image)", infer_flops, infer_s)]
    if device == "cpu":
        single, concurrent = onnx_inference_seconds(model, images[0], args.threads, args.repeats)
        rows.append(("inference, ONNX Runtime", infer_flops, single))
        rows.append((f"  {args.threads} at once, 1 thread", infer_flops, concurrent))
    rows.append((f"training step (/{batch})", train_flops, train_s))

    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"threads {args.threads}"
    print(f"{where}; config {args.config}: {cfg.model.backbone}, {cfg.model.min_size}-{cfg.model.max_size} px, "
          f"images {cfg.data.synthetic.image_size} px, training batch {batch}, mixed precision {amp}")
    print(f"ceiling: float32 matmul 1024x1024, best of 10: {ceiling / 1e9:.1f} GFLOP/s")
    if half_ceiling:
        print(f"ceiling: float16 matmul 4096x4096, best of 10: {half_ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'work':<24}{'GFLOP/img':>11}{'ms/img':>9}{'img/s':>8}{'GFLOP/s':>9}{'of fp32 ceiling':>17}"
          + (f"{'of fp16 ceiling':>17}" if half_ceiling else ""))
    for name, flops, seconds in rows:
        achieved = flops / seconds
        half = f"{achieved / half_ceiling:>16.1%}" if half_ceiling else ""
        print(f"{name:<24}{flops / 1e9:>11.3f}{seconds * 1e3:>9.1f}{1 / seconds:>8.1f}{achieved / 1e9:>9.1f}"
              f"{achieved / ceiling:>16.1%}{half}")


if __name__ == "__main__":
    main()
