"""Pointing an InferenceService at a new model, against an in-memory Kubernetes API (kmock emulator;
no Kubernetes API server can run here). The test plays KServe's controller."""

from __future__ import annotations

import pytest
from k8s_emulator import IsvcController

from release.deploy import DeployError, update_storage_uri


def test_patch_then_ready_returns_the_previous_uri_emulator(k8s_emulator):
    ctl = IsvcController(k8s_emulator.kubeconfig, "maskrcnn", "models")
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        result = update_storage_uri("maskrcnn", "models", "s3://models/maskrcnn/v2", canary_percent=10, timeout=30,
                                    poll=0.2, kubeconfig=k8s_emulator.kubeconfig)
    assert result.previous_uri == "s3://models/maskrcnn/v1" and result.storage_uri == "s3://models/maskrcnn/v2"
    predictor = ctl.get()["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://models/maskrcnn/v2"
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["minReplicas"] == 1 and predictor["model"]["modelFormat"] == {"name": "maskrcnn"}  # untouched


def test_not_ready_in_time_rolls_back_emulator(k8s_emulator):
    ctl = IsvcController(k8s_emulator.kubeconfig, "maskrcnn", "models", becomes_ready=False)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        with pytest.raises(DeployError, match=r"not Ready within 3 s on s3://models/maskrcnn/v2 .* rolled back to "
                                              r"s3://models/maskrcnn/v1"):
            update_storage_uri("maskrcnn", "models", "s3://models/maskrcnn/v2", timeout=3, poll=0.2,
                               kubeconfig=k8s_emulator.kubeconfig)
    assert ctl.seen[0] == "s3://models/maskrcnn/v2"  # it was patched, then restored
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"


def test_missing_inference_service_is_named_emulator(k8s_emulator):
    with pytest.raises(DeployError, match="InferenceService models/nope: cannot read it"):
        update_storage_uri("nope", "models", "s3://x/y", timeout=1, kubeconfig=k8s_emulator.kubeconfig)


def test_real_kubectl_sees_the_patched_uri_emulator(k8s_emulator):
    import shutil
    import subprocess

    ctl = IsvcController(k8s_emulator.kubeconfig, "maskrcnn", "models")
    ctl.create("gs://bucket/maskrcnn/v1")
    with ctl:
        update_storage_uri("maskrcnn", "models", "gs://bucket/maskrcnn/v2", timeout=30, poll=0.2,
                           kubeconfig=k8s_emulator.kubeconfig)
    out = subprocess.run([shutil.which("kubectl"), "--kubeconfig", k8s_emulator.kubeconfig, "-n", "models", "get",
                          "inferenceservices.serving.kserve.io", "maskrcnn", "-o",
                          "jsonpath={.spec.predictor.model.storageUri}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "gs://bucket/maskrcnn/v2"
