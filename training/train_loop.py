"""`train_loop_per_worker`: what each Ray Train worker runs.

Ray touches the loop in four places: `prepare_model` (DDP and device), `prepare_data_loader`
(device transfer), `ray.train.report` (metrics and rank 0's checkpoint) and `ray.train.get_checkpoint`
(restart after a lost worker). Everything else is the plain loop in `training.engine`.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from training.checkpoint import load_checkpoint, save_checkpoint, unwrap
from maskrcnn.config import Config, WorkerConfig
from training.data.dataset import CocoDataset, collate
from training.data.prepare import prepare_data
from training.data.transforms import build_train_transform
from training.engine import Progress, build_optimizer, lr_lambda, train_one_epoch
from training.evaluate import evaluate_model
from training.initialize import initialize
from maskrcnn.model import build_model
from maskrcnn.logs import setup_logging

log = logging.getLogger("training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@dataclass
class _Loop:
    """One worker's training state, built by `_build` and restored by `_restore`."""

    data: Any
    augment: Any
    sampler: DistributedSampler
    loader: DataLoader
    val_loader: DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train `loop_config["worker"].config`; rank 0 logs to MLflow when the worker config names a run."""
    # This project's progress at INFO; Ray Train's own INFO lines (a full metrics dict per report) stay out.
    setup_logging(logging.WARNING, force=True)
    for name in ("maskrcnn", "training"):
        logging.getLogger(name).setLevel(logging.INFO)
    worker: WorkerConfig = loop_config["worker"]
    cfg = worker.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.threads_per_worker or cfg.ray.cpus_per_worker))
    seed_everything(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    device = ray.train.torch.get_device()
    run = _build(cfg, rank, world, device)
    start_epoch, last_eval = _restore(run, worker.resume_from, rank)
    client = _mlflow_client(worker) if rank == 0 else None
    progress = Progress(cfg.train.epochs - start_epoch, run.steps_per_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        if worker.on_epoch_start is not None:
            worker.on_epoch_start(epoch, rank, world)
        _seed_epoch(run, cfg, epoch, rank)
        trained = train_one_epoch(run.model, run.optimizer, run.scheduler, run.loader, device, epoch, cfg.train, progress,
                                  run.scaler, world)
        measured = _evaluate_if_due(run, cfg, epoch, device, rank)
        last_eval = measured or last_eval
        # Ray ranks checkpoints by the latest evaluation (absent before the first: 0); MLflow gets only
        # what was measured at this epoch, so its charts show no value that was not taken.
        metrics: dict[str, Any] = {"epoch": epoch, **trained, cfg.ray.checkpoint_metric: 0.0, **last_eval}
        if client is not None:
            from training.tracking import log_metrics

            log_metrics(client, worker.mlflow_run_id, {**trained, **measured}, step=epoch)
        _report(run, worker, epoch, metrics, rank)


def _build(cfg: Config, rank: int, world: int, device: torch.device) -> _Loop:
    """The data (a distributed sampler over the training split, every rank's share of the validation split),
    the model (initialised, DDP), the optimiser, the schedule and, on GPU with AMP, the gradient scaler."""
    data = prepare_data(cfg.data, validate=False)
    augment = build_train_transform(cfg.data.augment)
    train_ds = CocoDataset(data.train, augment, max_pixels=cfg.data.max_image_pixels)
    val_ds = CocoDataset(data.val, max_pixels=cfg.data.max_image_pixels)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=cfg.data.num_workers, drop_last=len(train_ds) >= cfg.train.batch_size * world)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    val_loader = DataLoader(val_ds, batch_size=cfg.train.batch_size, collate_fn=collate, num_workers=cfg.data.num_workers,
                            sampler=DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False))
    model = initialize(build_model(cfg.model, data.label_map.num_classes), cfg.model, cfg.data.resolved_cache_dir())
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, cfg.train)
    steps_per_epoch = min(len(loader), cfg.train.max_steps_per_epoch or len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, cfg.train.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp and device.type == "cuda" else None
    return _Loop(data, augment, sampler, loader, val_loader, model, optimizer, scheduler, scaler, steps_per_epoch)


def _restore(run: _Loop, resume_from: str, rank: int) -> tuple[int, dict[str, Any]]:
    """(the first epoch to train, the last evaluation): Ray's own checkpoint after a worker-group restart,
    else the one --resume named (a folder or s3:// URI), else (0, {})."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint(resume_from)
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(folder)
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if rank == 0:
        log.info("resuming from %s at epoch %d", checkpoint.path, state["epoch"] + 1)
    return state["epoch"] + 1, {k: v for k, v in state["metrics"].items() if not k.startswith("train_")}


def _mlflow_client(worker: WorkerConfig):
    if not worker.mlflow_run_id:
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(worker.tracking_uri)


def _seed_epoch(run: _Loop, cfg: Config, epoch: int, rank: int) -> None:
    """Every random stream (augmentation, RPN/ROI sampling) is a function of (seed, epoch, rank), so a
    resumed run replays exactly what the uninterrupted run would have done."""
    run.sampler.set_epoch(epoch)
    epoch_seed = cfg.train.seed * 100_003 + epoch * 1009 + rank
    seed_everything(epoch_seed)
    if run.augment is not None:
        run.augment.reseed(epoch_seed)


def _evaluate_if_due(run: _Loop, cfg: Config, epoch: int, device: torch.device, rank: int) -> dict[str, Any]:
    """The validation metrics on every rank when this epoch is evaluated (every `eval_every`, and the last), else {}."""
    if (epoch + 1) % cfg.train.eval_every and epoch != cfg.train.epochs - 1:
        return {}
    evaluated, _ = evaluate_model(run.model, run.data.val, cfg.eval, loader=run.val_loader, device=device)
    evaluated = _broadcast(evaluated)
    if rank == 0:
        log.info("epoch %d: segm mAP %.4f, bbox mAP %.4f, mask IoU %.4f", epoch, evaluated["segm_mAP"],
                 evaluated["bbox_mAP"], evaluated["mask_iou"])
    return evaluated


def _report(run: _Loop, worker: WorkerConfig, epoch: int, metrics: dict[str, Any], rank: int) -> None:
    """Report the epoch's metrics to Ray, with rank 0's checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler,
                            epoch=epoch, config=worker.config, label_map=run.data.label_map, metrics=metrics,
                            run_info={"mlflow_run_id": worker.mlflow_run_id, "tracking_uri": worker.tracking_uri})
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
