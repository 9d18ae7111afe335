"""CVAT's exports: "CVAT for images 1.1" (XML) and "COCO 1.0".

XML (`annotations.xml`, images under `images/` or beside it): each `<image name width height>` holds
`<polygon label points="x,y;x,y;...">`, `<box label xtl ytl xbr ybr rotation>` and
`<mask label rle left top width height>`, whose `rle` is CVAT's: run lengths over the mask's box in row
order, starting with a run of background. Shapes sharing a `group_id` with one label are one instance.
Polylines, points, cuboids and skeletons have no area and are left out (counted). Polygons stay
polygons, boxes become their 4-corner polygon (rotated about their centre by `rotation` degrees), masks
become COCO RLE.

COCO 1.0 (`annotations/instances_<subset>.json`, images under `images/` or `images/<subset>/`) is COCO,
but CVAT (through datumaro's COCO writer) marks every mask `iscrowd: 1`, which COCO tools read as a crowd
region to ignore: a model would never learn from them. They are read as instances (`iscrowd: 0`) unless
`keep_crowd` is set, for exports whose crowd marks are meant. A box (an empty `segmentation` with a
`bbox`) becomes its 4-corner polygon, as in the XML.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, model_validator

from maskrcnn.storage import escapes_folder
from training.data.formats import (Imported, Instance, Sample, check_name, check_polygon, encode, in_image, parse, quote,
                                   read_json, read_xml, sized_sample, union)
from training.data.formats.schema import Finite, FlatPoints, Int, Name, Record, TextFinite
from maskrcnn.masks import segmentation_to_rle

LEFT_OUT = ("polyline", "points", "cuboid", "skeleton", "ellipse", "tag")


class _Image(Record):
    name: str = Field(min_length=1, max_length=4096)
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)


class _Box(Record):
    xtl: TextFinite
    ytl: TextFinite
    xbr: TextFinite
    ybr: TextFinite
    rotation: TextFinite = 0.0

    @model_validator(mode="after")
    def _ordered(self) -> "_Box":
        if self.xbr < self.xtl or self.ybr < self.ytl:
            raise ValueError(f"the box's bottom-right ({self.xbr:g}, {self.ybr:g}) is above or left of its top-left "
                             f"({self.xtl:g}, {self.ytl:g})")
        return self


class _Mask(Record):
    rle: str = Field(max_length=1 << 28)
    left: int = Field(ge=0)
    top: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


def find_image(imported: Imported, bases: list[Path], name: str, where: str) -> Path | None:
    """The first of `bases / name` that exists, checked by the safe-file rule; a problem when none does."""
    for base in bases:
        if escapes_folder(name) or os.path.lexists(base / name):
            return imported.file(name, where, base)
    imported.problems.append(f"{where}: image file not found under {' or '.join(str(b) for b in bases)}")
    return None


def read_xml_export(src: Path, options: dict[str, Any]) -> Imported:
    ann = src / "annotations.xml" if src.is_dir() else src
    imported = Imported(ann.parent)
    if imported.file(ann, ann.name) is None:
        return imported
    root = read_xml(ann)
    src = ann.parent
    rel = ann.name
    if root.tag != "annotations":
        imported.problems.append(f"{rel}: the root element is <{quote(root.tag)}>, expected <annotations> (CVAT for images 1.1)")
        return imported
    version = root.findtext("version")
    if version and version.strip() != "1.1":
        imported.problems.append(f"{rel}: <version> {quote(version.strip())}, this importer reads 1.1")
        return imported
    for label in root.iterfind("./meta//labels/label"):
        name = (label.findtext("name") or "").strip()
        if name and (label.findtext("type") or "any") in ("any", "polygon", "rectangle", "mask", "bitmap") \
                and check_name(name, f"{rel}: <meta> label", imported):
            imported.category(name)
    for index, image in enumerate(root.iter("image")):
        where = f"{rel}: image[{index}] (name={quote(image.get('name', ''))})"
        record = parse(_Image, dict(image.attrib), where, imported)
        if record is None:
            continue
        path = find_image(imported, [src / "images", src], record.name, f"{where}, attribute 'name'")
        if path is None:
            continue
        declared = (record.width, record.height)
        sample = sized_sample(path, record.name, where, imported, declared, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        groups: dict[tuple[str, str], list[Instance]] = {}
        for j, shape in enumerate(image):
            label = shape.get("label", "")
            tag = shape.tag if shape.tag in (*LEFT_OUT, "polygon", "box", "mask") else quote(shape.tag)
            at = f"{where}: <{tag}>[{j}] (label={quote(label)})"
            if shape.tag in LEFT_OUT:
                imported.skip(f"<{shape.tag}> shapes (no area)")
                continue
            if shape.tag not in ("polygon", "box", "mask"):
                imported.problems.append(f"{at}: unknown element")
                continue
            if not label:
                imported.problems.append(f"{at}, attribute 'label': missing")
                continue
            if check_name(label, f"{at}, attribute 'label'", imported) is None:
                continue
            part = _shape(shape, at, sample, imported)
            if part is None:
                continue
            imported.category(label)
            group = shape.get("group_id")
            key = (label, group) if group not in (None, "", "0") else (label, f"own-{j}")
            groups.setdefault(key, []).append(part)
        for parts in groups.values():
            imported.add(sample, _join(parts, sample.height, sample.width))
        imported.samples.append(sample)
    return imported


def _shape(shape: Any, at: str, sample: Sample, imported: Imported) -> Instance | None:
    label = shape.get("label")
    width, height = sample.width, sample.height
    if shape.tag == "polygon":
        try:
            points = [[float(v) for v in p.split(",")] for p in shape.get("points", "").split(";") if p.strip()]
            if any(len(p) != 2 for p in points):
                raise ValueError
        except (ValueError, OverflowError):
            imported.problems.append(f"{at}, attribute 'points': expected 'x,y;x,y;...'")
            return None
        flat, problem = check_polygon(points, f"{at}, attribute 'points'", width, height)
        if problem:
            imported.problems.append(problem)
            return None
        return Instance(label, polygons=[flat], where=at)
    if shape.tag == "box":
        box = parse(_Box, dict(shape.attrib), at, imported)
        if box is None:
            return None
        return box_instance(label, box.xtl, box.ytl, box.xbr, box.ybr, math.radians(box.rotation), "centre", at, sample, imported)
    mask = parse(_Mask, dict(shape.attrib), at, imported)
    if mask is None:
        return None
    left, top, w, h = mask.left, mask.top, mask.width, mask.height
    if left + w > width or top + h > height:
        imported.problems.append(f"{at}: the mask's box {left},{top} {w}x{h} is not inside the {width}x{height} image")
        return None
    try:
        counts = np.array([v for v in mask.rle.replace(" ", "").split(",") if v], dtype=np.int64)
    except (ValueError, OverflowError):
        imported.problems.append(f"{at}, attribute 'rle': expected comma-separated run lengths (integers)")
        return None
    if (counts < 0).any() or counts.size > w * h or int(counts.sum()) != w * h:
        imported.problems.append(f"{at}, attribute 'rle': its runs cover {int(counts.clip(0).sum())} pixels, "
                                 f"the box {w}x{h} has {w * h}")
        return None
    full = np.zeros((height, width), np.uint8)
    full[top:top + h, left:left + w] = np.repeat(np.arange(counts.size, dtype=np.uint8) % 2, counts).reshape(h, w)
    return Instance(label, rle=encode(full), where=at)  # background first


def box_instance(label: str, x0: float, y0: float, x1: float, y1: float, angle: float, about: str, at: str,
                 sample: Sample, imported: Imported) -> Instance | None:
    """A box (rotated by `angle` radians about its centre, CVAT, or its top-left corner, Label Studio) as its
    4-corner polygon when it lies in the image, else as the mask of its part inside the image. The unrotated
    box must lie in the image (within the tolerance)."""
    _, problem = in_image([x0, y0, x1, y1], sample.width, sample.height, at)
    if problem:
        imported.problems.append(problem)
        return None
    cx, cy = ((x0 + x1) / 2, (y0 + y1) / 2) if about == "centre" else (x0, y0)
    c, s = math.cos(angle), math.sin(angle)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    flat = [v for x, y in corners for v in (cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)]
    xs, ys = flat[0::2], flat[1::2]
    if min(xs) >= 0 and min(ys) >= 0 and max(xs) <= sample.width and max(ys) <= sample.height:
        return Instance(label, polygons=[flat], where=at)
    return Instance(label, rle=segmentation_to_rle([flat], sample.height, sample.width), where=at)


def _join(parts: list[Instance], height: int, width: int) -> Instance:
    """The shapes of one group as one instance (masks merged; polygons kept together when all are polygons)."""
    if len(parts) == 1:
        return parts[0]
    where = "; ".join(p.where for p in parts)
    if all(p.rle is None for p in parts):
        return Instance(parts[0].category, polygons=[poly for p in parts for poly in p.polygons or []], where=where)
    return Instance(parts[0].category, rle=union([p.as_rle(height, width) for p in parts]), where=where)


class _CocoImage(Record):
    id: Int | str
    file_name: str = Field(min_length=1, max_length=4096)
    width: Int | None = None
    height: Int | None = None


class _CocoCategory(Record):
    id: Int
    name: Name


class _CocoRle(Record):
    size: list[Int] = Field(min_length=2, max_length=2)
    counts: str | list[NonNegativeInt] = Field(max_length=1 << 28)


class _CocoAnnotation(Record):
    id: Int | str | None = None
    image_id: Int | str
    category_id: Int
    segmentation: list[FlatPoints] | _CocoRle
    bbox: list[Finite] | None = Field(None, min_length=4, max_length=4)
    iscrowd: Literal[0, 1] = 0


class _CocoFile(Record):
    images: list[Any]
    annotations: list[Any]
    categories: list[Any]


def read_coco_export(src: Path, options: dict[str, Any]) -> Imported:
    """CVAT's COCO 1.0 export of one subset (`options["subset"]`, default: the only `instances_*.json`)."""

    imported = Imported(src)
    files = sorted((src / "annotations").glob("instances_*.json"))
    subset = options.get("subset")
    if subset:
        files = [f for f in files if f.stem == f"instances_{subset}"]
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        imported.problems.append(f"{src / 'annotations'}: expected one instances_<subset>.json{f' for {subset!r}' if subset else ''}, "
                                 f"found {found} (choose with --subset)")
        return imported
    ann_path = files[0]
    name = ann_path.stem.removeprefix("instances_")
    rel = f"annotations/{ann_path.name}"
    if imported.file(ann_path, rel) is None:
        return imported
    data = parse(_CocoFile, read_json(ann_path), rel, imported)
    if data is None:
        return imported
    names = {}
    for i, raw in enumerate(data.categories):
        cat = parse(_CocoCategory, raw, f"{rel}: categories[{i}]", imported)
        if cat is not None:
            names[cat.id] = cat.name
            imported.category(cat.name)
    by_image: dict[Any, list[tuple[int, Any]]] = {}
    for i, ann in enumerate(data.annotations):
        key = ann.get("image_id") if isinstance(ann, dict) else None
        by_image.setdefault(key if isinstance(key, (int, str)) else None, []).append((i, ann))
    keep_crowd = bool(options.get("keep_crowd"))
    for i, raw in enumerate(data.images):
        where = f"{rel}: images[{i}]"
        img = parse(_CocoImage, raw, where, imported)
        if img is None:
            continue
        where = f"{where} (id={quote(img.id)}, file_name={quote(img.file_name)})"
        path = find_image(imported, [src / "images", src / "images" / name], img.file_name, f"{where}, field 'file_name'")
        if path is None:
            continue
        sample = sized_sample(path, img.file_name, where, imported, (img.width, img.height), options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        for j, raw_ann in by_image.get(img.id, []):
            _coco_annotation(raw_ann, f"{rel}: annotations[{j}]", names, sample, keep_crowd, imported)
        imported.samples.append(sample)
    return imported


def _coco_annotation(raw: Any, at: str, names: dict[int, str], sample: Sample, keep_crowd: bool,
                     imported: Imported) -> None:
    """One annotation of a CVAT COCO export, added to `sample` as an instance, or a problem named at `at`."""
    ann = parse(_CocoAnnotation, raw, at, imported)
    if ann is None:
        return
    at = f"{at} (id={quote(ann.id)})"
    if ann.category_id not in names:
        imported.problems.append(f"{at}, field 'category_id': {ann.category_id} is not a known category")
        return
    category = names[ann.category_id]
    seg = ann.segmentation
    if seg == [] and ann.bbox is not None:  # a CVAT box: no segmentation
        x, y, w, h = ann.bbox
        if w < 0 or h < 0:
            imported.problems.append(f"{at}, field 'bbox': a negative width or height ({w:g}x{h:g})")
            return
        part = box_instance(category, x, y, x + w, y + h, 0.0, "centre", f"{at}, field 'bbox'", sample, imported)
        if part is not None:
            part.iscrowd = ann.iscrowd
            imported.add(sample, part)
    elif isinstance(seg, list) and seg:
        polygons = []
        for k, poly in enumerate(seg):
            flat, problem = check_polygon(poly, f"{at}, field 'segmentation'[{k}]", sample.width, sample.height)
            if problem:
                imported.problems.append(problem)
                break
            polygons.append(flat)
        else:
            imported.add(sample, Instance(category, polygons=polygons, iscrowd=ann.iscrowd, where=at))
    elif isinstance(seg, _CocoRle) and seg.size == [sample.height, sample.width]:
        rle = _rle(seg, sample, at, imported)
        if rle is not None:
            imported.add(sample, Instance(category, rle=rle, iscrowd=ann.iscrowd if keep_crowd else 0, where=at))
    else:
        imported.problems.append(f"{at}, field 'segmentation': expected polygons or an RLE of size "
                                 f"[{sample.height}, {sample.width}]")


def _rle(seg: _CocoRle, sample: Sample, at: str, imported: Imported) -> dict[str, Any] | None:
    """The COCO RLE `seg` checked (runs covering the image exactly; a compressed string COCO's decoder reads)."""
    from faster_coco_eval.core import mask as mask_util

    h, w = seg.size
    if isinstance(seg.counts, list):
        if sum(seg.counts) != h * w:
            imported.problems.append(f"{at}, field 'segmentation.counts': the runs cover {sum(seg.counts)} pixels, "
                                     f"the image has {h * w}")
            return None
        return mask_util.frPyObjects({"size": [h, w], "counts": seg.counts}, h, w)
    if not seg.counts.isascii() or not all(48 <= ord(c) < 112 for c in seg.counts):
        imported.problems.append(f"{at}, field 'segmentation.counts': not COCO's compressed RLE (characters '0' to 'o')")
        return None
    rle = {"size": [h, w], "counts": seg.counts.encode()}
    try:
        mask_util.area(rle)  # refuses runs past the image
    except Exception as exc:  # the C decoder's errors are not typed
        imported.problems.append(f"{at}, field 'segmentation.counts': an RLE that cannot be decoded: {quote(str(exc))}")
        return None
    return rle
