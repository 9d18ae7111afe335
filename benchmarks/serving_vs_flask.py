"""Serving speed: the KServe predictor (`python -m serving`) against a naive Flask baseline.

Both serve the same serving package on 127.0.0.1 and get the same images from the same clients: by
default one of the default config's architecture with seeded weights (every server returns everything above
torchvision's 0.05), or a trained package with `--package` (the predictor at its default score threshold,
0.5; the baseline returns what the model returns, as tutorials do). The predictor runs twice: with the
package's ONNX graph in ONNX Runtime (the default backend) and with eager PyTorch (`--backend eager`). Reported per server: cold start (process start to
ready), throughput with C concurrent clients, p50/p99 latency, and the share of latency spent in the
model's forward pass (each server reports its own forward time in `x-forward-ms`). Server overhead
(p50 latency minus forward time, over p50) is measured with one client, where no queueing hides in it;
"in-server" is the same from the server's own clock (`x-server-ms`: request arrival to response start),
which leaves out the client, which shares these cores, and the loopback transfer.

    uv run python benchmarks/serving_vs_flask.py [--package DIR] [--requests 120] [--concurrency 4] [--image-size 256]

On a machine with an NVIDIA GPU (issue 24, item 4; goal <= 10 ms/img at 800 px): every server on the GPU
(the predictor's graph through ONNX Runtime's CUDA provider, TensorRT first when it offers it; the baseline
and the eager predictor's model moved to cuda), the `gpu` config's architecture at 800 px:

    uv run --with onnxruntime-gpu python benchmarks/serving_vs_flask.py --device cuda --config gpu --image-size 800 --requests 200
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devstack.procs import free_port  # noqa: E402
from maskrcnn.logs import setup_logging  # noqa: E402

log = logging.getLogger("benchmarks.serving")


def make_package(folder: Path, image_size: int, config: str = "default") -> Path:
    import torch

    from maskrcnn.config import CONFIG_DIR, load_config
    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    cfg = load_config(CONFIG_DIR / f"{config}.yaml", [f"model.min_size={image_size}", f"model.max_size={image_size}"])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    write_package(build_model(cfg.model, labels.num_classes), cfg, labels, {"model_version": "bench"}, folder / "package")
    return folder / "package"


def images(count: int, size: int) -> list[str]:
    from PIL import Image
    import io

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        img = np.full((size, size, 3), 40, np.uint8)
        for _ in range(3):
            x, y, s = rng.integers(0, size // 2, 3)
            img[y:y + s + 10, x:x + s + 10] = rng.integers(100, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def start(argv: list[str], ready_url: str, log_file: Path) -> tuple[subprocess.Popen, float]:
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=open(log_file, "wb"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[1:3]} exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=1) as resp:
                if resp.status == 200:
                    return proc, time.perf_counter() - began
        except OSError:
            time.sleep(0.1)


def call(url: str, body: bytes) -> tuple[float, float, int, float]:
    began = time.perf_counter()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        payload = resp.read()
        forward = float(resp.headers["x-forward-ms"]) / 1000
        inside = float(resp.headers["x-server-ms"]) / 1000
    return time.perf_counter() - began, forward, len(payload), inside


def run_load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, float]:
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: call(url, b), bodies))
    wall = time.perf_counter() - began
    lat = sorted(r[0] for r in results)
    return {"throughput": len(bodies) / wall, "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "forward": statistics.median(r[1] for r in results), "bytes": statistics.median(r[2] for r in results),
            "inside": statistics.median(r[3] for r in results)}


def main() -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--package", help="a trained serving package (default: seeded weights at --image-size)")
    parser.add_argument("--config", default="default", help="the seeded package's architecture (maskrcnn/configs/NAME.yaml)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every server runs its model")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    package = Path(args.package) if args.package else make_package(tmp, args.image_size, args.config)
    threshold = "0.5" if args.package else "0.05"
    pictures = images(8, args.image_size)
    root = Path(__file__).resolve().parents[1]
    rows = {}
    for name in ("naive Flask", "KServe predictor, eager", "KServe predictor"):
        port = free_port()
        if name == "naive Flask":
            argv = [sys.executable, str(root / "benchmarks" / "naive_flask_server.py"), str(package), str(port), args.device]
            ready, url = f"http://127.0.0.1:{port}/ready", f"http://127.0.0.1:{port}/predict"
            bodies = [json.dumps({"image": pictures[i % 8]}).encode() for i in range(args.requests)]
        else:
            argv = [sys.executable, "-m", "serving", "--model-dir", str(package), "--host", "127.0.0.1", "--http-port",
                    str(port), "--score-threshold", threshold, "--backend", "eager" if "eager" in name else "auto",
                    "--device", args.device]
            ready, url = f"http://127.0.0.1:{port}/v1/models/maskrcnn", f"http://127.0.0.1:{port}/v1/models/maskrcnn:predict"
            bodies = [json.dumps({"instances": [{"image": {"b64": pictures[i % 8]}}]}).encode() for i in range(args.requests)]
        proc, cold = start(argv, ready, tmp / f"{port}.log")
        try:
            run_load(url, bodies[:8], 2)  # warm-up
            single = run_load(url, bodies[: max(16, args.requests // 4)], 1)
            loaded = run_load(url, bodies, args.concurrency)
        finally:
            proc.terminate()
            proc.wait(30)
        rows[name] = {"cold": cold, "single": single, "loaded": loaded}
        log.info("%s done", name)
    base, ours = rows["naive Flask"], rows["KServe predictor"]
    print(f"\n{args.requests} requests, {args.concurrency} concurrent clients, {args.image_size}px PNG, on {args.device}, same package "
          f"({package}), predictor score threshold {threshold}\n")
    print(f"| server | cold start s | img/s (1 client) | forward ms (1 client) | img/s ({args.concurrency} clients) | p50 ms "
          f"| p99 ms | forward share of p50 | overhead, 1 client | in-server overhead, 1 client | response KB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        s, l = r["single"], r["loaded"]
        print(f"| {name} | {r['cold']:.1f} | {s['throughput']:.2f} | {s['forward'] * 1000:.1f} | {l['throughput']:.2f} | "
              f"{l['p50'] * 1000:.0f} | {l['p99'] * 1000:.0f} | "
              f"{l['forward'] / l['p50']:.0%} | {(s['p50'] - s['forward']) / s['p50']:.1%} | "
              f"{(s['inside'] - s['forward']) / s['inside']:.1%} | {l['bytes'] / 1024:.0f} |")
    eager = rows["KServe predictor, eager"]["loaded"]["throughput"]
    print(f"\npredictor (ONNX Runtime) / predictor (eager): throughput x{ours['loaded']['throughput'] / eager:.2f}")
    print(f"predictor / baseline: throughput x{ours['loaded']['throughput'] / base['loaded']['throughput']:.2f}, "
          f"p50 x{ours['loaded']['p50'] / base['loaded']['p50']:.2f}, p99 x{ours['loaded']['p99'] / base['loaded']['p99']:.2f}, "
          f"response size x{ours['loaded']['bytes'] / base['loaded']['bytes']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
