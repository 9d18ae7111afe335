"""The release layer's own command, without KFP: score, gate, register, publish, deploy and roll back,
against the real MLflow stack and its S3 server. The InferenceService lives on a real Kubernetes API
server (`devstack.kubeapi`), patched as the promote step's ServiceAccount (a TokenRequest token, the
project's Role); KServe's controller cannot run here, so a stand-in plays it (`kserve_stand_in`)."""

from __future__ import annotations

import shutil
import time

import pytest
from helpers import ISVC, logged_run
from maskrcnn.package import open_package
from kserve_stand_in import IsvcController
from mlflow.tracking import MlflowClient

from release.__main__ import REJECTED, main

pytestmark = pytest.mark.slow

def test_promote_reject_promote_rollback_kserve_stand_in(mlflow_stack, serving_package, cache_dir, k8s,
                                                       tmp_path, monkeypatch, caplog):
    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.tracking_uri)
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"release-{time.time_ns()}"
    prefix = f"s3://{mlflow_stack.state.models_bucket}/release"
    first = logged_run(client, name, shutil.copytree(serving_package, tmp_path / "a"))
    second = logged_run(client, name, shutil.copytree(serving_package, tmp_path / "b"))
    ctl = IsvcController(k8s.admin, ISVC, k8s.namespace)
    ctl.create(f"{prefix}/previous")
    common = ["--model-name", name, "--isvc-name", ISVC, "--namespace", k8s.namespace, "--kubeconfig", k8s.kubeconfig,
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
        # the same model: its paired bootstrap against the champion is exactly 0, recorded with the decision
        tags = client.get_run(second).data.tags
        assert [tags[f"gate.segm_map_delta{k}"] for k in ("", "_low", "_high")] == ["0.000000"] * 3
        # a margin of 0 is met by the point estimate, but not by the interval's lower bound when it is required
        assert main([*common, "promote", second, "--storage-prefix", prefix, "--min-segm-map", "0", "--min-mask-iou", "0",
                     "--require-lower-bound"]) == REJECTED
        assert "lower bound +0.0000 does not exceed the margin +0.0000" in client.get_run(second).data.tags["gate.reason"]
        assert len(client.search_model_versions(f"name = '{name}'")) == 1

        assert main([*common, "promote", second, "--storage-prefix", prefix, "--min-segm-map", "0", "--min-mask-iou", "0",
                     "--margin", "-1", "--require-lower-bound"]) == 0
        v2 = client.get_model_version_by_alias(name, "champion")
        assert v2.version == "2" and uri() == f"{prefix}/{name}/v2"
        assert v2.tags["gate.segm_map_delta_low"] == "0.000000" and "1000 resamples" in v2.tags["gate.bootstrap"]

        assert main([*common, "rollback", "1", "--reason", "incident 42"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "1" and uri() == f"{prefix}/{name}/v1"
    assert ctl.seen == [f"{prefix}/{name}/v1", f"{prefix}/{name}/v2", f"{prefix}/{name}/v1"]
    from training.registry import alias_history

    reasons = [h.reason for h in alias_history(client, name, "champion")]
    assert len(reasons) == 3 and reasons[-1].startswith("rollback: incident 42")
    # a version that was never published cannot be rolled back to
    assert main([*common, "rollback", "99"]) == 2


def test_promote_ends_served_and_signed_or_rolled_back_and_tagged_kserve_stand_in(mlflow_stack, serving_package, k8s,
                                                                              tmp_path, monkeypatch):
    """Two promotions of the same run's model. The first one's rollout wait cannot read the InferenceService
    (every GET after the patch answers 503): the URI is rolled back and the version tagged promotion.failed,
    champion unmoved. The second is served: its published package is signed, and verifies against the
    public key the predictor would be given."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from helpers import FlakyApi, unavailable

    from release import deploy
    from release.deploy import DeployError
    from release.promote import promote
    from maskrcnn.signature import key_id

    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"two-states-{time.time_ns()}"
    package = shutil.copytree(serving_package, tmp_path / "pkg")
    run_id = logged_run(client, name, package)
    model_uri = f"models:/{client.search_logged_models([client.get_run(run_id).info.experiment_id])[0].model_id}"
    prefix = f"s3://{mlflow_stack.state.models_bucket}/two-states"
    ctl = IsvcController(k8s.admin, ISVC, k8s.namespace)
    ctl.create(f"{prefix}/previous")
    key = Ed25519PrivateKey.generate()
    args = dict(package_dir=package, model_uri=model_uri, tracking_uri=mlflow_stack.tracking_uri, model_name=name,
                storage_prefix=prefix, isvc_name=ISVC, namespace=k8s.namespace, ready_timeout=3,
                kubeconfig=k8s.kubeconfig, signing_key=key)
    with ctl:
        with monkeypatch.context() as m:
            real = deploy.custom_objects_api(k8s.kubeconfig)  # the client itself, made before the patch below
            m.setattr(deploy, "custom_objects_api", lambda kubeconfig="": FlakyApi(k8s.kubeconfig, lambda n: unavailable(), real))
            with pytest.raises(DeployError, match="rolled back to " + f"{prefix}/previous"):
                promote(**args)
        failed = client.get_model_version(name, "1")
        assert "rolled back to " + f"{prefix}/previous" in failed.tags["promotion.failed"]
        assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == f"{prefix}/previous"
        assert "champion" not in (client.get_registered_model(name).aliases or {})

        result = promote(**{**args, "ready_timeout": 60})
    assert result.version == "2" and ctl.get()["spec"]["predictor"]["model"]["storageUri"] == result.storage_uri
    served = client.get_model_version_by_alias(name, "champion")
    assert served.version == "2" and "promotion.failed" not in served.tags
    assert served.tags["serving.signed_by"] == key_id(key.public_key())
    published = open_package(result.storage_uri, public_keys=[key.public_key()], cache_dir=tmp_path / "cache")
    assert published.signer == key_id(key.public_key()) and published.metadata["model_version"] == "2"
    assert published.files["model.pt"] == open_package(package).files["model.pt"]  # what was scored is what is served
