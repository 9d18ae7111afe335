"""The training loop: one epoch, the optimiser, the learning-rate schedule, progress lines. Plain PyTorch,
shared by Ray workers, the benchmarks and tests (inference is `training.inference`).

`train_one_epoch` knows nothing about Ray; distributed runs only add a DistributedSampler and a
DDP-wrapped model. Loss values are averaged across ranks for logging, so a non-finite loss stops every
rank at the same step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from maskrcnn.config import TrainConfig

log = logging.getLogger(__name__)


def is_primary() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors across ranks (one all-reduce)."""
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a global step: linear warmup, then cosine, step or constant."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(progress >= m for m in (2 / 3, 8 / 9))

    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Progress:
    """Counts steps across epochs for the ETA in progress lines."""

    epochs: int
    steps_per_epoch: int
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0

    def eta(self) -> str:
        if not self.steps_done:
            return "?"
        left = (self.epochs * self.steps_per_epoch - self.steps_done) * (time.perf_counter() - self.started) / self.steps_done
        return time.strftime("%H:%M:%S", time.gmtime(max(left, 0)))


def _to_device(images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device):
    return [i.to(device, non_blocking=True) for i in images], [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable,
    device: torch.device,
    epoch: int,
    cfg: TrainConfig,
    progress: Progress | None = None,
    scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
) -> dict[str, float]:
    """One pass over `loader`; returns mean losses, the last lr and training images/s (all ranks).

    Raises FloatingPointError with the loss dict when the (rank-averaged) loss is not finite.
    """
    model.train()
    sums: dict[str, float] = {}
    steps = images_seen = 0
    use_amp = scaler is not None
    max_steps = cfg.max_steps_per_epoch or None
    total = min(len(loader), max_steps) if max_steps else len(loader)  # type: ignore[arg-type]
    started = time.perf_counter()  # images/s counts data loading too: it is what a user waits for
    for step, (images, targets) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        logged = reduce_mean({**loss_dict, "loss": loss})
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch} step {step}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in logged.items())
                + " (lower train.lr, raise train.warmup_steps or keep train.grad_clip > 0)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - started
        steps += 1
        images_seen += len(images) * world_size
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        if progress is not None:
            progress.steps_done += 1
        if is_primary() and (step % cfg.log_every == 0 or step == total - 1):
            log.info("epoch %d step %d/%d loss %.4f lr %.5f img/s %.1f eta %s", epoch, step + 1, total, logged["loss"],
                     optimizer.param_groups[0]["lr"], images_seen / max(elapsed, 1e-9),
                     progress.eta() if progress else "?")
    out = {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}
    out["lr"] = optimizer.param_groups[0]["lr"]
    out["images_per_sec"] = images_seen / max(time.perf_counter() - started, 1e-9)
    return out
