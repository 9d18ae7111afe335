"""Batch inference speed: `python -m batch` on Ray Data against a plain ONNX Runtime loop and the HTTP
predictor, over the same images, on the same threads, in one run.

- plain loop: one process, the package's graph in ONNX Runtime (THREADS threads) with the pre- and
  post-processing of `maskrcnn.processing.detect`, image after image: the compute a batch job cannot beat;
- batch: `python -m batch` (a local Ray, one actor of THREADS threads, shards of 16): images/s of its
  actor on the shards (reading, inference, writing the results; the steady state of a long run), over its
  run (the actor's start, package check and probe included), and over its wall time with Ray's start-up;
- HTTP predictor: `python -m serving` (THREADS threads) on 127.0.0.1, the images sent by 2 clients.
The package is the default config's architecture with seeded weights (`serving_vs_flask.make_package`);
every detection above 0.05 is kept by all three.

    uv run python benchmarks/batch_inference.py [--images 384] [--image-size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_vs_flask import images as make_images, make_package  # noqa: E402

from devstack.load import predictor, run_load  # noqa: E402
from maskrcnn.logs import setup_logging  # noqa: E402

log = logging.getLogger("benchmarks.batch")


def plain_loop(package_dir: Path, files: list[Path], threads: int) -> float:
    """Images/s of the package's graph over `files`, one after another, in this process."""
    from maskrcnn.images import decode_image
    from maskrcnn.onnx_runtime import OnnxDetector
    from maskrcnn.package import open_package
    from maskrcnn.processing import detect

    package = open_package(package_dir, weights=False)
    run, sizes = OnnxDetector(package.graph, threads).run, (package.config.model.min_size, package.config.model.max_size)
    detect(run, decode_image(files[0]), *sizes, 0.5, 0.05, 100)  # warm-up
    began = time.perf_counter()
    for path in files:
        detect(run, decode_image(path), *sizes, package.config.eval.mask_threshold, 0.05, 100)
    return len(files) / (time.perf_counter() - began)


def batch_run(package_dir: Path, folder: Path, out: Path, threads: int) -> tuple[float, float, float]:
    """(images/s on the shards, images/s over the run, wall seconds with Ray's start) of `python -m batch`."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batch", str(folder), str(out), "--package", str(package_dir),
                           "--shard-size", "16", "--threads", str(threads), "--score-threshold", "0.05"],
                          capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    totals = json.loads(re.search(r"done: (\{.*\})", done.stderr).group(1))
    return totals["images"] / totals["shard_seconds"], totals["images"] / totals["seconds"], wall


def http_run(package_dir: Path, bodies: list[bytes], threads: int, log_file: Path) -> float:
    with predictor(package_dir, log_file, "--threads", str(threads), "--score-threshold", "0.05") as server:
        run_load(server.url, bodies[:4], 2)  # warm-up
        began = time.perf_counter()
        result = run_load(server.url, bodies, 2, timeout=300)
        rate = len(bodies) / (time.perf_counter() - began)
    if result.errors or result.statuses.get(503):
        raise RuntimeError(f"the predictor answered {dict(result.statuses)}")
    return rate


def main() -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        package_dir = make_package(root, args.image_size)
        folder = root / "images"
        folder.mkdir()
        encoded = make_images(args.images, args.image_size)
        files = []
        for i, b64 in enumerate(encoded):
            path = folder / f"{i:05d}.png"
            path.write_bytes(base64.b64decode(b64))
            files.append(path)
        bodies = [json.dumps({"instances": [{"image": {"b64": b64}}]}).encode() for b64 in encoded]
        plain = plain_loop(package_dir, files, args.threads)
        steady, batch_rate, batch_wall = batch_run(package_dir, folder, root / "out", args.threads)
        http = http_run(package_dir, bodies, args.threads, root / "predictor.log")
    print(f"{args.images} images of {args.image_size} px, {args.threads} threads, one run")
    print(f"{'path':<46}{'images/s':>10}{'x plain loop':>14}")
    for name, rate in (("plain ONNX Runtime loop (one process)", plain),
                       ("batch on Ray Data (its actor on the shards)", steady),
                       ("batch on Ray Data (over its run)", batch_rate),
                       (f"batch, wall with Ray's start ({batch_wall:.1f} s)", args.images / batch_wall),
                       ("HTTP predictor (2 clients)", http)):
        print(f"{name:<46}{rate:>10.2f}{rate / plain:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
