"""LabelMe (wkentaro/labelme) JSON: one file per image, `shapes` with `label`, `points`, `shape_type`,
`group_id` and, for `mask` shapes, a base64 PNG over the box `points` spans.

Shapes with the same label and `group_id` are one instance (as labelme's own COCO example joins them);
a shape without `group_id` is an instance of its own. Every shape becomes a mask drawn exactly as labelme
draws it (`labelme.utils.shape_to_mask`: PIL, outline included), so the COCO masks are the ones the
annotator saw; polygons, rectangles, oriented rectangles, circles (centre, a point on the rim) and masks
are instances, lines and points have no area and are refused. The image is the
file `imagePath` names (relative to the JSON); when it is missing, the embedded `imageData` is used.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, Sample, check_polygon, read_json, sized_sample
from training.data.images import ImageError

MAX_JSON_BYTES = 256 << 20  # a LabelMe file may embed its image
AREA_SHAPES = ("polygon", "rectangle", "oriented_rectangle", "circle", "mask")


def read(src: Path, options: dict[str, Any]) -> Imported:
    """Every `*.json` under `src` (recursively) that is a LabelMe file."""
    imported = Imported()
    files = sorted(p for p in src.rglob("*.json") if p.is_file())
    if not files:
        imported.problems.append(f"{src}: no LabelMe *.json file found")
    embedded_dir = Path(options.get("scratch", src)) / "embedded"
    for path in files:
        data = read_json(path, MAX_JSON_BYTES)
        rel = path.relative_to(src)
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            imported.problems.append(f"{rel}: expected a LabelMe object with a 'shapes' list")
            continue
        sample = _sample(src, path, rel, data, imported, embedded_dir, options)
        if sample is None:
            continue
        groups: dict[tuple[str, Any], list[tuple[int, dict[str, Any]]]] = {}
        for i, shape in enumerate(data["shapes"]):
            where = f"{rel}: shapes[{i}]"
            if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"]:
                imported.problems.append(f"{where}, field 'label': expected a non-empty string")
                continue
            kind = shape.get("shape_type") or "polygon"
            if kind not in AREA_SHAPES:
                imported.problems.append(f"{where} (label {shape['label']!r}), field 'shape_type': {kind!r} has no area; "
                                         f"an instance is one of {', '.join(AREA_SHAPES)}")
                continue
            key = (shape["label"], shape.get("group_id")) if shape.get("group_id") is not None else (shape["label"], ("own", i))
            groups.setdefault(key, []).append((i, shape))
        for (label, _), shapes in groups.items():
            instance = _instance(label, shapes, rel, sample, imported)
            if instance is not None:
                imported.category(label)
                sample.instances.append(instance)
        imported.samples.append(sample)
    return imported


def _sample(src: Path, path: Path, rel: Path, data: dict[str, Any], imported: Imported, embedded_dir: Path,
            options: dict[str, Any]) -> Sample | None:
    image_path = data.get("imagePath")
    declared = (data.get("imageWidth"), data.get("imageHeight"))
    if not isinstance(image_path, str) or not image_path:
        imported.problems.append(f"{rel}, field 'imagePath': expected the image's file name")
        return None
    image = (path.parent / image_path.replace("\\", "/")).resolve()
    if not image.is_relative_to(src.resolve()):
        imported.problems.append(f"{rel}, field 'imagePath': {image_path!r} is outside {src}")
        return None
    if not image.is_file():
        if not data.get("imageData"):
            imported.problems.append(f"{rel}, field 'imagePath': {image_path!r} not found, and no imageData embedded")
            return None
        try:
            raw = base64.b64decode(data["imageData"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            imported.problems.append(f"{rel}, field 'imageData': not base64")
            return None
        image = embedded_dir / rel.with_suffix(Path(image_path).suffix or ".png")
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(raw)
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        imported.problems.append(f"{rel}, field 'imagePath': {image_path!r} is not a JPG, PNG or TIFF file")
        return None
    file_name = str(rel.with_suffix(image.suffix))
    return sized_sample(image, file_name, str(rel), imported, declared, options.get("max_pixels", 64_000_000))


def _instance(label: str, shapes: list[tuple[int, dict[str, Any]]], rel: Path, sample: Sample,
              imported: Imported) -> Instance | None:
    mask = np.zeros((sample.height, sample.width), bool)
    where = f"{rel}: shapes[{', '.join(str(i) for i, _ in shapes)}] (label {label!r})"
    for i, shape in shapes:
        at = f"{rel}: shapes[{i}] (label {label!r})"
        kind = shape.get("shape_type") or "polygon"
        if kind == "mask":
            corners = _corners(shape.get("points"), 2, f"{at}, field 'points'", imported)
            part = None if corners is None else _mask(shape, *corners[0], *corners[1], at, sample, imported)
        else:
            need = {"polygon": 0, "rectangle": 2, "oriented_rectangle": 4, "circle": 2}[kind]
            if need:
                corners = _corners(shape.get("points"), need, f"{at}, field 'points'", imported)
            else:
                flat, problem = check_polygon(shape.get("points"), f"{at}, field 'points'")
                if problem:
                    imported.problems.append(problem)
                corners = None if problem else [(flat[j], flat[j + 1]) for j in range(0, len(flat), 2)]
            part = None if corners is None else _draw(kind, corners, sample)
        if part is None:
            return None
        mask |= part
    return Instance(label, mask=mask, where=where)


def _corners(points: Any, count: int, at: str, imported: Imported) -> list[tuple[float, float]] | None:
    try:
        if not (isinstance(points, list) and len(points) == count):
            raise ValueError
        corners = [(float(x), float(y)) for x, y in points]
        if not np.all(np.isfinite(corners)):
            raise ValueError
        return corners
    except (TypeError, ValueError):
        imported.problems.append(f"{at}: expected {count} [x, y] points of finite numbers, got {points!r}"[:300])
        return None


def _draw(kind: str, xy: list[tuple[float, float]], sample: Sample) -> np.ndarray:
    """The shape drawn as labelme's shape_to_mask draws it."""
    canvas = Image.new("L", (sample.width, sample.height))
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        (cx, cy), (px, py) = xy
        r = float(np.hypot(px - cx, py - cy))
        draw.ellipse(((cx - r, cy - r), (cx + r, cy + r)), outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle(((min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))), outline=1, fill=1)
    else:  # polygon, oriented_rectangle
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas, dtype=np.uint8) > 0


def _mask(shape: dict[str, Any], x1: float, y1: float, x2: float, y2: float, at: str, sample: Sample,
          imported: Imported) -> np.ndarray | None:
    """labelme's mask shape: a PNG over rows y1..y2 and columns x1..x2 (inclusive, truncated to integers)."""
    try:
        raw = base64.b64decode(shape.get("mask") or "", validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > sample.width * sample.height:
                raise ImageError(f"{img.width}x{img.height}, larger than the image")
            part = np.asarray(img.convert("L")) > 0
    except (binascii.Error, TypeError, ValueError, OSError, ImageError) as exc:
        imported.problems.append(f"{at}, field 'mask': expected a base64 PNG ({exc})")
        return None
    left, top, right, bottom = int(x1), int(y1), int(x2), int(y2)
    if part.shape != (bottom - top + 1, right - left + 1) or left < 0 or top < 0 or right >= sample.width or bottom >= sample.height:
        imported.problems.append(f"{at}, field 'mask': {part.shape[1]}x{part.shape[0]} does not fill the box "
                                 f"{left},{top}-{right},{bottom} inside the {sample.width}x{sample.height} image")
        return None
    mask = np.zeros((sample.height, sample.width), bool)
    mask[top:bottom + 1, left:right + 1] = part
    return mask
