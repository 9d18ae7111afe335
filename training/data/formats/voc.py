"""Pascal VOC instance segmentation: `JPEGImages/NAME.jpg`, `SegmentationObject/NAME.png` (instance i's
pixels hold i, 0 is background, 255 the void border), `SegmentationClass/NAME.png` (each pixel's class
index), `Annotations/NAME.xml` (the objects, in instance order) and, optionally, `labelmap.txt` (CVAT's
and datumaro's list of `name:r,g,b::` lines; without it, VOC's 20 classes) and
`ImageSets/Segmentation/<split>.txt`.

An instance's class is the class its pixels have in `SegmentationClass` (all of them must agree); without
that file, the name of the XML's i-th object (VOC's own convention; tools that write boxes-only objects
into the XML, as datumaro does, break it, so the PNG is preferred). The void border belongs to no instance, as in VOC's own
evaluation. Images without a `SegmentationObject` PNG have no masks and are left out (counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import glob
import os

from training.data.files import UnsafeFile, open_regular
from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, check_name, encode, quote, read_bytes, read_xml, sized_sample

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
VOID = 255


def _labelmap(src: Path, imported: Imported) -> tuple[list[str], dict[tuple[int, int, int], int]]:
    path = src / "labelmap.txt"
    if not os.path.lexists(path) or imported.file(path, "labelmap.txt") is None:
        return list(VOC_CLASSES), {}
    names, colours = [], {}
    for n, line in enumerate(read_bytes(path, 1 << 20).decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        colour = rest.split(":")[0]
        if colour:
            try:
                rgb = tuple(int(v) for v in colour.split(","))
                if len(rgb) != 3:
                    raise ValueError
                colours[rgb] = len(names)
            except ValueError:
                imported.problems.append(f"labelmap.txt line {n}: colour {quote(colour)}, expected r,g,b")
        names.append(check_name(name.strip(), f"labelmap.txt line {n}", imported) or "")
    return names, colours


def read(src: Path, options: dict[str, Any]) -> Imported:
    imported = Imported(src)
    names, colours = _labelmap(src, imported)
    split = options.get("split")
    objects_dir = src / "SegmentationObject"
    if split:
        listing = src / "ImageSets" / "Segmentation" / f"{split}.txt"
        if imported.file(listing, f"{listing.relative_to(src)} (the split {quote(split)})") is None:
            return imported
        stems = [s.strip() for s in read_bytes(listing, 64 << 20).decode("utf-8", "replace").split() if s.strip()]
    else:
        stems = sorted(p.stem for p in objects_dir.glob("*.png"))
    if not stems:
        imported.problems.append(f"{objects_dir.relative_to(src) if objects_dir.is_relative_to(src) else objects_dir}: "
                                 "no instance masks (*.png) found")
        return imported
    for stem in stems:
        if "/" in stem or "\\" in stem or stem.startswith(".."):
            imported.problems.append(f"{quote(stem)}: not a plain image name")
            continue
        candidates = [p for p in sorted((src / "JPEGImages").glob(f"{glob.escape(stem)}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(candidates) > 1:
            imported.problems.append(f"JPEGImages/{quote(stem)}.*: {len(candidates)} images of one name "
                                     f"({', '.join(p.name for p in candidates[:4])}); keep one")
            continue
        if not candidates:
            imported.problems.append(f"JPEGImages/{quote(stem)}.*: image not found")
            continue
        image = imported.file(candidates[0], f"JPEGImages/{candidates[0].name}")
        obj_path = objects_dir / f"{stem}.png"
        if image is None:
            continue
        if not os.path.lexists(obj_path):
            imported.skip("images without SegmentationObject")
            continue
        if imported.file(obj_path, f"SegmentationObject/{stem}.png") is None:
            continue
        sample = sized_sample(image, f"JPEGImages/{image.name}", f"JPEGImages/{image.name}", imported, None,
                              options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        objects = _indexed(obj_path, f"SegmentationObject/{stem}.png", sample, imported, {})
        class_path = src / "SegmentationClass" / f"{stem}.png"
        has_classes = os.path.lexists(class_path)
        if has_classes and imported.file(class_path, f"SegmentationClass/{stem}.png") is None:
            continue
        classes = _indexed(class_path, f"SegmentationClass/{stem}.png", sample, imported, colours) if has_classes else None
        xml_path = src / "Annotations" / f"{stem}.xml"
        xml_names = []
        if os.path.lexists(xml_path) and imported.file(xml_path, f"Annotations/{stem}.xml") is not None:
            xml_names = [(o.findtext("name") or "").strip() for o in read_xml(xml_path).iter("object")]
        if objects is None or (has_classes and classes is None):
            continue
        for index in [int(v) for v in np.unique(objects) if v not in (0, VOID)]:
            mask = objects == index
            at = f"SegmentationObject/{stem}.png, instance {index}"
            name = _class_of(mask, classes, index, xml_names, names, at, imported)
            if name is None or check_name(name, at, imported) is None:
                continue
            imported.category(name)
            imported.add(sample, Instance(name, rle=encode(mask), where=at))
        imported.samples.append(sample)
    if imported.samples and not options.get("keep_unused"):
        used = {i.category for s in imported.samples for i in s.instances}
        imported.categories = [n for n in names if n in used] + [n for n in imported.categories if n not in names]
    return imported


def _indexed(path: Path, rel: str, sample, imported: Imported, colours: dict[tuple[int, int, int], int]) -> np.ndarray | None:
    """A PNG's per-pixel indices (palette or grey; RGB through labelmap.txt's colours, else VOC's colour map, as
    datumaro and CVAT write them), sized as the image."""
    try:
        with open(open_regular(path), "rb") as f, Image.open(f) as img:
            if img.size != (sample.width, sample.height):
                imported.problems.append(f"{rel}: {img.width}x{img.height}, the image is {sample.width}x{sample.height}")
                return None
            if img.mode in ("P", "L"):
                return np.asarray(img)
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnsafeFile, Image.DecompressionBombError) as exc:
        imported.problems.append(f"{rel}: not a readable PNG: {quote(str(exc))}")
        return None
    colours = colours or {tuple(int(v) for v in c): i for i, c in enumerate(voc_colormap())}
    out = np.full(rgb.shape[:2], VOID, np.uint8)
    key = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
    known = np.zeros(rgb.shape[:2], bool)
    for (r, g, b), index in colours.items():
        hit = key == (r << 16 | g << 8 | b)
        out[hit] = index
        known |= hit
    if not known.all():
        r, g, b = rgb[~known][0]
        imported.problems.append(f"{rel}: colour ({r}, {g}, {b}) is no index of the VOC colour map "
                                 f"{'or labelmap.txt' if colours else ''}".rstrip())
        return None
    return out


def voc_colormap(n: int = 256) -> np.ndarray:
    """Pascal VOC's colour map (the devkit's labelcolormap): index i's bits spread over R, G, B from the top bit."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << bit
            c >>= 3
        cmap[i] = rgb
    return cmap


def _class_of(mask: np.ndarray, classes: np.ndarray | None, index: int, xml_names: list[str], names: list[str],
              at: str, imported: Imported) -> str | None:
    if classes is not None:
        values = np.unique(classes[mask])
        values = values[values != VOID]
        if len(values) != 1 or not 0 < int(values[0]) < len(names):
            shown = f"{values.tolist()[:8]}{' ...' if len(values) > 8 else ''}"
            imported.problems.append(f"{at}: its pixels have classes {shown} in SegmentationClass, expected "
                                     f"one class of 1-{len(names) - 1}")
            return None
        return names[int(values[0])]
    if index > len(xml_names) or not xml_names[index - 1]:
        imported.problems.append(f"{at}: no SegmentationClass PNG, and the annotation XML has no object {index}")
        return None
    return xml_names[index - 1]
