"""Initialisation for training only: load initial weights and freeze backbone stages.

`maskrcnn.model.build_model` builds the architecture and reads nothing. A training run then calls
`initialize`, which fetches `model.weights` / `model.backbone_weights` (a local path or an `s3://`,
`gs://`, `https://` URI) and freezes all but `model.trainable_backbone_layers` backbone stages.
Loading a checkpoint or a serving package never comes here, so a serving pod without egress never
tries to download init weights named in the config it was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from maskrcnn.config import ModelConfig
from maskrcnn.storage import fetch_file
from maskrcnn.model import backbone_row

log = logging.getLogger(__name__)

def initialize(model: MaskRCNN, cfg: ModelConfig, cache_dir: Path) -> MaskRCNN:
    """Load the initial weights `cfg` names (if any), then freeze backbone stages; returns `model`."""
    if cfg.backbone_weights != "none":
        load_matching(model.backbone.body, load_state_dict(cfg.backbone_weights, cache_dir),
                      f"backbone weights {cfg.backbone_weights}")
    if cfg.weights != "none":
        load_matching(model, load_state_dict(cfg.weights, cache_dir), f"weights {cfg.weights}")
    trainable = cfg.trainable_backbone_layers if cfg.trainable_backbone_layers >= 0 else (3 if cfg.pretrained else 5)
    freeze_backbone(model, cfg.backbone, trainable)
    return model


def load_state_dict(uri: str, cache_dir: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file or URI (fetched once into `cache_dir`), loaded as weights only."""
    path = fetch_file(uri, cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # our checkpoints and common training scripts nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load the tensors whose names and shapes match; log what was skipped (e.g. a head with other classes)."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise ValueError(f"{what}: none of its {len(state)} tensors match this model; is it for another architecture?")
    module.load_state_dict(usable, strict=False)
    log.info("%s: loaded %d tensors, skipped %d (name or shape differs)%s", what, len(usable), len(skipped),
             f", e.g. {skipped[:3]}" if skipped else "")


def freeze_backbone(model: MaskRCNN, backbone: str, trainable: int) -> None:
    """Leave the last `trainable` backbone stages (0-5) trainable and freeze the rest, as torchvision does;
    the stages are the backbone table's (`maskrcnn.model.BACKBONE_TABLE`)."""
    body = model.backbone.body
    stages = backbone_row(backbone).stages(body)
    body.requires_grad_(False)
    for stage in stages[max(0, len(stages) - trainable):] if trainable > 0 else []:
        for module in stage:
            module.requires_grad_(True)
