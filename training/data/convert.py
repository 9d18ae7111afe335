"""`uv run -m training.data.convert --from FORMAT SRC OUT`: an annotation tool's export as a validated COCO folder.

FORMAT is one of `training.data.formats` (labelme, cvat-xml, cvat-coco, labelstudio, yolo, voc, masks).
SRC is a local folder (or, for cvat-xml and labelstudio, the export file); OUT must not exist or be
empty, and lies outside SRC: the COCO folder (`annotations.json` and `images/`, the images copied, as
reflinks where the file system offers them, or hard-linked with `--link`, named by the converter with
the export's path kept as `source_file`) is written beside it and moved into place only once it is
complete and the COCO validator has passed it. Nothing in SRC is written or removed. Every file read
from SRC must be a regular file inside it (no symbolic link). Every problem of the
input is listed with its file, record and field; nothing is written then. Training and the pipeline read
these formats directly with `data.format` (`--data-format` on the command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from training.data.coco import CocoSplit, DatasetError, load_coco
from maskrcnn.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

FORMATS = ("labelme", "cvat-xml", "cvat-coco", "labelstudio", "yolo", "voc", "masks")


def convert(fmt: str, src: str | Path, out: str | Path, options: dict[str, Any] | None = None) -> CocoSplit:
    """Convert the export `src` in `fmt` to the COCO folder `out` (which must not exist or be empty) and
    return it loaded by the COCO validator. Raises DatasetError naming every problem, writing nothing.
    `options`: the importer's (split, subset, keep_crowd, max_pixels), `link` (hard-link the images
    instead of copying them), and `categories`, names that come
    first in this order (so that a validation split gets its training split's category ids)."""
    from training.data.formats import readers, write_coco

    options = dict(options or {})
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise DatasetError([f"format {fmt!r} is not one of {', '.join(FORMATS)}"], str(src))
    if not src.exists():
        raise DatasetError(["not found"], str(src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError([f"the output {out} exists and is not empty; choose a new folder"], str(src))
    folder = (src if src.is_dir() else src.parent).resolve()
    if out.resolve().is_relative_to(folder) or folder.is_relative_to(out.resolve()):
        raise DatasetError([f"the output {out} is inside the export (or holds it); choose a folder outside {folder}"], str(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        options.setdefault("scratch", str(Path(tmp) / "scratch"))
        options.setdefault("max_pixels", DEFAULT_MAX_PIXELS)
        imported = readers()[fmt](src, options)
        order = options.get("categories")
        if order:  # another split's categories first, in its order (a validation split converted for training)
            imported.categories = [*order, *(c for c in imported.categories if c not in order)]
        staged = Path(tmp) / "coco"
        write_coco(imported, staged, f"{src} ({fmt})", link=bool(options.get("link")))
        split = load_coco(staged, max_pixels=options["max_pixels"])  # the COCO validator, on what was written
        if out.exists():
            out.rmdir()
        staged.rename(out)
    log.info("%s (%s) -> %s: %d images, %d instances, categories %s", src, fmt, out, len(split.coco["images"]),
             len(split.coco["annotations"]), split.label_map.names)
    return dataclasses.replace(split, root=out, annotation_file=out / split.annotation_file.relative_to(staged))


def source_key(fmt: str, src: Path, options: dict[str, Any]) -> str:
    """A key for a converted copy of `src`: the format, the options, and every entry's name, size and mtime
    (links not followed)."""
    digest = hashlib.sha256(json.dumps({"format": fmt, "options": options}, sort_keys=True).encode())
    for path in sorted(src.rglob("*")) if src.is_dir() else [src]:
        stat = path.lstat()
        digest.update(f"{path.relative_to(src) if src.is_dir() else path.name}\0{stat.st_mode}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def converted(fmt: str, src: Path, cache_dir: Path, options: dict[str, Any] | None = None) -> Path:
    """The COCO folder of `src` in `fmt`, converted once into `cache_dir` and reused while `src` is unchanged.

    Concurrent workers (two Ray workers of a node on a cold cache) share one conversion: the first converts
    into a private folder while holding the entry's file lock and publishes it with an atomic rename; the
    others wait on the lock and find it (checked again under the lock)."""
    from filelock import FileLock

    options = dict(options or {})
    target = cache_dir / "converted" / f"{fmt}-{source_key(fmt, src, options)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "annotations.json").is_file():
            return target
        if target.exists():
            shutil.rmtree(target)  # a folder left by a crash before the rename: never a published one
        for stale in target.parent.glob(f"{target.name}.partial-*"):  # a killed worker's (the lock is ours now)
            shutil.rmtree(stale, ignore_errors=True)
        private = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        try:
            convert(fmt, src, private / "coco", options)
            (private / "coco").rename(target)
        finally:
            shutil.rmtree(private, ignore_errors=True)
    return target


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="the export's format")
    p.add_argument("src", help="the export: a folder (or the XML/JSON file for cvat-xml and labelstudio)")
    p.add_argument("out", help="the COCO folder to write (must not exist, or be empty)")
    p.add_argument("--split", default="", help="yolo: the data.yaml split (default train); voc: ImageSets/Segmentation/<split>.txt")
    p.add_argument("--subset", default="", help="cvat-coco: the subset, annotations/instances_<subset>.json")
    p.add_argument("--keep-crowd", action="store_true",
                   help="cvat-coco: keep iscrowd=1 on masks (CVAT marks every mask so; by default they are instances)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--link", action="store_true",
                   help="hard-link the images into OUT instead of copying them (an in-place write to OUT then changes SRC)")
    return p


def main(argv: list[str] | None = None) -> int:
    from maskrcnn import cli
    from maskrcnn.images import ImageError
    from maskrcnn.logs import setup_logging

    setup_logging()
    args = get_args_parser().parse_args(argv)
    options = {k: v for k, v in {"split": args.split, "subset": args.subset, "keep_crowd": args.keep_crowd,
                                 "max_pixels": args.max_pixels, "link": args.link}.items() if v}

    def converted() -> int:
        split = convert(args.fmt, args.src, args.out, options)
        print(f"OK {Path(args.out).resolve()}: {len(split.coco['images'])} images, {len(split.coco['annotations'])} "
              f"instances, categories {', '.join(split.label_map.names)}")
        return 0

    return cli.run(converted, {(DatasetError, ImageError): 1}, log)


if __name__ == "__main__":
    sys.exit(main())
