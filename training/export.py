"""`uv run -m training.export CHECKPOINT OUT [--no-onnx]`: the serving package of a training checkpoint.

The package's one writer (`write_package`: a model's weights, config, label map, probe and ONNX graph) and
the thin step from a checkpoint folder (local, or a Ray checkpoint URI) to it. Its one reader, and its
format, are `maskrcnn.package`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from training.checkpoint import load_checkpoint
from maskrcnn import cli
from maskrcnn.config import Config
from maskrcnn.labels import LabelMap
from maskrcnn.logs import setup_logging
from maskrcnn.onnx_runtime import ONNX_FILE
from maskrcnn.package import Package, PackageError, metadata_bytes, with_checksums

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path | None, metadata: dict[str, Any] | None = None,
                      onnx: bool = True) -> Package:
    """The serving package of a training checkpoint folder, with the checkpoint's epoch, metrics and run
    information (and `metadata`) as its metadata; written into `out_dir` unless it is None.

    `onnx`: also write `detector.onnx` (a failed export is logged and leaves the package without it)."""
    from maskrcnn.model import build_model

    state = load_checkpoint(checkpoint_dir)
    config = Config.from_dict(state["config"])
    label_map = LabelMap.from_dict(state["label_map"])
    model = build_model(config.model, label_map.num_classes)
    model.load_state_dict(state["model"])
    meta = {"epoch": state.get("epoch"), "metrics": state.get("metrics", {}), **(state.get("run_info") or {}),
            **(metadata or {})}
    return write_package(model, config, label_map, meta, out_dir, onnx=onnx)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export",
                                description="Write the serving package (weights, config, label map, metadata, probe, "
                                            "graph, SHA256SUMS) of a training checkpoint folder.")
    p.add_argument("checkpoint", help="checkpoint folder (holds checkpoint.pt), local or s3:// (a Ray checkpoint URI)")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--no-onnx", action="store_true", help=f"leave out {ONNX_FILE} (the package is then served by eager PyTorch)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    from ray.train import Checkpoint

    def export() -> int:
        source = args.checkpoint if "://" in args.checkpoint else str(Path(args.checkpoint).resolve())  # Ray needs it absolute
        with Checkpoint(source).as_directory() as folder:
            package = export_checkpoint(folder, args.out, onnx=not args.no_onnx)
        log.info("wrote the serving package of %s (epoch %s) to %s", args.checkpoint, package.metadata.get("epoch"), args.out)
        return 0

    return cli.run(export, {(FileNotFoundError, PackageError): 2}, log)


if __name__ == "__main__":
    sys.exit(main())


def write_package(model: torch.nn.Module, config: Config, label_map: LabelMap, metadata: dict[str, Any],
                  out_dir: str | Path | None = None, onnx: bool = True) -> Package:
    """The serving package of an in-memory model (and its config and label map), written to `out_dir` when
    given. `onnx`: also carry `detector.onnx`, kept only when ONNX Runtime reproduces the weights' detections
    on the probe (a failed export is logged, and the package is served by eager PyTorch)."""
    import tempfile

    import torch

    from training.onnx_export import OnnxExportError, export_onnx, make_probe

    model = model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    probe = make_probe(model)
    files = {"model.pt": buf.getvalue(), "config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False).encode(),
             "label_map.json": json.dumps(label_map.to_dict(), indent=2).encode(), "metadata.json": metadata_bytes(metadata),
             "probe.npz": probe.to_bytes()}
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                files[ONNX_FILE] = export_onnx(model, Path(tmp) / ONNX_FILE, probe).read_bytes()
            except OnnxExportError as exc:
                log.warning("the package%s has no %s, so it will be served by eager PyTorch: %s",
                            f" {out_dir}" if out_dir else "", ONNX_FILE, exc)
    package = Package.from_files(with_checksums(files), str(out_dir or ""))
    if out_dir is not None:
        package.save(out_dir)
    return package
