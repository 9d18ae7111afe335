"""Mask R-CNN's pre- and post-processing in NumPy: the one implementation that evaluation, the predictor
and batch inference share, and the reason the predictor needs no torch when the package has a graph.

- `preprocess`: an RGB image -> the network's input, as torchvision's `GeneralizedRCNNTransform` does at
  inference: the shorter side scaled to `min_size` (the longer one capped at `max_size`) by bilinear
  interpolation (half-pixel centres, no antialiasing: `F.interpolate(..., align_corners=False)`),
  normalised by the ImageNet mean and standard deviation, zero-padded to a multiple of 32.
- `postprocess`: the network's detections (boxes in the resized image, 28x28 mask probabilities) -> a
  `Prediction` in the original image: boxes scaled back, each mask pasted into its box as torchvision's
  `paste_masks_in_image` does (padded by one pixel, box expanded by 30/28, resized bilinearly), binarised at
  the threshold and encoded as COCO RLE, a few masks at a time within a memory budget.

The numbers are torchvision's to float32 rounding (the interpolation is computed with the same float32
source coordinates and weights, the rows then the columns). `tests/maskrcnn/test_transform.py` checks each step:
resized pixels within 2e-7 of `F.interpolate` (5e-7 from uint8), the network's input within 5e-6 of
`GeneralizedRCNNTransform`'s, boxes exact, binarised masks equal to torchvision's wherever its probability
is more than 1e-5 from the threshold; and whole detections against torchvision's own `model(images)` on a
validation split.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from maskrcnn.masks import Prediction, encode_masks

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32  # torchvision pads every side to a multiple of this (the FPN's largest stride)
MASK_PADDING = 1  # torchvision's `paste_masks_in_image` pads the 28x28 mask by one pixel before pasting
MASK_BUDGET_BYTES = 64 << 20
"""Memory for full-resolution masks at once while post-processing one image (uint8, one byte a pixel)."""

Network = Callable[..., tuple[np.ndarray, ...]]
"""`run(images 1x3xHxW float32, image_size int64 [h, w]) -> (boxes, labels, scores, masks Nx1x28x28)`: the
graph in ONNX Runtime (`maskrcnn.onnx_runtime.OnnxDetector.run`) or the eager network (`onnx_detector.eager_runner`)."""


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The image's size after the model's resize: the shorter side to `min_size`, unless that takes the
    longer side past `max_size` (torchvision: `floor(side * scale)` in double precision)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def _axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each output index along one axis: the two source indices and their weights, computed as
    PyTorch's CPU kernel does (float32 scale in/out, half-pixel centres, clamped at 0)."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    first = src.astype(np.int64)  # non-negative: truncation is floor
    second = np.minimum(first + 1, size_in - 1)
    w_second = src - first.astype(np.float32)
    return first, second, np.float32(1.0) - w_second, w_second


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """`array` (HxW or HxWxC, any numeric dtype) resized to `height` x `width` as float32, bilinearly with
    half-pixel centres and no antialiasing (`F.interpolate(mode="bilinear", align_corners=False)`)."""
    if height < 1 or width < 1:
        raise ValueError(f"resize_bilinear: expected an output of at least 1x1, got {height}x{width}")
    r0, r1, a0, a1 = _axis(array.shape[0], height)
    c0, c1, b0, b1 = _axis(array.shape[1], width)
    extra = (None,) * (array.ndim - 2)
    rows = array[r0].astype(np.float32)  # gathering the source dtype first: a quarter of the traffic for uint8
    rows *= a0[(slice(None), None, *extra)]
    other = array[r1].astype(np.float32)
    other *= a1[(slice(None), None, *extra)]
    rows += other
    out = rows[:, c0]
    out *= b0[(slice(None), *extra)]
    other = rows[:, c1]
    other *= b1[(slice(None), *extra)]
    out += other
    return out


def preprocess(image: np.ndarray, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An HxWx3 RGB image (uint8, or float in [0, 1]) -> (the network's input `1x3xH'xW'` float32, resized,
    normalised and zero-padded to a multiple of 32; its size before padding as int64 `[h, w]`)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess: expected an HxWx3 RGB image, got shape {image.shape}")
    h, w = resized_size(image.shape[0], image.shape[1], min_size, max_size)
    resized = resize_bilinear(image, h, w)
    if image.dtype == np.uint8:
        resized /= np.float32(255.0)  # bilinear weights sum to 1: scaling after resizing is the same to 1 ulp
    resized -= np.asarray(IMAGE_MEAN, np.float32)
    resized /= np.asarray(IMAGE_STD, np.float32)
    padded = np.zeros((1, 3, math.ceil(h / SIZE_DIVISIBLE) * SIZE_DIVISIBLE,
                       math.ceil(w / SIZE_DIVISIBLE) * SIZE_DIVISIBLE), np.float32)
    padded[0, :, :h, :w] = resized.transpose(2, 0, 1)
    return padded, np.asarray([h, w], np.int64)


def scale_boxes(boxes: np.ndarray, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Boxes (xyxy) in the resized image -> in the original image (torchvision's `resize_boxes`, float32)."""
    ratio_h = np.float32(original[0]) / np.float32(resized[0])
    ratio_w = np.float32(original[1]) / np.float32(resized[1])
    return (np.asarray(boxes, np.float32) * np.asarray([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)).reshape(-1, 4)


def paste_mask(probs: np.ndarray, box: np.ndarray, height: int, width: int, threshold: float,
               out: np.ndarray) -> None:
    """One 28x28 mask of probabilities pasted into `box` (xyxy, image coordinates) and binarised at
    `threshold` into `out` (HxW uint8, zeros outside the box), as `paste_masks_in_image` then `> threshold`:
    the mask padded by one pixel and the box expanded to match, truncated to integers, the mask resized
    bilinearly to the box and clipped to the image."""
    side = probs.shape[-1]
    scale = np.float32((side + 2 * MASK_PADDING) / side)
    padded = np.pad(np.asarray(probs, np.float32).reshape(side, side), MASK_PADDING)
    box = np.asarray(box, np.float32)
    half_w, half_h = (box[2] - box[0]) * np.float32(0.5) * scale, (box[3] - box[1]) * np.float32(0.5) * scale
    cx, cy = (box[2] + box[0]) * np.float32(0.5), (box[3] + box[1]) * np.float32(0.5)
    x0, y0, x1, y1 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))  # toward zero
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
    if left >= right or top >= bottom:
        return
    # Only the rows and columns inside the image are interpolated: the same values as resizing it all
    r0, r1, a0, a1 = (a[top - y0:bottom - y0] for a in _axis(padded.shape[0], h))
    c0, c1, b0, b1 = (a[left - x0:right - x0] for a in _axis(padded.shape[1], w))
    rows = padded[r0] * a0[:, None] + padded[r1] * a1[:, None]
    pasted = rows[:, c0] * b0 + rows[:, c1] * b1
    out[top:bottom, left:right] = pasted > threshold


def postprocess(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray,
                resized: tuple[int, int], original: tuple[int, int], mask_threshold: float,
                score_threshold: float = 0.0, max_detections: int | None = None,
                mask_budget_bytes: int = MASK_BUDGET_BYTES) -> Prediction:
    """One image's detections from the network (boxes in the resized image, `Nx1x28x28` mask
    probabilities) -> a Prediction in the original image: those scoring at least `score_threshold` (at most
    `max_detections`, best first), boxes/scores/labels as numpy, masks pasted, binarised at
    `mask_threshold` and encoded as COCO RLE, a few at a time within `mask_budget_bytes`."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)[:max_detections]
    kept_boxes = scale_boxes(np.asarray(boxes).reshape(-1, 4)[keep], resized, original)
    probs = np.asarray(masks)[keep]
    height, width = original
    chunk = max(1, mask_budget_bytes // max(1, height * width))
    rles: list[dict[str, Any]] = []
    for start in range(0, len(keep), chunk):
        binary = np.zeros((min(chunk, len(keep) - start), height, width), np.uint8)
        for n in range(len(binary)):
            paste_mask(probs[start + n], kept_boxes[start + n], height, width, mask_threshold, binary[n])
        rles += encode_masks(binary)
        del binary
    return {"boxes": kept_boxes, "scores": scores[keep], "labels": np.asarray(labels).reshape(-1)[keep].astype(np.int64),
            "masks": rles}


def detect(network: Network, image: np.ndarray, min_size: int, max_size: int, mask_threshold: float,
           score_threshold: float = 0.0, max_detections: int | None = None,
           mask_budget_bytes: int = MASK_BUDGET_BYTES) -> Prediction:
    """One RGB image (HxWx3, uint8 or float in [0, 1]) through `preprocess`, the network and `postprocess`."""
    images, size = preprocess(image, min_size, max_size)
    boxes, labels, scores, masks = network(images, size)
    return postprocess(boxes, labels, scores, masks, (int(size[0]), int(size[1])), image.shape[:2], mask_threshold,
                       score_threshold, max_detections, mask_budget_bytes)
