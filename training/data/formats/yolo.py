"""The YOLO segmentation format (Ultralytics): a `data.yaml` with `path` (optional), the splits (`train`,
`val`, ...: a folder of images, relative to `path`, a text file listing images (a line starting with
`./` relative to the list file's folder, as Ultralytics reads it), or a list of them, as Ultralytics' own
VOC.yaml writes) and `names` (a list, or a mapping from class index to name, the index
an integer or its text, which Ultralytics reads with `int()`); for each image `.../images/.../NAME.ext`, its labels at
`.../labels/.../NAME.txt`, one instance per line: `class x1 y1 x2 y2 ...`, coordinates normalised to 0-1.

An image without a label file has no instances (Ultralytics' background images). A line of 5 numbers is
a detection box, not a polygon: refused, with the file and line, since a box is not a mask.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, Sample, check_name, check_polygon, quote, read_bytes, sized_sample

MAX_LABEL_BYTES = 64 << 20
MAX_SPLIT_ENTRIES = 100


def _names(config: dict[str, Any], where: str, imported: Imported) -> list[str] | None:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            by_index = {int(k): v for k, v in names.items() if not isinstance(k, bool)}
        except (TypeError, ValueError):
            by_index = {}
        names = [by_index[k] for k in range(len(by_index))] if sorted(by_index) == list(range(len(names))) else None
    if not (isinstance(names, list) and names):
        imported.problems.append(f"{where}, field 'names': expected a list of class names, or a mapping 0..N-1 -> name")
        return None
    if any(check_name(n, f"{where}, field 'names'[{i}]", imported) is None for i, n in enumerate(names)):
        return None
    return names


def read(src: Path, options: dict[str, Any]) -> Imported:
    """The split `options["split"]` (default `train`) of the YOLO dataset whose data.yaml is in `src`."""
    imported = Imported(src.parent if src.is_file() else src)
    yaml_path = src if src.is_file() else next((src / n for n in ("data.yaml", "dataset.yaml") if os.path.lexists(src / n)), None)
    if yaml_path is None:
        imported.problems.append(f"{src}: no data.yaml found")
        return imported
    where = yaml_path.name
    if imported.file(yaml_path, where) is None:
        return imported
    try:
        config = yaml.safe_load(read_bytes(yaml_path, 1 << 20))
    except yaml.YAMLError as exc:
        imported.problems.append(f"{where}: not valid YAML: {quote(str(exc), 200)}")
        return imported
    if not isinstance(config, dict):
        imported.problems.append(f"{where}: expected a mapping with 'names' and the splits")
        return imported
    names = _names(config, where, imported)
    if names is None:
        return imported
    imported.categories = list(names)
    base = yaml_path.parent.resolve()
    path = config.get("path")
    root = (base / path).resolve() if isinstance(path, str) and path else base
    if not root.is_relative_to(base):
        root = base  # a path of the machine that wrote it: the dataset has moved here
    split = options.get("split") or "train"
    entry = config.get(split)
    entries = entry if isinstance(entry, list) else [entry]
    if not entries or len(entries) > MAX_SPLIT_ENTRIES or not all(isinstance(e, str) and e for e in entries):
        imported.problems.append(f"{where}, field {quote(split)}: expected the split's image folder or list file, "
                                 f"or a list of at most {MAX_SPLIT_ENTRIES} of them")
        return imported
    images = [image for e in entries for image in _images(root, e, f"{where}, field {quote(split)}", imported)]
    for image in images:
        rel = image.relative_to(root)
        sample = sized_sample(image, str(rel), str(rel), imported, None, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        label = _label_path(image, root)
        if os.path.lexists(label):
            if imported.file(label, str(label.relative_to(root))) is None:
                continue
            _read_labels(label, label.relative_to(root), names, sample, imported)
        imported.samples.append(sample)
    return imported


def _images(root: Path, entry: str, where: str, imported: Imported) -> list[Path]:
    target = (root / entry).resolve()
    if not target.is_relative_to(root):
        imported.problems.append(f"{where}: {quote(entry)} is outside the dataset folder {root}")
        return []
    if target.is_dir():
        found = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        return [p for p in found if imported.file(p, f"{where}: {p.relative_to(root)}") is not None]
    if imported.file(target, f"{where}: {quote(entry)}") is None:
        return []
    out = []
    listing = target.relative_to(root)
    for n, line in enumerate(read_bytes(target, MAX_LABEL_BYTES).decode("utf-8", "replace").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        # Ultralytics' rule: a line starting with ./ is relative to the list file's folder, another to the dataset
        where = Path(os.path.normpath(target.parent / line[2:] if line.startswith("./") else root / line))
        path = imported.file(where, f"{listing} line {n}: {quote(line)}")
        if path is not None:
            out.append(path)
    return out


def _label_path(image: Path, root: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.relative_to(root).parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return (root.joinpath(*parts)).with_suffix(".txt")


def _read_labels(path: Path, rel: Path, names: list[str], sample: Sample, imported: Imported) -> None:
    text = read_bytes(path, MAX_LABEL_BYTES).decode("utf-8", "replace")
    for n, line in enumerate(text.splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        at = f"{rel} line {n}"
        try:
            cls = int(values[0])
        except ValueError:
            imported.problems.append(f"{at}: the class {quote(values[0], 20)} is not an integer")
            continue
        if not 0 <= cls < len(names):
            imported.problems.append(f"{at}: class {quote(cls, 20)} is not in names (0-{len(names) - 1})")
            continue
        if len(values) == 5:
            imported.problems.append(f"{at}: a detection box (class x y w h), not a polygon; this importer reads the "
                                     "segmentation format (class x1 y1 x2 y2 ...)")
            continue
        flat, problem = check_polygon(values[1:], at, sample.width, sample.height, (sample.width, sample.height))
        if problem:
            imported.problems.append(problem.replace("coordinates must be numbers", "coordinates must be numbers (normalised 0-1)"))
            continue
        imported.add(sample, Instance(names[cls], polygons=[flat], where=at))
