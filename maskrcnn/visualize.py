"""Draw predicted masks, boxes, labels and scores on an image (for MLflow samples and the web page)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn.labels import LabelMap

from maskrcnn.masks import decode_segmentation
from maskrcnn.masks import Prediction


def colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


MIN_SIDE = 384
"""Small images are enlarged (nearest neighbour) so that labels stay readable..."""
MAX_CANVAS_PIXELS = 4_000_000
"""...but never beyond this many pixels (a 2x3000 strip would otherwise become a 2.6 GB canvas)."""


def draw_predictions(image: np.ndarray, pred: Prediction, label_map: LabelMap, score_threshold: float = 0.5,
                     alpha: float = 0.45) -> Image.Image:
    """An RGB PIL image with each prediction above `score_threshold` overlaid."""
    h, w = image.shape[:2]
    scale = max(1, min(MIN_SIDE // max(1, min(h, w)), int((MAX_CANVAS_PIXELS / (h * w)) ** 0.5)))
    out = np.repeat(np.repeat(image, scale, 0), scale, 1).astype(np.float32)
    keep = [i for i, s in enumerate(pred["scores"]) if s >= score_threshold]
    for n, i in enumerate(keep):
        mask = decode_segmentation(pred["masks"][i], h, w).astype(bool)
        mask = np.repeat(np.repeat(mask, scale, 0), scale, 1)
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour(n), np.float32)
    canvas = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for n, i in enumerate(keep):
        x0, y0, x1, y1 = (float(v) * scale for v in pred["boxes"][i])
        draw.rectangle([x0, y0, x1, y1], outline=colour(n), width=max(1, scale // 2))
        draw.text((x0 + 1, y0 + 1), f"{label_map.name_of(int(pred['labels'][i]))} {pred['scores'][i]:.2f}", fill=(255, 255, 255))
    return canvas
