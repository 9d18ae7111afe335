"""`uv run -m training.export CHECKPOINT OUT [--no-onnx]`: the serving package of a training checkpoint.

The package itself (its files, its one reader and one writer) is `training.package`; this is the thin
step from a checkpoint folder (local, or a Ray checkpoint URI) to it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from training.checkpoint import load_checkpoint
from training.config import Config
from training.data.labels import LabelMap
from training.logs import setup_logging
from training.graph import ONNX_FILE
from training.package import Package, PackageError, write_package

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path | None, metadata: dict[str, Any] | None = None,
                      onnx: bool = True) -> Package:
    """The serving package of a training checkpoint folder, with the checkpoint's epoch, metrics and run
    information (and `metadata`) as its metadata; written into `out_dir` unless it is None.

    `onnx`: also write `detector.onnx` (a failed export is logged and leaves the package without it)."""
    from training.model import build_model

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

    try:
        source = args.checkpoint if "://" in args.checkpoint else str(Path(args.checkpoint).resolve())  # Ray needs it absolute
        with Checkpoint(source).as_directory() as folder:
            package = export_checkpoint(folder, args.out, onnx=not args.no_onnx)
    except (FileNotFoundError, PackageError) as exc:
        log.error("%s", exc)
        return 2
    log.info("wrote the serving package of %s (epoch %s) to %s", args.checkpoint, package.metadata.get("epoch"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
