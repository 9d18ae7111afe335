"""The YOLO segmentation format (Ultralytics): a `data.yaml` with `path` (optional), the splits (`train`,
`val`, ...: a folder of images, relative to `path`, or a text file listing images) and `names` (a list, or
a mapping from class index to name); for each image `.../images/.../NAME.ext`, its labels at
`.../labels/.../NAME.txt`, one instance per line: `class x1 y1 x2 y2 ...`, coordinates normalised to 0-1.

An image without a label file has no instances (Ultralytics' background images). A line of 5 numbers is
a detection box, not a polygon: refused, with the file and line, since a box is not a mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, check_polygon, read_bytes, sized_sample

MAX_LABEL_BYTES = 64 << 20


def _names(config: dict[str, Any], where: str, imported: Imported) -> list[str] | None:
    names = config.get("names")
    if isinstance(names, dict) and all(isinstance(k, int) for k in names) and sorted(names) == list(range(len(names))):
        names = [names[k] for k in range(len(names))]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        imported.problems.append(f"{where}, field 'names': expected a list of class names, or a mapping 0..N-1 -> name")
        return None
    return names


def read(src: Path, options: dict[str, Any]) -> Imported:
    """The split `options["split"]` (default `train`) of the YOLO dataset whose data.yaml is in `src`."""
    imported = Imported()
    yaml_path = src if src.is_file() else next((src / n for n in ("data.yaml", "dataset.yaml") if (src / n).is_file()), None)
    if yaml_path is None:
        imported.problems.append(f"{src}: no data.yaml found")
        return imported
    try:
        config = yaml.safe_load(read_bytes(yaml_path, 1 << 20))
    except yaml.YAMLError as exc:
        imported.problems.append(f"{yaml_path.name}: not valid YAML: {exc}")
        return imported
    where = yaml_path.name
    if not isinstance(config, dict):
        imported.problems.append(f"{where}: expected a mapping with 'names' and the splits")
        return imported
    names = _names(config, where, imported)
    if names is None:
        return imported
    imported.categories = list(names)
    base = yaml_path.parent.resolve()
    root = (base / str(config.get("path") or ".")).resolve()
    if not root.is_relative_to(base):
        root = base  # a path of the machine that wrote it: the dataset has moved here
    split = options.get("split") or "train"
    entry = config.get(split)
    if not isinstance(entry, str) or not entry:
        imported.problems.append(f"{where}, field {split!r}: expected the split's image folder or list file")
        return imported
    images = _images(root, entry, f"{where}, field {split!r}", imported)
    for image in images:
        rel = image.relative_to(root)
        label = _label_path(image, root)
        sample = sized_sample(image, str(rel), str(rel), imported, None, options.get("max_pixels", 64_000_000))
        if sample is None:
            continue
        if label is not None and label.is_file():
            _read_labels(label, label.relative_to(root), names, sample, imported)
        imported.samples.append(sample)
    return imported


def _images(root: Path, entry: str, where: str, imported: Imported) -> list[Path]:
    target = (root / entry).resolve()
    if not target.is_relative_to(root):
        imported.problems.append(f"{where}: {entry!r} is outside the dataset folder {root}")
        return []
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if target.is_file():
        out = []
        for n, line in enumerate(read_bytes(target, MAX_LABEL_BYTES).decode("utf-8", "replace").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            path = (root / line).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                imported.problems.append(f"{target.relative_to(root)} line {n}: {line!r} is not an image in {root}")
                continue
            out.append(path)
        return out
    imported.problems.append(f"{where}: {entry!r} not found in {root}")
    return []


def _label_path(image: Path, root: Path) -> Path | None:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.relative_to(root).parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return (root.joinpath(*parts)).with_suffix(".txt")


def _read_labels(path: Path, rel: Path, names: list[str], sample, imported: Imported) -> None:
    text = read_bytes(path, MAX_LABEL_BYTES).decode("utf-8", "replace")
    for n, line in enumerate(text.splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        at = f"{rel} line {n}"
        try:
            cls = int(values[0])
        except ValueError:
            imported.problems.append(f"{at}: the class {values[0]!r} is not an integer")
            continue
        if not 0 <= cls < len(names):
            imported.problems.append(f"{at}: class {cls} is not in names (0-{len(names) - 1})")
            continue
        if len(values) == 5:
            imported.problems.append(f"{at}: a detection box (class x y w h), not a polygon; this importer reads the "
                                     "segmentation format (class x1 y1 x2 y2 ...)")
            continue
        flat, problem = check_polygon(values[1:], at, (sample.width, sample.height))
        if problem:
            imported.problems.append(problem)
            continue
        if any(not -0.01 <= float(v) <= 1.01 for v in values[1:]):
            imported.problems.append(f"{at}: coordinates must be normalised to 0-1")
            continue
        sample.instances.append(Instance(names[cls], polygons=[flat], where=at))
