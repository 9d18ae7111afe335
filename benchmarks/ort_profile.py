"""Where the graph's time goes, by operator, and what that allows against the fp32 matmul ceiling.

ONNX Runtime's own profiler on the package's `detector.onnx`, one single-thread session (as each of the
predictor's inference workers runs it), over the package config's validation images. The operators that
FlopCounterMode counts (convolutions and matrix products: `Conv`, `FusedConv`, `ConvTranspose`, `Gemm`,
`FusedGemm`, `MatMul`) are "dense"; the rest (RoIAlign, NMS, gathers, shape arithmetic, layout reorders)
do work that the FLOP count leaves out. The profiler costs time per node, so the run is also timed
without it (a second session), and the time outside the dense kernels is taken as that run less the dense
kernels' profiled time (long kernels, where the profiler's cost is small). The bound printed is Amdahl's:
the share of the one-thread ceiling the whole forward would reach if every dense operator ran at the
ceiling and the rest took the time it takes now.

    uv run python benchmarks/ort_profile.py --package PKG [--images 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DENSE = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime as ort
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.ceiling import matmul_flops_per_s
    from training.data.dataset import CocoDataset
    from training.data.prepare import prepare_data
    from maskrcnn.onnx_runtime import OnnxDetector
    from maskrcnn.eager import eager_runner
    from maskrcnn.package import open_package
    from maskrcnn.processing import preprocess

    package = open_package(args.package, cache_dir=Path(tempfile.mkdtemp()))
    cfg = package.config
    val = CocoDataset(prepare_data(cfg.data, validate=False).val, None, max_pixels=cfg.data.max_image_pixels)
    inputs = [preprocess((val[i % len(val)][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                         cfg.model.min_size, cfg.model.max_size) for i in range(args.images)]
    torch.set_num_threads(1)
    run = eager_runner(package.build_model())
    with FlopCounterMode(display=False) as counter:
        for x, size in inputs:
            run(x, size)
    flops = counter.get_total_flops() / len(inputs)
    ceiling = matmul_flops_per_s()

    feeds = [{"images": x, "image_size": np.asarray(s, np.int64)} for x, s in inputs]
    plain = OnnxDetector(package.graph, threads=1).session
    for feed in feeds[:4]:
        plain.run(None, feed)
    passes = []
    for _ in range(3):
        started = time.perf_counter()
        for feed in feeds:
            plain.run(None, feed)
        passes.append((time.perf_counter() - started) / len(feeds) * 1e3)
    plain_ms = statistics.median(passes)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(package.graph, options, providers=["CPUExecutionProvider"])
    for feed in feeds[:4]:
        session.run(None, feed)
    for feed in feeds:
        session.run(None, feed)
    profile = session.end_profiling()
    events = json.loads(Path(profile).read_text())
    os.remove(profile)
    by_op: collections.Counter[str] = collections.Counter()
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"])
    count = len(runs)
    measured = runs[-len(feeds):]
    run_ms = sum(measured) / len(measured) / 1e3
    total = sum(by_op.values())
    kernel_ms = total / count / 1e3
    dense_ms = sum(v for k, v in by_op.items() if k in DENSE) / count / 1e3
    other_ms = kernel_ms - dense_ms
    print(f"{len(inputs)} validation images, 1 thread; {flops / 1e9:.3f} GFLOP/img counted; ceiling (1 thread, fp32 "
          f"matmul 1024x1024) {ceiling / 1e9:.1f} GFLOP/s")
    print(f"run {plain_ms:.2f} ms/img ({run_ms:.2f} with the profiler); profiled kernels {kernel_ms:.2f} ms: dense "
          f"{dense_ms:.2f} ms ({dense_ms / kernel_ms:.0%}), other {other_ms:.2f} ms ({other_ms / kernel_ms:.0%})")
    print(f"dense operators at {flops / (dense_ms / 1e3) / ceiling:.0%} of the ceiling; the whole run at "
          f"{flops / (plain_ms / 1e3) / ceiling:.0%}; outside the dense kernels {plain_ms - dense_ms:.2f} ms")
    bound = (flops / ceiling) / (flops / ceiling + (plain_ms - dense_ms) / 1e3)
    print(f"bound: every dense operator at the ceiling and the rest as now: {bound:.0%} of the ceiling")
    print("| operator | ms/img | share of kernel time | dense |\n|---|---|---|---|")
    for op, micros in by_op.most_common(args.top):
        print(f"| {op} | {micros / count / 1e3:.2f} | {micros / total:.1%} | {'yes' if op in DENSE else ''} |")


if __name__ == "__main__":
    main()
