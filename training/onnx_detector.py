"""Mask R-CNN's network as an ONNX graph, run by ONNX Runtime: the serving package's `detector.onnx`.

The graph holds everything from the normalized, padded image tensor to the per-detection 28x28 mask
probabilities: backbone, FPN, RPN (anchors, top-n, NMS), RoIAlign, the box head and its per-class NMS,
and the mask head. Pre-processing (`model.transform`) and post-processing (mask pasting, thresholds, RLE:
`training.engine.postprocess`) stay the same PyTorch code as eager inference. On 2 CPU threads ONNX
Runtime runs the graph 1.6-1.9x faster than eager PyTorch, in float32 with the same numbers
(`benchmarks/forward_backends.py`; `benchmarks/RESULTS.md`, which also says why not OpenVINO).

The exporter is torch.onnx's TorchScript-based one (`dynamo=False`), the path torchvision documents and
tests for its detection models: torch.export cannot capture their data-dependent shapes (NMS). A graph is
kept only after ONNX Runtime reproduces eager PyTorch's detections on test inputs (`export_onnx`).
`OnnxDetector` loads it from bytes that the caller has checksum-verified (an ONNX file is a protobuf
graph with its weights: nothing is unpickled, and no external data file is read).
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

log = logging.getLogger(__name__)

ONNX_FILE = "detector.onnx"
INPUTS = ("images", "image_size")
OUTPUTS = ("boxes", "labels", "scores", "masks")  # `model.roi_heads`'s keys; masks are 28x28 probabilities
OPSET = 17
# How far ONNX Runtime's detections may be from eager PyTorch's in scores, box pixels and mask
# probabilities (float32 rounding in a different operator order gives ~1e-5 on scores, ~1e-4 px on boxes).
ATOL = 1e-3


class OnnxExportError(RuntimeError):
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


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the network of an eval-mode Mask R-CNN `model` to `path` as one self-contained ONNX file
    (dynamic height and width), then check ONNX Runtime against eager PyTorch on test inputs of three
    shapes. Raises OnnxExportError (and leaves no file) when either step fails."""
    path = Path(path)
    model = model.eval()
    graph = DetectorGraph(model).eval()
    inputs = list(_check_inputs(model))
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), _rows_merge_levels():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the check below is what counts
            torch.onnx.export(graph, inputs[0], str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(INPUTS), output_names=list(OUTPUTS),
                              dynamic_axes={"images": {2: "height", 3: "width"}, **{name: {0: "n"} for name in OUTPUTS}})
        runtime = OnnxDetector(path.read_bytes(), threads=torch.get_num_threads())
        for images, size in inputs:
            with torch.inference_mode():
                expected = graph(images, size)
            _compare(runtime.run(images, size), expected, f"input {tuple(images.shape)}, size {size.tolist()}")
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


def _check_inputs(model: nn.Module):
    """(images, size) pairs the export is checked on: a square image at the model's size, a narrower one
    padded to a multiple of 32 (size before padding != tensor size), and a blank one."""
    generator = torch.Generator().manual_seed(0)
    side = int(model.transform.max_size)
    for h, w, blank in ((side, side, False), (side, max(8, side * 2 // 3), False), (side, side, True)):
        image = torch.zeros(3, h, w) if blank else torch.rand(3, h, w, generator=generator)
        batch, _ = model.transform([image])
        yield batch.tensors, torch.tensor(batch.image_sizes[0], dtype=torch.int64)


def _compare(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], where: str) -> None:
    problem = detection_mismatch(dict(zip(OUTPUTS, got)), dict(zip(OUTPUTS, expected)))
    if problem:
        raise OnnxExportError(f"ONNX Runtime's detections for {where} differ from eager PyTorch's: {problem}")


def detection_mismatch(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = ATOL) -> str:
    """Why two sets of detections (`OUTPUTS` keys) differ beyond `atol`, or "" when they agree. Order is
    free among detections whose scores tie within `atol` (float rounding may swap them), and so is which
    of several tied detections at the lowest kept score made the cut."""
    boxes, labels, scores, masks = (got[k] for k in OUTPUTS)
    e_boxes, e_labels, e_scores, e_masks = (expected[k] for k in OUTPUTS)
    if len(scores) != len(e_scores):
        return f"{len(scores)} detections, expected {len(e_scores)}"
    unused = list(range(len(scores)))
    floor = float(torch.cat([scores, e_scores]).min()) + atol if len(scores) else 0.0
    for i in range(len(e_scores)):
        for j in unused:
            if (labels[j] == e_labels[i] and abs(float(scores[j] - e_scores[i])) <= atol
                    and torch.allclose(boxes[j], e_boxes[i], atol=atol, rtol=0)):
                if not torch.allclose(masks[j], e_masks[i], atol=atol, rtol=0):
                    diff = float((masks[j] - e_masks[i]).abs().max())
                    return f"the mask of detection {i} differs by {diff:.2e} (expected at most {atol})"
                unused.remove(j)
                break
        else:
            if float(e_scores[i]) > floor:  # not a tie at the cut
                return (f"detection {i} (label {int(e_labels[i])}, score {float(e_scores[i]):.5f}, box "
                        f"{[round(v, 3) for v in e_boxes[i].tolist()]}) has no counterpart within {atol}")
    return ""


class OnnxDetector:
    """An ONNX Runtime session (CPU) for `detector.onnx` on `threads` intra-op threads. Loads from bytes,
    so the graph that runs is the one whose checksum was verified."""

    def __init__(self, graph: bytes, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        inputs = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if inputs != INPUTS or outputs != OUTPUTS:
            raise OnnxExportError(f"not a detector graph: inputs {inputs}, outputs {outputs}; expected {INPUTS}, {OUTPUTS}")
        self.threads = options.intra_op_num_threads

    def run(self, images: torch.Tensor, image_size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for one normalized, padded image `1x3xHxW` and its size before padding."""
        feeds = {"images": np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32),
                 "image_size": np.asarray(image_size, dtype=np.int64)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))

    def __call__(self, batch: ImageList) -> list[dict[str, torch.Tensor]]:
        """`model.roi_heads`'s detections for each image of a transformed batch, one graph run per image."""
        return [dict(zip(OUTPUTS, self.run(batch.tensors[i:i + 1], torch.tensor(size, dtype=torch.int64))))
                for i, size in enumerate(batch.image_sizes)]
