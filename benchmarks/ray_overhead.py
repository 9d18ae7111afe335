"""Training images/s: Ray Train (1 worker) against a plain PyTorch loop, same model, data and threads.

Both paths run `training.engine.train_one_epoch` on the default config's model and synthetic data,
with the same torch thread count. Epoch 0 is warm-up (allocator, first-step costs) and is left out;
the steady-state images/s of the remaining epochs are compared. Ray's start-up (cluster, worker
group) is reported separately: it is paid once per run, not per step.

    uv run python benchmarks/ray_overhead.py [--epochs 4] [--steps 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

from training.config import load_config
from training.data.coco import CocoDataset, collate
from training.data.prepare import prepare_data
from training.data.transforms import build_train_transform
from training.engine import build_optimizer, lr_lambda, train_one_epoch
from training.model import build_model
from training.logs import setup_logging

log = logging.getLogger("benchmark")


def plain_loop(cfg) -> list[float]:
    torch.set_num_threads(cfg.train.threads_per_worker)
    torch.manual_seed(cfg.train.seed)
    data = prepare_data(cfg.data, validate=False)
    loader = DataLoader(CocoDataset(data.train, build_train_transform(cfg.data.augment)), batch_size=cfg.train.batch_size,
                        sampler=RandomSampler(range(len(data.train.coco["images"])), generator=torch.Generator().manual_seed(0)),
                        collate_fn=collate, drop_last=True)
    model = build_model(cfg.model, data.label_map.num_classes)
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train, cfg.train.epochs * cfg.train.max_steps_per_epoch))
    return [train_one_epoch(model, opt, sched, loader, torch.device("cpu"), e, cfg.train)["images_per_sec"]
            for e in range(cfg.train.epochs)]


def plain_loop_in_ray_task(cfg) -> list[float]:
    """The plain loop as a Ray task: separates "inside a Ray worker process" from Ray Train's own machinery."""
    import ray

    from training.config import Config
    from training.trainer import init_ray

    init_ray(cfg)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker)(lambda d: plain_loop(Config.from_dict(d)))
    return ray.get(task.remote(cfg.to_dict()))


def ray_path(cfg) -> tuple[list[float], float]:
    from training.trainer import init_ray, make_trainer

    started = time.perf_counter()
    init_ray(cfg)
    result = make_trainer(cfg, {"config": cfg.to_dict()}, f"bench-{int(time.time())}").fit()
    wall = time.perf_counter() - started
    # Every epoch's report rides with its checkpoint (num_to_keep = epochs here).
    reports = sorted((m["epoch"], m["images_per_sec"]) for _, m in result.best_checkpoints)
    return [rate for _, rate in reports], wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="steps per epoch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, "%(message)s")
    cfg = load_config(None, [
        f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}", f"train.threads_per_worker={args.threads}",
        "train.eval_every=1000", "train.log_every=1000", "ray.num_workers=1", f"ray.cpus_per_worker={args.threads}",
        "ray.storage_path=/tmp/maskrcnn-bench", f"ray.num_to_keep={args.epochs}", "data.synthetic.num_val=4",
    ])
    prepare_data(cfg.data)  # generate the data once, outside both measurements
    t0 = time.perf_counter()
    plain = plain_loop(cfg)
    plain_wall = time.perf_counter() - t0
    ray_rates, ray_wall = ray_path(cfg)
    task_rates = plain_loop_in_ray_task(cfg)
    plain_ss, ray_ss, task_ss = statistics.mean(plain[1:]), statistics.mean(ray_rates[1:]), statistics.mean(task_rates[1:])
    print(f"\nbackbone {cfg.model.backbone}, batch {cfg.train.batch_size}, {args.threads} threads, "
          f"{args.epochs} epochs x {args.steps} steps (epoch 0 is warm-up)")
    print(f"{'path':<14}{'img/s per epoch':<36}{'steady img/s':>13}{'wall s':>9}")
    print(f"{'plain loop':<14}{' '.join(f'{r:6.2f}' for r in plain):<36}{plain_ss:>13.2f}{plain_wall:>9.1f}")
    print(f"{'Ray Train':<14}{' '.join(f'{r:6.2f}' for r in ray_rates):<36}{ray_ss:>13.2f}{ray_wall:>9.1f}")
    print(f"{'loop in task':<14}{' '.join(f'{r:6.2f}' for r in task_rates):<36}{task_ss:>13.2f}{'':>9}")
    print(f"\nRay / plain steady-state throughput: {ray_ss / plain_ss:.3f}  (overhead {100 * (1 - ray_ss / plain_ss):+.1f}%)")
    print(f"plain loop in a Ray task / plain loop: {task_ss / plain_ss:.3f}  (cost of running inside a Ray worker process)")
    print(f"Ray wall / plain wall (start-up and per-epoch checkpointing included): {ray_wall / plain_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
