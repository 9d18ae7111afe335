"""`train_loop_per_worker`: what each Ray Train worker runs.

Ray touches the loop in four places: `prepare_model` (DDP and device), `prepare_data_loader`
(device transfer), `ray.train.report` (metrics and rank 0's checkpoint) and `ray.train.get_checkpoint`
(restart after a lost worker). Everything else is the plain loop in `training.engine`.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from training.checkpoint import load_checkpoint, save_checkpoint, unwrap
from training.config import Config
from training.data.dataset import CocoDataset, collate
from training.data.prepare import prepare_data
from training.data.transforms import build_train_transform
from training.engine import Progress, build_optimizer, lr_lambda, train_one_epoch
from training.evaluate import evaluate_model
from training.initialize import initialize
from training.model import build_model
from training.logs import setup_logging

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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train `loop_config["config"]`; optionally log to MLflow run `loop_config["mlflow_run_id"]` (rank 0)."""
    # This project's progress at INFO; Ray Train's own INFO lines (a full metrics dict per report) stay out.
    setup_logging(logging.WARNING, force=True)
    logging.getLogger("training").setLevel(logging.INFO)
    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.threads_per_worker or cfg.ray.cpus_per_worker
    torch.set_num_threads(max(1, threads))
    seed_everything(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    device = ray.train.torch.get_device()
    use_amp = cfg.train.amp and device.type == "cuda"

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
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_epoch, last_eval = 0, {}
    # Ray's own checkpoint after a worker-group restart; else the one --resume named (a folder or s3:// URI).
    checkpoint = ray.train.get_checkpoint()
    resume_from = loop_config.get("resume_from")
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint(resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        last_eval = {k: v for k, v in state["metrics"].items() if not k.startswith("train_")}
        if rank == 0:
            log.info("resuming from %s at epoch %d", checkpoint.path, start_epoch)

    client = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        from training.tracking import log_metrics
        client = MlflowClient(loop_config["tracking_uri"])

    progress = Progress(cfg.train.epochs - start_epoch, steps_per_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_lose_worker(loop_config.get("lose_worker_once"), epoch, rank, world)
        sampler.set_epoch(epoch)
        # Every random stream (augmentation, RPN/ROI sampling) is a function of (seed, epoch, rank),
        # so a resumed run replays exactly what the uninterrupted run would have done.
        epoch_seed = cfg.train.seed * 100_003 + epoch * 1009 + rank
        seed_everything(epoch_seed)
        if augment is not None:
            augment.reseed(epoch_seed)
        trained = train_one_epoch(model, optimizer, scheduler, loader, device, epoch, cfg.train, progress, scaler, world)
        measured: dict[str, Any] = {}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1:
            evaluated, _ = evaluate_model(model, data.val, cfg.eval, loader=val_loader, device=device)
            measured = last_eval = _broadcast(evaluated)
            if rank == 0:
                log.info("epoch %d: segm mAP %.4f, bbox mAP %.4f, mask IoU %.4f", epoch, last_eval["segm_mAP"],
                         last_eval["bbox_mAP"], last_eval["mask_iou"])
        # Ray ranks checkpoints by the latest evaluation (absent before the first: 0); MLflow gets only
        # what was measured at this epoch, so its charts show no value that was not taken.
        metrics: dict[str, Any] = {"epoch": epoch, **trained, cfg.ray.checkpoint_metric: 0.0, **last_eval}
        if client is not None:
            log_metrics(client, loop_config["mlflow_run_id"], {**trained, **measured}, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                                config=cfg, label_map=data.label_map, metrics=metrics,
                                run_info={"mlflow_run_id": loop_config.get("mlflow_run_id") or "",
                                          "tracking_uri": loop_config.get("tracking_uri") or ""})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def _maybe_lose_worker(spec: dict[str, Any] | None, epoch: int, rank: int, world: int) -> None:
    """Fault injection for tests: the last rank dies once at `spec["epoch"]`, as a lost node would.

    `spec["marker"]` is a file created before dying, so the restarted worker group goes on.
    """
    if not spec or epoch != spec["epoch"] or rank != world - 1 or os.path.exists(spec["marker"]):
        return
    open(spec["marker"], "w").close()
    # A node is lost some time into an epoch, after Ray has registered the previous checkpoint.
    time.sleep(spec.get("delay_s", 3.0))
    log.warning("fault injection: rank %d exits at epoch %d", rank, epoch)
    os._exit(1)
