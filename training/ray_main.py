"""`uv run -m training.ray_main`: train Mask R-CNN with Ray Train, evaluate, and track in MLflow.

With no flags it trains on the embedded synthetic dataset with `training/configs/default.yaml`,
on a local Ray with 2 CPU workers. Any config field can be overridden with `--set section.field=value`;
the common ones also have flags. See `--help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import Config, ConfigError, flatten, load_config
from training.data.coco import DatasetError
from training.data.prepare import PreparedData, prepare_data
from training.data.sources import SourceError

log = logging.getLogger("training")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.ray_main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: training/configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.epochs=5 --set model.backbone=resnet50_fpn (repeatable)")
    p.add_argument("--data", help="training split: folder, s3://bucket/prefix or gs://bucket/prefix (sets data.train)")
    p.add_argument("--val-data", help="validation split, same forms (sets data.val)")
    p.add_argument("--epochs", type=int, help="sets train.epochs")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (sets ray.num_workers)")
    p.add_argument("--address", help="join an existing Ray cluster, e.g. ray://head:10001 or auto (sets ray.address)")
    p.add_argument("--storage-path", help="checkpoint storage: folder or s3:// (sets ray.storage_path)")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid images/annotations instead of failing")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint folder, or (no value) the latest checkpoint of ray.name in storage")
    p.add_argument("--tune", action="store_true", help="Ray Tune search (ASHA) over lr and weight decay; see the tune section")
    p.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("data", "data.train"), ("val_data", "data.val"), ("epochs", "train.epochs"),
                      ("num_workers", "ray.num_workers"), ("address", "ray.address"), ("storage_path", "ray.storage_path")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    if args.no_register:
        overrides.append("tracking.register=false")
    return load_config(args.config, overrides)


@dataclass
class TrainResult:
    """Where a finished run put things."""

    run_id: str
    tracking_uri: str
    checkpoint: str
    metrics: dict[str, float]
    model_uri: str = ""
    model_version: str | None = None
    model_name: str = ""


def storage_path(cfg: Config) -> str:
    return cfg.ray.storage_path or str(Path.cwd() / "ray_results")


def find_latest_checkpoint(root: str, name: str) -> str:
    """The checkpoint folder with the highest epoch under `<root>/<name>*` (local storage; for s3:// pass the checkpoint URI)."""
    base = Path(root)
    best: tuple[int, float, str] | None = None
    for metrics_file in base.glob(f"{name}*/checkpoint_*/metrics.json"):
        epoch = json.loads(metrics_file.read_text()).get("epoch", -1)
        key = (epoch, metrics_file.stat().st_mtime, str(metrics_file.parent))
        best = max(best, key) if best else key
    if best is None:
        raise FileNotFoundError(f"--resume: no checkpoint of run {name!r} under {base} (pass a checkpoint folder instead)")
    return best[2]


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        import training

        # Ship this package to a remote cluster that does not have it installed (e.g. a bare KubeRay image).
        ray.init(address=cfg.ray.address, runtime_env={"py_modules": [str(Path(training.__file__).parent)]})
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token to manage
        # The dashboard (loopback only) serves the State API that Ray Train uses to clean up after runs.
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.ray.num_workers * cfg.ray.cpus_per_worker),
                 include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=True, logging_level=logging.WARNING)


def use_gpu(cfg: Config) -> bool:
    if cfg.ray.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.ray.use_gpu.lower() in ("true", "1", "yes")


def make_trainer(cfg: Config, loop_config: dict[str, Any], run_name: str, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.train_loop import train_loop_per_worker

    gpu = use_gpu(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep, checkpoint_score_attribute=cfg.ray.checkpoint_metric,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
        ),
    )


def best_checkpoint(result: Any, metric: str):
    ranked = [(m.get(metric, float("-inf")), c) for c, m in (result.best_checkpoints or [])]
    if ranked:
        return max(ranked, key=lambda x: x[0])[1]
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint


def finalize(cfg: Config, data: PreparedData, run_id: str, tracking_uri: str, checkpoint: Any) -> TrainResult:
    """Evaluate the best checkpoint, log artifacts and sample images, and log/register the model."""
    from mlflow.tracking import MlflowClient

    from training.checkpoint import load_model
    from training.evaluate import evaluate_model, metric_summary, write_samples
    from training.tracking import log_and_register_model, log_metrics

    client = MlflowClient(tracking_uri)
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        model, ckpt_cfg, label_map = load_model(folder)
        epoch = json.loads((Path(folder) / "metrics.json").read_text()).get("epoch", 0)
        log.info("evaluating the best checkpoint (epoch %d) on %d validation images", epoch, len(data.val.coco["images"]))
        metrics, predictions = evaluate_model(model, data.val, cfg.eval)
        log.info("final: %s", metric_summary(metrics))
        log_metrics(client, run_id, {f"final_{k}": v for k, v in metrics.items()}, step=epoch)
        client.log_artifacts(run_id, folder, "checkpoint")
        samples = write_samples(data.val, predictions, Path(tmp) / "samples", cfg.eval.num_sample_images, cfg.eval.score_threshold)
        for path in samples:
            client.log_artifact(run_id, str(path), "samples")
        model_uri, version = "", None
        if cfg.tracking.log_model:
            tags = {"dataset_hash": data.content_hash, "run_id": run_id, "epoch": epoch,
                    "config": json.dumps(ckpt_cfg.to_dict(), separators=(",", ":")),
                    **{k: f"{metrics[k]:.6f}" for k in ("segm_mAP", "bbox_mAP", "mask_iou", "segm_AP50")}}
            extra = [str(Path(folder) / n) for n in ("config.yaml", "label_map.json")]
            model_uri, version = log_and_register_model(tracking_uri, run_id, model, cfg.tracking, tags, extra)
    return TrainResult(run_id, tracking_uri, checkpoint.path, metrics, model_uri, version, cfg.tracking.model_name)


def start_tracking(cfg: Config, data: PreparedData, run_name: str, parent_run_id: str | None = None,
                   run_id: str | None = None) -> tuple[str, str]:
    """Create (or reopen, on resume) the MLflow run, and log config, params, label map and dataset stats."""
    from mlflow.tracking import MlflowClient

    from training.tracking import experiment_id, log_params, resolve_tracking_uri, start_run

    tracking_uri = resolve_tracking_uri(cfg.tracking)
    client = MlflowClient(tracking_uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: continuing run %s", run_id)
        return run_id, tracking_uri
    exp = experiment_id(client, cfg.tracking.experiment, tracking_uri)
    run_id = start_run(client, exp, run_name, {"dataset_hash": data.content_hash}, parent_run_id)
    log_params(client, run_id, flatten(cfg.to_dict()))
    client.log_dict(run_id, cfg.to_dict(), "config.yaml")
    client.log_dict(run_id, data.label_map.to_dict(), "label_map.json")
    client.log_dict(run_id, data.stats, "dataset_stats.json")
    log.info("MLflow: run %s in experiment %r at %s", run_id, cfg.tracking.experiment, tracking_uri)
    return run_id, tracking_uri


def train(cfg: Config, resume: str | None = None, data: PreparedData | None = None) -> TrainResult:
    """Validate data, train with Ray Train, evaluate the best checkpoint, and record it all in MLflow."""
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from training.tracking import resolve_tracking_uri

    data = data or prepare_data(cfg.data, validate=True)
    resume_from, previous_run = None, None
    if resume:
        resume_from = find_latest_checkpoint(storage_path(cfg), cfg.ray.name) if resume == "latest" else resume
        with Checkpoint(resume_from).as_directory() as folder:  # a local folder or an s3:// URI
            metrics_file = Path(folder) / "metrics.json"
            if not metrics_file.is_file():
                raise FileNotFoundError(f"--resume {resume_from}: not a checkpoint of this project (no metrics.json)")
            info = json.loads(metrics_file.read_text())  # run_info is saved beside the metrics
        if info.get("mlflow_run_id") and info.get("tracking_uri") == resolve_tracking_uri(cfg.tracking):
            previous_run = info["mlflow_run_id"]
        log.info("resuming from %s", resume_from)
    run_name = f"{cfg.ray.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, tracking_uri = start_tracking(cfg, data, run_name, run_id=previous_run)
    client = MlflowClient(tracking_uri)
    try:
        init_ray(cfg)
        loop_config = {"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "resume_from": resume_from}
        result = make_trainer(cfg, loop_config, run_name).fit()
        outcome = finalize(cfg, data, run_id, tracking_uri, best_checkpoint(result, cfg.ray.checkpoint_metric))
    except BaseException as exc:
        try:
            client.set_tag(run_id, "failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
        finally:
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return outcome


def report(result: TrainResult) -> None:
    log.info("done: segm mAP %.4f, bbox mAP %.4f, mask IoU %.4f", result.metrics["segm_mAP"], result.metrics["bbox_mAP"],
             result.metrics["mask_iou"])
    log.info("best checkpoint: %s", result.checkpoint)
    log.info("MLflow run: %s (tracking URI %s)", result.run_id, result.tracking_uri)
    if result.model_version:
        log.info("registered model: models:/%s/%s", result.model_name, result.model_version)
    if result.model_uri:
        log.info("model URI: %s", result.model_uri)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    from training.tracking import ModelUploadError

    try:
        cfg = config_from_args(args)
        if args.tune:
            from training.tune import tune

            result = tune(cfg)
        else:
            result = train(cfg, resume=args.resume)
    except (ConfigError, DatasetError, SourceError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except ModelUploadError as exc:
        log.error("%s", exc)
        return 1
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
