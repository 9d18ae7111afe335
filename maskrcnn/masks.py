"""Masks: COCO segmentations (polygons, RLE) decoded and encoded, boxes and areas from masks, and the
typed prediction that evaluation, the predictor and the tests share. No torch.

A `Prediction`: `{"image_id": int, "boxes": (N,4) xyxy, "scores": (N,), "labels": (N,) contiguous,
"masks": [RLE]}` (the predictor's carry no image id).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_util

Prediction = dict[str, Any]


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) binary masks -> compressed RLEs with str counts (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": list(r["size"]), "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]} for r in rles]


def polygon_area(poly: list[float]) -> float:
    """Area of a flat [x0, y0, x1, y1, ...] polygon (shoelace formula)."""
    xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """Polygon list, uncompressed RLE or compressed RLE -> one compressed RLE."""
    if isinstance(seg, list):
        return mask_util.merge(mask_util.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_util.frPyObjects(seg, height, width)
    return {"size": list(seg["size"]), "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation -> HxW uint8 mask."""
    return mask_util.decode(segmentation_to_rle(seg, height, width)).astype(np.uint8)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) binary masks -> (N, 4) xyxy boxes covering each mask's pixels."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes
