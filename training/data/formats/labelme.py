"""LabelMe (wkentaro/labelme) JSON: one file per image, `shapes` with `label`, `points`, `shape_type`,
`group_id` and, for `mask` shapes, a base64 PNG over the box `points` spans.

Shapes with the same label and `group_id` are one instance (as labelme's own COCO example joins them);
a shape without `group_id` is an instance of its own. Every shape becomes a mask drawn exactly as labelme
draws it (`labelme.utils.shape_to_mask`: PIL, outline included), so the COCO masks are the ones the
annotator saw; polygons, rectangles, oriented rectangles, circles (centre, a point on the rim) and masks
are instances, lines and points have no area and are refused. The image is the embedded `imageData`
when there is one (labelme itself loads it first, so a stale `imagePath` beside it is no problem), else
the file `imagePath` names, relative to the JSON (`../images/a.jpg` is fine) and inside the export.
Points are checked to lie in the image (within the tolerance) before anything is drawn.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from training.data.formats import (Imported, Instance, Sample, check_polygon, encode, in_image, parse, quote, read_json,
                                   sized_sample, union)
from training.data.formats.schema import Int, Name, Points, Record
from maskrcnn.images import ImageError

MAX_JSON_BYTES = 256 << 20  # a LabelMe file may embed its image
AREA_SHAPES = ("polygon", "rectangle", "oriented_rectangle", "circle", "mask")
EMBEDDED = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}


class _File(Record):
    shapes: list[Any]
    imagePath: str | None = Field(None, max_length=4096)
    imageData: str | None = None
    imageWidth: Int | None = None
    imageHeight: Int | None = None


class _Shape(Record):
    label: Name
    points: Points
    shape_type: str | None = Field(None, max_length=64)
    group_id: Int | None = None
    mask: str | None = None


def read(src: Path, options: dict[str, Any]) -> Imported:
    """Every `*.json` under `src` (recursively) that is a LabelMe file."""
    imported = Imported(src)
    files = sorted(src.rglob("*.json"))
    if not files:
        imported.problems.append(f"{src}: no LabelMe *.json file found")
    embedded_dir = Path(options.get("scratch", src)) / "embedded"
    for path in files:
        rel = path.relative_to(src)
        if imported.file(path, str(rel)) is None:
            continue
        data = parse(_File, read_json(path, MAX_JSON_BYTES), str(rel), imported)
        if data is None:
            continue
        sample = _sample(path, rel, data, imported, embedded_dir, options)
        if sample is None:
            continue
        groups: dict[tuple[str, Any], list[tuple[int, _Shape]]] = {}
        for i, raw in enumerate(data.shapes):
            where = f"{rel}: shapes[{i}]"
            shape = parse(_Shape, raw, where, imported)
            if shape is None:
                continue
            kind = shape.shape_type or "polygon"
            if kind not in AREA_SHAPES:
                imported.problems.append(f"{where} (label {quote(shape.label)}), field 'shape_type': {quote(kind)} has no area; "
                                         f"an instance is one of {', '.join(AREA_SHAPES)}")
                continue
            key = (shape.label, shape.group_id) if shape.group_id is not None else (shape.label, ("own", i))
            groups.setdefault(key, []).append((i, shape))
        for (label, _), shapes in groups.items():
            instance = _instance(label, shapes, rel, sample, imported)
            if instance is not None:
                imported.category(label)
                imported.add(sample, instance)
        imported.samples.append(sample)
    return imported


def _sample(path: Path, rel: Path, data: _File, imported: Imported, embedded_dir: Path,
            options: dict[str, Any]) -> Sample | None:
    declared = (data.imageWidth, data.imageHeight)
    max_pixels = options.get("max_pixels", 64_000_000)
    if data.imageData:
        try:
            raw = base64.b64decode(data.imageData, validate=True)
            with Image.open(io.BytesIO(raw)) as img:
                suffix = EMBEDDED.get(img.format or "")
        except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
            imported.problems.append(f"{rel}, field 'imageData': not a base64 PNG, JPEG or TIFF image")
            return None
        if suffix is None:
            imported.problems.append(f"{rel}, field 'imageData': a {quote(img.format)} image, expected PNG, JPEG or TIFF")
            return None
        image = embedded_dir / rel.with_suffix(suffix)
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(raw)
        return sized_sample(image, str(rel.with_suffix(suffix)), f"{rel}, field 'imageData'", imported, declared, max_pixels)
    if not data.imagePath:
        imported.problems.append(f"{rel}, field 'imagePath': expected the image's file name (or an embedded imageData)")
        return None
    image = imported.file(path.parent / data.imagePath.replace("\\", "/"), f"{rel}, field 'imagePath'")
    if image is None:
        return None
    return sized_sample(image, imported.rel(image), f"{rel}, field 'imagePath'", imported, declared, max_pixels)


def _instance(label: str, shapes: list[tuple[int, _Shape]], rel: Path, sample: Sample,
              imported: Imported) -> Instance | None:
    where = f"{rel}: shapes[{', '.join(str(i) for i, _ in shapes)}] (label {quote(label)})"
    parts = []
    for i, shape in shapes:
        at = f"{rel}: shapes[{i}] (label {quote(label)}), field 'points'"
        kind = shape.shape_type or "polygon"
        need = {"polygon": 0, "rectangle": 2, "oriented_rectangle": 4, "circle": 2, "mask": 2}[kind]
        if need and len(shape.points) != need:
            imported.problems.append(f"{at}: a {kind} has {need} [x, y] points, got {len(shape.points)}")
            return None
        if kind == "polygon":
            flat, problem = check_polygon(shape.points, at, sample.width, sample.height)
        else:  # corners (and a circle's centre and rim) must lie in the image; they are drawn unclipped
            flat = [v for p in shape.points for v in p]
            _, problem = in_image(flat, sample.width, sample.height, at)
        if problem:
            imported.problems.append(problem)
            return None
        xy = [(flat[j], flat[j + 1]) for j in range(0, len(flat), 2)]
        part = _mask(shape, *xy, at.replace("'points'", "'mask'"), sample, imported) if kind == "mask" else _draw(kind, xy, sample)
        if part is None:
            return None
        parts.append(encode(part))
    return Instance(label, rle=union(parts), where=where)


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


def _mask(shape: _Shape, corner1: tuple[float, float], corner2: tuple[float, float], at: str, sample: Sample,
          imported: Imported) -> np.ndarray | None:
    """labelme's mask shape: a PNG over rows y1..y2 and columns x1..x2 (inclusive, truncated to integers)."""
    (x1, y1), (x2, y2) = corner1, corner2
    try:
        raw = base64.b64decode(shape.mask or "", validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > sample.width * sample.height:
                raise ImageError(f"{img.width}x{img.height}, larger than the image")
            part = np.asarray(img.convert("L")) > 0
    except (binascii.Error, TypeError, ValueError, OSError, ImageError, Image.DecompressionBombError) as exc:
        imported.problems.append(f"{at}: expected a base64 PNG ({quote(str(exc))})")
        return None
    left, top, right, bottom = int(x1), int(y1), int(x2), int(y2)
    if part.shape != (bottom - top + 1, right - left + 1) or left < 0 or top < 0 or right >= sample.width or bottom >= sample.height:
        imported.problems.append(f"{at}: {part.shape[1]}x{part.shape[0]} does not fill the box "
                                 f"{left},{top}-{right},{bottom} inside the {sample.width}x{sample.height} image")
        return None
    mask = np.zeros((sample.height, sample.width), bool)
    mask[top:bottom + 1, left:right + 1] = part
    return mask
