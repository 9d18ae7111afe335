"""The training and evaluation loops: plain PyTorch, shared by Ray workers, the benchmark and tests.

`train_one_epoch` and `predict` know nothing about Ray; distributed runs only add a
DistributedSampler and a DDP-wrapped model. Loss values are averaged across ranks for logging, so a
non-finite loss stops every rank at the same step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from training.checkpoint import unwrap
from training.config import EvalConfig, TrainConfig
from training.metrics import Prediction, encode_masks
from training.graph import OnnxDetector

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


MASK_BUDGET_BYTES = 64 << 20
"""Memory for full-resolution masks at once while post-processing one image (float32 while pasting)."""


def postprocess(detection: dict[str, torch.Tensor], resized_size: tuple[int, int], original_size: tuple[int, int],
                mask_threshold: float, score_threshold: float = 0.0, max_detections: int | None = None,
                mask_budget_bytes: int = MASK_BUDGET_BYTES) -> Prediction:
    """One image's ROI-head output (boxes in the resized image, 28x28 mask probabilities) -> a Prediction in
    the original image's coordinates: detections scoring at least `score_threshold` (at most
    `max_detections`, best first), boxes/scores/labels as numpy, masks binarised at `mask_threshold` and
    encoded as COCO RLE. Evaluation and the predictor both come here, so they never drift.

    torchvision pastes every mask at full resolution as float32 at once (100 detections on a 12 MP photo:
    ~10 GB); here a few masks at a time are pasted, binarised and encoded, within `mask_budget_bytes`.
    """
    keep = (detection["scores"] >= score_threshold).nonzero().flatten()[:max_detections]
    boxes = resize_boxes(detection["boxes"][keep], resized_size, original_size)
    probs = detection["masks"][keep]
    height, width = original_size
    # paste_masks_in_image holds each pasted mask twice (a list, then a stacked copy)
    chunk = max(1, mask_budget_bytes // max(1, 2 * 4 * height * width))
    rles: list[dict[str, Any]] = []
    for start in range(0, len(keep), chunk):
        pasted = paste_masks_in_image(probs[start:start + chunk], boxes[start:start + chunk], (height, width))
        rles += encode_masks((pasted[:, 0] > mask_threshold).to(torch.uint8).cpu().numpy())
        del pasted
    return {
        "boxes": boxes.cpu().numpy(),
        "scores": detection["scores"][keep].cpu().numpy(),
        "labels": detection["labels"][keep].cpu().numpy(),
        "masks": rles,
    }


@torch.inference_mode()
def detect(model: nn.Module, images: list[torch.Tensor], mask_threshold: float, score_threshold: float = 0.0,
           max_detections: int | None = None, mask_budget_bytes: int = MASK_BUDGET_BYTES,
           graph: OnnxDetector | None = None) -> list[Prediction]:
    """Mask R-CNN inference with `postprocess`: the same numbers as `model(images)` followed by
    thresholding and RLE encoding, without materialising every full-resolution mask at once.

    `graph`: the package's network in ONNX Runtime (`training.graph`), which then runs in place
    of `model`'s backbone, RPN and RoI heads; pre- and post-processing are the same."""
    model.eval()
    original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    batch, _ = model.transform(images)
    if graph is None:
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    else:
        detections = graph(batch)
    return [postprocess(d, resized, original, mask_threshold, score_threshold, max_detections, mask_budget_bytes)
            for d, resized, original in zip(detections, batch.image_sizes, original_sizes)]


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: torch.device, mask_threshold: float = 0.5,
            graph: OnnxDetector | None = None) -> list[Prediction]:
    """Predictions for every image in `loader` (boxes, scores, labels, RLE masks), in image coordinates
    (the network in ONNX Runtime when `graph` is given, as in `detect`)."""
    out: list[Prediction] = []
    for images, targets in loader:
        predictions = detect(unwrap(model), [i.to(device) for i in images], mask_threshold, graph=graph)
        out += [{"image_id": int(t["image_id"]), **p} for t, p in zip(targets, predictions)]
    return out


def gather_predictions(predictions: list[Prediction]) -> list[Prediction]:
    """All ranks' predictions on every rank, each image once (DistributedSampler pads with repeats)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return predictions
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    unique: dict[int, Prediction] = {}
    for part in parts:
        for p in part:
            unique.setdefault(p["image_id"], p)
    return [unique[k] for k in sorted(unique)]


def summarize_scores(predictions: list[Prediction], cfg: EvalConfig) -> dict[str, float]:
    """Detections per image above the evaluation score threshold (a quick sanity number)."""
    counts = [int((np.asarray(p["scores"]) >= cfg.score_threshold).sum()) for p in predictions]
    return {"detections_per_image": float(np.mean(counts)) if counts else 0.0}
