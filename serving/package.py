"""The serving package: what the pipeline uploads and the predictor loads, checked by checksum.

A package is a folder holding:

- `model.pt`: the model's `state_dict` only (loads with `torch.load(weights_only=True)`: no pickled code),
- `config.yaml`: the training config, from which the predictor rebuilds the same architecture and
  pre-processing,
- `label_map.json`: contiguous label -> category id and name,
- `metadata.json`: where it came from (MLflow run, model version, metrics, dataset hash),
- `SHA256SUMS`: `sha256sum` format over every other file (check by hand with `sha256sum -c SHA256SUMS`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import load_checkpoint
from training.config import Config, load_config, save_config
from training.data.coco import LabelMap

CHECKSUM_FILE = "SHA256SUMS"
PACKAGE_FILES = ("model.pt", "config.yaml", "label_map.json", "metadata.json")


class PackageError(RuntimeError):
    """A serving package is incomplete or does not match its checksums; the message names the file."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_package(checkpoint_dir: str | Path, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the serving package of a training checkpoint folder into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(checkpoint_dir)
    torch.save(state["model"], out / "model.pt")
    save_config(Config.from_dict(state["config"]), out / "config.yaml")
    (out / "label_map.json").write_text(json.dumps(state["label_map"], indent=2))
    meta = {"epoch": state.get("epoch"), "metrics": state.get("metrics", {}), **(state.get("run_info") or {}),
            **(metadata or {})}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    write_checksums(out)
    return out


def write_checksums(folder: Path) -> None:
    lines = [f"{sha256(folder / name)}  {name}" for name in PACKAGE_FILES]
    (folder / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def read_checksums(folder: Path) -> dict[str, str]:
    path = Path(folder) / CHECKSUM_FILE
    if not path.is_file():
        raise PackageError(f"{path}: missing; a serving package must carry its checksums")
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise PackageError(f"{path} line {number}: expected '<sha256>  <file>', got {line!r}")
        sums[name.strip()] = digest
    return sums


def verify_package(folder: str | Path) -> dict[str, str]:
    """Check every file against `SHA256SUMS`; returns the checksums. Raises PackageError naming the file."""
    folder = Path(folder)
    sums = read_checksums(folder)
    missing = [name for name in PACKAGE_FILES if name not in sums]
    if missing:
        raise PackageError(f"{folder / CHECKSUM_FILE}: no checksum for {missing}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise PackageError(f"{path}: missing from the package")
        actual = sha256(path)
        if actual != digest:
            raise PackageError(f"{path}: sha256 {actual} does not match {digest} in {CHECKSUM_FILE}")
    return sums


def load_package(folder: str | Path) -> tuple[torch.nn.Module, Config, LabelMap]:
    """Verify and load a package: (model in eval mode on CPU, config, label map)."""
    from training.model import build_model

    folder = Path(folder)
    verify_package(folder)
    config = load_config(folder / "config.yaml", [])
    label_map = LabelMap.from_dict(json.loads((folder / "label_map.json").read_text()))
    model = build_model(config.model, label_map.num_classes)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), config, label_map
