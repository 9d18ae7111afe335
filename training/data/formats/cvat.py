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
from pathlib import Path
from typing import Any

import numpy as np

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, check_polygon, read_json, read_xml, sized_sample

LEFT_OUT = ("polyline", "points", "cuboid", "skeleton", "ellipse", "tag")


def _find_image(src: Path, name: str) -> Path | None:
    for base in (src / "images", src):
        path = (base / name).resolve()
        if path.is_relative_to(src.resolve()) and path.is_file():
            return path
    return None


def read_xml_export(src: Path, options: dict[str, Any]) -> Imported:
    imported = Imported()
    ann = src / "annotations.xml" if src.is_dir() else src
    root = read_xml(ann)
    src = ann.parent
    rel = ann.name
    if root.tag != "annotations":
        imported.problems.append(f"{rel}: the root element is <{root.tag}>, expected <annotations> (CVAT for images 1.1)")
        return imported
    version = root.findtext("version")
    if version and version.strip() != "1.1":
        imported.problems.append(f"{rel}: <version> {version.strip()}, this importer reads 1.1")
        return imported
    for label in root.iterfind("./meta//labels/label"):
        name = (label.findtext("name") or "").strip()
        if name and (label.findtext("type") or "any") in ("any", "polygon", "rectangle", "mask", "bitmap"):
            imported.category(name)
    for index, image in enumerate(root.iter("image")):
        name = image.get("name", "")
        where = f"{rel}: image[{index}] (name={name!r})"
        if not name or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            imported.problems.append(f"{where}, attribute 'name': expected a JPG, PNG or TIFF file name")
            continue
        path = _find_image(src, name)
        if path is None:
            imported.problems.append(f"{where}: image file not found under {src / 'images'} or {src}")
            continue
        declared = (_int(image.get("width")), _int(image.get("height")))
        sample = sized_sample(path, name, where, imported, declared, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        groups: dict[tuple[str, str], list[Instance]] = {}
        for j, shape in enumerate(image):
            label = shape.get("label", "")
            at = f"{where}: <{shape.tag}>[{j}] (label={label!r})"
            if shape.tag in LEFT_OUT:
                imported.skipped[f"<{shape.tag}> shapes (no area)"] = imported.skipped.get(f"<{shape.tag}> shapes (no area)", 0) + 1
                continue
            if shape.tag not in ("polygon", "box", "mask"):
                imported.problems.append(f"{at}: unknown element")
                continue
            if not label:
                imported.problems.append(f"{at}, attribute 'label': missing")
                continue
            part = _shape(shape, at, sample.width, sample.height, imported)
            if part is None:
                continue
            imported.category(label)
            group = shape.get("group_id")
            key = (label, group) if group not in (None, "", "0") else (label, f"own-{j}")
            groups.setdefault(key, []).append(part)
        for parts in groups.values():
            sample.instances.append(_join(parts, sample.height, sample.width))
        imported.samples.append(sample)
    return imported


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _shape(shape: Any, at: str, width: int, height: int, imported: Imported) -> Instance | None:
    label = shape.get("label")
    if shape.tag == "polygon":
        try:
            points = [[float(v) for v in p.split(",")] for p in shape.get("points", "").split(";") if p.strip()]
            if any(len(p) != 2 for p in points):
                raise ValueError
        except ValueError:
            imported.problems.append(f"{at}, attribute 'points': expected 'x,y;x,y;...'")
            return None
        flat, problem = check_polygon(points, f"{at}, attribute 'points'")
        if problem:
            imported.problems.append(problem)
            return None
        return Instance(label, polygons=[flat], where=at)
    if shape.tag == "box":
        try:
            x0, y0, x1, y1 = (float(shape.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))
            angle = math.radians(float(shape.get("rotation") or 0.0))
        except (TypeError, ValueError):
            imported.problems.append(f"{at}: attributes 'xtl', 'ytl', 'xbr', 'ybr' (and 'rotation') must be numbers")
            return None
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        c, s = math.cos(angle), math.sin(angle)
        flat = [v for x, y in corners for v in (cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)]
        return Instance(label, polygons=[flat], where=at)
    try:
        left, top, w, h = (int(float(shape.get(k))) for k in ("left", "top", "width", "height"))
        counts = [int(v) for v in shape.get("rle", "").split(",") if v.strip()]
    except (TypeError, ValueError):
        imported.problems.append(f"{at}: attributes 'rle', 'left', 'top', 'width', 'height' must be integers")
        return None
    if w <= 0 or h <= 0 or left < 0 or top < 0 or left + w > width or top + h > height:
        imported.problems.append(f"{at}: the mask's box {left},{top} {w}x{h} is not inside the {width}x{height} image")
        return None
    if any(c < 0 for c in counts) or sum(counts) != w * h:
        imported.problems.append(f"{at}, attribute 'rle': its runs cover {sum(counts)} pixels, the box {w}x{h} has {w * h}")
        return None
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)  # background first
    mask = np.zeros((height, width), bool)
    mask[top:top + h, left:left + w] = flat.reshape(h, w)
    return Instance(label, mask=mask, where=at)


def _join(parts: list[Instance], height: int, width: int) -> Instance:
    """The shapes of one group as one instance (masks merged; polygons kept together when all are polygons)."""
    if len(parts) == 1:
        return parts[0]
    where = "; ".join(p.where for p in parts)
    if all(p.mask is None for p in parts):
        return Instance(parts[0].category, polygons=[poly for p in parts for poly in p.polygons or []], where=where)
    from training.data.masks import decode_segmentation

    mask = np.zeros((height, width), bool)
    for p in parts:
        mask |= p.mask if p.mask is not None else decode_segmentation(p.polygons, height, width).astype(bool)
    return Instance(parts[0].category, mask=mask, where=where)


def read_coco_export(src: Path, options: dict[str, Any]) -> Imported:
    """CVAT's COCO 1.0 export of one subset (`options["subset"]`, default: the only `instances_*.json`)."""
    from training.data.masks import decode_segmentation

    imported = Imported()
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
    data = read_json(ann_path)
    rel = f"annotations/{ann_path.name}"
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        imported.problems.append(f"{rel}: expected a COCO object with lists 'images', 'annotations', 'categories'")
        return imported
    names = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            imported.problems.append(f"{rel}: categories[{i}]: expected {{'id': int, 'name': str}}")
            continue
        names[cat["id"]] = cat["name"]
        imported.category(cat["name"])
    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
    for i, ann in enumerate(data["annotations"]):
        by_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append((i, ann))
    keep_crowd = bool(options.get("keep_crowd"))
    for i, img in enumerate(data["images"]):
        where = f"{rel}: images[{i}] (id={img.get('id')!r}, file_name={img.get('file_name')!r})" if isinstance(img, dict) \
            else f"{rel}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            imported.problems.append(f"{where}, field 'file_name': expected a string")
            continue
        path = _find_image(src / "images", img["file_name"]) or _find_image(src / "images" / name, img["file_name"])
        if path is None:
            imported.problems.append(f"{where}: image file not found under {src / 'images'}")
            continue
        sample = sized_sample(path, img["file_name"], where, imported, (img.get("width"), img.get("height")),
                              options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        for j, ann in by_image.get(img.get("id"), []):
            at = f"{rel}: annotations[{j}] (id={ann.get('id')!r})"
            if ann.get("category_id") not in names:
                imported.problems.append(f"{at}, field 'category_id': {ann.get('category_id')!r} is not a known category")
                continue
            seg = ann.get("segmentation")
            crowd = int(ann.get("iscrowd", 0) or 0)
            if seg == [] and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:  # a CVAT box: no segmentation
                x, y, w, h = (float(v) for v in ann["bbox"])
                seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            if isinstance(seg, list) and seg:
                polygons = []
                for k, poly in enumerate(seg):
                    flat, problem = check_polygon(poly, f"{at}, field 'segmentation'[{k}]")
                    if problem:
                        imported.problems.append(problem)
                        break
                    polygons.append(flat)
                else:
                    sample.instances.append(Instance(names[ann["category_id"]], polygons=polygons, iscrowd=crowd, where=at))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), (list, str)) and seg.get("size") == [sample.height, sample.width]:
                try:
                    mask = decode_segmentation(seg, sample.height, sample.width).astype(bool)
                except Exception as exc:  # the C decoder's errors are not typed
                    imported.problems.append(f"{at}, field 'segmentation': an RLE that cannot be decoded: {exc}")
                    continue
                sample.instances.append(Instance(names[ann["category_id"]], mask=mask, iscrowd=crowd if keep_crowd else 0, where=at))
            else:
                imported.problems.append(f"{at}, field 'segmentation': expected polygons or an RLE of size "
                                         f"[{sample.height}, {sample.width}]")
        imported.samples.append(sample)
    return imported
