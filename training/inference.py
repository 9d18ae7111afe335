"""Inference: Mask R-CNN's forward pass and the one post-processing (masks pasted within a memory budget,
thresholded, RLE-encoded), shared by evaluation and the predictor so that they never drift.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from training.checkpoint import unwrap
from training.data.masks import Prediction, encode_masks
from training.graph import OnnxDetector


MASK_BUDGET_BYTES = 64 << 20
"""Memory for full-resolution masks at once while post-processing one image (float32 while pasting)."""


def postprocess(detection: dict[str, torch.Tensor], resized_size: tuple[int, int], original_size: tuple[int, int],
                mask_threshold: float, score_threshold: float = 0.0, max_detections: int | None = None,
                mask_budget_bytes: int = MASK_BUDGET_BYTES) -> Prediction:
    """One image's ROI-head output (boxes in the resized image, 28x28 mask probabilities) -> a Prediction in
    the original image's coordinates: detections scoring at least `score_threshold` (at most
    `max_detections`, best first), boxes/scores/labels as numpy, masks binarised at `mask_threshold` and
    encoded as COCO RLE. Evaluation and the predictor both come here, so they never drift.

    torchvision pastes every mask at full resolution as float32 at once (100 detections on a 12 MP photo:
    ~10 GB); here a few masks at a time are pasted, binarised and encoded, within `mask_budget_bytes`.
    """
    keep = (detection["scores"] >= score_threshold).nonzero().flatten()[:max_detections]
    boxes = resize_boxes(detection["boxes"][keep], resized_size, original_size)
    probs = detection["masks"][keep]
    height, width = original_size
    # paste_masks_in_image holds each pasted mask twice (a list, then a stacked copy)
    chunk = max(1, mask_budget_bytes // max(1, 2 * 4 * height * width))
    rles: list[dict[str, Any]] = []
    for start in range(0, len(keep), chunk):
        pasted = paste_masks_in_image(probs[start:start + chunk], boxes[start:start + chunk], (height, width))
        rles += encode_masks((pasted[:, 0] > mask_threshold).to(torch.uint8).cpu().numpy())
        del pasted
    return {
        "boxes": boxes.cpu().numpy(),
        "scores": detection["scores"][keep].cpu().numpy(),
        "labels": detection["labels"][keep].cpu().numpy(),
        "masks": rles,
    }


@torch.inference_mode()
def detect(model: nn.Module, images: list[torch.Tensor], mask_threshold: float, score_threshold: float = 0.0,
           max_detections: int | None = None, mask_budget_bytes: int = MASK_BUDGET_BYTES,
           graph: OnnxDetector | None = None) -> list[Prediction]:
    """Mask R-CNN inference with `postprocess`: the same numbers as `model(images)` followed by
    thresholding and RLE encoding, without materialising every full-resolution mask at once.

    `graph`: the package's network in ONNX Runtime (`training.graph`), which then runs in place
    of `model`'s backbone, RPN and RoI heads; pre- and post-processing are the same."""
    model.eval()
    original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    batch, _ = model.transform(images)
    if graph is None:
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    else:
        detections = graph(batch)
    return [postprocess(d, resized, original, mask_threshold, score_threshold, max_detections, mask_budget_bytes)
            for d, resized, original in zip(detections, batch.image_sizes, original_sizes)]


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: torch.device, mask_threshold: float = 0.5,
            graph: OnnxDetector | None = None) -> list[Prediction]:
    """Predictions for every image in `loader` (boxes, scores, labels, RLE masks), in image coordinates
    (the network in ONNX Runtime when `graph` is given, as in `detect`)."""
    out: list[Prediction] = []
    for images, targets in loader:
        predictions = detect(unwrap(model), [i.to(device) for i in images], mask_threshold, graph=graph)
        out += [{"image_id": int(t["image_id"]), **p} for t, p in zip(targets, predictions)]
    return out
