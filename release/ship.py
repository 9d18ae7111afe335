"""`uv run -m release ship`: from a commit to a pipeline version in Kubeflow, in one command for CI.

1. **build** the image from the Dockerfile with podman, buildah or docker (the first found, or
   `--builder`), tagged `<repository>:<tag>` (the tag defaults to the commit);
2. **push** it, and take the digest the registry stored (podman and buildah write it to a file;
   docker prints it): what runs is then exactly what was built, whatever happens to the tag later
   (`--prebuilt sha256:...`: an image already built and pushed, e.g. by Cloud Build's own steps: steps 1
   and 2 are skipped);
3. **compile** the pipeline with `<repository>@sha256:<digest>` as every step's image;
4. **upload** it to Kubeflow (`kfp.Client`): the pipeline is created on its first upload, then a version
   named after the commit is added. The same commit again keeps the existing version only if every step
   of it runs the image just pushed; a version of that name on other images is refused (a rebuilt image,
   or someone else's upload under our name);
5. optionally **record** the release (`--record s3://|gs://...json`: the pipeline, the version and the
   image digest), which `release retrain` runs, rather than whatever version is newest;
6. optionally **run** that version once, and/or make it the **recurring** run (cron), replacing the
   recurring run of the same name so that the schedule always runs the newest version.

Each step logs what it did; a failure raises ShipError naming the step. The registry's credentials are
the builder's own (`podman login`, `docker login`, a credential helper, CI's Workload Identity
Federation); Kubeflow's token, when it needs one, comes from a file ($MASKRCNN_KFP_TOKEN_FILE), never
from the command line.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.names import PIPELINE_NAME

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = ("podman", "buildah", "docker")
KFP_TOKEN_ENV = "MASKRCNN_KFP_TOKEN_FILE"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REPOSITORY = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
CRON = re.compile(r"^(\S+\s+){5}\S+$")  # KFP's cron: 6 fields, seconds first (robfig/cron)


class ShipError(RuntimeError):
    """One step of `ship` failed; `step` names it."""

    def __init__(self, step: str, message: str):
        super().__init__(f"ship: {step} failed: {message}")
        self.step = step


@dataclass(frozen=True)
class ShipPlan:
    """What to ship and where. Validated in `__post_init__` (the error names the field)."""

    repository: str  # e.g. us-central1-docker.pkg.dev/PROJECT/maskrcnn/platform (no tag)
    commit: str  # the git commit: the default tag, and the pipeline version's name
    tag: str = ""  # default: the commit's first 12 characters
    context: Path = ROOT
    containerfile: Path = ROOT / "Dockerfile"
    build_args: dict[str, str] = field(default_factory=dict)
    builder: str = ""  # podman | buildah | docker; empty: the first found
    tls_verify: bool = True  # False only for a registry on 127.0.0.1 without TLS (tests)
    kfp_host: str = ""  # empty: compile only, upload nothing
    kfp_namespace: str = ""  # multi-user Kubeflow: the profile namespace
    pipeline_name: str = PIPELINE_NAME
    experiment: str = "maskrcnn"
    run: bool = False  # start one run of the new version
    cron: str = ""  # make it the recurring run on this schedule (6 fields, seconds first)
    params: dict[str, Any] = field(default_factory=dict)  # the runs' pipeline parameters
    output: Path = Path("maskrcnn_pipeline.yaml")
    prebuilt: str = ""  # sha256:... of an image already pushed to `repository` (Cloud Build pushes it): no build, no push
    record: str = ""  # s3:// or gs:// object where the release (pipeline, version, image) is recorded for retrain

    def __post_init__(self) -> None:
        if not REPOSITORY.match(self.repository):
            raise ValueError(f"ship: repository {self.repository!r}: expected host[:port]/path in lower case, without tag")
        if not re.fullmatch(r"[0-9a-f]{7,40}", self.commit):
            raise ValueError(f"ship: commit {self.commit!r}: expected a git commit id (7-40 hex digits)")
        if self.tag and not TAG.match(self.tag):
            raise ValueError(f"ship: tag {self.tag!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        if self.builder and self.builder not in BUILDERS:
            raise ValueError(f"ship: builder {self.builder!r}: expected one of {BUILDERS}")
        if self.cron and not CRON.match(self.cron.strip()):
            raise ValueError(f"ship: cron {self.cron!r}: expected 6 fields, seconds first (e.g. '0 0 3 * * 1')")
        if (self.run or self.cron) and not self.kfp_host:
            raise ValueError("ship: --run and --cron need --kfp-host")
        if self.prebuilt and not DIGEST.fullmatch(self.prebuilt):
            raise ValueError(f"ship: prebuilt {self.prebuilt!r}: expected the pushed image's digest, sha256:<64 hex>")
        if self.record:
            from maskrcnn.storage import is_remote

            if not is_remote(self.record) or not self.record.endswith(".json"):
                raise ValueError(f"ship: record {self.record!r}: expected an s3:// or gs:// object ending in .json")
            if not self.kfp_host:
                raise ValueError("ship: --record needs --kfp-host (it records the uploaded version)")
        if not self.prebuilt and not Path(self.containerfile).is_file():
            raise ValueError(f"ship: containerfile {self.containerfile} does not exist")

    @property
    def image(self) -> str:
        return f"{self.repository}:{self.tag or self.commit[:12]}"


@dataclass
class Shipped:
    image: str  # repository:tag as built and pushed
    digest: str  # sha256:...
    pipeline_yaml: Path
    pipeline_id: str = ""
    version_id: str = ""
    run_id: str = ""
    recurring_run_id: str = ""

    @property
    def pinned(self) -> str:
        return f"{self.image.rsplit(':', 1)[0]}@{self.digest}"


def find_builder(preferred: str = "") -> str:
    for name in ([preferred] if preferred else BUILDERS):
        if shutil.which(name):
            return name
    raise ShipError("build", f"no image builder: install one of {', '.join(BUILDERS)}" if not preferred
                    else f"{preferred} is not installed")


def _run(step: str, command: list[str], timeout: float) -> str:
    log.info("%s: %s", step, " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ShipError(step, f"{command[0]} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise ShipError(step, f"{' '.join(command[:2])} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def build(plan: ShipPlan, builder: str, timeout: float = 3600) -> None:
    args = [a for key, value in plan.build_args.items() for a in ("--build-arg", f"{key}={value}")]
    verb = ["build"] if builder != "buildah" else ["build", "--layers"]
    _run("build", [builder, *verb, "-f", str(plan.containerfile), "-t", plan.image,
                   "--build-arg", f"GIT_COMMIT={plan.commit}", *args, str(plan.context)], timeout)


def push(plan: ShipPlan, builder: str, timeout: float = 3600) -> str:
    """Push the image; the digest of the manifest the registry stored."""
    tls = [] if plan.tls_verify or builder == "docker" else ["--tls-verify=false"]
    if builder == "docker":
        out = _run("push", ["docker", "push", plan.image], timeout)
        digests = DIGEST.findall(out.split("digest:")[-1]) if "digest:" in out else []
    else:
        with tempfile.TemporaryDirectory() as tmp:
            digest_file = Path(tmp) / "digest"
            _run("push", [builder, "push", *tls, "--digestfile", str(digest_file), plan.image], timeout)
            digests = DIGEST.findall(digest_file.read_text()) if digest_file.exists() else []
    if len(digests) != 1:
        raise ShipError("push", f"{builder} did not report the pushed image's digest")
    log.info("push: %s is %s", plan.image, digests[0])
    return digests[0]


def kfp_client(plan: ShipPlan, token: str = ""):
    import kfp

    return kfp.Client(host=plan.kfp_host, namespace=plan.kfp_namespace or "kubeflow", existing_token=token or None)


def upload(client, plan: ShipPlan, yaml_path: Path) -> tuple[str, str]:
    """The pipeline's id and the id of its version named after the commit (created unless it exists)."""
    pipeline_id = client.get_pipeline_id(plan.pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(yaml_path), pipeline_name=plan.pipeline_name,
                                          description="Mask R-CNN: prepare, train, evaluate, gate, promote",
                                          namespace=plan.kfp_namespace or None)
        pipeline_id = pipeline.pipeline_id
        log.info("upload: created pipeline %s (%s)", plan.pipeline_name, pipeline_id)
    name = plan.commit
    existing = _versions_named(client, pipeline_id, name)
    if existing:
        wanted = images_of(yaml.safe_load_all(yaml_path.read_text()))
        there = images_of(_spec_documents(client.get_pipeline_version(pipeline_id, existing[0]).pipeline_spec))
        if there != wanted:
            raise ShipError("upload", f"{plan.pipeline_name} already has a version named {name} ({existing[0]}) whose "
                                      f"steps run {sorted(there) or 'no image'}, not {sorted(wanted)}: a version is never "
                                      f"reused for other images; delete it in Kubeflow, or ship another commit")
        log.info("upload: %s already has version %s (%s) on the same image; not uploading it again", plan.pipeline_name,
                 name, existing[0])
        return pipeline_id, existing[0]
    version = client.upload_pipeline_version(str(yaml_path), pipeline_version_name=name, pipeline_id=pipeline_id,
                                             description=f"commit {plan.commit}, image {plan.image}")
    log.info("upload: %s version %s (%s)", plan.pipeline_name, name, version.pipeline_version_id)
    return pipeline_id, version.pipeline_version_id


def images_of(documents) -> set[str]:
    """Every container image the pipeline's steps run (the pipeline spec's executors)."""
    spec = next((d for d in documents if isinstance(d, dict) and "deploymentSpec" in d), {})
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    return {e["container"]["image"] for e in executors.values() if "container" in e}


def _spec_documents(pipeline_spec) -> list:
    """The documents of a version as the API returns it: the spec, or `pipeline_spec`/`platform_spec` both."""
    spec = pipeline_spec if isinstance(pipeline_spec, dict) else {}
    return [spec.get("pipeline_spec", spec)]


def write_release_record(plan: ShipPlan, shipped: Shipped) -> None:
    """The release `retrain` runs: overwritten by each ship (the newest release wins, by intent)."""
    import os
    from datetime import UTC, datetime

    from maskrcnn.storage import upload_object

    record = {"pipeline_name": plan.pipeline_name, "pipeline_id": shipped.pipeline_id, "version_id": shipped.version_id,
              "version_name": plan.commit, "image": shipped.pinned,
              "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "release.json")
        Path(path).write_text(json.dumps(record, indent=2))
        upload_object(plan.record, Path(path))
    log.info("record: %s names version %s (%s) of %s", plan.record, plan.commit, shipped.version_id, plan.pipeline_name)


def read_release_record(uri: str) -> dict[str, str]:
    """The record `write_release_record` wrote; ValueError naming the field that is missing or wrong."""
    from maskrcnn.storage import read_object

    if not uri:
        raise ValueError("retrain: --release-record is required: the record `release ship --record` writes names the "
                         "pipeline version to run (never the newest by age)")
    try:
        record = json.loads(read_object(uri, limit=64 << 10)[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not JSON ({exc})") from None
    for key in ("pipeline_name", "pipeline_id", "version_id", "image"):
        if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"{uri}: field {key!r} missing or not a string (written by `release ship --record`?)")
    return record


def _versions_named(client, pipeline_id: str, name: str) -> list[str]:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipeline_versions(pipeline_id=pipeline_id, filter=flt).pipeline_versions or []
    return [v.pipeline_version_id for v in found if v.display_name == name]


def start_runs(client, plan: ShipPlan, shipped: Shipped) -> None:
    experiment = client.create_experiment(plan.experiment, namespace=plan.kfp_namespace or None)
    if plan.run:
        run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=f"{plan.pipeline_name} {plan.commit[:12]}",
                                  params=plan.params, pipeline_id=shipped.pipeline_id, version_id=shipped.version_id)
        shipped.run_id = run.run_id
        log.info("run: started %s (%s)", run.display_name, run.run_id)
    if plan.cron:
        name = f"{plan.pipeline_name} (scheduled)"
        for old in client.list_recurring_runs(experiment_id=experiment.experiment_id, page_size=100).recurring_runs or []:
            if old.display_name == name:
                client.delete_recurring_run(old.recurring_run_id)
                log.info("recurring: removed %s (%s), which ran an older version", name, old.recurring_run_id)
        job = client.create_recurring_run(experiment_id=experiment.experiment_id, job_name=name, cron_expression=plan.cron,
                                          params=plan.params, pipeline_id=shipped.pipeline_id,
                                          version_id=shipped.version_id, max_concurrency=1, no_catchup=True)
        shipped.recurring_run_id = job.recurring_run_id
        log.info("recurring: %s on '%s' runs version %s (%s)", name, plan.cron, plan.commit, job.recurring_run_id)


def ship(plan: ShipPlan, token: str = "", build_timeout: float = 3600) -> Shipped:
    """The five steps (see the module's docstring); ShipError names the one that failed."""
    if plan.prebuilt:
        log.info("build, push: skipped; %s is already pushed as %s", plan.image, plan.prebuilt)
        digest = plan.prebuilt
    else:
        builder = find_builder(plan.builder)
        build(plan, builder, build_timeout)
        digest = push(plan, builder, build_timeout)
    shipped = Shipped(plan.image, digest, Path(plan.output))
    # the pipeline's own command, in a process of its own: release does not import pipelines (the layout)
    _run("compile", [sys.executable, "-m", "pipelines.compile", "--image", shipped.pinned, "--output",
                     str(shipped.pipeline_yaml), "--batch-output", str(shipped.pipeline_yaml.with_name("batch_pipeline.yaml"))],
         timeout=600)
    log.info("compile: %s, every step on %s", shipped.pipeline_yaml, shipped.pinned)
    if not plan.kfp_host:
        return shipped
    client = _step("upload", lambda: kfp_client(plan, token))
    shipped.pipeline_id, shipped.version_id = _step("upload", lambda: upload(client, plan, shipped.pipeline_yaml))
    if plan.record:
        _step("record", lambda: write_release_record(plan, shipped))
    if plan.run or plan.cron:
        _step("run", lambda: start_runs(client, plan, shipped))
    return shipped


def _step(step: str, action):
    try:
        return action()
    except ShipError:
        raise
    except Exception as exc:  # noqa: BLE001 - kfp's ApiException, connection errors: the step is named, the cause kept
        raise ShipError(step, f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}") from exc
