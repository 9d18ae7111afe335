"""Batching concurrent requests (issue 24, item 3): one graph run on B images against B single-image runs
side by side, for the package's network.

The serving graph takes one image (`training.onnx_export.DetectorGraph`). This exports a variant that
takes B images of the same padded size at once (`BatchedGraph`: torchvision's own batched backbone, RPN
and RoI heads; outputs concatenated, with each detection's image index) and times, on the validation
images of the package's config (each resized and padded as the predictor does):

- the predictor today: one image per thread at once, on one single-thread session (`--inference-workers`);
- one image at a time on all threads;
- B images in one run, on all threads (what batching concurrent requests would do), after checking that
  its detections of each image are the single-image graph's (`maskrcnn.onnx_runtime.detection_mismatch`).

    uv run python benchmarks/batched_graph.py --package PKG [--batch 2,4] [--images 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskrcnn.onnx_runtime import OnnxDetector  # noqa: E402


class BatchedGraph(nn.Module):
    """B normalized images of one padded size `Bx3xHxW` and their sizes before padding `Bx2` -> boxes,
    labels, scores, masks and each detection's image index, concatenated over the batch."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads, self.batch = model.backbone, model.rpn, model.roi_heads, batch

    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        listed = ImageList(images, [(sizes[i, 0], sizes[i, 1]) for i in range(self.batch)])
        features = self.backbone(images)
        proposals, _ = self.rpn(listed, features)
        detections, _ = self.roi_heads(features, proposals, listed.image_sizes)
        index = torch.cat([torch.full_like(d["labels"], i) for i, d in enumerate(detections)])
        return (*(torch.cat([d[k] for d in detections]) for k in ("boxes", "labels", "scores", "masks")), index)


def export_batched(model: nn.Module, batch: int, images: np.ndarray, sizes: np.ndarray, path: Path) -> bytes:
    from training.onnx_export import OPSET, _rows_merge_levels

    with warnings.catch_warnings(), _rows_merge_levels():
        warnings.simplefilter("ignore")
        torch.onnx.export(BatchedGraph(model.eval(), batch).eval(), (torch.from_numpy(images), torch.from_numpy(sizes)),
                          str(path), dynamo=False, opset_version=OPSET, input_names=["images", "sizes"],
                          output_names=["boxes", "labels", "scores", "masks", "image"],
                          dynamic_axes={name: {0: "n"} for name in ("boxes", "labels", "scores", "masks", "image")})
    return path.read_bytes()


def session(graph: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def check(sess, stack: tuple[np.ndarray, np.ndarray], singles: list[tuple[np.ndarray, ...]]) -> None:
    """The batched graph's detections of each image are the single-image graph's (else the timing is moot)."""
    from maskrcnn.onnx_runtime import OUTPUTS, detection_mismatch

    *outputs, image = sess.run(None, {"images": stack[0], "sizes": stack[1].astype(np.int64)})
    for i, expected in enumerate(singles):
        got = {k: v[image == i] for k, v in zip(OUTPUTS, outputs)}
        problem = detection_mismatch(got, dict(zip(OUTPUTS, expected)))
        if problem:
            raise SystemExit(f"the batched graph's detections of image {i} differ from the single-image graph's: {problem}")


def timed(fn, passes: int) -> float:
    fn()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--batch", default="2,4")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    from training.data.prepare import prepare_data
    from maskrcnn.package import open_package
    from maskrcnn.processing import preprocess

    package = open_package(args.package, cache_dir=Path(tempfile.mkdtemp()))
    model, cfg = package.build_model(), package.config
    data = prepare_data(cfg.data, validate=False)
    from training.data.dataset import CocoDataset

    val = CocoDataset(data.val, None, max_pixels=cfg.data.max_image_pixels)
    inputs = []
    for i in range(args.images):
        pixels = (val[i % len(val)][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        inputs.append(preprocess(pixels, cfg.model.min_size, cfg.model.max_size))
    shapes = {x.shape for x, _ in inputs}
    if len(shapes) != 1:
        raise SystemExit(f"the validation images pad to several sizes {shapes}; a batch needs one")
    single = OnnxDetector(package.graph, args.threads)
    per_thread = OnnxDetector(package.graph, 1)
    count = len(inputs)
    rows = []
    with ThreadPoolExecutor(args.threads) as pool:
        rows.append((f"{args.threads} images at once, 1 thread each (the predictor)",
                     timed(lambda: list(pool.map(lambda x: per_thread.run(*x), inputs)), args.passes) / count))
    rows.append((f"one image at a time, {args.threads} threads", timed(lambda: [single.run(*x) for x in inputs], args.passes) / count))
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batch.split(",")):
            stacks = [(np.concatenate([x for x, _ in inputs[i:i + batch]]), np.stack([s for _, s in inputs[i:i + batch]]))
                      for i in range(0, count - batch + 1, batch)]
            graph = export_batched(model, batch, *stacks[0], Path(tmp) / f"batch{batch}.onnx")
            sess = session(graph, args.threads)
            check(sess, stacks[0], [single.run(*x) for x in inputs[:batch]])
            ms = timed(lambda: [sess.run(None, {"images": x, "sizes": s.astype(np.int64)}) for x, s in stacks],
                       args.passes) / (len(stacks) * batch)
            rows.append((f"{batch} images in one run, {args.threads} threads", ms))
            if args.threads % 2 == 0 and batch == 2:
                sess1 = session(graph, args.threads // 2)
                with ThreadPoolExecutor(2) as pool:
                    ms = timed(lambda: list(pool.map(lambda p: sess1.run(None, {"images": p[0], "sizes": p[1].astype(np.int64)}),
                                                     stacks)), args.passes) / (len(stacks) * batch)
                rows.append((f"{batch} images in one run, two runs at once, {args.threads // 2} thread(s) each", ms))
    base = rows[0][1]
    print(f"{count} validation images, {shapes.pop()} padded, {args.threads} threads; ms per image, median of {args.passes} passes")
    print("| setting | ms/img | img/s | vs the predictor |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {1 / seconds:.1f} | x{base / seconds:.2f} |")


if __name__ == "__main__":
    main()
