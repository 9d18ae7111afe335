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
from training.data.sources import is_remote

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

    def argv(self) -> list[str]:
        """The command line that runs this request (`python -m batch ...`), for a Ray job."""
        s = self.settings
        args = [self.source, self.output, *(["--package", self.package] if self.package else ["--model", self.model]),
                "--shard-size", str(s.shard_size), "--score-threshold", str(s.score_threshold),
                "--max-detections", str(s.max_detections), "--concurrency", str(self.concurrency)]
        args += ["--threads", str(self.threads)] if self.threads else []
        args += ["--tracking-uri", self.tracking_uri] if self.tracking_uri else []
        return args + (["--overlays"] if s.overlays else []) + (["--masks"] if s.masks else [])


def load_package(request: Request, tmp: str):
    from training.package import open_package
    from training.tracking import download_model

    if request.model:
        if not request.model.startswith("models:/"):
            raise BatchError(f"--model {request.model!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        if not request.tracking_uri:
            raise BatchError("--model needs --tracking-uri (or $MLFLOW_TRACKING_URI)")
        return open_package(download_model(request.tracking_uri, request.model, tmp))
    if not request.package:
        raise BatchError("give --package or --model")
    return open_package(request.package)


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
    plan = Plan(request.source, request.output, hashlib.sha256(package.files["SHA256SUMS"]).hexdigest(),
                request.settings, list_images(request.source))
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
