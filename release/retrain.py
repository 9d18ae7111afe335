"""`uv run -m release retrain`: start the training pipeline when new data has arrived. Made for a
Kubernetes CronJob (`deployment/retrain/`); scheduled retraining without new data is `release ship
--cron` (a KFP recurring run).

1. **hash** the dataset at `--data` (and `--val-data`) exactly as the pipeline's prepare step does
   (`training.data.prepare`: fetched, validated, hashed); a dataset that does not validate starts
   nothing, and the error names the file and the record;
2. **compare** it with the `dataset_hash` of the registry's `champion`: the same, nothing to do;
3. **claim** the hash: a conditional create of `<claims>/<hash>.json` (S3 `If-None-Match: *`, GCS
   generation 0), so that of two triggers racing on the same new data exactly one goes on, and a hash
   is run once, however often the CronJob looks. A claim expires: one whose trigger died before it
   started a run, or whose run failed, was cancelled or is gone, is taken over after `grace_s` by a
   conditional overwrite (S3 `If-Match`, GCS generation match) of the claim that was read, so that
   data is never lost to a crash, and still run once;
4. **stage** the files that were hashed (the annotations and images of both splits, byte for byte) to
   the immutable prefix `<staging>/<hash>/` (create-only writes; a copy that reuses files already there,
   from an earlier try, is hashed again): the run trains on exactly the data that was hashed, never on the
   live prefix, which may change meanwhile;
5. **run** the pipeline version `release ship` recorded as the release (`--release-record`), once, with
   `data`/`val_data` set to the staged copy and `data_hash` to the hash (its prepare step refuses data
   that differs); the claim then records the run's id. If the run cannot be started, the claim is
   removed, so that the next look tries again.

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

from maskrcnn.names import PIPELINE_NAME

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".json"


class RetrainError(RuntimeError):
    """The trigger could not finish a step (the message names it); nothing was started, or it was undone."""


FAILED_STATES = ("FAILED", "CANCELED", "CANCELING")
"""KFP v2 run states after which the claimed data was not trained on: the claim may be taken over."""


@dataclass(frozen=True)
class RetrainPlan:
    data: str  # the training data prefix (s3://, gs://, or a folder), as the pipeline's `data`
    claims: str  # s3:// or gs:// prefix of the claims (one object per dataset hash that started a run)
    kfp_host: str
    tracking_uri: str
    model_name: str
    release_record: str = ""  # the record `release ship --record` wrote: the pipeline version to run
    val_data: str = ""
    config: str = "default"
    pipeline_name: str = PIPELINE_NAME
    experiment: str = "maskrcnn"
    kfp_namespace: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    staging: str = ""  # where the hashed data is copied for the run (default: <claims>/datasets)
    grace_s: float = 3600.0  # how long a claim without a live run is honoured before it is taken over

    def __post_init__(self) -> None:
        from maskrcnn.storage import is_remote

        if not is_remote(self.claims):
            raise ValueError(f"retrain: claims {self.claims!r}: expected an s3:// or gs:// prefix (a conditional "
                             "create there is what makes two triggers start one run)")
        if self.staging and not is_remote(self.staging):
            raise ValueError(f"retrain: staging {self.staging!r}: expected an s3:// or gs:// prefix (the pipeline's "
                             "pods read the staged data from there)")
        if not self.kfp_host:
            raise ValueError("retrain: --kfp-host is required")
        if isinstance(self.grace_s, bool) or not isinstance(self.grace_s, (int, float)) or not self.grace_s >= 0:
            raise ValueError(f"retrain: grace_s must be a number >= 0, got {self.grace_s!r}")

    @property
    def staging_prefix(self) -> str:
        return (self.staging or f"{self.claims.rstrip('/')}/datasets").rstrip("/")


@dataclass
class RetrainResult:
    dataset_hash: str
    action: str  # "started", "champion has it", "already claimed"
    run_id: str = ""
    claim: str = ""


def prepared_data(plan: RetrainPlan, cache_dir: Path, train: str = "", val: str | None = None):
    """The data as the pipeline's prepare step would see it (fetched, validated, hashed)."""
    from maskrcnn.config import load_config
    from training.data.prepare import prepare_data

    cfg = load_config(plan.config, [])
    cfg = cfg.replace(data={"train": train or plan.data, "val": plan.val_data if val is None else val,
                            "cache_dir": str(cache_dir)})
    return prepare_data(cfg.data, validate=True)


def dataset_hash(plan: RetrainPlan, cache_dir: Path) -> str:
    """The content hash the prepare step would record for this data (validated on the way)."""
    return prepared_data(plan, cache_dir).content_hash


def champion_hash(tracking_uri: str, model_name: str) -> str | None:
    from mlflow.tracking import MlflowClient

    from training.registry import CHAMPION, get_alias
    from maskrcnn.waiting import retry_call

    version = retry_call(get_alias, MlflowClient(tracking_uri), model_name, CHAMPION, what=f"reading {model_name}@{CHAMPION}")
    return (version.tags or {}).get("dataset_hash") if version is not None else None


def released_version(client, plan: RetrainPlan) -> tuple[str, str]:
    """(pipeline id, version id) of the release `release ship` recorded, checked against Kubeflow."""
    from release.ship import read_release_record

    record = read_release_record(plan.release_record)
    if record["pipeline_name"] != plan.pipeline_name:
        raise RetrainError(f"run: the release record {plan.release_record} is for pipeline {record['pipeline_name']!r}, "
                           f"not {plan.pipeline_name!r}")
    pipeline_id = client.get_pipeline_id(plan.pipeline_name)
    if pipeline_id != record["pipeline_id"]:
        raise RetrainError(f"run: Kubeflow's pipeline {plan.pipeline_name!r} is {pipeline_id}, the release record names "
                           f"{record['pipeline_id']} (ship again)")
    return pipeline_id, record["version_id"]


def stage(prepared, plan: RetrainPlan, digest: str) -> tuple[str, str, bool]:
    """Copy the files that were hashed to `<staging>/<hash>/train` (and `/val` when the validation split has
    a root of its own), create-only: a staged dataset is never changed. Returns the prefixes to give the
    pipeline, and whether any file was already there (from a run that failed, or anyone else's write): then
    the copy must be hashed again (`verify_staged`); files this call created are the bytes it hashed."""
    from training.data.prepare import files_by_root
    from maskrcnn.storage import ObjectExists, create_object, escapes_folder

    prefix = f"{plan.staging_prefix}/{digest}"
    roots = list(files_by_root(prepared).items())
    names = ["train", "val"][:len(roots)]
    copied = kept = 0
    for name, (root, files) in zip(names, roots):
        for rel in sorted(set(files)):
            if escapes_folder(rel):  # an annotation file outside the data's folder: no place in a copy of it
                raise RetrainError(f"stage: {rel} lies outside {root}; give the annotations inside the data prefix")
            try:
                create_object(f"{prefix}/{name}/{rel}", (root / rel).read_bytes())
                copied += 1
            except ObjectExists:
                kept += 1
    log.info("stage: %d file(s) to %s (%d already there)", copied, prefix, kept)
    return f"{prefix}/train", f"{prefix}/val" if len(roots) > 1 else "", kept > 0


def verify_staged(plan: RetrainPlan, train: str, val: str, digest: str, cache_dir: Path) -> None:
    """Hash the staged copy as the pipeline will: RetrainError unless it is the data that was hashed."""
    again = prepared_data(plan, cache_dir, train, val).content_hash
    if again != digest:
        raise RetrainError(f"stage: the staged copy at {train} hashes to {again[:12]}, not {digest[:12]}: a staged dataset "
                           f"is immutable, so this one is not what it should be; remove {plan.staging_prefix}/{digest} "
                           f"by hand and look again")
    log.info("stage: the staged copy hashes to %s, as the data did", digest[:12])


def _claim_is_stale(claim: dict[str, Any], client, grace_s: float) -> str:
    """Why a claim may be taken over (its trigger died before starting a run; its run failed, was cancelled
    or is gone, and `grace_s` has passed since), or "" while it holds."""
    stamp = claim.get("started_at") or claim.get("claimed_at") or ""
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    except (TypeError, ValueError):
        age = float("inf")  # unreadable: as old as can be
    if age < grace_s:
        return ""
    run_id = claim.get("run_id") or ""
    if not run_id:
        return f"claimed {age:.0f} s ago and no run was ever recorded (the trigger died before starting it)"
    try:
        state = str(client.get_run(run_id).state or "")
    except Exception as exc:  # noqa: BLE001 - 404 and the like: the run is gone
        if getattr(exc, "status", None) == 404:
            return f"its run {run_id} is gone"
        raise RetrainError(f"claim: cannot ask Kubeflow about run {run_id}: {exc}") from exc
    return f"its run {run_id} ended {state}" if state.upper() in FAILED_STATES else ""


def retrain(plan: RetrainPlan, token: str = "", client=None) -> RetrainResult:
    """The five steps (see the module's docstring)."""
    from maskrcnn.storage import (ObjectChanged, ObjectExists, create_object, delete_object, read_object,
                                       replace_object)
    from release.lease import holder_identity

    with tempfile.TemporaryDirectory() as cache:
        prepared = prepared_data(plan, Path(cache))
        current = prepared.content_hash
        log.info("hash: %s at %s", current[:12], plan.data)
        if champion_hash(plan.tracking_uri, plan.model_name) == current:
            log.info("compare: the champion of %s was trained on %s; nothing to do", plan.model_name, current[:12])
            return RetrainResult(current, "champion has it")
        if client is None:
            import kfp

            client = kfp.Client(host=plan.kfp_host, namespace=plan.kfp_namespace or "kubeflow", existing_token=token or None)
        claim = f"{plan.claims.rstrip('/')}/{current}{CLAIM_SUFFIX}"
        record = {"dataset_hash": current, "data": plan.data, "val_data": plan.val_data, "holder": holder_identity(),
                  "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": ""}
        try:
            version = create_object(claim, json.dumps(record).encode())
        except ObjectExists:
            body, seen = read_object(claim)
            held = json.loads(body)
            why = _claim_is_stale(held, client, plan.grace_s)
            if not why:
                log.info("claim: %s holds (run %s): this data was already started; nothing to do", claim,
                         held.get("run_id") or "being started")
                return RetrainResult(current, "already claimed", held.get("run_id", ""), claim)
            record["took_over"] = held
            try:
                replace_object(claim, json.dumps(record).encode(), seen)
            except ObjectChanged:
                log.info("claim: %s was taken over by another trigger at the same moment; nothing to do", claim)
                return RetrainResult(current, "already claimed", claim=claim)
            version = read_object(claim)[1]
            log.warning("claim: took over %s: %s", claim, why)
        log.info("claim: %s", claim)
        try:
            train, val, reused = stage(prepared, plan, current)
            if reused:  # the pipeline's prepare step checks data_hash in any case; this fails before a doomed run
                verify_staged(plan, train, val, current, Path(cache) / "staged")
            pipeline_id, version_id = released_version(client, plan)
            experiment = client.create_experiment(plan.experiment, namespace=plan.kfp_namespace or None)
            params = {**plan.params, "data": train, "val_data": val, "data_hash": current, "config": plan.config,
                      "tracking_uri": plan.params.get("tracking_uri", plan.tracking_uri), "model_name": plan.model_name}
            run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=f"retrain on new data {current[:12]}",
                                      params=params, pipeline_id=pipeline_id, version_id=version_id)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the run: release the claim so that the next look retries
            try:
                delete_object(claim)
            except Exception as undo:  # noqa: BLE001
                raise RetrainError(f"run: {exc}; removing the claim {claim} failed too ({undo}): it expires after "
                                   f"{plan.grace_s:.0f} s") from exc
            raise RetrainError(f"run: {type(exc).__name__}: {' '.join(str(exc).split())[:1000]} (claim removed; the next "
                               "look retries)") from exc
        started = {**record, "run_id": run.run_id, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                   "staged": train, "staged_val": val, "pipeline_version_id": version_id}
        try:
            replace_object(claim, json.dumps(started).encode(), version)
        except Exception as exc:  # noqa: BLE001 - the run is started; without its id the claim expires, never re-runs a live one
            log.error("claim: could not record run %s in %s (%s); it is taken over only after %.0f s", run.run_id, claim,
                      exc, plan.grace_s)
    log.info("run: started %s (%s) on %s, from %s", run.display_name, run.run_id, current[:12], train)
    return RetrainResult(current, "started", run.run_id, claim)
