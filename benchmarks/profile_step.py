"""Where a training step's seconds go: data, each part of Mask R-CNN's forward pass, backward, optimizer.

Runs the plain loop (no Ray) on the config's model and synthetic data, one process, and times each
stage of every step with wall clocks around the model's parts (forward hooks). Backward is timed as a
whole: autograd does not attribute it to modules. Optionally starts from a checkpoint, because a
trained model proposes real objects and its heads see different work than a random one.

    uv run python benchmarks/profile_step.py [--steps 30] [--threads 2] [--checkpoint DIR] [--ops 15] [-o key=value ...]

`--ops N` also runs the measured steps under torch.profiler and prints the N operators with the most
self time (forward and backward kernels alike, e.g. RoIAlign's backward).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, RandomSampler

from training.checkpoint import load_checkpoint
from maskrcnn.config import load_config
from training.data.dataset import CocoDataset, collate
from training.data.prepare import prepare_data
from training.data.transforms import build_train_transform
from training.engine import build_optimizer
from maskrcnn.logs import setup_logging
from maskrcnn.model import build_model

PARTS = {
    "transform": "transform",
    "backbone body": "backbone.body",
    "backbone fpn": "backbone.fpn",
    "rpn": "rpn",
    "box roi pool": "roi_heads.box_roi_pool",
    "box head+predictor": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "mask roi pool": "roi_heads.mask_roi_pool",
    "mask head+predictor": ("roi_heads.mask_head", "roi_heads.mask_predictor"),
}


def _timed(model: torch.nn.Module, totals: dict[str, float]) -> None:
    """Add each part's forward wall time to `totals[part]` on every call."""
    for part, names in PARTS.items():
        for name in (names,) if isinstance(names, str) else names:
            module = model.get_submodule(name)
            started: list[float] = []
            module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()))
            module.register_forward_hook(lambda *_, s=started, p=part: totals.__setitem__(p, totals[p] + time.perf_counter() - s.pop()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder to start from (a trained model)")
    p.add_argument("--ops", type=int, default=0, help="also print the N operators with the most self CPU time")
    p.add_argument("-o", "--override", action="append", default=[])
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, "%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.override)
    data = prepare_data(cfg.data, validate=False)
    loader = DataLoader(CocoDataset(data.train, build_train_transform(cfg.data.augment)), batch_size=cfg.train.batch_size,
                        sampler=RandomSampler(range(len(data.train.coco["images"])), generator=torch.Generator().manual_seed(0)),
                        collate_fn=collate, drop_last=True, num_workers=cfg.data.num_workers)
    model = build_model(cfg.model, data.label_map.num_classes)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.lr * 0.01 if args.checkpoint else 0.001  # keep the model where it is
    totals: dict[str, float] = defaultdict(float)
    _timed(model, totals)
    per_step: dict[str, list[float]] = defaultdict(list)
    positives: list[int] = []
    roi_heads = model.roi_heads
    sample = roi_heads.select_training_samples

    def counting(*a, **k):
        out = sample(*a, **k)
        positives.append(sum(int((labels > 0).sum()) for labels in out[2]))
        return out

    roi_heads.select_training_samples = counting
    it = iter(loader)
    profiler = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup and args.ops:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        totals.clear()
        t0 = time.perf_counter()
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        t1 = time.perf_counter()
        losses = model(images, targets)
        loss = sum(losses.values())
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if step < args.warmup:
            continue
        per_step["data"].append(t1 - t0)
        forward_parts = sum(totals.values())
        for part in PARTS:
            per_step[f"fwd: {part}"].append(totals[part])
        per_step["fwd: rest (losses, sampling glue)"].append(t2 - t1 - forward_parts)
        per_step["backward"].append(t3 - t2)
        per_step["optimizer"].append(t4 - t3)
        per_step["step total"].append(t4 - t0)

    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=40))
    step_total = statistics.mean(per_step["step total"])
    print(f"\n{cfg.model.backbone} at {cfg.model.min_size} px, batch {cfg.train.batch_size}, {args.threads} threads, "
          f"{args.steps} steps after {args.warmup} warm-up, {'trained' if args.checkpoint else 'random'} weights; "
          f"mean positives sampled per image: {statistics.mean(positives[args.warmup:]) / cfg.train.batch_size:.1f}")
    print(f"{'stage':<36}{'ms/step':>9}{'share':>8}")
    for name, values in per_step.items():
        ms = 1000 * statistics.mean(values)
        print(f"{name:<36}{ms:>9.1f}{100 * ms / 1000 / step_total:>7.1f}%")
    print(f"images/s: {cfg.train.batch_size / step_total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
