"""MLflow tracking: where runs go, the run lifecycle, params, per-epoch metrics, and the model.

Only the driver and rank 0 call this module. Without `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`)
runs go to a local SQLite store, `./mlflow.db`, with artifacts in `./mlartifacts`; open it with
`uv run mlflow ui --backend-store-uri sqlite:///mlflow.db`.

Every run (a training run, a Tune trial, a Tune parent) is closed by one context manager,
`tracked_run`: FINISHED on success, FAILED (KILLED on Ctrl-C) with the tag `failure_reason` otherwise.
The model of a run is its serving package (`training.export`), logged as an MLflow LoggedModel's
artifacts: weights, config, label map, metadata and checksums; nothing pickled.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from maskrcnn.config import Config, TrackingConfig, flatten

if TYPE_CHECKING:
    from training.data.prepare import PreparedData

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
FAILURE_TAG = "failure_reason"
MODEL_TYPE = "maskrcnn-serving-package"


class ModelUploadError(RuntimeError):
    """The model's files could not be uploaded to the artifact store; nothing was registered."""


def resolve_tracking_uri(cfg: TrackingConfig | str = "", project_dir: Path | None = None) -> str:
    """The tracking URI: the config's (or the given string), else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    uri = cfg if isinstance(cfg, str) else cfg.tracking_uri
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(project_dir or Path.cwd()).resolve() / 'mlflow.db'}"


EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
"""What the experiment is, as MLflow 3's UI reads it: without it the UI may open the experiment in its GenAI
view ("Evaluation runs") instead of the runs table and the metric charts."""


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment `name` (created when missing), tagged as model development (`EXPERIMENT_KIND_TAG`);
    an experiment made before the tag existed gets it, one already tagged otherwise keeps its kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return exp.experiment_id


def git_commit() -> str:
    """This code's commit: git's answer, else $MASKRCNN_GIT_COMMIT (set in the image, which has no .git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or os.environ.get("MASKRCNN_GIT_COMMIT", "")
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("MASKRCNN_GIT_COMMIT", "")


def start_run(client: MlflowClient, exp_id: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def open_run(cfg: Config, data: PreparedData, run_name: str, parent_run_id: str | None = None,
             run_id: str | None = None) -> tuple[str, str]:
    """Create (or reopen, on resume) the MLflow run, and log config, params, label map and dataset stats.

    Returns (run id, tracking URI).
    """
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
    if tracking_uri.startswith(("http://", "https://")):
        log.info("MLflow UI: %s", run_url(tracking_uri, exp, run_id))
    return run_id, tracking_uri


def experiment_url(tracking_uri: str, exp_id: str) -> str:
    """The experiment's runs and charts in MLflow's UI, in its model-training view. (MLflow 3.17's UI picks its
    view from `?workflowType=`, else the browser's last choice, GenAI by default; older 3.x UIs read the
    experiment's `mlflow.experimentKind` tag, which `experiment_id` sets.)"""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def run_url(tracking_uri: str, exp_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


@contextmanager
def tracked_run(client: MlflowClient, run_id: str, stopped_status: Callable[[], str] | None = None) -> Iterator[str]:
    """Close `run_id` however the block ends: FINISHED; FAILED with tag `failure_reason` ("Type: message")
    on an exception; KILLED (with the same tag) on KeyboardInterrupt.

    `stopped_status`: when given, a SystemExit (how Ray Tune stops a trial) is not a failure; the run
    ends with the status it returns.
    """
    try:
        yield run_id
    except BaseException as exc:
        if isinstance(exc, SystemExit) and stopped_status is not None:
            client.set_terminated(run_id, stopped_status())
            raise
        try:
            client.set_tag(run_id, FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        finally:
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def log_package(client: MlflowClient, run_id: str, package_dir: str | Path) -> str:
    """Log the serving package as the run's MLflow model (a LoggedModel whose artifacts are the package's
    files, byte for byte); returns its URI, `models:/m-...`.

    Raises ModelUploadError when the upload fails (the model is then marked FAILED, and nothing may be
    registered from it).
    """
    experiment = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment, name="model", source_run_id=run_id, model_type=MODEL_TYPE)
    try:
        _upload_package(client, model.model_id, Path(package_dir))
    except Exception as exc:
        try:
            client.finalize_logged_model(model.model_id, "FAILED")
        except Exception:  # the server may be what failed; the original error is what matters
            log.warning("could not mark model %s FAILED", model.model_id)
        raise ModelUploadError(f"uploading the model of run {run_id} to the artifact store (through "
                               f"{client.tracking_uri}) failed, so no model version was registered: {exc}") from exc
    client.finalize_logged_model(model.model_id, "READY")
    return f"models:/{model.model_id}"


def _upload_package(client: MlflowClient, model_id: str, folder: Path) -> None:
    client.log_model_artifacts(model_id, str(folder))


def download_model(tracking_uri: str, model_uri: str, dst: str | Path) -> Path:
    """Download a logged model's files (`models:/m-...`, `models:/<name>/<version>` or `models:/<name>@<alias>`)
    from the tracking server at `tracking_uri` (also its registry) into `dst`; returns the folder."""
    import mlflow.artifacts

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = model_uri.removeprefix("models:/")
    if ref.startswith("m-"):
        model_id = ref
    else:
        name, sep, alias = ref.partition("@")
        version = (client.get_model_version_by_alias(name, alias) if sep
                   else client.get_model_version(*ref.rsplit("/", 1)))
        model_id = version.model_id or version.source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri))
