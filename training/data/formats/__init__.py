"""Importers: what annotation tools export, as a validated COCO folder.

Each importer reads one split of one tool's export into `Imported` (images and their instances, by
category name); `write_coco` writes it as a COCO folder (`annotations.json` and `images/`), which
`training.data.convert` then loads with the COCO validator. Polygons stay polygons; masks (brushes,
RLE, PNGs) become COCO RLE, exactly. A problem in the input is reported with the file, the record and
the field, as the COCO validator does, all problems of a split at once.

| format | reads | tool |
|---|---|---|
| `labelme` | one LabelMe JSON per image (polygon, rectangle, circle, mask shapes; `group_id` joins shapes) | LabelMe |
| `cvat-xml` | `annotations.xml`, "CVAT for images 1.1" (polygon, box, mask with CVAT's RLE) | CVAT |
| `cvat-coco` | CVAT's "COCO 1.0" export (`annotations/instances_*.json`); its masks are RLE marked `iscrowd: 1` | CVAT |
| `labelstudio` | Label Studio's JSON export (polygonlabels, rectanglelabels, brushlabels with its RLE) | Label Studio |
| `yolo` | `data.yaml` and `labels/*.txt` of the YOLO segmentation format (normalised polygons) | Ultralytics |
| `voc` | Pascal VOC: `Annotations/*.xml`, `SegmentationObject/*.png`, `SegmentationClass/*.png` | Pascal VOC |
| `masks` | `images/NAME.ext` and `masks/NAME/CATEGORY/*.png`, one binary PNG per instance | any |
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from faster_coco_eval.core import mask as mask_util
from PIL import Image

from training.data.coco import DatasetError
from training.data.images import DEFAULT_MAX_PIXELS, ImageError
from training.data.masks import segmentation_to_rle

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # one annotation file (a tool's whole-split export)
MAX_POINTS = 100_000  # one polygon's vertices
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


@dataclass
class Instance:
    """One object: its category name and its shape, as polygons (flat x, y lists in pixels) or a mask."""

    category: str
    polygons: list[list[float]] | None = None
    mask: np.ndarray | None = None  # HxW bool, for the whole image
    iscrowd: int = 0
    where: str = ""  # the file and record it came from, for messages


@dataclass
class Sample:
    image: Path  # the image file
    file_name: str  # its name in the COCO folder, relative to images/
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Imported:
    """A split read from a tool's export: its images, the categories in the tool's order, and problems."""

    samples: list[Sample] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # what was left out on purpose, and how many

    def category(self, name: str) -> None:
        if name not in self.categories:
            self.categories.append(name)


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes, refused past `limit` (from its size, before reading)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    if size > limit:
        raise DatasetError([f"{size} bytes, above the limit of {limit} for one annotation file"], str(path))
    return path.read_bytes()


def read_json(path: Path, limit: int = MAX_FILE_BYTES) -> Any:
    data = read_bytes(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError([f"not UTF-8 text ({exc.reason} at byte {exc.start}), expected JSON"], str(path)) from None
    except json.JSONDecodeError as exc:
        raise DatasetError([f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"], str(path)) from None


def read_xml(path: Path, limit: int = MAX_FILE_BYTES):
    """The root element of an XML file, parsed without entities or external references (defusedxml)."""
    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException

    data = read_bytes(path, limit)
    try:
        return SafeET.fromstring(data)
    except DefusedXmlException as exc:
        raise DatasetError([f"refused XML construct: {exc}"], str(path)) from None
    except SafeET.ParseError as exc:
        raise DatasetError([f"not valid XML: {exc}"], str(path)) from None


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, bounded; ImageError names the file."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: not a readable image: {exc}") from None
    if w * h > max_pixels:
        raise ImageError(f"{path}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    return w, h


def sized_sample(image: Path, file_name: str, where: str, imported: Imported, declared: tuple[Any, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | None:
    """A Sample for `image`, its size read from the file and checked against the tool's `declared` (width,
    height) when it gives one; None (with the problem recorded) when the image is missing or disagrees."""
    try:
        w, h = image_size(image, max_pixels)
    except ImageError as exc:
        imported.problems.append(f"{where}: {exc}")
        return None
    if declared is not None and declared != (None, None) and tuple(declared) != (w, h):
        imported.problems.append(f"{where}: the annotation says {declared[0]}x{declared[1]}, the image file is {w}x{h}")
        return None
    return Sample(image, file_name, w, h)


def check_polygon(points: Any, where: str, scale: tuple[float, float] = (1.0, 1.0)) -> tuple[list[float] | None, str | None]:
    """A flat [x0, y0, x1, y1, ...] list in pixels from [[x, y], ...] or a flat list (scaled by `scale`), or
    the problem: fewer than 3 points, more than MAX_POINTS, or a coordinate that is not a finite number."""
    flat = [v for p in points for v in p] if points and isinstance(points[0], (list, tuple)) else list(points or [])
    if len(flat) % 2:
        return None, f"{where}: an odd number of coordinates ({len(flat)}), expected x, y pairs"
    if not 6 <= len(flat) <= 2 * MAX_POINTS:
        return None, f"{where}: {len(flat) // 2} point(s), expected 3 to {MAX_POINTS}"
    try:
        values = [float(v) for v in flat]
    except (TypeError, ValueError):
        return None, f"{where}: coordinates must be numbers"
    if not all(np.isfinite(values)):
        return None, f"{where}: coordinates must be finite numbers"
    return [v * scale[i % 2] for i, v in enumerate(values)], None


def write_coco(imported: Imported, out: Path, source: str, link: bool = True) -> Path:
    """Write `imported` as a COCO folder at `out` (annotations.json, images/); raises DatasetError with every
    problem when there are any, before anything is written. Images are hard-linked when `link` and the
    file system allows it, else copied. Returns the annotation file."""
    if imported.problems:
        raise DatasetError(imported.problems, source)
    if not imported.samples:
        raise DatasetError(["no annotated image found"], source)
    names = [s.file_name for s in imported.samples]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError([f"two images would be written as images/{n}" for n in duplicates[:20]], source)
    categories = [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(imported.categories, start=1)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for image_id, sample in enumerate(imported.samples, start=1):
        images.append({"id": image_id, "file_name": sample.file_name, "width": sample.width, "height": sample.height})
        for inst in sample.instances:
            if inst.mask is not None:
                rle = mask_util.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
                segmentation: Any = {"size": [sample.height, sample.width], "counts": rle["counts"].decode()}
            else:
                segmentation = inst.polygons
            rle = segmentation_to_rle(segmentation, sample.height, sample.width)
            area = float(mask_util.area(rle))
            if area <= 0:
                log.warning("%s: an empty shape, left out", inst.where)
                imported.skipped["empty shapes"] = imported.skipped.get("empty shapes", 0) + 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[inst.category],
                                "segmentation": segmentation, "area": area,
                                "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": inst.iscrowd})
    (out / "images").mkdir(parents=True, exist_ok=True)
    for sample in imported.samples:
        target = out / "images" / sample.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            if not link:
                raise OSError("copy asked")
            os.link(sample.image, target)
        except OSError:
            shutil.copyfile(sample.image, target)
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for what, count in imported.skipped.items():
        log.info("%s: left out %d %s", source, count, what)
    return path


Reader = Callable[[Path, dict[str, Any]], Imported]


def readers() -> dict[str, Reader]:
    """Every importer by format name (imported on use)."""
    from training.data.formats import cvat, labelme, labelstudio, masks, voc, yolo

    return {"labelme": labelme.read, "cvat-xml": cvat.read_xml_export, "cvat-coco": cvat.read_coco_export,
            "labelstudio": labelstudio.read, "yolo": yolo.read, "voc": voc.read, "masks": masks.read}
