"""The release layer's own command, without KFP: score, gate, register, publish, deploy and roll back,
against the real MLflow stack and its S3 server. The InferenceService lives in kmock's in-memory
Kubernetes API (an emulator: no API server can run here), with the test playing KServe."""

from __future__ import annotations

import shutil
import time

import pytest
from k8s_emulator import IsvcController
from mlflow.tracking import MlflowClient

from release.__main__ import REJECTED, main
from training.package import open_package
from training.tracking import log_package

pytestmark = pytest.mark.slow

ISVC, NAMESPACE = "maskrcnn", "models"


def _logged_run(client, experiment: str, package) -> str:
    """A run that logged `package` as its model, as training does (the package's config is the tiny one,
    so its validation split is the tiny synthetic one)."""
    exp = client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    run_id = client.create_run(exp.experiment_id).info.run_id
    open_package(package).stamped({"mlflow_run_id": run_id, "dataset_hash": "d" * 64, "git_commit": "c" * 40}).save(package)
    log_package(client, run_id, package)
    return run_id


def test_promote_reject_promote_rollback_k8s_emulator(mlflow_stack, serving_package, cache_dir, k8s_emulator,
                                                       tmp_path, monkeypatch, caplog):
    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.tracking_uri)
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"release-{time.time_ns()}"
    prefix = f"s3://{mlflow_stack.state.models_bucket}/release"
    first = _logged_run(client, name, shutil.copytree(serving_package, tmp_path / "a"))
    second = _logged_run(client, name, shutil.copytree(serving_package, tmp_path / "b"))
    ctl = IsvcController(k8s_emulator.kubeconfig, ISVC, NAMESPACE)
    ctl.create(f"{prefix}/previous")
    common = ["--model-name", name, "--isvc-name", ISVC, "--namespace", NAMESPACE, "--kubeconfig", k8s_emulator.kubeconfig,
              "--ready-timeout", "60"]
    uri = lambda: ctl.get()["spec"]["predictor"]["model"]["storageUri"]  # noqa: E731
    with ctl:
        assert main([*common, "promote", first, "--storage-prefix", prefix, "--min-segm-map", "0", "--min-mask-iou", "0"]) == 0
        v1 = client.get_model_version_by_alias(name, "champion")
        assert v1.version == "1" and uri() == f"{prefix}/{name}/v1"
        assert v1.tags["gate.decision"] == "promote" and v1.tags["run_id"] == first and v1.tags["dataset_hash"] == "d" * 64

        # the same model again must beat the champion by 0.01: rejected, nothing registered or moved
        assert main([*common, "promote", second, "--storage-prefix", prefix, "--min-segm-map", "0", "--min-mask-iou", "0",
                     "--margin", "0.01"]) == REJECTED
        assert client.get_run(second).data.tags["gate.decision"] == "reject"
        assert "does not beat champion v1" in client.get_run(second).data.tags["gate.reason"]
        assert len(client.search_model_versions(f"name = '{name}'")) == 1 and uri() == f"{prefix}/{name}/v1"

        assert main([*common, "promote", second, "--storage-prefix", prefix, "--min-segm-map", "0", "--min-mask-iou", "0",
                     "--margin", "-1"]) == 0
        assert client.get_model_version_by_alias(name, "champion").version == "2" and uri() == f"{prefix}/{name}/v2"

        assert main([*common, "rollback", "1", "--reason", "incident 42"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "1" and uri() == f"{prefix}/{name}/v1"
    assert ctl.seen == [f"{prefix}/{name}/v1", f"{prefix}/{name}/v2", f"{prefix}/{name}/v1"]
    from training.registry import alias_history

    reasons = [h.reason for h in alias_history(client, name, "champion")]
    assert len(reasons) == 3 and reasons[-1].startswith("rollback: incident 42")
    # a version that was never published cannot be rolled back to
    assert main([*common, "rollback", "99"]) == 2
