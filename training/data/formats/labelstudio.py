"""Label Studio's JSON export: a list of tasks, each with `data` (the image's URL or path) and
`annotations[].result[]` regions: `polygonlabels` (points in percent of the image), `rectanglelabels`
(x, y, width, height in percent, `rotation` in degrees about the top-left corner) and `brushlabels`
(`format: "rle"`: Label Studio's own bit-packed RLE of the RGBA brush image, decoded as its converter
does). Label Studio's COCO export cannot carry brushes; this reads them exactly.

The image is looked up by the file name at the end of the task's URL (`/data/upload/3/1a2b-cat.jpg`,
`s3://bucket/cat.jpg`, ...) under `images/` or beside the JSON; Label Studio prefixes uploads with 8 hex
characters and a dash, which are tried without too. The first (or, with `annotation`, the chosen) of
the task's non-cancelled annotations is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from training.data.formats import IMAGE_SUFFIXES, Imported, Instance, check_polygon, read_json, sized_sample

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def read(src: Path, options: dict[str, Any]) -> Imported:
    imported = Imported()
    files = [src] if src.is_file() else sorted(p for p in src.glob("*.json") if p.is_file())
    if not files:
        imported.problems.append(f"{src}: no Label Studio JSON export (*.json) found")
        return imported
    folder = files[0].parent
    for ann_file in files:
        tasks = read_json(ann_file)
        rel = ann_file.name
        if not isinstance(tasks, list):
            imported.problems.append(f"{rel}: expected a list of tasks (Label Studio's JSON export)")
            continue
        for t, task in enumerate(tasks):
            _task(task, f"{rel}: tasks[{t}]", folder, imported, options)
    return imported


def _image_of(task: dict[str, Any], folder: Path) -> tuple[str, Path | None]:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    url = data.get("image") or next((v for v in data.values() if isinstance(v, str) and
                                     Path(urlparse(v).path).suffix.lower() in IMAGE_SUFFIXES), "")
    if not isinstance(url, str) or not url:
        return "", None
    name = Path(unquote(urlparse(url).path)).name
    for candidate in (name, UPLOAD_PREFIX.sub("", name)):
        for base in (folder / "images", folder):
            path = (base / candidate).resolve()
            if candidate and path.is_relative_to(folder.resolve()) and path.is_file():
                return candidate, path
    return name, None


def _task(task: Any, where: str, folder: Path, imported: Imported, options: dict[str, Any]) -> None:
    if not isinstance(task, dict):
        imported.problems.append(f"{where}: expected an object")
        return
    where = f"{where} (id={task.get('id')!r})"
    name, path = _image_of(task, folder)
    if path is None:
        imported.problems.append(f"{where}, field 'data.image': {name or 'no image URL'!r} not found under "
                                 f"{folder / 'images'} or {folder}")
        return
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    choice = int(options.get("annotation", 0))
    if not annotations:
        imported.skipped["tasks without an annotation"] = imported.skipped.get("tasks without an annotation", 0) + 1
        return
    if choice >= len(annotations):
        imported.problems.append(f"{where}: has {len(annotations)} annotation(s), annotation {choice} was asked for")
        return
    results = annotations[choice].get("result")
    if not isinstance(results, list):
        imported.problems.append(f"{where}: annotations[{choice}], field 'result': expected a list")
        return
    sizes = {(r.get("original_width"), r.get("original_height")) for r in results if isinstance(r, dict) and r.get("original_width")}
    declared = sizes.pop() if len(sizes) == 1 else None
    sample = sized_sample(path, name, where, imported, declared, options.get("max_pixels", 64_000_000))
    if sample is None:
        return
    for r, region in enumerate(results):
        at = f"{where}: annotations[{choice}].result[{r}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            imported.problems.append(f"{at}: expected an object with a 'value'")
            continue
        kind, value = region.get("type"), region["value"]
        if kind not in ("polygonlabels", "rectanglelabels", "brushlabels"):
            imported.skipped[f"{kind} regions (no instance mask)"] = imported.skipped.get(f"{kind} regions (no instance mask)", 0) + 1
            continue
        labels = value.get(kind)
        if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str) and labels[0]):
            imported.problems.append(f"{at}, field 'value.{kind}': expected one label, got {labels!r}")
            continue
        label = labels[0]
        at = f"{at} ({kind} {label!r})"
        instance = _region(kind, value, at, sample.width, sample.height, imported)
        if instance is not None:
            instance.category = label
            imported.category(label)
            sample.instances.append(instance)
    imported.samples.append(sample)


def _region(kind: str, value: dict[str, Any], at: str, width: int, height: int, imported: Imported) -> Instance | None:
    if kind == "polygonlabels":
        flat, problem = check_polygon(value.get("points"), f"{at}, field 'value.points'", (width / 100, height / 100))
        if problem:
            imported.problems.append(problem)
            return None
        return Instance("", polygons=[flat], where=at)
    if kind == "rectanglelabels":
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            angle = math.radians(float(value.get("rotation") or 0.0))
        except (KeyError, TypeError, ValueError):
            imported.problems.append(f"{at}: fields 'value.x', 'y', 'width', 'height' must be numbers")
            return None
        x, y, w, h = x * width / 100, y * height / 100, w * width / 100, h * height / 100
        c, s = math.cos(angle), math.sin(angle)  # Label Studio rotates about the top-left corner
        corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
        return Instance("", polygons=[[v for dx, dy in corners for v in (x + dx * c - dy * s, y + dx * s + dy * c)]], where=at)
    if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
        imported.problems.append(f"{at}, field 'value.format': expected a brush in 'rle' format")
        return None
    try:
        mask = decode_brush(value["rle"], width, height)
    except ValueError as exc:
        imported.problems.append(f"{at}, field 'value.rle': {exc}")
        return None
    return Instance("", mask=mask, where=at)


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
