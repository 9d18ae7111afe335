"""Training on a remote Ray cluster (KubeRay) through the Ray Jobs API.

With `ray.address` set to the head's dashboard URL (`http://HEAD:8265`, KubeRay's
`http://<cluster>-head-svc.<namespace>.svc:8265`), `train()` does not run Ray Train here: it submits a
Ray job whose driver (`python -m training.job`, on the head node) runs the same `train()` against the
cluster, waits for it while relaying its log, and brings back the result (and, when asked, the serving
package, downloaded from MLflow). This is the submission Ray's documentation advises for Ray Train;
Ray Client (`ray://`) is not.

The cluster's nodes share nothing with this process, or with each other: the data, the checkpoints and
the tracking server must be reachable from every node. `check_remote` refuses, before anything starts,
a local data folder, a local checkpoint folder, and a local MLflow store. A dataset prepared here (the
pipeline's prepare step) is staged to `<ray.storage_path>/datasets/<content hash>/` first.

Secrets never travel in the job: the nodes' own environment (S3 keys from a Kubernetes Secret) is used.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from maskrcnn.config import Config, ConfigError
from training.data.prepare import PreparedData, export_prepared
from maskrcnn.storage import is_remote

log = logging.getLogger("training")

JOB_ENV = "MASKRCNN_JOB"
"""The job's description (config, staged dataset, result URI) for `training.job`, as JSON."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def is_jobs_api(address: str) -> bool:
    """A Ray Jobs API address (the head's dashboard), as opposed to a GCS/Ray Client address."""
    return address.startswith(("http://", "https://"))


def check_remote(cfg: Config, staged_data: bool = False) -> None:
    """Refuse, before anything starts, what a cluster's nodes cannot reach: a local data folder, a local
    checkpoint folder, a local MLflow store. `staged_data`: the data will be staged to object storage."""
    where = f"the Ray cluster at {cfg.ray.address}"
    problems = []
    if not is_remote(cfg.ray.storage_path):
        problems.append(f"ray.storage_path={cfg.ray.storage_path or '(empty: ./ray_results)'} is a local folder: "
                        "every node writes checkpoints there, so it must be s3://bucket/prefix or gs://bucket/prefix")
    if not staged_data:
        for field in ("train", "val"):
            value = getattr(cfg.data, field)
            if value and not is_remote(value):
                problems.append(f"data.{field}={value} is a local path: the nodes cannot read it; "
                                "upload it and pass s3://... or gs://...")
    tracking = cfg.tracking.tracking_uri
    if not tracking.startswith(("http://", "https://", "databricks")):
        problems.append(f"tracking.tracking_uri={tracking or '(empty: ./mlflow.db)'} is local to this machine: "
                        "pass the MLflow server's http(s):// URI")
    if problems:
        raise ConfigError(f"cannot train on {where}:\n  - " + "\n  - ".join(problems))


def stage_dataset(data: PreparedData, storage_path: str) -> str:
    """Upload a prepared dataset to `<storage_path>/datasets/<content hash>` (once); returns that URI."""
    from maskrcnn.storage import list_objects, upload_object

    uri = f"{storage_path.rstrip('/')}/datasets/{data.content_hash[:16]}"
    if "dataset.json" in {o.key.rsplit("/", 1)[-1] for o in list_objects(uri, allow_empty=True)}:
        log.info("dataset %s already staged at %s", data.content_hash[:12], uri)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_prepared(data, Path(tmp) / "dataset")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "dataset.json")
        log.info("staging the prepared dataset (%d files) to %s", len(files) + 1, uri)
        for path in files:
            upload_object(f"{uri}/{path.relative_to(folder).as_posix()}", path)
        upload_object(f"{uri}/dataset.json", folder / "dataset.json")  # last: marks the staging complete
    return uri


def job_client(address: str):
    """The Jobs API client; with a token in $RAY_AUTH_TOKEN (KubeRay's Secret), token authentication."""
    import os

    from ray.job_submission import JobSubmissionClient

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return JobSubmissionClient(address)


def submit(cfg: Config, data: PreparedData | None = None, package_dir: str | Path | None = None,
           resume: str | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """Run `train()` as a Ray job on the cluster at `cfg.ray.address`; returns its `TrainResult` as a dict."""
    check_remote(cfg, staged_data=data is not None)
    address = cfg.ray.address
    cfg = cfg.replace(ray={"address": "auto"})  # the job's driver joins the cluster it runs on
    staged = ""
    if data is not None:
        staged = stage_dataset(data, cfg.ray.storage_path)
        cfg = cfg.replace(data={"train": f"{staged}/train", "val": f"{staged}/val"})
    submission_id = f"maskrcnn-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    result_uri = f"{cfg.ray.storage_path.rstrip('/')}/jobs/{submission_id}/result.json"
    spec = {"config": cfg.to_dict(), "staged": staged, "result": result_uri, "resume": resume}
    client = job_client(address)
    client.submit_job(entrypoint="python -m training.job", submission_id=submission_id,
                      runtime_env={"env_vars": {JOB_ENV: json.dumps(spec)}})
    log.info("submitted Ray job %s to %s", submission_id, address)
    status = wait(client, submission_id, poll_s)
    if status != "SUCCEEDED":
        tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-40:])
        raise RuntimeError(f"Ray job {submission_id} on {address} ended {status}; its log ends:\n{tail}")
    result = _read_result(result_uri)
    if package_dir:  # the package the job logged as the run's model, byte for byte, checksums verified
        from maskrcnn.package import open_package
        from training.tracking import download_model

        with tempfile.TemporaryDirectory() as tmp:
            open_package(download_model(result["tracking_uri"], result["model_uri"], tmp)).save(package_dir)
        result["package"] = str(package_dir)
    return result


def wait(client: Any, submission_id: str, poll_s: float = 2.0) -> str:
    """Wait for a job's end, relaying its new log lines; Ctrl-C stops the job."""
    from maskrcnn.waiting import connection_error, poll_until

    shown = 0

    def ended() -> str | None:
        nonlocal shown
        status = str(client.get_job_status(submission_id).value)
        logs = client.get_job_logs(submission_id)
        for line in logs[shown:].splitlines():
            log.info("[%s] %s", submission_id, line)
        shown = len(logs)
        return status if status in TERMINAL else None

    try:  # a dashboard that drops a request (a head restarting) is polled through, not a failed run
        return poll_until(ended, timeout=float("inf"), interval=poll_s, what=f"Ray job {submission_id}",
                          transient=connection_error)
    except KeyboardInterrupt:
        log.warning("stopping Ray job %s", submission_id)
        client.stop_job(submission_id)
        raise


def _read_result(uri: str) -> dict[str, Any]:
    from maskrcnn.storage import fetch_file

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(fetch_file(uri, Path(tmp)).read_text())
