"""COCO instance-segmentation annotations: parse and validate a split (the loader and the validator).

The label map is `maskrcnn.labels`, masks `maskrcnn.masks`, samples `training.data.dataset`.

Validation runs before training: every problem names the file, the record and the field, and says
what was expected. With `skip_invalid` the offending annotations (or images) are dropped and counted
instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_util

from training.data.files import UnsafeFile, regular_file
from maskrcnn.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from maskrcnn.labels import LabelMap
from maskrcnn.masks import polygon_area, segmentation_to_rle
from maskrcnn.storage import escapes_folder

log = logging.getLogger(__name__)

MAX_PROBLEMS_SHOWN = 20


class DatasetError(ValueError):
    """A dataset that cannot be used: malformed JSON, missing files, bad annotations."""

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = problems
        shown = "\n  - ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        hint = "" if len(problems) == 1 and "JSON" in problems[0] else "\n(use data.skip_invalid=true to drop invalid records instead)"
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - {shown}{more}{hint}")


@dataclass
class CocoSplit:
    """A validated split: the cleaned COCO dict, the folder its `file_name`s are relative to, the label map."""

    coco: dict[str, Any]
    root: Path
    label_map: LabelMap
    annotation_file: Path
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def image_ids(self) -> list[int]:
        return [img["id"] for img in self.coco["images"]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


MIN_PART_AREA = 1.0
"""A part of a multi-part polygon smaller than this (square pixels), or with fewer than 3 points, is
degenerate: it is dropped and counted, and the instance keeps its other parts."""


def _check_polygons(seg: list[Any], width: int, height: int) -> tuple[str | None, list[list[float]], int]:
    """(what is wrong or None, the usable parts, how many degenerate parts were dropped)."""
    if not seg:
        return "empty polygon list, expected at least one polygon [x1, y1, x2, y2, x3, y3, ...]", [], 0
    kept: list[list[float]] = []
    degenerate: list[tuple[int, str]] = []
    for i, poly in enumerate(seg):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            return f"polygon {i} is not a flat list of numbers", [], 0
        if len(poly) % 2:
            return f"polygon {i} has {len(poly)} coordinates, expected an even number >= 6", [], 0
        if len(poly) < 6:
            degenerate.append((i, f"polygon {i} has {len(poly)} coordinates, expected an even number >= 6"))
            continue
        xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
        # COCO polygons may touch the far edge (x == width); one pixel of slack allows for rounding.
        if xs.min() < -1 or ys.min() < -1 or xs.max() > width + 1 or ys.max() > height + 1:
            return (
                f"polygon {i} is out of bounds: x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, {ys.max():g}], "
                f"expected within the image's {width}x{height}"
            ), [], 0
        area = polygon_area(poly)
        if area <= 0 or (len(seg) > 1 and area < MIN_PART_AREA):
            degenerate.append((i, f"polygon {i} is empty (zero area)" if area <= 0 else f"polygon {i} is a sliver ({area:.2g} px²)"))
            continue
        kept.append(poly)
    if not kept:
        if len(degenerate) == 1:
            return degenerate[0][1], [], 0
        return f"all {len(degenerate)} polygons are degenerate (zero area, a sliver or fewer than 3 points)", [], 0
    return None, kept, len(degenerate)


def _check_rle(seg: dict[str, Any], width: int, height: int) -> str | None:
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"RLE 'size' must be [height, width], got {size!r}"
    if size != [height, width]:
        return f"RLE size {size} does not match the image's [height, width] = [{height}, {width}]"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "uncompressed RLE 'counts' must be non-negative integers"
        if sum(counts) != height * width:
            return f"uncompressed RLE counts sum to {sum(counts)}, expected height*width = {height * width}"
        return None
    if not isinstance(counts, str) or not counts:
        return f"RLE 'counts' must be a string (compressed) or a list of integers, got {type(counts).__name__}"
    # The compressed form is only checked by decoding it; a malformed string would otherwise pass here
    # and stop training later with a bare decoder error.
    if not counts.isascii() or not all(48 <= ord(c) < 112 for c in counts):
        return "compressed RLE 'counts' is malformed: expected COCO's compressed string (characters '0' to 'o')"
    try:
        mask = mask_util.decode({"size": size, "counts": counts.encode()})
    except Exception as exc:  # the C decoder raises untyped errors; its message says what is wrong
        return f"compressed RLE 'counts' is malformed, it cannot be decoded: {exc}"
    if mask.shape[:2] != (height, width):
        return f"compressed RLE 'counts' decodes to {mask.shape[1]}x{mask.shape[0]}, expected {width}x{height}"
    return None


def _check_segmentation(seg: Any, width: int, height: int, iscrowd: int) -> tuple[str | None, Any, int]:
    """(what is wrong with a segmentation or None, the usable segmentation, degenerate parts dropped)."""
    if isinstance(seg, list):
        if iscrowd:
            return "crowd annotations (iscrowd=1) must use RLE, got a polygon list", seg, 0
        return _check_polygons(seg, width, height)
    if isinstance(seg, dict):
        return _check_rle(seg, width, height), seg, 0
    return f"expected a polygon list or an RLE dict, got {type(seg).__name__}", seg, 0


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError([f"annotation file does not exist, expected a COCO JSON file at {path}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise DatasetError([f"not UTF-8 text ({exc.reason} at byte {exc.start}), expected COCO JSON"], str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError([f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"], str(path)) from None


def _read_split(ann_path: Path) -> dict[str, Any]:
    """The annotation file's top level: an object with lists `images`, `annotations`, `categories` (else fatal)."""
    data = _read_json(ann_path)
    if not isinstance(data, dict):
        raise DatasetError([f"top level is a {type(data).__name__}, expected an object with images, annotations, categories"],
                           str(ann_path))
    fatal = [f"{ann_path.name}: field '{key}' is missing or not a list"
             for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if fatal:
        raise DatasetError(fatal, str(ann_path))
    return data


def _check_categories(records: list[Any], src: str) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """(the categories by id, the problems); any problem in the categories is fatal."""
    categories: dict[int, dict[str, Any]] = {}
    problems = []
    for i, cat in enumerate(records):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.append(f"{src}: categories[{i}]: expected {{'id': int, 'name': str}}, got {cat!r}")
        elif cat["id"] in categories:
            problems.append(f"{src}: categories[{i}], field 'id': duplicate category id {cat['id']}")
        elif cat["id"] <= 0:
            problems.append(f"{src}: categories[{i}], field 'id': {cat['id']} must be a positive integer")
        else:
            categories[cat["id"]] = {"id": cat["id"], "name": cat["name"], "supercategory": cat.get("supercategory", "")}
    if not categories and not problems:
        problems.append(f"{src}: field 'categories' is empty, expected at least one category")
    return categories, problems


@dataclass
class _Checked:
    """What the records checked so far establish, for the ones that refer to them."""

    src: str
    root: Path
    check_images: bool
    max_pixels: int
    categories: dict[int, dict[str, Any]]
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    declared_image_ids: set[int] = field(default_factory=set)
    annotation_ids: set[int] = field(default_factory=set)


def _check_image(i: int, img: Any, ctx: _Checked) -> tuple[dict[str, Any] | None, str | None]:
    """(the cleaned image record, None) or (None, what is wrong with images[i])."""
    if not isinstance(img, dict):
        return None, f"{ctx.src}: images[{i}]: expected an object, got {img!r}"
    where = f"{ctx.src}: images[{i}] (id={img.get('id')!r}, file_name={img.get('file_name')!r})"
    if not _is_int(img.get("id")):
        return None, f"{where}, field 'id': expected an integer"
    if img["id"] in ctx.images:
        return None, f"{where}, field 'id': duplicate image id"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return None, f"{where}, field 'file_name': expected a non-empty string"
    if escapes_folder(img["file_name"]):
        return None, (f"{where}, field 'file_name': escapes the dataset folder (an absolute path or '..'); "
                      f"expected a path relative to {ctx.root}")
    if not (_is_int(img.get("width")) and _is_int(img.get("height")) and img["width"] > 0 and img["height"] > 0):
        return None, f"{where}, fields 'width'/'height': expected positive integers, got {img.get('width')!r}x{img.get('height')!r}"
    path = ctx.root / img["file_name"]
    if not os.path.lexists(path) and os.path.lexists(ctx.root / "images" / img["file_name"]):
        path = ctx.root / "images" / img["file_name"]
    if not os.path.lexists(path):
        return None, f"{where}: image file not found at {path}"
    try:
        regular_file(ctx.root, path)  # no symbolic link, nothing outside the dataset's folder
    except UnsafeFile as exc:
        return None, f"{where}: {path}: {exc}"
    if ctx.check_images:
        try:
            pixels = decode_image(path, max_pixels=ctx.max_pixels)
        except ImageError as exc:
            return None, f"{where}: {exc}"
        h, w = pixels.shape[:2]
        if (w, h) != (img["width"], img["height"]):
            return None, f"{where}: the JSON says {img['width']}x{img['height']}, the image file is {w}x{h}"
    return {"id": img["id"], "file_name": str(path.relative_to(ctx.root)), "width": img["width"], "height": img["height"]}, None


SILENTLY_DROPPED = "its image was invalid and is reported already"


def _check_annotation(i: int, ann: Any, ctx: _Checked) -> tuple[dict[str, Any] | None, str | None, int]:
    """(the cleaned annotation, None, degenerate polygon parts dropped) or (None, what is wrong with
    annotations[i], 0); the problem is `SILENTLY_DROPPED` for an annotation of an invalid image."""
    if not isinstance(ann, dict):
        return None, f"{ctx.src}: annotations[{i}]: expected an object, got {ann!r}", 0
    where = f"{ctx.src}: annotations[{i}] (id={ann.get('id')!r})"
    image_id, cat_id, iscrowd = ann.get("image_id"), ann.get("category_id"), ann.get("iscrowd", 0)
    if not _is_int(ann.get("id")):
        return None, f"{where}, field 'id': expected an integer", 0
    if ann["id"] in ctx.annotation_ids:
        return None, f"{where}, field 'id': duplicate annotation id", 0
    if not _is_int(image_id) or image_id not in ctx.declared_image_ids:
        return None, f"{where}, field 'image_id': {image_id!r} is not the id of any image in 'images'", 0
    if image_id not in ctx.images:
        return None, SILENTLY_DROPPED, 0
    if not _is_int(cat_id) or cat_id not in ctx.categories:
        known = ", ".join(str(c) for c in sorted(ctx.categories))
        return None, f"{where}, field 'category_id': {cat_id!r} is not a known category (known: {known})", 0
    if iscrowd not in (0, 1):
        return None, f"{where}, field 'iscrowd': expected 0 or 1, got {iscrowd!r}", 0
    if "segmentation" not in ann:
        return None, f"{where}, field 'segmentation': missing, expected a polygon list or an RLE dict", 0
    img = ctx.images[image_id]
    reason, segmentation, degenerate = _check_segmentation(ann["segmentation"], img["width"], img["height"], iscrowd)
    if reason:
        return None, f"{where}, field 'segmentation': {reason}", 0
    bbox = ann.get("bbox")
    if "bbox" in ann and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                              and bbox[2] >= 0 and bbox[3] >= 0):
        return None, f"{where}, field 'bbox': expected [x, y, width, height] with width, height >= 0, got {bbox!r}", 0
    if "area" in ann and ann["area"] is not None and not (_is_number(ann["area"]) and ann["area"] >= 0):
        return None, f"{where}, field 'area': expected a number >= 0, got {ann['area']!r}", 0
    try:
        rle = segmentation_to_rle(segmentation, img["height"], img["width"])
    except Exception as exc:  # the C decoder's errors are not typed
        return None, f"{where}, field 'segmentation': cannot be decoded: {exc}", 0
    area = float(mask_util.area(rle))
    if area <= 0:
        return None, f"{where}, field 'segmentation': the mask is empty", 0
    if degenerate:
        log.debug("%s: dropped %d degenerate polygon part(s)", where, degenerate)
    return {"id": ann["id"], "image_id": image_id, "category_id": cat_id, "segmentation": segmentation,
            "area": float(ann.get("area") or area), "bbox": [float(v) for v in bbox or mask_util.toBbox(rle)],
            "iscrowd": int(iscrowd)}, None, degenerate


def load_coco(
    root: str | Path,
    annotation_file: str | Path = "annotations.json",
    skip_invalid: bool = False,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> CocoSplit:
    """Parse and validate a COCO split.

    `annotation_file` is relative to `root` unless absolute; image `file_name`s are relative to
    `root` (or to `root/images` when not found directly under `root`). Raises DatasetError listing
    every problem, unless `skip_invalid`, which drops the bad records and logs how many.
    """
    root = Path(root)
    ann_path = Path(annotation_file) if Path(annotation_file).is_absolute() else root / annotation_file
    src = ann_path.name
    data = _read_split(ann_path)
    categories, fatal = _check_categories(data["categories"], src)
    if fatal:
        raise DatasetError(fatal, str(ann_path))
    ctx = _Checked(src, root, check_images, max_pixels, categories,
                   declared_image_ids={im.get("id") for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))})
    problems: list[str] = []
    bad_images = bad_anns = parts_dropped = 0
    for i, img in enumerate(data["images"]):
        record, problem = _check_image(i, img, ctx)
        if problem:
            problems.append(problem)
            bad_images += 1
        else:
            ctx.images[record["id"]] = record
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        record, problem, degenerate = _check_annotation(i, ann, ctx)
        if problem:
            problems += [] if problem is SILENTLY_DROPPED else [problem]
            bad_anns += 1
            continue
        ctx.annotation_ids.add(record["id"])
        parts_dropped += degenerate
        annotations.append(record)

    if problems and not skip_invalid:
        raise DatasetError(problems, str(ann_path))
    if problems:
        log.warning("%s: skipped %d invalid image(s) and %d invalid annotation(s); first: %s", ann_path, bad_images, bad_anns, problems[0])
    if parts_dropped:
        log.warning("%s: dropped %d degenerate polygon part(s) (zero area, a sliver or fewer than 3 points); "
                    "their instances keep their other parts", ann_path, parts_dropped)
    if not ctx.images:
        raise DatasetError([f"{src}: no usable images"], str(ann_path))
    if not any(a["iscrowd"] == 0 for a in annotations):
        raise DatasetError([f"{src}: no annotations: none of the {len(ctx.images)} image(s) has an instance to learn "
                            f"(field 'annotations' is empty{' after dropping invalid ones' if bad_anns else ''} or "
                            f"holds crowd regions only); expected at least one non-crowd instance"], str(ann_path))
    coco = {"info": data.get("info", {}), "images": list(ctx.images.values()), "annotations": annotations,
            "categories": list(categories.values())}
    return CocoSplit(coco, root, LabelMap.from_categories(list(categories.values())), ann_path,
                     dropped={"images": bad_images, "annotations": bad_anns, "polygon_parts": parts_dropped})


def subset(split: CocoSplit, image_ids: list[int]) -> CocoSplit:
    """The same split restricted to `image_ids` (same label map)."""
    keep = set(image_ids)
    coco = dict(split.coco)
    coco["images"] = [img for img in split.coco["images"] if img["id"] in keep]
    coco["annotations"] = [a for a in split.coco["annotations"] if a["image_id"] in keep]
    return CocoSplit(coco, split.root, split.label_map, split.annotation_file)


