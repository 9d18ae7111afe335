"""The serving package: the one model artifact. Training logs it to MLflow as the run's model, the
registry's versions point to it, the pipeline publishes it, the evaluate step scores the champion
from it, and KServe's predictor loads it.

A package is a folder holding:

- `model.pt`: the model's `state_dict` only (loads with `torch.load(weights_only=True)`: no pickled code),
- `config.yaml`: the training config, from which the architecture, pre-processing and post-processing
  (`eval.mask_threshold`) are rebuilt,
- `label_map.json`: contiguous label -> category id and name,
- `metadata.json`: the evidence (MLflow run, metrics, dataset hash, git commit, epoch; the registered
  version once promoted),
- `detector.onnx`: the same network and weights as an ONNX graph (`training.onnx_detector`), which the
  predictor runs with ONNX Runtime, ~1.7x faster than eager PyTorch on CPU. Written when the export
  reproduces eager PyTorch's detections; a package without it (older, or when the export failed: the
  reason is logged) is served by eager PyTorch,
- `SHA256SUMS`: `sha256sum` format over every other file (check by hand with `sha256sum -c SHA256SUMS`).

`uv run -m training.export CHECKPOINT OUT [--no-onnx]` writes the package of a checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import load_checkpoint
from training.config import Config, load_config, save_config
from training.data.coco import LabelMap
from training.data.sources import sha256_file
from training.logs import setup_logging
from training.onnx_detector import ONNX_FILE, OnnxDetector, OnnxExportError, export_onnx

log = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"
PACKAGE_FILES = ("model.pt", "config.yaml", "label_map.json", "metadata.json")  # every package has these
OPTIONAL_FILES = (ONNX_FILE,)


class PackageError(RuntimeError):
    """A serving package is incomplete or does not match its checksums; the message names the file."""


def export_package(checkpoint_dir: str | Path, out_dir: str | Path, metadata: dict[str, Any] | None = None,
                   onnx: bool = True) -> Path:
    """Write the serving package of a training checkpoint folder into `out_dir`; returns `out_dir`.

    `onnx`: also write `detector.onnx` (a failed export is logged and leaves the package without it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(checkpoint_dir)
    torch.save(state["model"], out / "model.pt")
    config = Config.from_dict(state["config"])
    save_config(config, out / "config.yaml")
    (out / "label_map.json").write_text(json.dumps(state["label_map"], indent=2))
    (out / ONNX_FILE).unlink(missing_ok=True)  # never keep a graph of other weights
    if onnx:
        _export_graph(out, config, LabelMap.from_dict(state["label_map"]).num_classes, state["model"])
    meta = {"epoch": state.get("epoch"), "metrics": state.get("metrics", {}), **(state.get("run_info") or {}),
            **(metadata or {})}
    _write_metadata(out, meta)
    return out


def _export_graph(out: Path, config: Config, num_classes: int, weights: dict[str, torch.Tensor]) -> None:
    from training.model import build_model

    model = build_model(config.model, num_classes)
    model.load_state_dict(weights)
    try:
        export_onnx(model.eval(), out / ONNX_FILE)
    except OnnxExportError as exc:
        log.warning("the package %s has no %s, so it will be served by eager PyTorch: %s", out, ONNX_FILE, exc)


def read_metadata(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "metadata.json").read_text())


def stamp_package(folder: str | Path, updates: dict[str, Any]) -> Path:
    """Add `updates` to the package's metadata (e.g. final metrics, the registered version) and rewrite
    `SHA256SUMS`. The weights, config and label map are untouched."""
    folder = Path(folder)
    verify_package(folder)
    _write_metadata(folder, {**read_metadata(folder), **updates})
    return folder


def _write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    names = [*PACKAGE_FILES, *(name for name in OPTIONAL_FILES if (folder / name).is_file())]
    lines = [f"{sha256_file(folder / name)}  {name}" for name in names]
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
    unknown = sorted(set(sums) - {*PACKAGE_FILES, *OPTIONAL_FILES})
    if unknown:
        raise PackageError(f"{folder / CHECKSUM_FILE}: lists {unknown}; a package holds only "
                           f"{[*PACKAGE_FILES, *OPTIONAL_FILES]}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise PackageError(f"{path}: missing from the package")
        actual = sha256_file(path)
        if actual != digest:
            raise PackageError(f"{path}: sha256 {actual} does not match {digest} in {CHECKSUM_FILE}")
    return sums


def load_package(folder: str | Path) -> tuple[torch.nn.Module, Config, LabelMap]:
    """Verify and load a package: (model in eval mode on CPU, config, label map).

    The architecture is rebuilt from the config and the weights are loaded into it; initial weights
    named in the config are never fetched (that is a training-only step).
    """
    from training.model import build_model

    folder = Path(folder)
    verify_package(folder)
    config = load_config(folder / "config.yaml", [])
    label_map = LabelMap.from_dict(json.loads((folder / "label_map.json").read_text()))
    model = build_model(config.model, label_map.num_classes)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), config, label_map


def load_graph(folder: str | Path, threads: int) -> OnnxDetector | None:
    """The package's `detector.onnx` in an ONNX Runtime session (`training.onnx_detector.OnnxDetector`),
    or None when the package has none. The bytes loaded are the bytes checked against `SHA256SUMS`; an
    unlisted graph file is ignored (with a warning), a mismatching one refused."""
    import hashlib

    folder = Path(folder)
    digest = read_checksums(folder).get(ONNX_FILE)
    if digest is None:
        if (folder / ONNX_FILE).exists():
            log.warning("%s: not listed in %s; ignored", folder / ONNX_FILE, CHECKSUM_FILE)
        return None
    graph = (folder / ONNX_FILE).read_bytes()
    actual = hashlib.sha256(graph).hexdigest()
    if actual != digest:
        raise PackageError(f"{folder / ONNX_FILE}: sha256 {actual} does not match {digest} in {CHECKSUM_FILE}")
    return OnnxDetector(graph, threads)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export",
                                description="Write the serving package (weights, config, label map, metadata, "
                                            "SHA256SUMS) of a training checkpoint folder.")
    p.add_argument("checkpoint", help="checkpoint folder (holds checkpoint.pt), local or s3:// (a Ray checkpoint URI)")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--no-onnx", action="store_true", help=f"leave out {ONNX_FILE} (the package is then served by eager PyTorch)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    from ray.train import Checkpoint

    try:
        source = args.checkpoint if "://" in args.checkpoint else str(Path(args.checkpoint).resolve())  # Ray needs it absolute
        with Checkpoint(source).as_directory() as folder:
            out = export_package(folder, args.out, onnx=not args.no_onnx)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    meta = read_metadata(out)
    log.info("wrote the serving package of %s (epoch %s) to %s", args.checkpoint, meta.get("epoch"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
