"""Label Studio's JSON export: a list of tasks, each with `data` (the image's URL or path) and
`annotations[].result[]` regions: `polygonlabels` (points in percent of the image), `rectanglelabels`
(x, y, width, height in percent, `rotation` in degrees about the top-left corner) and `brushlabels`
(`format: "rle"`: Label Studio's own bit-packed RLE of the RGBA brush image, decoded as its converter
does). Label Studio's COCO export cannot carry brushes; this reads them exactly.

The image is looked up by the file name at the end of the task's URL (`/data/upload/3/1a2b-cat.jpg`,
`s3://bucket/cat.jpg`, ...) under `images/` or beside the JSON; Label Studio prefixes uploads with 8 hex
characters and a dash, which are tried without too. A local-storage URL (`/data/local-files/?d=images/b.png`)
names the file by its path under the storage's root: that path is tried first, inside the export. The first (or, with `annotation`, the chosen) of
the task's non-cancelled annotations is read.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from pydantic import Field

from maskrcnn.storage import escapes_folder
from training.data.formats import (IMAGE_SUFFIXES, Imported, Instance, Sample, check_polygon, encode, parse, quote, read_json,
                                   sized_sample)
from training.data.formats.cvat import box_instance
from training.data.formats.schema import Finite, Int, Name, NonNegative, Points, Record

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
Byte = Annotated[int, Field(ge=0, le=255, strict=True)]


class _Task(Record):
    id: Any = None
    data: dict[str, Any]
    annotations: list[Any] = []


class _Annotation(Record):
    result: list[Any]
    was_cancelled: bool = False


class _Region(Record):
    type: str | None = Field(None, max_length=64)
    value: dict[str, Any]
    original_width: Int | None = Field(None, gt=0)
    original_height: Int | None = Field(None, gt=0)


class _Labels(Record):
    polygonlabels: Annotated[list[Name], Field(min_length=1, max_length=1)] | None = None
    rectanglelabels: Annotated[list[Name], Field(min_length=1, max_length=1)] | None = None
    brushlabels: Annotated[list[Name], Field(min_length=1, max_length=1)] | None = None


class _Polygon(Record):
    points: Points


class _Rectangle(Record):
    x: Finite
    y: Finite
    width: NonNegative
    height: NonNegative
    rotation: Finite = 0.0


class _Brush(Record):
    format: Literal["rle"]
    rle: Annotated[list[Byte], Field(max_length=1 << 28)]


def read(src: Path, options: dict[str, Any]) -> Imported:
    files = [src] if src.is_file() else sorted(src.glob("*.json"))
    imported = Imported(src.parent if src.is_file() else src)
    if not files:
        imported.problems.append(f"{src}: no Label Studio JSON export (*.json) found")
        return imported
    folder = imported.root
    for ann_file in files:
        rel = ann_file.name
        if imported.file(ann_file, rel) is None:
            continue
        tasks = read_json(ann_file)
        if not isinstance(tasks, list):
            imported.problems.append(f"{rel}: expected a list of tasks (Label Studio's JSON export)")
            continue
        for t, task in enumerate(tasks):
            _task(task, f"{rel}: tasks[{t}]", folder, imported, options)
    return imported


def _names_of(url: str) -> list[str]:
    """The relative names a task's URL may mean, most specific first (ValueError for a malformed URL)."""
    parsed = urlparse(url)
    names = []
    if parsed.path.rstrip("/").endswith("/data/local-files") or parsed.path == "/data/local-files/":
        names += [unquote(d) for d in parse_qs(parsed.query).get("d", [])[:1]]
    name = Path(unquote(parsed.path)).name
    if names:
        name = Path(names[0]).name
    return [*names, name, UPLOAD_PREFIX.sub("", name)]


def _image_of(task: _Task, folder: Path, where: str, imported: Imported) -> tuple[str, Path | None]:
    url = task.data.get("image") or next((v for v in task.data.values() if isinstance(v, str) and
                                          Path(v.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES), "")
    if not isinstance(url, str) or not url:
        imported.problems.append(f"{where}, field 'data.image': no image URL")
        return "", None
    try:
        candidates = _names_of(url)
    except ValueError as exc:
        imported.problems.append(f"{where}, field 'data.image': {quote(url)} is not a URL ({quote(str(exc))})")
        return "", None
    for candidate in dict.fromkeys(c for c in candidates if c):
        for base in (folder / "images", folder):
            if escapes_folder(candidate) or os.path.lexists(base / candidate):
                path = imported.file(candidate, f"{where}, field 'data.image'", base)
                return candidate, path
    imported.problems.append(f"{where}, field 'data.image': {quote(candidates[-2] or url)} not found under "
                             f"{folder / 'images'} or {folder}")
    return "", None


def _task(raw: Any, where: str, folder: Path, imported: Imported, options: dict[str, Any]) -> None:
    task = parse(_Task, raw, where, imported)
    if task is None:
        return
    where = f"{where} (id={quote(task.id)})"
    name, path = _image_of(task, folder, where, imported)
    if path is None:
        return
    annotations = [a for a in task.annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    choice = int(options.get("annotation", 0))
    if not annotations:
        imported.skip("tasks without an annotation")
        return
    if choice >= len(annotations):
        imported.problems.append(f"{where}: has {len(annotations)} annotation(s), annotation {choice} was asked for")
        return
    annotation = parse(_Annotation, annotations[choice], f"{where}: annotations[{choice}]", imported)
    if annotation is None:
        return
    regions = []
    for r, raw_region in enumerate(annotation.result):
        at = f"{where}: annotations[{choice}].result[{r}]"
        region = parse(_Region, raw_region, at, imported)
        if region is not None:
            regions.append((at, region))
    sizes = {(g.original_width, g.original_height) for _, g in regions if g.original_width}
    if len(sizes) > 1:
        imported.problems.append(f"{where}: the regions give different original sizes {sorted(sizes)[:4]}")
        return
    sample = sized_sample(path, name, where, imported, sizes.pop() if sizes else None, options.get("max_pixels", 64_000_000))
    if sample is None:
        return
    for at, region in regions:
        kind = region.type
        if kind not in ("polygonlabels", "rectanglelabels", "brushlabels"):
            imported.skip(f"{quote(kind, 40)} regions (no instance mask)")
            continue
        labels = parse(_Labels, {kind: region.value.get(kind)}, at, imported, "value")
        if labels is None:
            continue
        if getattr(labels, kind) is None:
            imported.problems.append(f"{at}, field 'value.{kind}': missing, expected one label")
            continue
        label = getattr(labels, kind)[0]
        at = f"{at} ({kind} {quote(label)})"
        instance = _region(kind, region.value, at, sample, imported)
        if instance is not None:
            instance.category = label
            imported.category(label)
            imported.add(sample, instance)
    imported.samples.append(sample)


def _region(kind: str, value: dict[str, Any], at: str, sample: Sample, imported: Imported) -> Instance | None:
    width, height = sample.width, sample.height
    if kind == "polygonlabels":
        polygon = parse(_Polygon, value, at, imported, "value")
        if polygon is None:
            return None
        flat, problem = check_polygon(polygon.points, f"{at}, field 'value.points'", width, height, (width / 100, height / 100))
        if problem:
            imported.problems.append(problem)
            return None
        return Instance("", polygons=[flat], where=at)
    if kind == "rectanglelabels":
        box = parse(_Rectangle, value, at, imported, "value")
        if box is None:
            return None
        x, y, w, h = box.x * width / 100, box.y * height / 100, box.width * width / 100, box.height * height / 100
        # Label Studio rotates about the top-left corner
        return box_instance("", x, y, x + w, y + h, math.radians(box.rotation), "corner", f"{at}, field 'value'", sample, imported)
    brush = parse(_Brush, value, at, imported, "value")
    if brush is None:
        return None
    try:
        mask = decode_brush(brush.rle, width, height)
    except ValueError as exc:
        imported.problems.append(f"{at}, field 'value.rle': {exc}")
        return None
    return Instance("", rle=encode(mask), where=at)


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
        self.i = 0

    def read(self, n: int) -> int:
        if self.i + n > self.bits.size:
            raise ValueError("the RLE ends early")
        value = int(np.dot(self.bits[self.i:self.i + n].astype(np.int64), 1 << np.arange(n - 1, -1, -1, dtype=np.int64)))
        self.i += n
        return value


def decode_brush(rle: list[int], width: int, height: int) -> np.ndarray:
    """A Label Studio brush RLE (its converter's `decode_rle` format) -> HxW bool (the alpha channel > 0).

    Layout: 32 bits value count (must be width x height x 4, RGBA), 5 bits word size - 1, four 4-bit run
    length field sizes - 1; then runs: 1 bit (repeat or literal), 2 bits field choice, that many bits of
    length - 1, then one word (repeat) or length words (literal)."""
    if not all(isinstance(v, int) and 0 <= v <= 255 for v in rle):
        raise ValueError("expected a list of bytes (integers 0-255)")
    bits = _Bits(bytes(rle))
    num = bits.read(32)
    if num != width * height * 4:
        raise ValueError(f"encodes {num} values, a {width}x{height} RGBA brush image has {width * height * 4}")
    word = bits.read(5) + 1
    if word > 8:
        raise ValueError(f"words of {word} bits; an RGBA brush image has 8-bit values")
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > num:
            raise ValueError(f"a run ends at value {j}, past the {num} values")
        if repeat:
            out[i:j] = bits.read(word)
        else:
            for k in range(i, j):
                out[k] = bits.read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] > 0
