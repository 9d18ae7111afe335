"""Exports written by the annotation tools' own libraries, and those libraries' own reading of them.

Run in an environment of its own, never the project's (tests/training/test_convert.py does it, PYTHON being the
tests' interpreter, whose base Python uv reuses: no interpreter is downloaded):

    uv run --no-project --python PYTHON --with datumaro==1.13.12 --with label-studio-converter==0.0.59 \
        --with labelme==6.3.1 python tests/tool_exports.py OUT

It draws a few images with objects (polygons, boxes, masks with holes), then writes, under OUT:
- `cvat-xml/`, `cvat-coco/`, `voc/`: datumaro's CVAT-for-images-1.1, COCO (CVAT's COCO 1.0 writer) and
  VOC instance-segmentation exports of them (datumaro is CVAT's format library; for VOC, whose instances
  are PNG masks, every object drawn as a mask);
- `labelme/`: LabelMe JSON files, mask shapes encoded with labelme's own `img_arr_to_b64`;
- `labelstudio/`: a Label Studio JSON export, brushes encoded with label-studio-converter's `mask2rle`;
- `yolo/`: the Ultralytics segmentation layout, as documented;
- `masks/`: the per-instance PNG layout.
For each, `<format>.reference.npz` holds every instance's mask as the tool's library reads the export
back (datumaro's importers, labelme's `shape_to_mask`, label-studio-converter's `decode_rle`), and
`<format>.reference.json` their images and categories: the independent answer the importers must match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

W, H = 200, 150
CATEGORIES = ["cat", "dog", "bird"]


def scene(seed: int):
    """An image and its objects: (category, kind, geometry, mask) with kind polygon, box or mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 215, (H, W, 3), dtype=np.uint8)
    objects = []
    for k in range(3):
        category = CATEGORIES[(seed + k) % 3]
        x, y = int(rng.integers(5, W - 80)), int(rng.integers(5, H - 70))
        kind = ("polygon", "box", "mask")[(seed + k) % 3]
        if kind == "polygon":
            pts = [x, y, x + 60, y + 5, x + 70, y + 55, x + 30, y + 65, x + 3, y + 40]
            geometry = [float(v) + 0.25 for v in pts]
        elif kind == "box":
            geometry = [float(x), float(y), float(x + 55), float(y + 45)]
        else:
            canvas = Image.new("L", (W, H))
            ImageDraw.Draw(canvas).ellipse((x, y, x + 60, y + 50), fill=1)
            ImageDraw.Draw(canvas).rectangle((x + 25, y + 20, x + 35, y + 30), fill=0)  # a hole
            geometry = np.asarray(canvas, bool)
        objects.append((category, kind, geometry))
    return image, objects


def rasterize(polygon: list[float]) -> np.ndarray:
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([polygon], H, W))).astype(bool)


def box_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def save_reference(out: Path, name: str, rows: list[tuple[str, str, np.ndarray]]) -> None:
    np.savez_compressed(out / f"{name}.reference.npz", **{f"m{i}": m for i, (_, _, m) in enumerate(rows)})
    (out / f"{name}.reference.json").write_text(json.dumps([{"image": img, "category": cat, "key": f"m{i}"}
                                                            for i, (img, cat, _) in enumerate(rows)]))


def datumaro_exports(out: Path, scenes) -> None:
    import datumaro as dm
    from datumaro.components.annotation import AnnotationType, Bbox, Mask, Polygon
    from datumaro.components.media import Image as DmImage

    items = []
    for n, (image, objects) in enumerate(scenes):
        anns = []
        for k, (category, kind, geometry) in enumerate(objects):
            label, ident = CATEGORIES.index(category), k + 1
            if kind == "polygon":
                anns.append(Polygon(geometry, label=label, id=ident, group=ident))
            elif kind == "box":
                x0, y0, x1, y1 = geometry
                anns.append(Bbox(x0, y0, x1 - x0, y1 - y0, label=label, id=ident, group=ident))
            else:
                anns.append(Mask(image=geometry, label=label, id=ident, group=ident))
        items.append(dm.DatasetItem(id=f"img_{n:03d}", subset="default", media=DmImage.from_numpy(image[:, :, ::-1].copy()),
                                    annotations=anns))
    dataset = dm.Dataset.from_iterable(items, categories=CATEGORIES)
    # VOC's instances are PNG masks (its XML objects are boxes): every object as a mask
    as_masks = dm.Dataset.from_iterable([
        dm.DatasetItem(id=item.id, subset=item.subset, media=item.media, annotations=[
            Mask(image=rasterize([float(v) for v in a.points]) if a.type == AnnotationType.polygon else
                 rasterize(box_polygon(a.x, a.y, a.x + a.w, a.y + a.h)) if a.type == AnnotationType.bbox else a.image,
                 label=a.label, id=a.id, group=a.group) for a in item.annotations]) for item in items], categories=CATEGORIES)
    for name, fmt, read_as, source in (("cvat-xml", "cvat", "cvat", dataset),
                                       ("cvat-coco", "coco_instances", "coco_instances", dataset),
                                       ("voc", "voc_instance_segmentation", "voc_instance_segmentation", as_masks)):
        target = out / name
        source.export(str(target), fmt, save_media=True)
        if name == "cvat-xml":  # CVAT names the file annotations.xml
            (target / "default.xml").rename(target / "annotations.xml")
        back = dm.Dataset.import_from(str(target), read_as)
        labels = back.categories()[AnnotationType.label]
        rows = []
        for item in back:
            # datumaro's COCO reader gives each object its box beside its shape: a box is an object only alone
            shaped = {ann.group or ann.id for ann in item.annotations if ann.type in (AnnotationType.mask, AnnotationType.polygon)}
            for ann in item.annotations:
                if ann.type == AnnotationType.mask:
                    mask = np.asarray(ann.image, bool)
                elif ann.type == AnnotationType.polygon:
                    mask = rasterize([float(v) for v in ann.points])
                elif ann.type == AnnotationType.bbox and (ann.group or ann.id) not in shaped:
                    mask = rasterize(box_polygon(ann.x, ann.y, ann.x + ann.w, ann.y + ann.h))
                else:
                    continue
                rows.append((f"{item.id}.jpg", labels[ann.label].name, mask))
        save_reference(out, name, rows)


def labelme_export(out: Path, scenes) -> None:
    from labelme.utils import img_arr_to_b64, img_b64_to_arr, shape_to_mask

    target = out / "labelme"
    target.mkdir(parents=True)
    rows = []
    for n, (image, objects) in enumerate(scenes):
        name = f"img_{n:03d}.png"
        Image.fromarray(image).save(target / name)
        shapes = []
        for k, (category, kind, geometry) in enumerate(objects):
            if kind == "polygon":
                pts = [[geometry[i], geometry[i + 1]] for i in range(0, len(geometry), 2)]
                # the polygon in two parts joined by group_id, as an occluded object is drawn
                half = len(pts) // 2 + 1
                shapes += [{"label": category, "points": pts[:half] + [pts[0]], "group_id": k + 1, "shape_type": "polygon",
                            "flags": {}, "description": "", "mask": None},
                           {"label": category, "points": [pts[0]] + pts[half - 1:], "group_id": k + 1,
                            "shape_type": "polygon", "flags": {}, "description": "", "mask": None}]
            elif kind == "box":
                x0, y0, x1, y1 = geometry
                shapes.append({"label": category, "points": [[x0, y0], [x1, y1]], "group_id": None, "shape_type": "rectangle",
                               "flags": {}, "description": "", "mask": None})
            else:
                ys, xs = np.nonzero(geometry)
                x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
                crop = geometry[y1:y2 + 1, x1:x2 + 1].astype(np.uint8) * 255
                shapes.append({"label": category, "points": [[x1, y1], [x2, y2]], "group_id": None, "shape_type": "mask",
                               "flags": {}, "description": "", "mask": img_arr_to_b64(crop)})
        # a circle too, on the first image
        if n == 0:
            shapes.append({"label": "bird", "points": [[150.0, 110.0], [150.0, 130.0]], "group_id": None,
                           "shape_type": "circle", "flags": {}, "description": "", "mask": None})
        (target / f"img_{n:03d}.json").write_text(json.dumps({
            "version": "6.3.1", "flags": {}, "shapes": shapes, "imagePath": name, "imageData": None,
            "imageHeight": H, "imageWidth": W}, indent=2))
        groups: dict = {}
        for i, shape in enumerate(shapes):
            key = (shape["label"], shape["group_id"] if shape["group_id"] is not None else f"own-{i}")
            if shape["shape_type"] == "mask":  # as labelme.utils.shapes_to_label places it
                (x1, y1), (x2, y2) = np.asarray(shape["points"]).astype(int)
                mask = np.zeros((H, W), bool)
                mask[y1:y2 + 1, x1:x2 + 1] = img_b64_to_arr(shape["mask"]) > 0
            else:
                mask = shape_to_mask((H, W), shape["points"], shape["shape_type"])
            groups[key] = groups.get(key, np.zeros((H, W), bool)) | mask
        rows += [(name, label, mask) for (label, _), mask in groups.items()]
    save_reference(out, "labelme", rows)


def labelstudio_export(out: Path, scenes) -> None:
    from label_studio_converter.brush import decode_rle, mask2rle

    target = out / "labelstudio"
    (target / "images").mkdir(parents=True)
    tasks, rows = [], []
    for n, (image, objects) in enumerate(scenes):
        name = f"img_{n:03d}.png"
        Image.fromarray(image).save(target / "images" / name)
        results = []
        for k, (category, kind, geometry) in enumerate(objects):
            common = {"id": f"r{n}{k}", "from_name": "label", "to_name": "image", "original_width": W, "original_height": H,
                      "image_rotation": 0}
            if kind == "polygon":
                pts = [[geometry[i] * 100 / W, geometry[i + 1] * 100 / H] for i in range(0, len(geometry), 2)]
                results.append({**common, "type": "polygonlabels", "value": {"points": pts, "closed": True,
                                                                             "polygonlabels": [category]}})
                rows.append((name, category, rasterize([v for p in pts for v in (p[0] * W / 100, p[1] * H / 100)])))
            elif kind == "box":
                x0, y0, x1, y1 = geometry
                results.append({**common, "type": "rectanglelabels", "value": {
                    "x": x0 * 100 / W, "y": y0 * 100 / H, "width": (x1 - x0) * 100 / W, "height": (y1 - y0) * 100 / H,
                    "rotation": 0, "rectanglelabels": [category]}})
                rows.append((name, category, rasterize(box_polygon(x0, y0, x1, y1))))
            else:
                rle = mask2rle(geometry.astype(np.uint8) * 255)
                results.append({**common, "type": "brushlabels", "value": {"format": "rle", "rle": [int(v) for v in rle],
                                                                           "brushlabels": [category]}})
                rows.append((name, category, decode_rle(rle).reshape(H, W, 4)[:, :, 3] > 0))
        tasks.append({"id": n + 1, "data": {"image": f"/data/upload/1/{n:08x}-{name}"},
                      "annotations": [{"id": 100 + n, "completed_by": 1, "result": results, "was_cancelled": False}],
                      "predictions": []})
    (target / "export.json").write_text(json.dumps(tasks))
    save_reference(out, "labelstudio", rows)


def yolo_export(out: Path, scenes) -> None:
    target = out / "yolo"
    (target / "images" / "train").mkdir(parents=True)
    (target / "labels" / "train").mkdir(parents=True)
    (target / "data.yaml").write_text("path: /somewhere/else/dataset\ntrain: images/train\nval: images/train\n"
                                      "names:\n  0: cat\n  1: dog\n  2: bird\n")
    rows = []
    for n, (image, objects) in enumerate(scenes):
        name = f"img_{n:03d}.png"
        Image.fromarray(image).save(target / "images" / "train" / name)
        lines = []
        for category, kind, geometry in objects:
            polygon = geometry if kind == "polygon" else box_polygon(*geometry) if kind == "box" else None
            if polygon is None:
                continue  # YOLO has no masks
            lines.append(" ".join([str(CATEGORIES.index(category))] +
                                  [f"{v / (W if i % 2 == 0 else H):.6f}" for i, v in enumerate(polygon)]))
            rows.append((f"images/train/{name}", category, rasterize(polygon)))
        (target / "labels" / "train" / f"img_{n:03d}.txt").write_text("\n".join(lines) + "\n")
    save_reference(out, "yolo", rows)


def masks_export(out: Path, scenes) -> None:
    target = out / "masks"
    (target / "images").mkdir(parents=True)
    rows = []
    for n, (image, objects) in enumerate(scenes):
        name = f"img_{n:03d}.png"
        Image.fromarray(image).save(target / "images" / name)
        for k, (category, kind, geometry) in enumerate(objects):
            mask = geometry if kind == "mask" else rasterize(geometry if kind == "polygon" else box_polygon(*geometry))
            folder = target / "masks" / f"img_{n:03d}" / category
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{k}.png")
            rows.append((name, category, mask))
    save_reference(out, "masks", rows)


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scenes = [scene(seed) for seed in range(4)]
    datumaro_exports(out, scenes)
    labelme_export(out, scenes)
    labelstudio_export(out, scenes)
    yolo_export(out, scenes)
    masks_export(out, scenes)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
