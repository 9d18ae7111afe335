"""What a batch run does, decided before it starts: the images, their shards, and the manifest that makes
a run resumable (a shard whose results file exists is done) and refuses to mix two runs' outputs."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from training.data.formats import IMAGE_SUFFIXES
from maskrcnn.storage import escapes_folder, is_remote, list_objects

MAX_IMAGES = 10_000_000
MAX_IMAGE_BYTES = 256 << 20
RESULTS = "results"
MANIFEST = "manifest.json"


class BatchError(ValueError):
    """A batch run that cannot start or go on; the message names the input and the rule."""


@dataclass(frozen=True)
class Settings:
    """What the outputs depend on besides the images and the package: a resumed run must have the same."""

    shard_size: int = 64
    score_threshold: float = 0.05
    max_detections: int = 100
    overlays: bool = False
    masks: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.shard_size <= 10_000:
            raise BatchError(f"--shard-size: expected 1 to 10000, got {self.shard_size}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise BatchError(f"--score-threshold: expected 0 to 1, got {self.score_threshold}")
        if not 1 <= self.max_detections <= 1000:
            raise BatchError(f"--max-detections: expected 1 to 1000, got {self.max_detections}")


@dataclass(frozen=True)
class Shard:
    index: int
    names: list[str]  # image names relative to the source
    first_id: int  # COCO image id of names[0]; ids are positions in the sorted list, from 1

    @property
    def stem(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass
class Plan:
    source: str
    output: str
    package: str  # the SHA-256 of the package's SHA256SUMS: its identity
    settings: Settings
    names: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # name -> "size etag" (a local file: size and mtime)

    def shards(self) -> list[Shard]:
        size = self.settings.shard_size
        return [Shard(i, self.names[start:start + size], start + 1)
                for i, start in enumerate(range(0, len(self.names), size))]

    def manifest(self) -> dict[str, Any]:
        """What the outputs depend on: a resumed run must match it in every key. The images are keyed by
        their names with their sizes and ETags, so images changed under the same names are another run."""
        digest = hashlib.sha256("\n".join(f"{n}\t{self.versions.get(n, '')}" for n in self.names).encode()).hexdigest()
        return {"source": self.source.rstrip("/"), "package_sha256sums": self.package, "images": len(self.names),
                "images_sha256": digest, "settings": asdict(self.settings)}


def list_images(source: str) -> tuple[list[str], dict[str, str]]:
    """Image names (JPG, PNG, TIFF) under `source` (a folder, s3:// or gs:// prefix), sorted, relative to it,
    and each one's version ("size etag"; for a local file its size and mtime); BatchError for none, too
    many, one too large, or one whose name escapes the prefix. Local links are not followed."""
    if is_remote(source):
        prefix = source.rstrip("/").split("://", 1)[1].partition("/")[2]
        objects = [(o.key[len(prefix):].lstrip("/") if prefix else o.key, o.size, o.etag) for o in list_objects(source)]
    else:
        root = Path(source)
        if not root.is_dir():
            raise BatchError(f"{source}: not a folder, s3:// or gs:// prefix")
        stats = [(p, p.lstat()) for p in root.rglob("*")]
        objects = [(str(p.relative_to(root).as_posix()), st.st_size, str(st.st_mtime_ns)) for p, st in stats
                   if stat.S_ISREG(st.st_mode)]
    names, versions = [], {}
    for name, size, etag in objects:
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if escapes_folder(name):
            raise BatchError(f"{source}: object {name!r} escapes the prefix")
        if size > MAX_IMAGE_BYTES:
            raise BatchError(f"{source}/{name}: {size} bytes, above the limit of {MAX_IMAGE_BYTES} for one image")
        names.append(name)
        versions[name] = f"{size} {etag}"
    if not names:
        raise BatchError(f"{source}: no JPG, PNG or TIFF image found")
    if len(names) > MAX_IMAGES:
        raise BatchError(f"{source}: {len(names)} images, above the limit of {MAX_IMAGES} for one run")
    return sorted(names), versions


def check_manifest(existing: dict[str, Any] | None, plan: Plan) -> None:
    """A resumed run must be the same run: same images, package and settings (the output is otherwise mixed)."""
    if existing is None:
        return
    wanted = plan.manifest()
    differ = [key for key in wanted if not isinstance(existing, dict) or existing.get(key) != wanted[key]]
    if differ:
        what = {"images_sha256": "images_sha256 differ: images were added, removed or changed under the same names"}
        raise BatchError(f"{plan.output}/{MANIFEST}: the output holds another run's results "
                         f"({'; '.join(what.get(k, k) for k in differ)}{'' if 'images_sha256' in differ and len(differ) == 1 else ' differ'}); "
                         f"write to a new output, or remove it to start again")


def manifest_bytes(plan: Plan) -> bytes:
    return json.dumps(plan.manifest(), indent=2, sort_keys=True).encode()
