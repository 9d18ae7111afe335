"""Checkpoints: one folder holding model, optimizer, scheduler, epoch, config and label map.

`checkpoint.pt` has everything resume needs, as tensors and plain Python values only, so it loads
with `torch.load(weights_only=True)` (no pickled code); `config.yaml` and `label_map.json` beside it
let a person see what made it without loading torch. `training.export` turns a checkpoint into the
serving package, the one model artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn.config import Config, save_config
from maskrcnn.labels import LabelMap

CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, scaler: Any, epoch: int, config: Config, label_map: LabelMap,
                    metrics: dict[str, float], run_info: dict[str, str] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "config": config.to_dict(),
        "label_map": label_map.to_dict(),
        "metrics": {k: _plain(v) for k, v in metrics.items()},
        "run_info": dict(run_info or {}),
    }, folder / CHECKPOINT_FILE)
    save_config(config, folder / "config.yaml")
    (folder / "label_map.json").write_text(json.dumps(label_map.to_dict(), indent=2))
    (folder / "metrics.json").write_text(json.dumps({**metrics, **(run_info or {})}, indent=2, sort_keys=True, default=_plain))
    return folder


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers: `weights_only` loading accepts only plain types and tensors."""
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain values), loaded as weights only."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {folder}: not a checkpoint folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_info(folder: str | Path) -> dict[str, Any]:
    """`metrics.json` beside the weights (epoch, metrics, MLflow run): readable without torch."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint of this project (no metrics.json)")
    return json.loads(path.read_text())
