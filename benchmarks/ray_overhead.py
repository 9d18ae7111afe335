"""Training images/s: Ray Train against the loops a user would otherwise write, same model, data and threads.

Four paths run `training.engine.train_one_epoch` on the default config's model and synthetic data:

- plain loop: one process, no Ray, all the threads;
- Ray Train, 1 worker: the same, as Ray Train's only worker;
- torchrun, 2 ranks: DDP over gloo (torchvision's references' launcher), threads split between ranks;
- Ray Train, 2 workers: the same DDP, set up by Ray Train.

Epoch 0 is warm-up and is left out; the steady-state images/s of the remaining epochs are compared.
Each path runs `--rounds` times, in alternating order (forward, then backward), so that drift over the
run (thermal, noisy neighbours) does not favour the path that runs first. Every run is a fresh process,
and each Ray run starts and stops its own local Ray, so no path shares the machine with another's idle
processes or a Ray driver's threads. Start-up (cluster, worker group, first step) is reported separately
as wall time: it is paid once per run, not per step.

    uv run python benchmarks/ray_overhead.py [--epochs 4] [--steps 25] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from maskrcnn.config import Config, load_config
from training.data.dataset import CocoDataset, collate
from training.data.prepare import prepare_data
from training.data.transforms import build_train_transform
from training.engine import build_optimizer, lr_lambda, train_one_epoch
from maskrcnn.logs import setup_logging
from maskrcnn.model import build_model

log = logging.getLogger("benchmark")


def plain_loop(cfg: Config, rank: int = 0, world: int = 1) -> list[float]:
    """The loop without Ray: one process, or one DDP rank of `world` (torchrun) when a process group is up."""
    torch.set_num_threads(cfg.train.threads_per_worker)
    torch.manual_seed(cfg.train.seed)
    data = prepare_data(cfg.data, validate=False)
    dataset = CocoDataset(data.train, build_train_transform(cfg.data.augment))
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    else:
        sampler = RandomSampler(range(len(dataset)), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    model = build_model(cfg.model, data.label_map.num_classes)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)  # what ray.train.torch.prepare_model does on CPU
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train, cfg.train.epochs * cfg.train.max_steps_per_epoch))
    rates = []
    for epoch in range(cfg.train.epochs):
        if world > 1:
            sampler.set_epoch(epoch)
        rates.append(train_one_epoch(model, opt, sched, loader, torch.device("cpu"), epoch, cfg.train, world_size=world)["images_per_sec"])
    return rates


def torchrun_worker(config_json: str, out: str) -> None:
    """One torchrun rank: the plain loop under DDP (gloo). Rank 0 writes the per-epoch rates to `out`."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rates = plain_loop(Config.from_dict(json.loads(config_json)), rank, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rates, f)
    dist.destroy_process_group()


def torchrun(cfg: Config, workers: int) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rates.json")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                        __file__, "--torchrun-worker", json.dumps(cfg.to_dict()), out],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads_per_worker)})
        wall = time.perf_counter() - started
        with open(out) as f:
            return json.load(f), wall


def ray_path(cfg: Config) -> tuple[list[float], float]:
    import ray

    from training.trainer import init_ray, make_trainer

    started = time.perf_counter()
    init_ray(cfg)
    try:
        result = make_trainer(cfg, {"config": cfg.to_dict()}, f"bench-{time.time_ns()}").fit()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    # Every epoch's report rides with its checkpoint (num_to_keep = epochs here).
    reports = sorted((m["epoch"], m["images_per_sec"]) for _, m in result.best_checkpoints)
    return [rate for _, rate in reports], wall


def plain_path(cfg: Config) -> tuple[list[float], float]:
    started = time.perf_counter()
    rates = plain_loop(cfg)
    return rates, time.perf_counter() - started


def run_path(kind: str, config_json: str, out: str) -> None:
    """One measured run in this (fresh) process; writes (rates, wall) to `out`."""
    setup_logging(logging.WARNING, "%(message)s")
    cfg = Config.from_dict(json.loads(config_json))
    rates, wall = {"plain": plain_path, "ray": ray_path, "torchrun": lambda c: torchrun(c, c.ray.num_workers)}[kind](cfg)
    with open(out, "w") as f:
        json.dump([rates, wall], f)


def in_fresh_process(kind: str, cfg: Config) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        subprocess.run([sys.executable, __file__, "--run-path", kind, json.dumps(cfg.to_dict()), out], check=True)
        with open(out) as f:
            rates, wall = json.load(f)
    return rates, wall


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--torchrun-worker":
        torchrun_worker(sys.argv[2], sys.argv[3])
        return 0
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--run-path":
        run_path(*sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="steps per epoch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the whole machine, split between ranks")
    p.add_argument("--rounds", type=int, default=2, help="runs of every path, in alternating order")
    p.add_argument("--workers", type=int, default=2, help="ranks of the distributed paths")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING, "%(message)s")
    common = [f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}", "train.eval_every=1000",
              "train.log_every=1000", "ray.storage_path=/tmp/maskrcnn-bench", f"ray.num_to_keep={args.epochs}",
              "data.synthetic.num_val=4"]
    per_rank = max(1, args.threads // args.workers)
    one = load_config(None, common + [f"train.threads_per_worker={args.threads}", "ray.num_workers=1",
                                      f"ray.cpus_per_worker={args.threads}"])
    many = load_config(None, common + [f"train.threads_per_worker={per_rank}", f"ray.num_workers={args.workers}",
                                       f"ray.cpus_per_worker={per_rank}"])
    prepare_data(one.data)  # generate the data once, outside every measurement

    paths = {
        "plain loop": lambda: in_fresh_process("plain", one),
        "Ray Train x1": lambda: in_fresh_process("ray", one),
        f"torchrun x{args.workers}": lambda: in_fresh_process("torchrun", many),
        f"Ray Train x{args.workers}": lambda: in_fresh_process("ray", many),
    }
    runs: dict[str, list[tuple[list[float], float]]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            log.warning("round %d: %s", r + 1, name)
            runs[name].append(paths[name]())

    steady = {name: [statistics.mean(rates[1:]) for rates, _ in got] for name, got in runs.items()}
    print(f"\nbackbone {one.model.backbone} at {one.model.min_size} px, batch {one.train.batch_size} per rank, "
          f"{args.threads} threads in all, {args.epochs} epochs x {args.steps} steps (epoch 0 is warm-up), "
          f"{args.rounds} rounds in alternating order")
    print(f"{'path':<15}{'round':>6}  {'img/s per epoch':<30}{'steady img/s':>13}{'wall s':>9}")
    for name, got in runs.items():
        for r, (rates, wall) in enumerate(got):
            print(f"{name:<15}{r + 1:>6}  {' '.join(f'{x:6.2f}' for x in rates):<30}{steady[name][r]:>13.2f}{wall:>9.1f}")
    mean = {name: statistics.mean(values) for name, values in steady.items()}
    names = list(paths)
    print(f"\n{'ratio (steady img/s, mean of rounds)':<44}{'value':>7}")
    print(f"{'Ray Train x1 / plain loop':<44}{mean[names[1]] / mean[names[0]]:>7.3f}")
    print(f"{f'Ray Train x{args.workers} / torchrun x{args.workers}':<44}{mean[names[3]] / mean[names[2]]:>7.3f}")
    print(f"{f'torchrun x{args.workers} / plain loop':<44}{mean[names[2]] / mean[names[0]]:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
