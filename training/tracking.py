"""MLflow tracking: where runs go, params, per-epoch metrics, artifacts, and the registered model.

Only the driver and rank 0 call this module. Without `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`)
runs go to a local SQLite store, `./mlflow.db`, with artifacts in `./mlartifacts`; open it with
`uv run mlflow ui --backend-store-uri sqlite:///mlflow.db`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from training.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100


class ModelUploadError(RuntimeError):
    """The model's files could not be uploaded to the artifact store; nothing was registered."""

MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(cfg: TrackingConfig, project_dir: Path | None = None) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(project_dir or Path.cwd()).resolve() / 'mlflow.db'}"


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def start_run(client: MlflowClient, exp_id: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_and_register_model(tracking_uri: str, run_id: str, model: Any, cfg: TrackingConfig,
                           tags: dict[str, Any], extra_files: list[str] | None = None) -> tuple[str, str | None]:
    """Log the torch model as an MLflow model of `run_id`; when configured, register it with `tags` and
    point `cfg.alias` (default `challenger`) at the new version.

    Registration happens only after the upload has returned, so a failed upload registers nothing.
    Returns (model URI, registered version or None).
    """
    from training.registry import register_model, set_alias

    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = _log_model(run_id, model, extra_files)
    except Exception as exc:
        raise ModelUploadError(f"uploading the model of run {run_id} to the artifact store (through {tracking_uri}) "
                               f"failed, so no model version was registered: {exc}") from exc
    if not cfg.register:
        return info.model_uri, None
    client = MlflowClient(tracking_uri)
    commit = git_commit()
    version = register_model(client, cfg.model_name, info.model_uri, run_id,
                             {**tags, **({"git_commit": commit} if commit else {})})
    if cfg.alias:
        set_alias(client, cfg.model_name, cfg.alias, version, reason=f"trained in run {run_id}")
    return info.model_uri, version


def _log_model(run_id: str, model: Any, extra_files: list[str] | None) -> Any:
    import torch
    import torchvision

    # On exit start_run ends the run (FAILED on an exception); train() then sets its final status.
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        # A pickled torchvision module: Mask R-CNN's data-dependent control flow does not torch.export
        # (MLflow's default 'pt2'). Explicit requirements skip MLflow's slow inference of them.
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", extra_files=extra_files,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"],
        )
    return info
