"""The manifests and the promote step's permissions on a real Kubernetes API server (kube-apiserver 1.20
and etcd on 127.0.0.1, RBAC on; `devstack.kubeapi`). KServe's CRDs are loaded adapted for 1.20: their
`default: ""` lines dropped in a copy (`adapt_crd_for_1_20`; the vendored files are untouched). No
controller runs: what is checked is what the API server itself decides: schema, generations, RBAC."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers import render_kustomization as render
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from devstack.kubeapi import adapt_crd_for_1_20
from devstack.procs import StackError

pytestmark = pytest.mark.slow

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["deployment/overlays/production", "deployment/overlays/canary", "deployment/overlays/kubeflow-multi-user",
            "mlflow/k8s/overlays/gcs", "mlflow/k8s/overlays/minio"]


def apply(kube_api, objects: list[dict]) -> str:
    return kube_api.apply(yaml.safe_dump_all(objects))


def apis(kubeconfig) -> tuple:
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    return client.CustomObjectsApi(api_client), client.AppsV1Api(api_client), client.CoreV1Api(api_client)


def test_the_kserve_crds_need_the_1_20_adaptation_and_it_only_drops_empty_string_defaults():
    paths = sorted((ROOT / "deployment" / "crds").glob("kserve-*.yaml"))
    assert len(paths) >= 2, paths  # the InferenceService and ServingRuntime CRDs, at least
    for path in paths:
        text = path.read_text()
        adapted = adapt_crd_for_1_20(text)
        kept = [line for line in text.splitlines() if line.strip() != 'default: ""']
        assert len(kept) < len(text.splitlines()), f"{path.name} has no `default: \"\"` left: the adaptation may go"
        assert adapted.splitlines() == kept


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_overlay_applies_to_a_real_api_server_with_kubectl_validation(kube_api, path):
    """`kubectl apply --validate=true` (kubectl checks every field against the server's OpenAPI, which
    includes the CRDs' schemas), then each object reads back from the server as rendered."""
    objects = render(path)
    apply(kube_api, objects)
    live = yaml.safe_load(kube_api.kubectl("get", "-f", "-", "-o", "yaml", input_text=yaml.safe_dump_all(objects)))["items"]
    assert [(o["kind"], o["metadata"]["name"]) for o in live] == [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert objects and any(key in obj for obj in objects for key in ("spec", "data", "rules", "roleRef", "subjects"))
    for obj, stored in zip(objects, live):
        for key in ("spec", "data", "rules", "roleRef", "subjects"):
            if key in obj:
                assert _contains(stored[key], obj[key]), (path, obj["kind"], key, stored[key], obj[key])


def _contains(stored, rendered) -> bool:
    """Whether every field rendered is stored with the same value (the server adds defaults)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(k in stored and _contains(stored[k], v) for k, v in rendered.items())
    if isinstance(rendered, list):
        return isinstance(stored, list) and len(stored) == len(rendered) and all(map(_contains, stored, rendered))
    return stored == rendered or str(stored) == str(rendered)


def test_the_ray_manifests_apply_but_the_raycluster_is_left_to_the_offline_crd_check(kube_api):
    """The RayCluster's CRD (KubeRay 1.7) uses CEL `x-kubernetes-validations` and list-map keys without
    defaults, which a 1.20 API server refuses. Stripping those rules would check the RayCluster against a
    weaker schema than a cluster enforces, so it is left to `test_manifests.py`'s check against the full
    published schema; the rest of ray/ applies here. If this server ever takes the CRD, this test fails
    and the RayCluster should be applied here too."""
    objects = render("ray")
    apply(kube_api, [o for o in objects if o["kind"] != "RayCluster"])
    with pytest.raises(StackError, match="unknown field \"x-kubernetes-validations\""):
        kube_api.kubectl("create", "--validate=true", "-f", str(ROOT / "deployment" / "crds" / "kuberay-v1.7.0-rayclusters.yaml"))


def test_kubectl_refuses_a_misspelt_field_and_the_server_a_wrong_type(kube_api):
    isvc = next(o for o in render("deployment/overlays/production") if o["kind"] == "InferenceService")
    apply(kube_api, [o for o in render("deployment/overlays/production") if o["kind"] == "Namespace"])
    typo = copy.deepcopy(isvc)
    typo["metadata"]["name"] = "typo"
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(StackError, match='unknown field "storageURI"'):
        apply(kube_api, [typo])
    custom, _, _ = apis(kube_api.kubeconfig)
    wrong = copy.deepcopy(isvc)
    wrong["metadata"]["name"] = "wrong-type"
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(GROUP, VERSION, "models", PLURAL, wrong)
    assert refused.value.status == 422 and "spec.predictor.minReplicas" in refused.value.body


def test_a_storage_uri_patch_bumps_the_generation_and_a_status_write_does_not(k8s):
    custom, _, _ = apis(k8s.admin)
    isvc = next(o for o in render("deployment/overlays/production") if o["kind"] == "InferenceService")
    isvc["metadata"]["namespace"] = k8s.namespace
    created = custom.create_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, isvc)
    assert created["metadata"]["generation"] == 1
    promoter, _, _ = apis(k8s.kubeconfig)
    patched = promoter.patch_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn",
                                                      {"spec": {"predictor": {"model": {"storageUri": "gs://b/v2"}}}})
    assert patched["metadata"]["generation"] == 2
    status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn",
                                                          {"status": {"observedGeneration": 9}})
    assert status["metadata"]["generation"] == 2 and status["status"]["observedGeneration"] == 9
    with pytest.raises(ApiException) as refused:
        promoter.patch_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn",
                                                {"spec": {"predictor": {"model": {"storageUri": 7}}}})
    assert refused.value.status == 422 and "storageUri" in refused.value.body


def _forbidden(call, *args) -> str:
    with pytest.raises(ApiException) as refused:
        call(*args)
    assert refused.value.status == 403, (call.__name__, refused.value.status, refused.value.reason)
    return refused.value.body


def _as_service_account(kube_api, tmp_path, overlay: str, account: str, namespace: str):
    """Apply `overlay`, create the ServiceAccount its RoleBinding names (Kubeflow's install or profile
    controller makes it on a cluster), an InferenceService's predictor Deployment and a second
    namespace's InferenceService and another one beside it (as the admin); the account's kubeconfig, with a
    TokenRequest token."""
    objects = render(overlay)
    apply(kube_api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (namespace, "elsewhere")])
    apply(kube_api, objects)
    apply(kube_api, [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": namespace}},
                     {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "maskrcnn-predictor", "namespace": "models"},
                      "spec": {"selector": {"matchLabels": {"app": "p"}}, "template": {
                          "metadata": {"labels": {"app": "p"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}])
    other = next(o for o in objects if o["kind"] == "InferenceService")
    apply(kube_api, [{**other, "metadata": {"name": "maskrcnn", "namespace": "elsewhere"}},
                     {**other, "metadata": {"name": "another-model", "namespace": "models"}}])
    return kube_api.token_kubeconfig(tmp_path / f"{account}.kubeconfig", account, namespace)


def _may_promote_and_nothing_more(custom, apps, core, kubeconfig, monkeypatch) -> None:
    """The pipeline's account (`custom`, `apps`, `core`, from `kubeconfig`) may only mint a token for
    models/maskrcnn-promoter; acting as it (what the promote step does), it may get and patch the one
    InferenceService, read its Deployment and hold its release Lease, and nothing more."""
    from release.deploy import PROMOTER_ENV, custom_objects_api

    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    _forbidden(custom.get_namespaced_custom_object, GROUP, VERSION, "models", PLURAL, "maskrcnn")
    _forbidden(custom.patch_namespaced_custom_object, GROUP, VERSION, "models", PLURAL, "maskrcnn",
               {"spec": {"predictor": {"model": {"storageUri": "gs://x/y"}}}})
    _forbidden(core.create_namespaced_service_account_token, "default", "models", request)  # only the promoter's
    monkeypatch.setenv(PROMOTER_ENV, "models/maskrcnn-promoter")
    custom = custom_objects_api(str(kubeconfig))
    apps, core = client.AppsV1Api(custom.api_client), client.CoreV1Api(custom.api_client)
    isvc = custom.get_namespaced_custom_object(GROUP, VERSION, "models", PLURAL, "maskrcnn")
    uri = isvc["spec"]["predictor"]["model"]["storageUri"]
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, "models", PLURAL, "maskrcnn",
                                                    {"spec": {"predictor": {"model": {"storageUri": uri + "-next"}}}})
    assert patched["spec"]["predictor"]["model"]["storageUri"] == uri + "-next"
    assert apps.read_namespaced_deployment("maskrcnn-predictor", "models").metadata.name == "maskrcnn-predictor"
    _forbidden(custom.delete_namespaced_custom_object, GROUP, VERSION, "models", PLURAL, "maskrcnn")
    _forbidden(custom.list_namespaced_custom_object, GROUP, VERSION, "models", PLURAL)
    _forbidden(custom.create_namespaced_custom_object, GROUP, VERSION, "models", PLURAL,
               {**isvc, "metadata": {"name": "another", "namespace": "models"}})
    _forbidden(custom.get_namespaced_custom_object, GROUP, VERSION, "models", PLURAL, "another-model")  # resourceNames
    _forbidden(custom.patch_namespaced_custom_object_status, GROUP, VERSION, "models", PLURAL, "maskrcnn",
               {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    _forbidden(core.list_namespaced_secret, "models")
    _forbidden(core.create_namespaced_service_account_token, "maskrcnn-promoter", "models", request)
    _forbidden(apps.patch_namespaced_deployment, "maskrcnn-predictor", "models", {"spec": {"replicas": 0}})
    # the release Lease: taken, renewed and released by the step itself (release.lease), never deleted
    from release.lease import Intent, ReleaseLease

    lease = ReleaseLease("maskrcnn", "models", api=client.CoordinationV1Api(custom.api_client), duration_s=30)
    lease.acquire(Intent("promote", "maskrcnn", "maskrcnn", "models", lease.holder))
    lease.release()
    assert lease.read().intent is None and lease.read().holder is None
    coordination = client.CoordinationV1Api(custom.api_client)
    _forbidden(coordination.delete_namespaced_lease, lease.name, "models")
    _forbidden(coordination.read_namespaced_lease, "another-release", "models")
    _forbidden(custom.get_namespaced_custom_object, GROUP, VERSION, "elsewhere", PLURAL, "maskrcnn")
    _forbidden(custom.patch_namespaced_custom_object, GROUP, VERSION, "elsewhere", PLURAL, "maskrcnn",
               {"spec": {"predictor": {"model": {"storageUri": "gs://x/y"}}}})


def test_the_pipeline_runner_may_only_act_as_the_promoter_and_it_may_patch_the_inference_service_and_nothing_more(
        kube_api, tmp_path, monkeypatch):
    """The standalone install's `kubeflow/pipeline-runner`, bound by the production overlay's Roles."""
    kubeconfig = _as_service_account(kube_api, tmp_path, "deployment/overlays/production", "pipeline-runner", "kubeflow")
    _may_promote_and_nothing_more(*apis(kubeconfig), kubeconfig, monkeypatch)


def test_the_multi_user_overlay_moves_the_permission_to_the_profiles_default_editor(kube_api, tmp_path, monkeypatch):
    kubeconfig = _as_service_account(kube_api, tmp_path, "deployment/overlays/kubeflow-multi-user", "default-editor",
                                     "kubeflow-user-example-com")
    _may_promote_and_nothing_more(*apis(kubeconfig), kubeconfig, monkeypatch)
    apply(kube_api, [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pipeline-runner", "namespace": "kubeflow"}}])
    runner, _, core = apis(kube_api.token_kubeconfig(tmp_path / "runner.kubeconfig", "pipeline-runner", "kubeflow"))
    _forbidden(core.create_namespaced_service_account_token, "maskrcnn-promoter", "models",
               client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])))


@pytest.mark.parametrize("overlay, account, namespace", [
    ("deployment/overlays/production", "pipeline-runner", "kubeflow"),
    ("deployment/overlays/kubeflow-multi-user", "default-editor", "kubeflow-user-example-com")])
def test_the_promote_step_runs_as_the_overlays_service_account_kserve_stand_in(kube_api, tmp_path, overlay, account, namespace,
                                                                             monkeypatch):
    """The promote step's deploy, as the account each overlay binds, on the overlay's own InferenceService:
    patched, served (the stand-in plays KServe), and, for a model that never loads, rolled back; all
    within the Role."""
    from kserve_stand_in import IsvcController

    from release.deploy import DeployError, update_storage_uri

    kubeconfig = str(_as_service_account(kube_api, tmp_path, overlay, account, namespace))
    from release.deploy import PROMOTER_ENV

    monkeypatch.setenv(PROMOTER_ENV, "models/maskrcnn-promoter")  # as the pipeline sets it on the step
    ctl = IsvcController(str(kube_api.kubeconfig), "maskrcnn", "models")
    ctl.adopt()
    before = ctl.get()["spec"]["predictor"]["model"]["storageUri"]
    with ctl:
        result = update_storage_uri("maskrcnn", "models", f"{before}/{account}", timeout=30, poll=0.1, kubeconfig=kubeconfig)
    assert result.previous_uri == before and ctl.get()["spec"]["predictor"]["model"]["storageUri"] == f"{before}/{account}"
    failing = IsvcController(str(kube_api.kubeconfig), "maskrcnn", "models", becomes_ready=False)
    failing.adopt()
    with failing, pytest.raises(DeployError, match="BlockedByFailedLoad.*rolled back"):
        update_storage_uri("maskrcnn", "models", f"{before}/broken", timeout=30, poll=0.1, kubeconfig=kubeconfig)
    assert failing.get()["spec"]["predictor"]["model"]["storageUri"] == f"{before}/{account}"

