"""The embedded synthetic dataset: circles, squares and triangles with occlusion, in COCO format.

Generated deterministically from a seed into `<cache>/synthetic/<hash of the settings>/{train,val}`,
so every machine that asks for the same settings gets byte-identical files. Unoccluded shapes are
stored as polygons, occluded ones as compressed RLE of their visible part, so both COCO mask forms
are exercised by the default run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
from faster_coco_eval.core import mask as mask_util
from PIL import Image, ImageDraw

from maskrcnn.config import SyntheticConfig
from maskrcnn.masks import polygon_area

log = logging.getLogger(__name__)

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
MIN_VISIBLE = 0.4
"""A shape less visible than this (fraction of its own area) is dropped: it is hidden, not occluded."""
GENERATOR_VERSION = 1


def _background(rng: np.random.Generator, size: int, noise: float) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, size)[:, None, None]
    img = c0 * (1 - t) + c1 * t
    img = np.broadcast_to(img, (size, size, 3)) + rng.normal(0.0, noise, (size, size, 3))
    return np.clip(img, 0, 255)


def _shape_polygon(rng: np.random.Generator, kind: int, cx: float, cy: float, r: float) -> list[float]:
    if kind == 1:  # circle, as a fine polygon for drawing
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    elif kind == 2:  # square, randomly rotated
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + rng.uniform(0, math.pi / 2)
    else:  # triangle, randomly rotated
        angles = np.array([0.0, 2 / 3, 4 / 3]) * math.pi + rng.uniform(0, 2 * math.pi)
    return [float(v) for a in angles for v in (cx + r * math.cos(a), cy + r * math.sin(a))]


def _render_image(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, list[tuple[int, np.ndarray, list[float]]]]:
    size = cfg.image_size
    image = _background(rng, size, cfg.noise)
    shapes: list[tuple[int, np.ndarray, list[float]]] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        kind = int(rng.integers(1, 4))
        r = rng.uniform(cfg.min_size, cfg.max_size) / 2
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        poly = _shape_polygon(rng, kind, cx, cy, r)
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
        mask = np.asarray(canvas, dtype=bool)
        colour = rng.uniform(0, 255, 3)
        local = image[mask].mean(axis=0) if mask.any() else colour
        if np.abs(colour - local).sum() < 120:  # keep shapes visible against what lies under them
            colour = 255 - local
        image[mask] = colour + rng.normal(0.0, cfg.noise / 2, (int(mask.sum()), 3))
        shapes = [(k, m & ~mask, p) for k, m, p in shapes]
        shapes.append((kind, mask, poly))
    return np.clip(image, 0, 255).astype(np.uint8), shapes


def _write_split(out: Path, rng: np.random.Generator, cfg: SyntheticConfig, count: int, first_id: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_id * 100
    for n in range(count):
        image_id = first_id + n
        pixels, shapes = _render_image(rng, cfg)
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(out / name, optimize=False)
        images.append({"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for kind, visible, poly in shapes:
            full_area = polygon_area(poly)
            area = int(visible.sum())
            if area < 0.5 * cfg.min_size or area < MIN_VISIBLE * full_area:
                continue
            rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
            occluded = area < 0.98 * full_area
            seg = {"size": rle["size"], "counts": rle["counts"].decode()} if occluded else [poly]
            x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": kind, "segmentation": seg,
                                "area": float(area), "bbox": [x, y, w, h], "iscrowd": 0})
    coco = {"info": {"description": "synthetic shapes", "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    (out / "annotations.json").write_text(json.dumps(coco))


def synthetic_dataset(cfg: SyntheticConfig, cache_dir: Path) -> tuple[Path, Path]:
    """Generate (once) and return the (train, val) folders of the synthetic dataset for `cfg`."""
    key = hashlib.sha256(json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(cfg)}, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir / "synthetic" / key
    done = root / ".complete"
    if not done.exists():
        log.info("generating synthetic dataset (%d train, %d val, %dpx, seed %d) in %s",
                 cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed, root)
        rng = np.random.default_rng(cfg.seed)
        # Separate child streams: the val split does not change when num_train changes.
        train_rng, val_rng = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))
        tmp = root.with_name(root.name + ".tmp")
        _write_split(tmp / "train", train_rng, cfg, cfg.num_train, first_id=1)
        _write_split(tmp / "val", val_rng, cfg, cfg.num_val, first_id=1_000_000)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        done.touch()
    return root / "train", root / "val"
