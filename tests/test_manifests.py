"""Every kustomization, rendered with the real `kubectl kustomize`: built-in objects validated against
Kubernetes' own schemas (kubernetes-validate, strict), custom resources checked for the fields the
platform relies on, above all the storageUri path that the pipeline's promote step patches."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from conftest import render_kustomization as render

from release.deploy import storage_uri_of

KUSTOMIZATIONS = ["deployment/overlays/production", "deployment/overlays/canary", "ray", "mlflow/k8s/overlays/gcs",
                  "mlflow/k8s/overlays/minio"]
K8S_VERSION = "1.31"


def by_kind(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_builtin_objects_are_valid_kubernetes(path):
    objects = render(path)
    builtin = [o for o in objects if "." not in o["apiVersion"].split("/")[0] or o["apiVersion"].startswith("rbac.")]
    assert builtin
    for obj in builtin:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises with the field at fault
    for obj in objects:
        assert obj["metadata"].get("namespace") or obj["kind"] == "Namespace", obj["metadata"]["name"]
        assert "REGION-docker.pkg.dev" in yaml.safe_dump(obj) or "image" not in yaml.safe_dump(obj)


def test_inference_service_has_the_field_promote_patches():
    objects = render("deployment/overlays/production")
    isvc = by_kind(objects, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert storage_uri_of(isvc).startswith("gs://")  # spec.predictor.model.storageUri
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert predictor["model"]["resources"]["requests"]["cpu"]
    assert predictor["model"]["readinessProbe"]["httpGet"]["path"] == "/v1/models/maskrcnn"
    assert "canaryTrafficPercent" not in predictor
    runtime = by_kind(objects, "ServingRuntime")
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["python", "-m", "serving"] and "/mnt/models" in container["args"]
    assert container["securityContext"]["runAsNonRoot"] is True
    sa = by_kind(objects, "ServiceAccount")
    assert predictor["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def test_canary_overlay_splits_traffic():
    isvc = by_kind(render("deployment/overlays/canary"), "InferenceService")
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert storage_uri_of(isvc).endswith("/v2")


def test_promote_role_is_least_privilege():
    objects = render("deployment/overlays/production")
    role = by_kind(objects, "Role")
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "patch"]},
                             {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]
    binding = by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["metadata"]["namespace"] == role["metadata"]["namespace"]


def test_ray_cluster_runs_the_project_image():
    cluster = by_kind(render("ray"), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["client"] == 10001  # `ray://...:10001`, the pipeline's ray_address
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["image"] == head["image"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
