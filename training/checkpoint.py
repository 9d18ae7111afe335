"""Checkpoints: one folder holding model, optimizer, scheduler, epoch, config and label map.

`checkpoint.pt` has everything resume needs; `config.yaml` and `label_map.json` beside it let a
person (or the serving package) see what made it without loading torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import Config, save_config
from training.data.coco import LabelMap

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
        "metrics": metrics,
        "run_info": run_info or {},
    }, folder / CHECKPOINT_FILE)
    save_config(config, folder / "config.yaml")
    (folder / "label_map.json").write_text(json.dumps(label_map.to_dict(), indent=2))
    (folder / "metrics.json").write_text(json.dumps({**metrics, **(run_info or {})}, indent=2, sort_keys=True))
    return folder


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {folder}: not a checkpoint folder")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(folder: str | Path) -> tuple[nn.Module, Config, LabelMap]:
    """The model of a checkpoint, in eval mode on CPU, with its config and label map."""
    from training.model import build_model

    state = load_checkpoint(folder)
    config = Config.from_dict(state["config"])
    label_map = LabelMap.from_dict(state["label_map"])
    model = build_model(config.model, label_map.num_classes)
    model.load_state_dict(state["model"])
    return model.eval(), config, label_map
