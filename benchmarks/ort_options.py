"""More images per core from ONNX Runtime (issue 24, item 3): session variants on one trained package's
graph against the predictor's own session, speed and accuracy side by side in one run.

Variants (all on the CPU provider, `--threads` intra-op threads unless said):
- `one image, all threads`: the predictor's session (`maskrcnn.onnx_runtime.OnnxDetector`: ORT_ENABLE_ALL,
  sequential, one inter-op thread) running one image at a time, as the predictor did until it ran
  several inference workers: the baseline of the ratios;
- `offline-optimised`: the graph optimised once and saved (`optimized_model_filepath`), then loaded with
  optimisation off (what a package could ship): its load time, and whether running it differs;
- `no spinning`: `session.intra_op.allow_spinning = 0` (idle threads sleep instead of spinning);
- `parallel`: ORT_PARALLEL with two inter-op threads;
- `2 sessions x 1 thread`: two sessions of one intra-op thread each, two images at a time on two Python
  threads (what two predictor processes of one CPU each would do): throughput only, its ms/img is the
  wall time per image of the pair;
- `1 session x 1 thread, 2 images at once`: one single-thread session that two Python threads run at
  once (the predictor now: `--inference-workers 2`, one model in memory), timed the same way.
- `int8 QDQ`: static int8 quantisation (QDQ format, per-channel int8 weights, the Conv, MatMul and Gemm
  nodes only), calibrated on `--calibration` training images pre-processed as the predictor does.

For each: seconds to make the session (quantisation included), the network's wall ms per image over the
validation images (pre-processed once, so only the graph is timed; median of the passes), and segm/bbox mAP on the validation
split through the predictor's pre- and post-processing (`training.inference.predict`). A variant is a
candidate only when its segm mAP is within 0.005 of eager PyTorch's (the issue's rule).

    uv run python benchmarks/ort_options.py --package DIR [--threads 2] [--passes 3] [--calibration 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmark")


class Session:
    """An ONNX Runtime session with `OnnxDetector.run`'s signature (what `predict` calls)."""

    def __init__(self, graph: bytes | str, threads: int, optimise: bool = True, spinning: bool = True,
                 parallel: bool = False, save_to: str = ""):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 2 if parallel else 1
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if save_to:
            options.optimized_model_filepath = save_to
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(self, images, image_size, timeout_s=None):
        return tuple(self.session.run(None, {"images": np.asarray(images, np.float32),
                                             "image_size": np.asarray(image_size, np.int64)}))


def quantised(graph_path: Path, out: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(graph_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from torch.utils.data import DataLoader

    from training.data.dataset import CocoDataset, collate
    from training.data.prepare import prepare_data
    from training.inference import predict
    from training.metrics import evaluate_predictions
    from maskrcnn.model import input_sizes
    from maskrcnn.package import open_package
    from maskrcnn.processing import preprocess

    package = open_package(args.package)
    model, cfg = package.build_model(), package.config
    torch.set_num_threads(args.threads)
    data = prepare_data(cfg.data, validate=False)
    sizes = input_sizes(model)

    def pixels(split, count: int | None = None) -> list[np.ndarray]:
        dataset = CocoDataset(split)
        return [dataset[i][0].permute(1, 2, 0).numpy() for i in range(min(len(dataset), count or len(dataset)))]

    val_inputs = [preprocess(image, *sizes) for image in pixels(data.val)]
    loader = DataLoader(CocoDataset(data.val), batch_size=4, collate_fn=collate)

    def score(graph) -> dict[str, float]:
        metrics = evaluate_predictions(data.val.coco, predict(model, loader, torch.device("cpu"), cfg.eval.mask_threshold,
                                                              graph), data.val.label_map)
        return {"segm": metrics["segm_mAP"], "bbox": metrics["bbox_mAP"]}

    eager = score(None)
    rows: list[tuple[str, float, Session]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "detector.onnx"
        fp32.write_bytes(package.graph)
        variants = {
            BASE: lambda: Session(package.graph, args.threads),
            "offline-optimised": lambda: Session(str(_saved(package.graph, Path(tmp) / "optimised.onnx", args.threads)),
                                                 args.threads, optimise=False),
            "no spinning": lambda: Session(package.graph, args.threads, spinning=False),
            "parallel": lambda: Session(package.graph, args.threads, parallel=True),
            "int8 QDQ": lambda: Session(str(quantised(fp32, Path(tmp) / "int8.onnx", [
                {"images": i, "image_size": s} for i, s in (preprocess(p, *sizes) for p in pixels(data.train, args.calibration))])),
                args.threads),
        }
        for name, make in variants.items():
            started = time.perf_counter()
            try:
                session = make()
            except Exception as exc:  # a variant that cannot be made is a result too
                print(f"{name}: not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                continue
            rows.append((name, time.perf_counter() - started, session))
        shared = Session(package.graph, 1)
        pairs = {"2 sessions x 1 thread": [Session(package.graph, 1), Session(package.graph, 1)],
                 SHARED: [shared, shared]}
        rows += [(name, 0.0, pair[0]) for name, pair in pairs.items()]
        timings: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for _ in range(args.passes):  # passes alternate between the variants
            for name, pair in pairs.items():
                timings[name].append(_pair_ms(pair, val_inputs))
            for name, _, session in rows:
                if name in pairs:
                    continue
                session.run(*val_inputs[0])
                began = time.perf_counter()
                for images, size in val_inputs:
                    session.run(images, size)
                timings[name].append((time.perf_counter() - began) / len(val_inputs) * 1000)
        base = statistics.median(timings[BASE])
        print(f"\n{len(val_inputs)} validation images at {sizes[1]} px, {args.threads} threads, {args.passes} passes; "
              f"eager PyTorch: segm mAP {eager['segm']:.4f}, bbox {eager['bbox']:.4f}\n")
        print("| variant | setup s | network ms/img (wall / images; median of passes) | img/s | x one image | segm mAP | bbox mAP | candidate |")
        print("|---|---|---|---|---|---|---|---|")
        for name, setup_s, session in rows:
            ms = statistics.median(timings[name])
            metrics = score(session)
            ok = abs(metrics["segm"] - eager["segm"]) <= 0.005
            print(f"| {name} | {setup_s:.2f} | {ms:.2f} ({min(timings[name]):.2f}-{max(timings[name]):.2f}) | "
                  f"{1000 / ms:.1f} | x{base / ms:.2f} | {metrics['segm']:.4f} | {metrics['bbox']:.4f} | {'yes' if ok else 'no'} |")


BASE, SHARED = "one image, all threads", "1 session x 1 thread, 2 images at once (the predictor)"


def _pair_ms(pair: list[Session], inputs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Wall ms per image with each session running every other input on its own thread."""
    from concurrent.futures import ThreadPoolExecutor

    def work(k: int) -> None:
        for images, size in inputs[k::2]:
            pair[k].run(images, size)

    for k in (0, 1):
        pair[k].run(*inputs[0])
    with ThreadPoolExecutor(2) as pool:
        began = time.perf_counter()
        list(pool.map(work, (0, 1)))
        return (time.perf_counter() - began) / len(inputs) * 1000


def _saved(graph: bytes, path: Path, threads: int) -> Path:
    Session(graph, threads, save_to=str(path))
    return path


if __name__ == "__main__":
    main()
