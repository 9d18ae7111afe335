"""Importers: what annotation tools export, as a validated COCO folder.

Each importer reads one split of one tool's export into `Imported` (images and their instances, by
category name); `write_coco` writes it as a COCO folder (`annotations.json` and `images/`), which
`training.data.convert` then loads with the COCO validator. Polygons stay polygons; masks (brushes,
RLE, PNGs) become COCO RLE, exactly. A problem in the input is reported with the file, the record and
the field, as the COCO validator does, all problems of a split at once.

| format | reads | tool |
|---|---|---|
| `labelme` | one LabelMe JSON per image (polygon, rectangle, circle, mask shapes; `group_id` joins shapes) | LabelMe |
| `cvat-xml` | `annotations.xml`, "CVAT for images 1.1" (polygon, box, mask with CVAT's RLE) | CVAT |
| `cvat-coco` | CVAT's "COCO 1.0" export (`annotations/instances_*.json`); its masks are RLE marked `iscrowd: 1` | CVAT |
| `labelstudio` | Label Studio's JSON export (polygonlabels, rectanglelabels, brushlabels with its RLE) | Label Studio |
| `yolo` | `data.yaml` and `labels/*.txt` of the YOLO segmentation format (normalised polygons) | Ultralytics |
| `voc` | Pascal VOC: `Annotations/*.xml`, `SegmentationObject/*.png`, `SegmentationClass/*.png` | Pascal VOC |
| `masks` | `images/NAME.ext` and `masks/NAME/CATEGORY/*.png`, one binary PNG per instance | any |
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from faster_coco_eval.core import mask as mask_util
from PIL import Image
from pydantic import BaseModel, ValidationError

from training.data.coco import DatasetError
from training.data.files import UnsafeFile, copy_out, open_regular, quote, read_regular, regular_file
from maskrcnn.images import DEFAULT_MAX_PIXELS, ImageError
from maskrcnn.storage import escapes_folder

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # one annotation file (a tool's whole-split export)
MAX_POINTS = 100_000  # one polygon's vertices
MAX_POINTS_PER_IMAGE = 2_000_000  # every vertex of one image's instances
MAX_INSTANCES_PER_IMAGE = 5_000
MAX_INSTANCES = 1_000_000  # in the whole split
MAX_RLE_CHARS_PER_IMAGE = 32 << 20  # the masks of one image, as COCO's compressed RLE
MAX_RLE_CHARS = 256 << 20  # every mask of the split
MAX_NAME_CHARS = 200  # a category name (the label map's rule)
EDGE_TOLERANCE = 0.01  # a vertex may lie this fraction of the image (plus one pixel) outside it: it is clipped
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Instance:
    """One object: its category name and its shape, as polygons (flat x, y lists in pixels, inside the
    image) or a COCO compressed RLE over the whole image (`{"size": [h, w], "counts": bytes}`): never a
    full-image array, so memory follows the export's size, not its images'."""

    category: str
    polygons: list[list[float]] | None = None
    rle: dict[str, Any] | None = None
    iscrowd: int = 0
    where: str = ""  # the file and record it came from, for messages

    def as_rle(self, height: int, width: int) -> dict[str, Any]:
        return self.rle if self.rle is not None else mask_util.merge(mask_util.frPyObjects(self.polygons, height, width))


@dataclass
class Sample:
    image: Path  # the image file, checked by the safe-file rule
    source: str  # its path in the export, for messages and the COCO record's `source_file`
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    points: int = 0
    rle_chars: int = 0


@dataclass
class Imported:
    """A split read from a tool's export: its images, the categories in the tool's order, and problems.
    `root` is the export folder every file must lie in (the safe-file rule, `training.data.files`)."""

    root: Path = Path(".")
    samples: list[Sample] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # what was left out on purpose, and how many
    instances: int = 0
    rle_chars: int = 0

    def category(self, name: str) -> None:
        if name not in self.categories:
            self.categories.append(name)

    def skip(self, what: str) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1

    def file(self, path: Path | str, where: str, base: Path | None = None) -> Path | None:
        """The export's file at `path` (a name relative to `base`, default the export folder, or a path),
        or None with the problem recorded: a name that climbs (absolute, `..`), a link, not a regular file,
        outside the export, or missing."""
        if isinstance(path, str):
            if not path or escapes_folder(path):
                self.problems.append(f"{where}: {quote(path)} is not a relative name inside the export "
                                     "(absolute, or with a '..' part)")
                return None
            path = (base or self.root) / path.replace("\\", "/")
        try:
            return regular_file(self.root, path)
        except UnsafeFile as exc:
            self.problems.append(f"{where}: {self.rel(path)}: {exc}")
            return None

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def add(self, sample: Sample, instance: Instance) -> bool:
        """Keep `instance` in `sample`, within the limits on instances, vertices and mask sizes (each named
        when it is passed); False when it was refused."""
        points = sum(len(p) // 2 for p in instance.polygons or [])
        chars = len(instance.rle["counts"]) if instance.rle is not None else 0
        for count, limit, what in ((len(sample.instances) + 1, MAX_INSTANCES_PER_IMAGE, "instances in one image"),
                                   (self.instances + 1, MAX_INSTANCES, "instances in the split"),
                                   (sample.points + points, MAX_POINTS_PER_IMAGE, "polygon vertices in one image"),
                                   (sample.rle_chars + chars, MAX_RLE_CHARS_PER_IMAGE, "mask RLE characters in one image"),
                                   (self.rle_chars + chars, MAX_RLE_CHARS, "mask RLE characters in the split")):
            if count > limit:
                self.problems.append(f"{instance.where}: more than {limit} {what} (the limit); split the export")
                return False
        sample.instances.append(instance)
        sample.points += points
        sample.rle_chars += chars
        self.instances += 1
        self.rle_chars += chars
        return True


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes (no link followed), refused past `limit` (from its size, before reading)."""
    try:
        return read_regular(path, limit)
    except UnsafeFile as exc:
        raise DatasetError([f"{exc}"], str(path)) from None


def read_json(path: Path, limit: int = MAX_FILE_BYTES) -> Any:
    data = read_bytes(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError([f"not UTF-8 text ({exc.reason} at byte {exc.start}), expected JSON"], str(path)) from None
    except json.JSONDecodeError as exc:
        raise DatasetError([f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"], str(path)) from None
    except RecursionError:
        raise DatasetError(["JSON nested too deeply"], str(path)) from None


def read_xml(path: Path, limit: int = MAX_FILE_BYTES):
    """The root element of an XML file, parsed without entities or external references (defusedxml)."""
    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException

    data = read_bytes(path, limit)
    try:
        return SafeET.fromstring(data)
    except DefusedXmlException as exc:
        raise DatasetError([f"refused XML construct: {exc}"], str(path)) from None
    except SafeET.ParseError as exc:
        raise DatasetError([f"not valid XML: {exc}"], str(path)) from None


def problems_of(error: ValidationError, where: str, limit: int = 5, prefix: str = "") -> list[str]:
    """A schema's ValidationError as problems naming each field (`a.b[2].c`, after `prefix`), the rule and
    the value."""
    out = []
    for e in error.errors(include_url=False)[:limit]:
        loc = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])).lstrip(".")
        out.append(f"{where}, field {quote(loc) if loc else '(the record)'}: {e['msg']}"
                   + (f", got {quote(e['input'])}" if e["type"] not in ("missing",) else ""))
    return out


def parse(model: type[BaseModel], data: Any, where: str, imported: Imported, prefix: str = "") -> Any:
    """`data` validated by the schema `model`, or None with each problem recorded (fields after `prefix`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        imported.problems.extend(problems_of(exc, where, prefix=prefix))
        return None


def check_name(name: Any, where: str, imported: Imported) -> str | None:
    """A category name: 1 to MAX_NAME_CHARS printable characters (no newline or control character)."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
        imported.problems.append(f"{where}: the category name {quote(name)} must be 1 to {MAX_NAME_CHARS} printable "
                                 "characters (no newline or control character)")
        return None
    return name


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header (the file opened without following a link), bounded."""
    try:
        fd = open_regular(path)
    except UnsafeFile as exc:
        raise ImageError(f"{path}: {exc}") from None
    try:
        with open(fd, "rb") as f, Image.open(f) as img:
            w, h = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: not a readable image: {exc}") from None
    if w * h > max_pixels:
        raise ImageError(f"{path}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    return w, h


def sized_sample(image: Path, source: str, where: str, imported: Imported, declared: tuple[Any, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | None:
    """A Sample for `image`, its size read from the file and checked against the tool's `declared` (width,
    height) when it gives one; None (with the problem recorded) when the image is unreadable or disagrees."""
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        imported.problems.append(f"{where}: {quote(source)} is not a JPG, PNG or TIFF file")
        return None
    try:
        w, h = image_size(image, max_pixels)
    except ImageError as exc:
        imported.problems.append(f"{where}: {exc}")
        return None
    if declared is not None and tuple(declared) != (None, None):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in declared):
            imported.problems.append(f"{where}: the declared size {quote(declared)} must be two integers")
            return None
        if tuple(declared) != (w, h):
            imported.problems.append(f"{where}: the annotation says {declared[0]}x{declared[1]}, the image file is {w}x{h}")
            return None
    return Sample(image, source, w, h)


def in_image(values: list[float], width: int, height: int, where: str) -> tuple[list[float] | None, str | None]:
    """Flat x, y coordinates clipped to the image when within EDGE_TOLERANCE of it, else the problem."""
    xs, ys = np.asarray(values[0::2], float), np.asarray(values[1::2], float)
    tx, ty = EDGE_TOLERANCE * width + 1, EDGE_TOLERANCE * height + 1
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None, f"{where}: coordinates must be finite numbers"
    if xs.min() < -tx or ys.min() < -ty or xs.max() > width + tx or ys.max() > height + ty:
        return None, (f"{where}: x in [{xs.min():.6g}, {xs.max():.6g}], y in [{ys.min():.6g}, {ys.max():.6g}] is outside the "
                      f"{width}x{height} image (tolerance {EDGE_TOLERANCE:.0%} + 1 px)")
    out = np.empty(len(values))
    out[0::2], out[1::2] = np.clip(xs, 0, width), np.clip(ys, 0, height)
    return out.tolist(), None


def check_polygon(points: Any, where: str, width: int, height: int,
                  scale: tuple[float, float] = (1.0, 1.0)) -> tuple[list[float] | None, str | None]:
    """A flat [x0, y0, x1, y1, ...] list in pixels from [[x, y], ...] or a flat list (scaled by `scale`), or
    the problem: fewer than 3 points, more than MAX_POINTS, a coordinate that is not a finite number, or
    one outside the image (beyond the tolerance; within it, clipped)."""
    if not isinstance(points, (list, tuple)):
        return None, f"{where}: expected a list of points, got {quote(points)}"
    if len(points) > 2 * MAX_POINTS:
        return None, f"{where}: {len(points)} values, expected at most {MAX_POINTS} points"
    if points and all(isinstance(p, (list, tuple)) for p in points):
        if any(len(p) != 2 for p in points):
            return None, f"{where}: expected [x, y] pairs"
        flat = [v for p in points for v in p]
    elif any(isinstance(p, (list, tuple, dict)) for p in points):
        return None, f"{where}: expected [[x, y], ...] or a flat [x, y, ...] list"
    else:
        flat = list(points)
    if len(flat) % 2:
        return None, f"{where}: an odd number of coordinates ({len(flat)}), expected x, y pairs"
    if not 6 <= len(flat) <= 2 * MAX_POINTS:
        return None, f"{where}: {len(flat) // 2} point(s), expected 3 to {MAX_POINTS}"
    if any(isinstance(v, bool) for v in flat):
        return None, f"{where}: coordinates must be numbers, not booleans"
    try:
        values = [float(v) for v in flat]
    except (TypeError, ValueError, OverflowError):
        return None, f"{where}: coordinates must be numbers"
    return in_image([v * scale[i % 2] for i, v in enumerate(values)], width, height, where)


def encode(mask: np.ndarray) -> dict[str, Any]:
    """An HxW mask as COCO compressed RLE (the only form an instance's mask is kept in)."""
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))


def union(rles: list[dict[str, Any]]) -> dict[str, Any]:
    return rles[0] if len(rles) == 1 else mask_util.merge(rles, intersect=0)


def output_name(index: int, source: str) -> str:
    """The image's name in the COCO folder, generated: its index and a sanitised stem (never a path)."""
    path = Path(source.replace("\\", "/"))
    stem = SAFE_CHARS.sub("_", path.stem).strip("._")[:64] or "image"
    return f"{index:06d}-{stem}{path.suffix.lower()}"


def write_coco(imported: Imported, out: Path, source: str, link: bool = False) -> Path:
    """Write `imported` as a COCO folder at `out` (annotations.json, images/); raises DatasetError with every
    problem when there are any, before anything is written. Image names are generated (`output_name`),
    the export's path kept as `source_file`; images are copies (reflinks where the file system offers
    them), hard links only when `link`. Nothing of the export is written or removed. Returns the
    annotation file."""
    if imported.problems:
        raise DatasetError(imported.problems, source)
    if not imported.samples:
        raise DatasetError(["no annotated image found"], source)
    seen: dict[Path, str] = {}
    for sample in imported.samples:
        first = seen.setdefault(sample.image.resolve(), sample.source)
        if first != sample.source:
            imported.problems.append(f"{quote(sample.source)} and {quote(first)} are one image file, annotated twice")
        elif sum(1 for s in imported.samples if s.source == sample.source) > 1:
            imported.problems.append(f"{quote(sample.source)}: annotated by more than one record")
            seen[sample.image.resolve()] = ""
    if imported.problems:
        raise DatasetError(sorted(set(imported.problems), key=imported.problems.index), source)
    categories = [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(imported.categories, start=1)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations, names = [], [], []
    for image_id, sample in enumerate(imported.samples, start=1):
        names.append(output_name(image_id, sample.source))
        images.append({"id": image_id, "file_name": names[-1], "width": sample.width, "height": sample.height,
                       "source_file": sample.source})
        for inst in sample.instances:
            rle = inst.as_rle(sample.height, sample.width)
            area = float(mask_util.area(rle))
            if area <= 0:
                log.warning("%s: an empty shape, left out", inst.where)
                imported.skip("empty shapes")
                continue
            segmentation: Any = inst.polygons if inst.rle is None else {"size": [sample.height, sample.width],
                                                                         "counts": rle["counts"].decode()}
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[inst.category],
                                "segmentation": segmentation, "area": area,
                                "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": inst.iscrowd})
    (out / "images").mkdir(parents=True, exist_ok=True)
    for sample, name in zip(imported.samples, names):
        copy_out(sample.image, out / "images" / name, link=link)
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for what, count in imported.skipped.items():
        log.info("%s: left out %d %s", source, count, what)
    return path


Reader = Callable[[Path, dict[str, Any]], Imported]


def readers() -> dict[str, Reader]:
    """Every importer by format name (imported on use)."""
    from training.data.formats import cvat, labelme, labelstudio, masks, voc, yolo

    return {"labelme": labelme.read, "cvat-xml": cvat.read_xml_export, "cvat-coco": cvat.read_coco_export,
            "labelstudio": labelstudio.read, "yolo": yolo.read, "voc": voc.read, "masks": masks.read}
