"""Mask R-CNN's network as an ONNX graph, run by ONNX Runtime: the serving package's `detector.onnx`.

The graph holds everything from the normalized, padded image tensor to the per-detection 28x28 mask
probabilities: backbone, FPN, RPN (anchors, top-n, NMS), RoIAlign, the box head and its per-class NMS,
and the mask head. Pre-processing (resize, normalise, pad) and post-processing (mask pasting, thresholds,
RLE) are `maskrcnn.processing`'s NumPy code, the same for the graph and for eager PyTorch. On 2 CPU threads ONNX
Runtime runs the graph 1.6-1.9x faster than eager PyTorch, in float32 with the same numbers
(`benchmarks/forward_backends.py`; `benchmarks/RESULTS.md`, which also says why not OpenVINO).

The exporter is torch.onnx's TorchScript-based one (`dynamo=False`), the path torchvision documents and
tests for its detection models: torch.export cannot capture their data-dependent shapes (NMS). A graph is
kept only after ONNX Runtime reproduces eager PyTorch's detections on the package's probe (`make_probe`:
seeded inputs and the weights' detections on them, stored in the package so that the predictor repeats
the same check when it loads). Running, checking and probing a graph needs no torch: `maskrcnn.onnx_runtime`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
import torchvision.ops.poolers
from torchvision.models.detection.image_list import ImageList

from maskrcnn.eager import eager_runner
from maskrcnn.onnx_runtime import INPUTS, OUTPUTS, GraphError, OnnxDetector, Probe, check_graph

log = logging.getLogger(__name__)

OPSET = 17


class OnnxExportError(GraphError):
    """The network could not be exported, or the exported graph disagrees with eager PyTorch."""


class DetectorGraph(nn.Module):
    """What the ONNX graph computes, for one image: (normalized padded image `1x3xHxW`, its size before
    padding `[h, w]`) -> (boxes, labels, scores, mask probabilities `Nx1x28x28`), as
    `model.roi_heads` returns them, in the resized image's coordinates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = model.backbone, model.rpn, model.roi_heads

    def forward(self, images: torch.Tensor, image_size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = ImageList(images, [(image_size[0], image_size[1])])
        features = self.backbone(images)
        proposals, _ = self.rpn(batch, features)
        (detections,), _ = self.roi_heads(features, proposals, batch.image_sizes)
        return tuple(detections[name] for name in OUTPUTS)


def export_onnx(model: nn.Module, path: str | Path, probe: Probe | None = None) -> Path:
    """Write the network of an eval-mode Mask R-CNN `model` to `path` as one self-contained ONNX file
    (dynamic height and width), then check ONNX Runtime against eager PyTorch on the probe's inputs
    (`make_probe(model)` when not given): the same check the predictor runs when it loads the package.
    Raises OnnxExportError (and leaves no file) when either step fails."""
    path = Path(path)
    model = model.eval()
    graph = DetectorGraph(model).eval()
    probe = probe or make_probe(model)
    started = time.perf_counter()
    try:
        images, size = (torch.from_numpy(probe.inputs[0][k]) for k in INPUTS)
        with warnings.catch_warnings(), _rows_merge_levels():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the check below is what counts
            torch.onnx.export(graph, (images, size), str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(INPUTS), output_names=list(OUTPUTS),
                              dynamic_axes={"images": {2: "height", 3: "width"}, **{name: {0: "n"} for name in OUTPUTS}})
        graph_bytes = path.read_bytes()
        check_graph(graph_bytes, str(path))
        problem = probe.mismatch(OnnxDetector(graph_bytes, threads=torch.get_num_threads()).run)
        if problem:
            raise OnnxExportError(f"ONNX Runtime's detections differ from eager PyTorch's: {problem}")
    except Exception as exc:  # the exporter raises many types; the caller decides what a failure means
        path.unlink(missing_ok=True)
        if isinstance(exc, OnnxExportError):
            raise
        raise OnnxExportError(f"exporting {type(model).__name__} to ONNX: {type(exc).__name__}: {exc}") from exc
    log.info("exported the network to %s (%.1f MB) in %.1f s; ONNX Runtime matches eager PyTorch", path,
             path.stat().st_size / 1e6, time.perf_counter() - started)
    return path


@contextlib.contextmanager
def _rows_merge_levels() -> Iterator[None]:
    """While tracing, torchvision's MultiScaleRoIAlign puts each FPN level's pooled RoIs back in place with
    `scatter` over an index expanded to every element, which runtimes run element by element (in ONNX
    Runtime, a quarter of the graph's time). This swaps in the same merge done by rows (`index_put`, exported as
    ScatterND): the same values, the copy done per RoI."""
    original = torchvision.ops.poolers._onnx_merge_levels

    def merge_rows(levels: torch.Tensor, unmerged: list[torch.Tensor]) -> torch.Tensor:
        first = unmerged[0]
        merged = torch.zeros((levels.size(0), *first.shape[1:]), dtype=first.dtype, device=first.device)
        for level, pooled in enumerate(unmerged):
            merged = merged.index_put((torch.where(levels == level)[0],), pooled)
        return merged

    torchvision.ops.poolers._onnx_merge_levels = merge_rows
    try:
        yield
    finally:
        torchvision.ops.poolers._onnx_merge_levels = original


def make_probe(model: nn.Module) -> Probe:
    """The probe of an eval-mode model: seeded inputs of three shapes (a square image at the model's size, a
    narrower one padded to a multiple of 32, so size before padding != tensor size, and a blank one),
    already resized, normalised and padded by `maskrcnn.processing.preprocess`, with the detections eager
    PyTorch gives on them."""
    from maskrcnn.model import input_sizes
    from maskrcnn.processing import preprocess

    generator = torch.Generator().manual_seed(0)
    min_size, max_size = input_sizes(model)
    run = eager_runner(model)
    inputs, expected = [], []
    for h, w, blank in ((max_size, max_size, False), (max_size, max(8, max_size * 2 // 3), False), (max_size, max_size, True)):
        image = np.zeros((h, w, 3), np.float32) if blank else torch.rand(3, h, w, generator=generator).permute(1, 2, 0).numpy()
        images, size = preprocess(image, min_size, max_size)
        inputs.append({"images": images, "image_size": size})
        expected.append(dict(zip(OUTPUTS, run(images, size))))
    return Probe(inputs, expected)
