"""Turn a `DataConfig` into validated train/val splits, a label map and a content hash.

The driver calls `prepare_data(validate=True)` before Ray starts, so a bad dataset fails in seconds
with the offending file and field. Each Ray worker calls it again with `validate=False`: the same
sources resolve to the same cached files (a remote node fetches its own copy), and only the JSON is
parsed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.config import DataConfig
from training.data.coco import CocoSplit, DatasetError, load_coco, subset
from maskrcnn.labels import LabelMap
from maskrcnn.storage import content_hash, escapes_folder, fetch_prefix, sha256_file
from training.data.synthetic import synthetic_dataset

log = logging.getLogger(__name__)

PREPARED_FILE = "dataset.json"


@dataclass
class PreparedData:
    train: CocoSplit
    val: CocoSplit
    label_map: LabelMap
    content_hash: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def split_stats(split: CocoSplit) -> dict[str, Any]:
    counts = Counter(a["category_id"] for a in split.coco["annotations"])
    names = dict(zip(split.label_map.category_ids, split.label_map.names))
    return {
        "images": len(split.coco["images"]),
        "instances": len(split.coco["annotations"]),
        "crowd": sum(a["iscrowd"] for a in split.coco["annotations"]),
        "per_class": {names[c]: counts.get(c, 0) for c in split.label_map.category_ids},
    }


def _files_of(split: CocoSplit) -> list[str]:
    ann = split.annotation_file
    ann_name = str(ann.relative_to(split.root)) if ann.is_relative_to(split.root) else str(ann)  # absolute: joins as itself
    return [ann_name] + [img["file_name"] for img in split.coco["images"]]


def prepare_data(cfg: DataConfig, validate: bool = True) -> PreparedData:
    """Resolve, fetch and validate the dataset named by `cfg` (the synthetic one when `cfg.train` is empty)."""
    cache = cfg.resolved_cache_dir()
    kwargs = {"skip_invalid": cfg.skip_invalid, "check_images": validate, "max_pixels": cfg.max_image_pixels}
    if not cfg.train:
        if cfg.val:
            raise DatasetError(["data.val is set but data.train is empty: give both, or neither for the synthetic dataset"], "config")
        train_dir, val_dir = synthetic_dataset(cfg.synthetic, cache)
        train, val = load_coco(train_dir, **kwargs), load_coco(val_dir, **kwargs)
    elif cfg.format != "coco":  # an annotation tool's export, converted once into the cache
        train = load_coco(_converted(cfg, cfg.train, {"split": "train"} if cfg.format == "yolo" else {}), **kwargs)
        order = {"categories": train.label_map.names}
        if cfg.val:
            val = load_coco(_converted(cfg, cfg.val, {"split": "val", **order} if cfg.format == "yolo" else order), **kwargs)
        elif cfg.format == "yolo":  # data.yaml names its own validation split
            val = load_coco(_converted(cfg, cfg.train, {"split": "val", **order}), **kwargs)
        else:
            train, val = _hold_out(cfg, train)
    else:
        train_dir = fetch_prefix(cfg.train, cache)
        train = load_coco(train_dir, cfg.train_annotations, **kwargs)
        if cfg.val:
            val = load_coco(fetch_prefix(cfg.val, cache), cfg.val_annotations, **kwargs)
        else:
            train, val = _hold_out(cfg, train)
    return _checked(cfg, train, val, validate)


def _converted(cfg: DataConfig, uri: str, options: dict[str, Any]) -> Path:
    from training.data.convert import converted

    cache = cfg.resolved_cache_dir()
    return converted(cfg.format, fetch_prefix(uri, cache), cache, {**options, "max_pixels": cfg.max_image_pixels})


def _hold_out(cfg: DataConfig, train: CocoSplit) -> tuple[CocoSplit, CocoSplit]:
    """(train, val): `cfg.val_fraction` of the images held out, the same ones every run."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DatasetError([f"data.val_fraction must be in (0, 1) when data.val is empty, got {cfg.val_fraction}"], "config")
    ids = np.array(train.image_ids)
    rng = np.random.default_rng(0)  # fixed: the held-out split must not move between runs
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * cfg.val_fraction)))
    if n_val >= len(ids):
        raise DatasetError([f"{cfg.train}: {len(ids)} image(s) are too few to hold out {cfg.val_fraction:.0%} for validation"], "config")
    return subset(train, ids[n_val:].tolist()), subset(train, ids[:n_val].tolist())


def _checked(cfg: DataConfig, train: CocoSplit, val: CocoSplit, validate: bool) -> PreparedData:
    for name, split in (("train", train), ("val", val)):
        if not any(a["iscrowd"] == 0 for a in split.coco["annotations"]):
            raise DatasetError([f"the {name} split has no annotations ({len(split.coco['images'])} image(s), none with "
                                f"a non-crowd instance); expected at least one instance to {'learn' if name == 'train' else 'score'}"],
                               str(split.annotation_file))
    if val.label_map.category_ids != train.label_map.category_ids:
        raise DatasetError([
            f"the validation categories {val.label_map.category_ids} differ from the training categories "
            f"{train.label_map.category_ids}; both splits must declare the same categories"], str(val.annotation_file))
    prepared = PreparedData(train, val, train.label_map)
    if validate:
        prepared.content_hash = content_hash_of(files_by_root(prepared))
        prepared.stats = {"train": split_stats(train), "val": split_stats(val),
                          "dropped": {"train": train.dropped, "val": val.dropped}}
        log.info("dataset %s: train %d images / %d instances, val %d images / %d instances, classes %s",
                 prepared.content_hash[:12], prepared.stats["train"]["images"], prepared.stats["train"]["instances"],
                 prepared.stats["val"]["images"], prepared.stats["val"]["instances"], train.label_map.names)
    return prepared


def files_by_root(data: PreparedData) -> dict[Path, list[str]]:
    """The files the content hash covers (each split's annotation file and images), by root folder: train's
    root first, then val's when it has its own (dicts keep their order)."""
    files = {data.train.root: _files_of(data.train)}
    files.setdefault(data.val.root, []).extend(_files_of(data.val))
    return files


def content_hash_of(files_by_root: dict[Path, list[str]]) -> str:
    """The dataset's identity: each root's `content_hash` (relative names and bytes), in the dict's order
    (train's root first). Where the files lie on this machine plays no part, so a copy of the data (a
    staged dataset, another cache) has the same hash."""
    h = hashlib.sha256()
    for root, files in files_by_root.items():
        h.update(content_hash(root, sorted(set(files))).encode())
    return h.hexdigest()


def export_prepared(data: PreparedData, folder: str | Path) -> Path:
    """Write the validated splits as self-contained COCO folders (`train/`, `val/`: annotations.json plus
    the images, hard-linked where possible) and `dataset.json` (content hash, statistics, label map)."""
    import json
    import os
    import shutil

    folder = Path(folder)
    for name, split in (("train", data.train), ("val", data.val)):
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        for img in split.coco["images"]:
            src, dst = split.root / img["file_name"], out / img["file_name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        (out / "annotations.json").write_text(json.dumps(split.coco))
    manifest = {f"{name}/{rel}": {"size": (folder / name / rel).stat().st_size, "sha256": sha256_file(folder / name / rel)}
                for name, split in (("train", data.train), ("val", data.val))
                for rel in ["annotations.json", *(img["file_name"] for img in split.coco["images"])]}
    (folder / PREPARED_FILE).write_text(json.dumps(
        {"content_hash": data.content_hash, "stats": data.stats, "label_map": data.label_map.to_dict(),
         "files": manifest}, indent=2))
    return folder


def verify_prepared(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file `export_prepared` listed is there with its size and SHA-256 (DatasetError naming each one
    that is missing, cut or changed): the content hash in dataset.json is only as good as the files."""
    problems = []
    for rel, expected in sorted(manifest.items()):
        path = folder / rel
        if escapes_folder(rel) or not path.is_file() or path.is_symlink():
            problems.append(f"{rel}: missing (listed in {PREPARED_FILE})")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, {PREPARED_FILE} says {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{rel}: its SHA-256 differs from {PREPARED_FILE}'s")
    if problems:
        raise DatasetError([*problems, "the prepared dataset changed after it was hashed: prepare it again"], str(folder))


def load_prepared(folder: str | Path, max_pixels: int | None = None) -> PreparedData:
    """A dataset written by `export_prepared`, with the content hash and statistics computed when it was
    prepared: the dataset's identity is computed once per run, from the data as the user gave it, and
    every later step (training, registration) carries that same hash. Its files are verified against the
    manifest first (`verify_prepared`), so a cut or changed file never travels under the original hash."""
    import json

    folder = Path(folder)
    meta_file = folder / PREPARED_FILE
    if not meta_file.is_file():
        raise DatasetError([f"not a prepared dataset: {PREPARED_FILE} is missing (write one with export_prepared)"], str(folder))
    meta = json.loads(meta_file.read_text())
    if not isinstance(meta.get("files"), dict):
        raise DatasetError([f"{PREPARED_FILE} lists no files: written before datasets were verified; prepare it again"],
                           str(folder))
    verify_prepared(folder, meta["files"])
    kwargs = {"check_images": False, **({"max_pixels": max_pixels} if max_pixels else {})}
    train, val = load_coco(folder / "train", **kwargs), load_coco(folder / "val", **kwargs)
    return PreparedData(train, val, train.label_map, meta["content_hash"], meta["stats"])
