"""A folder of per-instance binary masks: `images/NAME.ext` and, for each instance of that image,
`masks/NAME/CATEGORY/ANY.png`: a single-channel (or RGB) PNG of the image's size whose non-zero pixels
are the instance (one non-zero value: a PNG holding several is an instance-index map, refused, since its
instances would be read as one). An image without a `masks/NAME` folder has no instances. Categories are the folder
names, in sorted order unless a `categories.txt` (one name per line) gives the order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.files import UnsafeFile, open_regular
from training.data.formats import (IMAGE_SUFFIXES, Imported, Instance, check_name, encode, quote, read_bytes,
                                   sized_sample)


def read(src: Path, options: dict[str, Any]) -> Imported:
    imported = Imported(src)
    images = sorted(p for p in (src / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not images:
        imported.problems.append(f"{src / 'images'}: no JPG, PNG or TIFF image found")
        return imported
    order = src / "categories.txt"
    ordered = os.path.lexists(order)
    if ordered and imported.file(order, "categories.txt") is not None:
        names = [n.strip() for n in read_bytes(order, 1 << 20).decode("utf-8", "replace").splitlines() if n.strip()]
        imported.categories = [n for i, n in enumerate(names) if check_name(n, f"categories.txt line {i + 1}", imported)]
    found = set()
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    for folder in sorted(p for p in (src / "masks").glob("*") if p.is_dir()):
        if folder.name not in by_stem:
            imported.problems.append(f"masks/{quote(folder.name)}: no image images/{quote(folder.name)}.* for these masks")
        elif len(by_stem[folder.name]) > 1:
            imported.problems.append(f"masks/{quote(folder.name)}: the images {', '.join(p.name for p in by_stem[folder.name][:4])} "
                                     "share its name; which one these masks belong to is ambiguous (rename one)")
    for image in images:
        where = f"images/{image.name}"
        if imported.file(image, where) is None or (len(by_stem[image.stem]) > 1 and (src / "masks" / image.stem).is_dir()):
            continue
        sample = sized_sample(image, where, where, imported, None, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        for category_dir in sorted(p for p in (src / "masks" / image.stem).glob("*") if p.is_dir()):
            category = category_dir.name
            if check_name(category, f"masks/{image.stem}/{quote(category)}", imported) is None:
                continue
            for path in sorted(category_dir.glob("*")):
                rel = f"masks/{image.stem}/{category}/{path.name}"
                if path.suffix.lower() != ".png" or imported.file(path, rel) is None:
                    if path.suffix.lower() != ".png":
                        imported.problems.append(f"{quote(rel, 120)}: expected a PNG mask")
                    continue
                mask = _binary(path, rel, sample, imported)
                if mask is None:
                    continue
                if ordered and category not in imported.categories:
                    imported.problems.append(f"{rel}: category {quote(category)} is not in categories.txt")
                    continue
                found.add(category)
                imported.add(sample, Instance(category, rle=encode(mask), where=rel))
        imported.samples.append(sample)
    if not ordered:
        imported.categories = sorted(found)
    return imported


def _binary(path: Path, rel: str, sample, imported: Imported) -> np.ndarray | None:
    """The instance's pixels: a PNG of the image's size with one non-zero value."""
    try:
        with open(open_regular(path), "rb") as f, Image.open(f) as img:
            if img.size != (sample.width, sample.height):
                imported.problems.append(f"{rel}: {img.width}x{img.height}, its image is {sample.width}x{sample.height}")
                return None
            values = np.asarray(img.convert("L"))
    except (OSError, UnsafeFile, Image.DecompressionBombError) as exc:
        imported.problems.append(f"{rel}: not a readable PNG: {quote(str(exc))}")
        return None
    levels = np.unique(values)
    levels = levels[levels != 0]
    if levels.size == 0:
        imported.problems.append(f"{rel}: an empty mask (no non-zero pixel)")
        return None
    if levels.size > 1:
        imported.problems.append(f"{rel}: holds {levels.size} non-zero values ({', '.join(str(v) for v in levels[:5])}); "
                                 "a binary mask has one (an instance-index map is several instances: one PNG each)")
        return None
    return values > 0
