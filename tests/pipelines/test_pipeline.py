"""The KFP v2 pipeline: the committed YAML, and whole local runs (KFP's SubprocessRunner) on the tiny
config with real Ray, the real MLflow stack and its S3 server. The InferenceService lives on a real
Kubernetes API server (`devstack.kubeapi`), patched by the promote step as its ServiceAccount (a
TokenRequest token, the project's Role); KServe's controller cannot run here, so a stand-in plays it
(`kserve_stand_in`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from kserve_stand_in import IsvcController
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.compile import BATCH_OUTPUT, DEFAULT_OUTPUT, compile_batch_pipeline, compile_pipeline

ISVC, PREVIOUS = "maskrcnn", "s3://models/maskrcnn/previous"


def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRCNN_IMAGE", "elsewhere:1")  # the factory reads no environment: only the CLI's default does
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == DEFAULT_OUTPUT.read_text(), "stale: run `uv run -m pipelines.compile` and commit"
    batch = compile_batch_pipeline(tmp_path / "batch.yaml")
    assert batch.read_text() == BATCH_OUTPUT.read_text(), "stale: run `uv run -m pipelines.compile` and commit"


def test_the_batch_pipeline_is_one_hardened_step_with_the_champion_by_default():
    spec, platform = yaml.safe_load_all(BATCH_OUTPUT.read_text())
    assert spec["pipelineInfo"]["name"] == "maskrcnn-batch-inference"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source", "output"} <= {k for k, v in params.items() if not v.get("isOptional")}
    assert params["model"]["defaultValue"] == "models:/maskrcnn@champion"
    (executor,) = spec["deploymentSpec"]["executors"].values()
    assert executor["container"]["resources"]["memoryLimit"] == 17.179869184
    (k8s,) = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert k8s["securityContext"]["runAsNonRoot"] is True and int(k8s["securityContext"]["runAsUser"]) == 1000
    assert {s["secretName"] for s in k8s["secretAsEnv"]} == {"maskrcnn-storage", "maskrcnn-ray-auth"}


def test_the_batch_pipeline_runs_with_kfps_local_runner(serving_package, tmp_path):
    """The compiled step as KFP's SubprocessRunner runs it, over a folder with a package folder."""
    from kfp import local

    from pipelines.pipeline import build_batch_pipeline

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(images / f"{i}.png")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        run = build_batch_pipeline()(source=str(images), output=str(tmp_path / "out"), package=str(serving_package),
                                     model="", shard_size=2, score_threshold=0.0)
    finally:
        os.environ.pop("RAY_AUTH_MODE")
    assert run is not None
    assert sorted(p.name for p in (tmp_path / "out" / "results").iterdir()) == [
        "shard-00000.images.json", "shard-00000.json", "shard-00001.images.json", "shard-00001.json"]
    (executed,) = list((tmp_path / "root").rglob("batch-predict/executor_output.json"))
    outputs = json.loads(executed.read_text())
    assert outputs["parameterValues"]["Output"] == 3
    assert outputs["artifacts"]["summary"]["artifacts"][0]["metadata"]["images"] == 3.0  # the step's Metrics


def test_yaml_has_the_steps_and_the_gate_condition():
    spec, _ = yaml.safe_load_all(DEFAULT_OUTPUT.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {f"exec-{n}" for n in ("prepare-data", "train", "evaluate", "gate", "promote", "reject")} == set(executors)
    for executor in executors.values():
        assert executor["container"]["image"] == "maskrcnn-platform:0.1.0"
    tasks = spec["root"]["dag"]["tasks"]
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = [t["triggerPolicy"]["condition"] for t in branches.values()]
    assert "inputs.parameter_values['pipelinechannel--gate-decision'] == 'promote'" in conditions
    assert any(c.startswith("!(") for c in conditions)  # the Else branch
    assert tasks["evaluate"]["dependentTasks"] == ["prepare-data", "train"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"min_segm_map", "min_mask_iou", "margin", "require_lower_bound", "storage_prefix", "isvc_name", "canary_percent",
            "data_format"} <= set(params)
    assert spec["components"]["comp-train"]["outputDefinitions"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    # docstrings: the pipeline's is in the YAML; each component carries its own (KFP's pipeline IR has
    # no per-task description field, so tasks also get display names)
    assert spec["pipelineInfo"]["description"].startswith("The Mask R-CNN pipeline")
    from pipelines.components import make_components

    assert "Ray Train" in make_components().train.component_spec.description
    assert tasks["train"]["taskInfo"]["name"] == "train"


@pytest.fixture
def pipeline_env(mlflow_stack, cache_dir, k8s, tmp_path, monkeypatch):
    """Everything one local run needs: S3 keys and endpoint in the environment (the steps inherit it),
    a unique experiment and model name, an InferenceService serving PREVIOUS, checkpoints in S3."""
    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    name = f"pipe-{time.time_ns()}"
    ctl = IsvcController(k8s.admin, ISVC, k8s.namespace)
    ctl.create(PREVIOUS)
    bucket = mlflow_stack.state.models_bucket
    params = dict(
        config="tiny", data="", val_data="", model_name=name, tracking_uri=mlflow_stack.tracking_uri,
        overrides=[f"ray.storage_path=s3://{bucket}/ray/{name}", f"tracking.experiment={name}", "train.epochs=1"],
        ray_address="", min_segm_map=0.0, min_mask_iou=0.0, margin=-1.0,
        storage_prefix=f"s3://{bucket}", isvc_name=ISVC, namespace=k8s.namespace,
        canary_percent=0, ready_timeout=60.0, kubeconfig=k8s.kubeconfig,
        promoter_service_account="")  # the kubeconfig is the promoter's own token already (tests/deployment/test_kube_api.py acts as it)
    return params, ctl, MlflowClient(mlflow_stack.tracking_uri), tmp_path / "pipeline-root"


@pytest.fixture
def containers(request, monkeypatch):
    """What the DockerRunner needs: the image, and podman's Docker API in DOCKER_HOST."""
    image = request.getfixturevalue("platform_image")
    monkeypatch.setenv("DOCKER_HOST", request.getfixturevalue("docker_host"))
    return image


def _run(params, root, runner="docker", image="", **changes):
    """The pipeline through `python -m pipelines.run_local`: in containers of `image` (DockerRunner on
    podman), or as subprocesses here. A failed step raises RuntimeError with the run's output."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pipelines.run_local", "--runner", runner, "--pipeline-root", str(root)]
    if image:
        argv += ["--image", image]
    for name, value in {**params, **changes}.items():
        if isinstance(value, list):
            argv += [a for item in value for a in ("--set", item)]
        else:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"run_local exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return out.stdout + out.stderr


def _only_run(client, experiment):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["docker", "subprocess"])
def test_a_good_model_is_promoted_and_served_kserve_stand_in(runner, pipeline_env, mlflow_stack, tmp_path, capsys, request,
                                                          monkeypatch):
    """In containers, the train step submits to the two-node Ray cluster in containers (Jobs API, token
    authentication); as subprocesses, it starts a local Ray."""
    params, ctl, client, root = pipeline_env
    image = ""
    if runner == "docker":
        image = request.getfixturevalue("containers")
        nodes = request.getfixturevalue("ray_nodes")
        for key, value in nodes.client_env().items():
            monkeypatch.setenv(key, value)
        params = {**params, "ray_address": nodes.jobs_url}
    with ctl:
        output = _run(params, root, runner, image)
    if runner == "docker":  # every step ran in the image as its uid 1000; training ran on the Ray cluster
        assert "submitted Ray job" in output
        assert {p.stat().st_uid for p in root.glob("*/*")} == {1000}
    name = params["model_name"]
    champion = client.get_model_version_by_alias(name, "champion")
    run = _only_run(client, name)
    assert champion.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["gate.decision"] == "promote"
    uri = f"s3://{mlflow_stack.state.models_bucket}/{name}/v{champion.version}"
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == uri  # exactly the uploaded location
    assert champion.tags["serving.storage_uri"] == uri
    from maskrcnn.storage import fetch_prefix
    from maskrcnn.package import open_package

    package = open_package(fetch_prefix(uri, tmp_path / "download"))
    served = package.checksums
    assert set(served) == {"model.pt", "config.yaml", "label_map.json", "metadata.json", "probe.npz", "detector.onnx",
                           "reference.json", "MODEL_CARD.md"}
    # One artifact: the Model artifact, the model logged in MLflow and the published package hold the
    # same weights, config and label map (only metadata.json gains the version number)
    from training.tracking import download_model

    (model_dir,) = list(root.glob("*/train/model"))
    logged = open_package(download_model(params["tracking_uri"], f"models:/{name}/{champion.version}",
                                         tmp_path / "logged")).checksums
    for file in ("model.pt", "config.yaml", "label_map.json", "probe.npz", "detector.onnx"):
        assert served[file] == logged[file] == open_package(model_dir).checksums[file], file
    assert package.metadata["model_version"] == champion.version
    # the evaluation report: the evaluate step's HTML output (the KFP UI shows it), on the run beside the
    # training's own, and the model card in the package and as the version's description
    (page,) = list(root.glob("*/evaluate/report"))
    assert page.read_text().startswith("<!DOCTYPE html>") and 'id="confusion"' in page.read_text()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "gate")} == {"gate/report.html"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {"evaluation/report.html"}
    assert package.card.startswith("# Model card: ") and champion.description.startswith("**Gate:** promoted:")
    # The dataset's identity is computed once: the prepare step's hash is the run's and the version's
    (dataset_dir,) = list(root.glob("*/prepare-data/dataset"))
    prepared_hash = json.loads((dataset_dir / "dataset.json").read_text())["content_hash"]
    assert run.data.tags["dataset_hash"] == champion.tags["dataset_hash"] == prepared_hash
    # The promoted version carries the same evidence as one registered by training, plus the gate's decision
    assert float(champion.tags["segm_mAP"]) == pytest.approx(run.data.metrics["final_segm_mAP"], abs=1e-6)
    assert len(champion.tags["git_commit"]) == 40 and champion.tags["run_id"] == run.info.run_id
    assert champion.tags["gate.decision"] == "promote" and champion.tags["gate.reason"].startswith("promoted:")
    assert json.loads(champion.tags["config"])["train"]["epochs"] == 1
    from training.registry import main as registry_main

    import os

    os.environ["MLFLOW_TRACKING_URI"] = params["tracking_uri"]
    try:
        assert registry_main(["show", name]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(champion.version + " "))
    assert champion.tags["segm_mAP"][:8] in row and "-" not in row.split()[1:3]
    # the next run's evaluate step finds this champion and scores its package on the same split: the
    # same model, so the same numbers as the candidate
    from release.scoring import score_candidate_and_champion
    from training.data.prepare import load_prepared

    scores = score_candidate_and_champion(open_package(model_dir), load_prepared(dataset_dir).val,
                                          params["tracking_uri"], name)
    assert scores.champion.version == champion.version
    assert scores.champion.segm_map == pytest.approx(scores.segm_map, abs=1e-9)
    assert scores.champion.mask_iou == pytest.approx(scores.mask_iou, abs=1e-9)
    interval = scores.interval  # the paired bootstrap of the same model against itself
    assert (interval.delta, interval.low, interval.high, interval.images) == (0.0, 0.0, 0.0, len(
        load_prepared(dataset_dir).val.coco["images"]))
    assert type(scores).from_dict(json.loads(json.dumps(scores.to_dict()))) == scores  # as a Kubeflow output travels


@pytest.mark.slow
def test_a_bad_model_is_rejected_and_nothing_moves_kserve_stand_in(pipeline_env, containers):
    params, ctl, client, root = pipeline_env
    with ctl:
        _run(params, root, image=containers, min_segm_map=0.99, min_mask_iou=0.99)  # returns: the run is green
    name = params["model_name"]
    run = _only_run(client, name)
    assert run.data.tags["gate.decision"] == "reject" and run.data.tags["promoted"] == "false"
    assert "segm mAP" in run.data.tags["gate.reason"] and "< threshold 0.9900" in run.data.tags["gate.reason"]
    assert "gate.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.search_model_versions(f"name = '{name}'") == []
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == PREVIOUS and ctl.seen == []


@pytest.mark.slow
def test_a_failed_upload_leaves_the_inference_service_untouched_kserve_stand_in(pipeline_env, containers):
    params, ctl, client, root = pipeline_env
    with ctl, pytest.raises(RuntimeError, match="promote"):
        _run(params, root, image=containers, storage_prefix="s3://no-such-bucket/models")
    name = params["model_name"]
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == PREVIOUS and ctl.seen == []
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert "uploading the serving package to s3://no-such-bucket" in version.tags["promotion.failed"]
    with pytest.raises(Exception, match="(?i)alias|not found|does not exist"):
        client.get_model_version_by_alias(name, "champion")


@pytest.mark.slow
def test_a_service_that_never_becomes_ready_is_rolled_back_kserve_stand_in(pipeline_env, containers):
    params, ctl, client, root = pipeline_env
    ctl.becomes_ready = False
    with ctl, pytest.raises(RuntimeError, match="promote"):
        _run(params, root, image=containers, ready_timeout=5.0)
    name = params["model_name"]
    assert ctl.seen and ctl.seen[0].endswith(f"/{name}/v1")  # it was pointed at the new package...
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == PREVIOUS  # ...and rolled back
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert "rolled back to " + PREVIOUS in version.tags["promotion.failed"]


def test_yaml_sets_required_parameters_resources_shm_secrets_and_non_root():
    spec, platform = yaml.safe_load_all(DEFAULT_OUTPUT.read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    required = {name for name, p in params.items() if not p.get("isOptional")}
    assert required == {"tracking_uri", "storage_prefix"}  # no placeholder default to forget to change
    assert params["namespace"]["defaultValue"] == "models"  # the manifests' namespace
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]["resources"]
    assert train["cpuRequest"] == 4.0 and train["memoryRequest"] == train["memoryLimit"]
    assert all("memoryLimit" in e["container"]["resources"] for e in executors.values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, cfg in k8s.items():
        assert cfg["securityContext"] == {"runAsGroup": "1000", "runAsNonRoot": True, "runAsUser": "1000"}, name
    for name in ("exec-train", "exec-evaluate"):
        (shm,) = k8s[name]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    secrets = {s["secretName"]: s for s in k8s["exec-train"]["secretAsEnv"]}
    assert secrets["maskrcnn-ray-auth"]["keyToEnv"] == [{"envVar": "RAY_AUTH_TOKEN", "secretKey": "auth_token"}]
    assert all(s["optional"] for s in secrets.values())
    assert "secretAsEnv" not in k8s["exec-gate"]  # least privilege: only the steps that touch storage


def test_image_and_gpus_are_arguments_of_the_pipeline_factory(tmp_path):
    """The image, the train step's GPUs and their resource name are the factory's arguments: no environment
    variable, no module reload, and a second compile is unaffected by the first."""
    spec, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "gpu.yaml", image="registry.example/p@sha256:" + "a" * 64,
                                                  train_gpus=2, accelerator="nvidia.com/mig-1g.10gb").read_text())
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    accelerator = train["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/mig-1g.10gb" and accelerator["resourceCount"] == "2"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"registry.example/p@sha256:" + "a" * 64}
    plain, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "plain.yaml").read_text())
    assert "accelerator" not in plain["deploymentSpec"]["executors"]["exec-train"]["container"].get("resources", {})
    assert {e["container"]["image"] for e in plain["deploymentSpec"]["executors"].values()} == {"maskrcnn-platform:0.1.0"}
    with pytest.raises(ValueError, match="train_gpus: expected an integer >= 0, got -1"):
        compile_pipeline(tmp_path / "bad.yaml", train_gpus=-1)


def test_component_image_installs_the_locked_project_as_non_root():
    text = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert "uv sync --locked --no-dev" in text
    for package in ("training", "release", "pipelines", "serving"):
        assert f"COPY {package} ./{package}" in text
    # development infrastructure stays out of the image
    assert "COPY devstack" not in text
    assert "devstack" in (Path(__file__).resolve().parents[2] / ".dockerignore").read_text().split()
    assert "USER 1000:1000" in text and "PATH=/opt/venv/bin:$PATH" in text  # kfp's `python3` is the locked env's
