"""The training library: Ray set-up, the `TorchTrainer`, the tracked run, and evaluate-log-register.

`train(cfg)` is what the CLI (`training.ray_main`), Ray Tune (`training.tune`) and the pipeline's
train step call: validate the data, open (or reopen) the MLflow run, train with Ray Train, then
`finalize` the best checkpoint into the serving package, score that package on the validation split,
and log it as the run's model (registered when `tracking.register`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from training.checkpoint import read_checkpoint_info
from maskrcnn.config import Config, ConfigError, WorkerConfig
from training.data.prepare import PreparedData, prepare_data
from training.tracking import git_commit, open_run, resolve_tracking_uri, tracked_run

log = logging.getLogger("training")


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
    package: str = ""
    """The serving package's folder when `train(package_dir=...)` asked to keep it (else it lives in MLflow only)."""


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
    connect_ray(cfg.ray.address, cfg.ray.num_workers * cfg.ray.cpus_per_worker)


def connect_ray(address: str, num_cpus: int = 0, modules: tuple[Any, ...] = ()) -> None:
    """Join the Ray cluster at `address` (`auto`, `ray://...`), shipping `training` and `modules` (packages)
    to it, or start a local Ray on at least `num_cpus` CPUs when `address` is empty. Training and batch
    inference (`batch`) both start Ray here."""
    import ray

    if ray.is_initialized():
        return
    if not address and "RAY_ENABLE_UV_RUN_RUNTIME_ENV" not in os.environ:
        # Under `uv run`, Ray's uv hook packs the working folder and builds a second virtualenv for the
        # workers (~35 s of a 1-minute start here). A local Ray's workers run this very interpreter, so the
        # copy buys nothing. Ray reads the switch into this constant at import and consults it in ray.init;
        # RAY_ENABLE_UV_RUN_RUNTIME_ENV=1 keeps the hook (tests/training/test_ray_local.py checks both).
        from ray._private import ray_constants

        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if address:
        import maskrcnn
        import training

        from training.remote import is_jobs_api

        if is_jobs_api(address):
            raise ConfigError(f"ray.address={address} is a Jobs API address: submit a Ray job to it "
                              "(train() and `python -m batch` do), or run this as a Ray job on that cluster")

        # Ship the code to a remote cluster that does not have it installed (e.g. a bare KubeRay image): the
        # bottom package and training/ (and, for batch, batch/).
        packages = [maskrcnn, training, *modules]
        ray.init(address=address, runtime_env={"py_modules": [str(Path(m.__file__).parent) for m in packages]})
    else:
        # Token authentication stays on (Ray's default since 2.59; it generates ~/.ray/auth_token): Ray 2.60
        # has no setting to bind GCS and the raylet to 127.0.0.1, so the token is what keeps other hosts out.
        # RAY_AUTH_MODE=disabled opts out. The dashboard (the State API Ray Train cleans up with) is loopback only.
        ray.init(num_cpus=max(os.cpu_count() or 1, num_cpus),
                 include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=True, logging_level=logging.WARNING)


def use_gpu(cfg: Config) -> bool:
    if cfg.ray.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.ray.use_gpu == "true"


def make_trainer(cfg: Config, worker: WorkerConfig, run_name: str, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.train_loop import train_loop_per_worker

    gpu = use_gpu(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker},  # Ray wants a dict
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


def finalize(cfg: Config, data: PreparedData, run_id: str, tracking_uri: str, checkpoint: Any,
             package_dir: str | Path | None = None) -> TrainResult:
    """Export the best checkpoint's serving package, score it on the validation split, log the checkpoint,
    sample images and the package (as the run's model), and register it when configured."""
    from training.bootstrap import metric_intervals
    from training.evaluate import evaluate_package, metric_summary, split_reference, write_report, write_samples
    from training.model_card import card_inputs, render_card
    from training.export import export_checkpoint
    from training.registry import register_package, set_alias
    from training.tracking import log_metrics, log_package

    client = MlflowClient(tracking_uri)
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        epoch = read_checkpoint_info(folder).get("epoch", 0)
        package = export_checkpoint(folder, None, {"dataset_hash": data.content_hash, "git_commit": git_commit(),
                                                  "mlflow_run_id": run_id, "tracking_uri": tracking_uri})
        log.info("evaluating the best checkpoint's package (epoch %d) on %d validation images", epoch,
                 len(data.val.coco["images"]))
        metrics, predictions = evaluate_package(package, data.val, cfg.eval)
        reference = split_reference(data.val, predictions, package.label_map.names)
        intervals = metric_intervals(data.val.coco, predictions, package.label_map,
                                     resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed)
        page = Path(tmp) / "report.html"
        report = write_report(page, data.val, predictions, cfg.eval,
                              f"{cfg.tracking.model_name}: run {run_id}, epoch {epoch}, validation split")
        package = package.stamped({"metrics": metrics}).with_reference(reference)
        package = package.with_card(render_card(card_inputs(package, data.val, data.stats, metrics, intervals,
                                                            cfg.eval.bootstrap_resamples, report)))
        package_path = package.save(package_dir or Path(tmp) / "package")  # written once, as logged and registered
        log.info("final: %s (segm mAP 95%% interval [%.4f, %.4f])", metric_summary(metrics), *intervals["segm_mAP"])
        bounds = {f"final_{k}_{side}": v for k, pair in intervals.items() for side, v in zip(("low", "high"), pair)}
        log_metrics(client, run_id, {**{f"final_{k}": v for k, v in metrics.items()}, **bounds}, step=epoch)
        client.log_artifacts(run_id, folder, "checkpoint")
        for path in write_samples(data.val, predictions, Path(tmp) / "samples", cfg.eval.num_sample_images,
                                  cfg.eval.score_threshold):
            client.log_artifact(run_id, str(path), "samples")
        client.log_artifact(run_id, str(page), "evaluation")
        model_uri, version = "", None
        if cfg.tracking.log_model:
            model_uri = log_package(client, run_id, package_path)
            if cfg.tracking.register:
                version = register_package(client, cfg.tracking.model_name, model_uri, package)
                if cfg.tracking.alias:
                    set_alias(client, cfg.tracking.model_name, cfg.tracking.alias, version, reason=f"trained in run {run_id}")
    return TrainResult(run_id, tracking_uri, checkpoint.path, metrics, model_uri, version, cfg.tracking.model_name,
                       str(package_dir or ""))


def _resume_point(cfg: Config, resume: str) -> tuple[str, str | None]:
    """(checkpoint to resume from, MLflow run to continue or None) for `--resume [CHECKPOINT]`."""
    from ray.train import Checkpoint

    resume_from = find_latest_checkpoint(storage_path(cfg), cfg.ray.name) if resume == "latest" else resume
    with Checkpoint(resume_from).as_directory() as folder:  # a local folder or an s3:// URI
        info = read_checkpoint_info(folder)  # run_info is saved beside the metrics
    log.info("resuming from %s", resume_from)
    if info.get("mlflow_run_id") and info.get("tracking_uri") == resolve_tracking_uri(cfg.tracking):
        return resume_from, info["mlflow_run_id"]
    return resume_from, None


def train(cfg: Config, resume: str | None = None, data: PreparedData | None = None,
          package_dir: str | Path | None = None) -> TrainResult:
    """Validate data, train with Ray Train, evaluate the best checkpoint's package, and record it all in MLflow.

    `data`: an already prepared dataset (its content hash is the run's `dataset_hash`); `package_dir`:
    also keep the serving package there.
    """
    from training.remote import is_jobs_api, submit

    if is_jobs_api(cfg.ray.address):  # a remote cluster's Jobs API: this same function runs there, as a Ray job
        return TrainResult(**submit(cfg, data=data, package_dir=package_dir, resume=resume))
    data = data or prepare_data(cfg.data, validate=True)
    resume_from, previous_run = _resume_point(cfg, resume) if resume else (None, None)
    run_name = f"{cfg.ray.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, tracking_uri = open_run(cfg, data, run_name, run_id=previous_run)
    with tracked_run(MlflowClient(tracking_uri), run_id):
        init_ray(cfg)
        worker = WorkerConfig(cfg, mlflow_run_id=run_id, tracking_uri=tracking_uri, resume_from=resume_from or "")
        result = make_trainer(cfg, worker, run_name).fit()
        return finalize(cfg, data, run_id, tracking_uri, best_checkpoint(result, cfg.ray.checkpoint_metric), package_dir)
