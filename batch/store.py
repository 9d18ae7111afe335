"""Reading images from, and writing results to, a folder or an object store prefix (the one scheme table
of `maskrcnn.storage`). Results are written whole: a local file by rename, an object by one PUT, so
a shard's results file exists only once it is complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from maskrcnn.storage import ObjectExists, SourceError, create_object, is_remote, list_objects, read_object, write_object


def join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


def read_bytes(source: str, name: str, limit: int) -> bytes:
    """The bytes of `name` under `source`, refused past `limit` bytes."""
    if not is_remote(source):
        path = Path(source) / name
        if path.stat().st_size > limit:
            raise SourceError(f"{path}: above the limit of {limit} bytes")
        return path.read_bytes()
    return read_object(join(source, name), limit)[0]  # in memory, at most `limit` + 1 bytes fetched


def write(output: str, name: str, data: bytes) -> None:
    """`data` as `name` under `output`, whole or not at all."""
    if is_remote(output):
        write_object(join(output, name), data)
        return
    target = Path(output) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp_name, target)


def create(output: str, name: str, data: bytes) -> bool:
    """`data` as `name` under `output` only if nothing is there (a conditional write: of two runs creating it,
    one wins); False when something is."""
    if is_remote(output):
        try:
            create_object(join(output, name), data)
        except ObjectExists:
            return False
        return True
    target = Path(output) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp_name, target)  # fails when the name exists: the file appears whole, once
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_name)
    return True


def names_under(output: str, folder: str) -> set[str]:
    """The file names directly under `output/folder` (empty when there is nothing)."""
    if is_remote(output):
        objects = list_objects(join(output, folder), allow_empty=True)
        return {o.key.rsplit("/", 1)[-1] for o in objects}
    path = Path(output) / folder
    return {p.name for p in path.iterdir() if p.is_file()} if path.is_dir() else set()


def read_json(output: str, name: str) -> Any | None:
    """The JSON object `name` under `output`, or None when there is none."""
    folder, _, leaf = name.rpartition("/")
    if leaf not in names_under(output, folder):
        return None
    return json.loads(read_bytes(output, name, 64 << 20))
