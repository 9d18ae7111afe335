"""A folder of per-instance binary masks: `images/NAME.ext` and, for each instance of that image,
`masks/NAME/CATEGORY/ANY.png`: a single-channel (or RGB) PNG of the image's size whose non-zero pixels
are the instance. An image without a `masks/NAME` folder has no instances. Categories are the folder
names, in sorted order unless a `categories.txt` (one name per line) gives the order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, read_bytes, sized_sample


def read(src: Path, options: dict[str, Any]) -> Imported:
    imported = Imported()
    images = sorted(p for p in (src / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        imported.problems.append(f"{src / 'images'}: no JPG, PNG or TIFF image found")
        return imported
    order = src / "categories.txt"
    if order.is_file():
        imported.categories = [n.strip() for n in read_bytes(order, 1 << 20).decode("utf-8").splitlines() if n.strip()]
    found = set()
    stems = {p.stem for p in images}
    for folder in sorted(p for p in (src / "masks").glob("*") if p.is_dir()):
        if folder.name not in stems:
            imported.problems.append(f"masks/{folder.name}: no image images/{folder.name}.* for these masks")
    for image in images:
        sample = sized_sample(image, image.name, f"images/{image.name}", imported, None, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        for category_dir in sorted(p for p in (src / "masks" / image.stem).glob("*") if p.is_dir()):
            for path in sorted(category_dir.glob("*")):
                rel = f"masks/{image.stem}/{category_dir.name}/{path.name}"
                if path.suffix.lower() != ".png" or not path.is_file():
                    imported.problems.append(f"{rel}: expected a PNG mask")
                    continue
                try:
                    with Image.open(path) as img:
                        if img.size != (sample.width, sample.height):
                            imported.problems.append(f"{rel}: {img.width}x{img.height}, its image is {sample.width}x{sample.height}")
                            continue
                        mask = np.asarray(img.convert("L")) > 0
                except OSError as exc:
                    imported.problems.append(f"{rel}: not a readable PNG: {exc}")
                    continue
                if not mask.any():
                    imported.problems.append(f"{rel}: an empty mask (no non-zero pixel)")
                    continue
                if imported.categories and order.is_file() and category_dir.name not in imported.categories:
                    imported.problems.append(f"{rel}: category {category_dir.name!r} is not in categories.txt")
                    continue
                found.add(category_dir.name)
                sample.instances.append(Instance(category_dir.name, mask=mask, where=rel))
        imported.samples.append(sample)
    if not order.is_file():
        imported.categories = sorted(found)
    return imported
