"""`release ship`, for real where it can be: the image built with podman and pushed to a real OCI
registry on 127.0.0.1 (Debian's `docker-registry`, the distribution registry), its digest checked
against the registry's own and pulled back by it; the pipeline compiled on that digest; and uploaded,
run and scheduled through the real `kfp.Client` against a stand-in of the KFP API server
(`kfp_stand_in`: the API server cannot run here). The image is a small one from the same Debian base
as the project's (the project's own is several GB; building it is the container tests' job)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from kfp_stand_in import KfpStandIn

from devstack.procs import free_port, http_ok, spawn, stop_pid, wait_for
from release.ship import ShipError, ShipPlan, ship

pytestmark = pytest.mark.slow

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
CONTAINERFILE = """ARG BASE
FROM ${BASE}
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision=${GIT_COMMIT}
RUN echo shipped > /shipped.txt
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The distribution registry on 127.0.0.1, storing on disk under a temporary folder."""
    if not shutil.which("docker-registry"):
        pytest.fail("docker-registry is not installed (Debian: apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": False}},
        "http": {"addr": f"127.0.0.1:{port}"}, "log": {"level": "warn"}}))
    proc = spawn(["docker-registry", "serve", str(root / "config.yml")], root / "registry.log")
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/v2/"), "docker-registry", 30, root / "registry.log", proc.pid)
        yield f"127.0.0.1:{port}"
    finally:
        stop_pid(proc.pid, "docker-registry", timeout=10)


@pytest.fixture(scope="module")
def build_context(tmp_path_factory):
    """A small image's context, and podman set up as the project sets it up (runc; the Debian base)."""
    from devstack.podman import Podman

    conf = tmp_path_factory.mktemp("podman")
    base = Podman(conf).base()
    context = tmp_path_factory.mktemp("context")
    (context / "Containerfile").write_text(CONTAINERFILE)
    return context, base, conf / "containers.conf"


@pytest.fixture
def plan(registry, build_context, tmp_path, monkeypatch):
    context, base, conf = build_context
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))

    def make(commit: str = COMMIT_A, **kwargs) -> ShipPlan:
        return ShipPlan(repository=f"{registry}/maskrcnn/platform", commit=commit, context=context,
                        containerfile=context / "Containerfile", build_args={"BASE": base}, builder="podman",
                        tls_verify=False, output=tmp_path / f"pipeline-{commit[:4]}.yaml", **kwargs)
    return make


def registry_digest(registry: str, repository: str, tag: str) -> str:
    """The digest the registry reports for a tag (its Docker-Content-Digest header)."""
    accept = ", ".join(["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"])
    request = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}", method="HEAD",
                                     headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.headers["Docker-Content-Digest"]


def images_in(pipeline_yaml: Path) -> set[str]:
    spec = next(yaml.safe_load_all(pipeline_yaml.read_text()))
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


def test_ship_builds_pushes_compiles_on_the_digest_and_uploads_a_version_per_commit(plan, registry, monkeypatch):
    with KfpStandIn() as kfp:
        first = ship(plan(kfp_host=kfp.url))
        assert first.image == f"{registry}/maskrcnn/platform:{COMMIT_A[:12]}"
        assert first.digest == registry_digest(registry, "maskrcnn/platform", COMMIT_A[:12])
        assert images_in(first.pipeline_yaml) == {f"{registry}/maskrcnn/platform@{first.digest}"}
        # pulled back by digest: the same image, with the commit it was built from
        ref = f"{registry}/maskrcnn/platform@{first.digest}"
        podman = ["podman", "--log-level=error"]
        subprocess.run([*podman, "rmi", "--force", ref], capture_output=True)
        subprocess.run([*podman, "pull", "--quiet", "--tls-verify=false", ref], check=True, capture_output=True, timeout=300)
        labels = json.loads(subprocess.run([*podman, "image", "inspect", "--format", "{{json .Labels}}", ref], check=True,
                                           capture_output=True, text=True).stdout)
        assert labels["org.opencontainers.image.revision"] == COMMIT_A

        (pipeline,) = kfp.pipelines.values()
        assert pipeline["display_name"] == "maskrcnn-train-gate-serve" and first.pipeline_id == pipeline["pipeline_id"]
        versions = {v["display_name"]: v for v in kfp.versions.values()}
        assert set(versions) == {"maskrcnn-train-gate-serve", COMMIT_A}  # the upload's own first version, and the commit's
        assert versions[COMMIT_A]["pipeline_version_id"] == first.version_id
        uploaded = versions[COMMIT_A]["pipeline_spec"]["pipeline_spec"]  # with kfp-kubernetes' platform spec beside it
        spec_images = {e["container"]["image"] for e in uploaded["deploymentSpec"]["executors"].values()}
        assert spec_images == {ref}

        again = ship(plan(kfp_host=kfp.url))  # the same commit: the version is kept, not uploaded again
        assert again.version_id == first.version_id and len(kfp.versions) == 2
        assert ("POST", "/pipelines/upload_version") in kfp.calls and kfp.calls.count(("POST", "/pipelines/upload_version")) == 1

        second = ship(plan(COMMIT_B, kfp_host=kfp.url, run=True, cron="0 0 3 * * 1",
                           params={"tracking_uri": "http://mlflow.mlflow:5000", "storage_prefix": "gs://models"}))
        assert second.pipeline_id == first.pipeline_id and second.version_id != first.version_id and len(kfp.versions) == 3
        (run,) = kfp.runs
        assert run["pipeline_version_reference"] == {"pipeline_id": first.pipeline_id, "pipeline_version_id": second.version_id}
        assert run["runtime_config"]["parameters"]["storage_prefix"] == "gs://models" and second.run_id == run["run_id"]
        (job,) = kfp.recurring.values()
        assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1" and int(job["max_concurrency"]) == 1
        assert job["pipeline_version_reference"]["pipeline_version_id"] == second.version_id and job["no_catchup"] is True

        # a version of that name whose steps run another image (a rebuild, someone else's upload): never reused
        with pytest.raises(ShipError, match=f"upload failed: .*already has a version named {COMMIT_A} .* whose steps run"):
            ship(plan(COMMIT_A, kfp_host=kfp.url, prebuilt="sha256:" + "e" * 64))
        assert len(kfp.versions) == 3

        third = ship(plan(COMMIT_A, kfp_host=kfp.url, cron="0 0 4 * * *"))  # the schedule moves to this version
        (job,) = kfp.recurring.values()
        assert job["recurring_run_id"] == third.recurring_run_id and job["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
        assert job["pipeline_version_reference"]["pipeline_version_id"] == first.version_id


def test_a_failure_names_its_step_and_bad_input_is_refused(plan, build_context, registry, tmp_path, monkeypatch, caplog):
    from release.__main__ import main

    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ShipError, match="ship: push failed: podman push exited"):
        ship(ShipPlan(**{**vars(plan()), "repository": f"{dead}/maskrcnn/platform"}))
    with pytest.raises(ShipError, match="ship: upload failed"):
        ship(plan(kfp_host=f"http://{dead}"))
    with pytest.raises(ValueError, match="repository 'Upper/Case'"):
        plan().__class__(**{**vars(plan()), "repository": "Upper/Case"})
    with pytest.raises(ValueError, match="cron '0 3 \\* \\* \\*': expected 6 fields"):
        plan(kfp_host="http://x", cron="0 3 * * *")
    with pytest.raises(ValueError, match="--run and --cron need --kfp-host"):
        plan(run=True)
    context, base, _ = build_context
    caplog.set_level(logging.INFO)
    code = main(["ship", "--repository", f"{registry}/maskrcnn/platform", "--commit", COMMIT_B, "--builder", "podman",
                 "--insecure-registry", "--context", str(context), "--containerfile", str(context / "Containerfile"),
                 "--build-arg", f"BASE={base}", "--output", str(tmp_path / "cli.yaml")])
    assert code == 0 and (tmp_path / "cli.yaml").exists()
    assert any(r.message.startswith("push: ") and " is sha256:" in r.message for r in caplog.records)
    # an image pushed by someone else (Cloud Build's own steps): compiled on its digest, nothing built
    digest = registry_digest(registry, "maskrcnn/platform", COMMIT_B[:12])
    assert main(["ship", "--repository", f"{registry}/maskrcnn/platform", "--commit", COMMIT_B, "--prebuilt", digest,
                 "--containerfile", "/nonexistent", "--output", str(tmp_path / "prebuilt.yaml")]) == 0
    assert images_in(tmp_path / "prebuilt.yaml") == {f"{registry}/maskrcnn/platform@{digest}"}
    assert main(["ship", "--repository", f"{registry}/maskrcnn/platform", "--commit", COMMIT_B, "--prebuilt", "latest"]) == 2
    assert main(["ship", "--repository", f"{registry}/maskrcnn/platform", "--commit", "not-a-commit"]) == 2
    assert main(["ship", "--repository", f"{registry}/x", "--commit", COMMIT_B, "--param", "novalue"]) == 2


def test_the_default_pipeline_name_is_the_pipelines():
    from pipelines.pipeline import PIPELINE_NAME

    assert ShipPlan.__dataclass_fields__["pipeline_name"].default == PIPELINE_NAME
