"""`uv run -m release retrain`: start the training pipeline when new data has arrived. Made for a
Kubernetes CronJob (`deployment/retrain/`); scheduled retraining without new data is `release ship
--cron` (a KFP recurring run).

1. **hash** the dataset at `--data` (and `--val-data`) exactly as the pipeline's prepare step does
   (`training.data.prepare`: fetched, validated, hashed); a dataset that does not validate starts
   nothing, and the error names the file and the record;
2. **compare** it with the `dataset_hash` of the registry's `champion`: the same, nothing to do;
3. **claim** the hash: a conditional create of `<claims>/<hash>.json` (S3 `If-None-Match: *`, GCS
   generation 0), so that of two triggers racing on the same new data exactly one goes on, and a hash
   is run once, however often the CronJob looks;
4. **run** the newest version of the pipeline once, with `data`/`val_data` set to the prefixes; if the
   run cannot be started, the claim is removed, so that the next look tries again.

The event-driven alternative on GCS (a Pub/Sub notification on the bucket, a push subscription to a
small service running the same function) is described in the README.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".json"


class RetrainError(RuntimeError):
    """The trigger could not finish a step (the message names it); nothing was started, or it was undone."""


@dataclass(frozen=True)
class RetrainPlan:
    data: str  # the training data prefix (s3://, gs://, or a folder), as the pipeline's `data`
    claims: str  # s3:// or gs:// prefix of the claims (one object per dataset hash that started a run)
    kfp_host: str
    tracking_uri: str
    model_name: str
    val_data: str = ""
    config: str = "default"
    pipeline_name: str = "maskrcnn-train-gate-serve"
    experiment: str = "maskrcnn"
    kfp_namespace: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from training.data.sources import is_remote

        if not is_remote(self.claims):
            raise ValueError(f"retrain: claims {self.claims!r}: expected an s3:// or gs:// prefix (a conditional "
                             "create there is what makes two triggers start one run)")
        if not self.kfp_host:
            raise ValueError("retrain: --kfp-host is required")


@dataclass
class RetrainResult:
    dataset_hash: str
    action: str  # "started", "champion has it", "already claimed"
    run_id: str = ""
    claim: str = ""


def dataset_hash(plan: RetrainPlan, cache_dir: Path) -> str:
    """The content hash the prepare step would record for this data (validated on the way)."""
    from training.config import load_config
    from training.data.prepare import prepare_data

    cfg = load_config(plan.config, [])
    cfg = cfg.replace(data={"train": plan.data, "val": plan.val_data, "cache_dir": str(cache_dir)})
    return prepare_data(cfg.data, validate=True).content_hash


def champion_hash(tracking_uri: str, model_name: str) -> str | None:
    from mlflow.tracking import MlflowClient

    from training.registry import CHAMPION, get_alias
    from training.waiting import retry_call

    version = retry_call(get_alias, MlflowClient(tracking_uri), model_name, CHAMPION, what=f"reading {model_name}@{CHAMPION}")
    return (version.tags or {}).get("dataset_hash") if version is not None else None


def newest_version(client, pipeline_name: str) -> tuple[str, str]:
    """(pipeline id, id of its newest version)."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        raise RetrainError(f"run: Kubeflow has no pipeline named {pipeline_name!r} (upload it: release ship)")
    # newest first, so that the first page holds it however many versions there are
    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=10,
                                             sort_by="created_at desc").pipeline_versions or []
    if not versions:
        raise RetrainError(f"run: pipeline {pipeline_name!r} has no version")
    newest = max(versions, key=lambda v: v.created_at)
    return pipeline_id, newest.pipeline_version_id


def retrain(plan: RetrainPlan, token: str = "", client=None) -> RetrainResult:
    """The four steps (see the module's docstring)."""
    from training.data.sources import ObjectExists, create_object, delete_object

    with tempfile.TemporaryDirectory() as cache:
        current = dataset_hash(plan, Path(cache))
    log.info("hash: %s at %s", current[:12], plan.data)
    if champion_hash(plan.tracking_uri, plan.model_name) == current:
        log.info("compare: the champion of %s was trained on %s; nothing to do", plan.model_name, current[:12])
        return RetrainResult(current, "champion has it")
    claim = f"{plan.claims.rstrip('/')}/{current}{CLAIM_SUFFIX}"
    record = {"dataset_hash": current, "data": plan.data, "val_data": plan.val_data,
              "claimed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        create_object(claim, json.dumps(record).encode())
    except ObjectExists:
        log.info("claim: %s exists: a run was already started for this data; nothing to do", claim)
        return RetrainResult(current, "already claimed", claim=claim)
    log.info("claim: %s", claim)
    try:
        if client is None:
            import kfp

            client = kfp.Client(host=plan.kfp_host, namespace=plan.kfp_namespace or "kubeflow", existing_token=token or None)
        pipeline_id, version_id = newest_version(client, plan.pipeline_name)
        experiment = client.create_experiment(plan.experiment, namespace=plan.kfp_namespace or None)
        params = {**plan.params, "data": plan.data, "val_data": plan.val_data, "config": plan.config,
                  "tracking_uri": plan.params.get("tracking_uri", plan.tracking_uri), "model_name": plan.model_name}
        run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=f"retrain on new data {current[:12]}",
                                  params=params, pipeline_id=pipeline_id, version_id=version_id)
    except Exception as exc:  # noqa: BLE001 - whatever stopped the run: release the claim so that the next look retries
        try:
            delete_object(claim)
        except Exception as undo:  # noqa: BLE001
            raise RetrainError(f"run: {exc}; removing the claim {claim} failed too ({undo}): remove it by hand") from exc
        raise RetrainError(f"run: {type(exc).__name__}: {' '.join(str(exc).split())[:1000]} (claim removed; the next "
                           "look retries)") from exc
    log.info("run: started %s (%s) on %s", run.display_name, run.run_id, current[:12])
    return RetrainResult(current, "started", run.run_id, claim)
