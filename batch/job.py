"""One batch run, from what the command line or the pipeline's step was given: here on a local Ray, on a
cluster this process runs in (`auto`), or submitted as a Ray job to a cluster's Jobs API."""

from __future__ import annotations

import hashlib
import logging
import shlex
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from batch.runner import check, default_threads, run
from batch.shards import BatchError, Plan, Settings, list_images
from maskrcnn.storage import is_remote

log = logging.getLogger("batch")


@dataclass(frozen=True)
class Request:
    """A batch run: images at `source`, results to `output`, by a package (`package`) or a registered model
    (`model`: models:/NAME@ALIAS, read from `tracking_uri`)."""

    source: str
    output: str
    package: str = ""
    model: str = ""
    tracking_uri: str = ""
    settings: Settings = Settings()
    concurrency: int = 1
    threads: int = 0
    address: str = ""
    public_keys: tuple[str, ...] = ()  # key files or folders: the package must be signed by one of them

    def argv(self) -> list[str]:
        """The command line that runs this request (`python -m batch ...`), for a Ray job."""
        s = self.settings
        args = [self.source, self.output, *(["--package", self.package] if self.package else ["--model", self.model]),
                "--shard-size", str(s.shard_size), "--score-threshold", str(s.score_threshold),
                "--max-detections", str(s.max_detections), "--concurrency", str(self.concurrency)]
        args += ["--threads", str(self.threads)] if self.threads else []
        args += ["--tracking-uri", self.tracking_uri] if self.tracking_uri else []
        args += [a for key in self.public_keys for a in ("--public-keys", key)]
        return args + (["--overlays"] if s.overlays else []) + (["--masks"] if s.masks else [])


def load_package(request: Request, tmp: str):
    """The package to run: `--package` as given, or the version `--model` names: its published package (the
    signed, stamped copy at its `serving.storage_uri`) when it was published, else MLflow's copy; either is
    refused unless its digest is the one the version records (`serving.package_digest`, or for an
    unpublished version `gate.scored_digest`). With `public_keys`, the package must be signed by one."""
    from maskrcnn.package import open_package
    from maskrcnn.signature import load_public_keys

    keys = [k for source in request.public_keys for k in load_public_keys(source)] or None
    if request.model:
        return _registered(request, tmp, keys)
    if not request.package:
        raise BatchError("give --package or --model")
    return open_package(request.package, public_keys=keys)


def _registered(request: Request, tmp: str, keys):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from maskrcnn.package import open_package
    from training.registry import DIGEST_TAG, SCORED_DIGEST_TAG, STORAGE_URI_TAG
    from training.tracking import download_model

    if not request.model.startswith("models:/") or request.model.startswith("models:/m-"):
        raise BatchError(f"--model {request.model!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if not request.tracking_uri:
        raise BatchError("--model needs --tracking-uri (or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(request.tracking_uri, registry_uri=request.tracking_uri)
    ref = request.model.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    try:
        version = client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(*ref.rsplit("/", 1))
    except (MlflowException, TypeError, ValueError) as exc:
        raise BatchError(f"--model {request.model}: not found in the registry at {request.tracking_uri}: {exc}") from None
    tags = version.tags or {}
    if tags.get(STORAGE_URI_TAG):
        package, expected, what = open_package(tags[STORAGE_URI_TAG], public_keys=keys, cache_dir=tmp), tags.get(DIGEST_TAG), DIGEST_TAG
    else:
        folder = download_model(request.tracking_uri, f"models:/{name}/{version.version}", tmp)
        package, expected, what = open_package(folder, public_keys=keys), tags.get(SCORED_DIGEST_TAG), SCORED_DIGEST_TAG
    if expected and package.digest != expected:
        raise BatchError(f"--model {request.model} (version {version.version}): the package at {package.where} has digest "
                         f"{package.digest}, the version records {what}={expected}; refusing a package other than the "
                         "one recorded")
    log.info("%s is version %s: %s (digest %s%s)", request.model, version.version, package.where, package.digest,
             "" if expected else ", none recorded on the version to compare")
    return package


def run_batch(request: Request) -> dict[str, Any]:
    """Run `request`; returns the totals (images, detections, shards, skipped_shards, seconds). BatchError,
    PackageError and SourceError name a bad input before anything runs; RuntimeError is a failed Ray job."""
    from training.remote import is_jobs_api

    threads = request.threads or default_threads(request.concurrency)
    check(request.concurrency, threads)
    if request.address and is_jobs_api(request.address):
        return submit(request)
    with tempfile.TemporaryDirectory() as tmp:
        package = load_package(request, tmp)
    names, versions = list_images(request.source)
    plan = Plan(request.source, request.output, hashlib.sha256(package.files["SHA256SUMS"]).hexdigest(),
                request.settings, names, versions)
    import batch
    from training.trainer import connect_ray

    connect_ray(request.address, request.concurrency * threads, (batch,))
    return run(plan, dict(package.files), request.concurrency, threads)


def submit(request: Request) -> dict[str, Any]:
    """Run `request` as a Ray job on the cluster at its Jobs API address, relaying the job's log."""
    from training.remote import job_client, wait

    local = [name for name, value in (("SRC", request.source), ("OUT", request.output), ("--package", request.package))
             if value and not is_remote(value)]
    if local:
        raise BatchError(f"{', '.join(local)}: a Ray job on a cluster reads and writes object storage (s3://, gs://), "
                         "not this machine's folders")
    submission_id = f"maskrcnn-batch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = job_client(request.address)
    # The job's driver runs the cluster's image (the platform image, as for training's job); it ships
    # `training` and `batch` to the workers itself (connect_ray), so the job sets no py_modules of its own:
    # Ray refuses a driver's runtime_env that repeats a field of the job's.
    client.submit_job(entrypoint=shlex.join(["python", "-m", "batch", *request.argv(), "--address", "auto"]),
                      submission_id=submission_id)
    log.info("submitted Ray job %s to %s", submission_id, request.address)
    status = wait(client, submission_id)
    if status != "SUCCEEDED":
        raise RuntimeError(f"Ray job {submission_id} on {request.address} ended {status}")
    return {"job": submission_id, "settings": asdict(request.settings)}
