"""Every kustomization, rendered with the real `kubectl kustomize`: built-in objects validated against
Kubernetes' own schemas (kubernetes-validate, strict), custom resources checked for the fields the
platform relies on, above all the storageUri path that the pipeline's promote step patches."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import render_kustomization as render

from release.deploy import storage_uri_of

KUSTOMIZATIONS = ["deployment/overlays/production", "deployment/overlays/canary", "deployment/overlays/kubeflow-multi-user",
                  "ray", "mlflow/k8s/overlays/gcs", "mlflow/k8s/overlays/minio", "deployment/retrain"]
ROOT = Path(__file__).resolve().parents[2]
# The custom resources' schemas as KServe and KubeRay publish them (deployment/crds/README.md).
CRDS = {("serving.kserve.io/v1beta1", "InferenceService"): "kserve-v0.20.0-inferenceservices.yaml",
        ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-v0.20.0-servingruntimes.yaml",
        ("ray.io/v1", "RayCluster"): "kuberay-v1.7.0-rayclusters.yaml",
        ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-v0.93.0-podmonitors.yaml",
        ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator-v0.93.0-prometheusrules.yaml",
        ("monitoring.googleapis.com/v1", "PodMonitoring"): "gmp-v0.17.2-podmonitorings.yaml",
        ("monitoring.googleapis.com/v1", "Rules"): "gmp-v0.17.2-rules.yaml"}
MONITORING = ["deployment/monitoring/prometheus-operator", "deployment/monitoring/gke-managed-prometheus"]
K8S_VERSION = "1.31"


def by_kind(objects: list[dict], kind: str, name: str = "") -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and (not name or o["metadata"]["name"] == name)]
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
    # inference threads = the CPU request (no CPU limit, so the process would otherwise see the node's cores)
    threads = container["args"][container["args"].index("--threads") + 1]
    assert threads == str(predictor["model"]["resources"]["requests"]["cpu"]) == str(container["resources"]["requests"]["cpu"])
    assert "cpu" not in predictor["model"]["resources"].get("limits", {})
    assert container["securityContext"]["runAsNonRoot"] is True
    sa = by_kind(objects, "ServiceAccount", predictor["serviceAccountName"])
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def test_the_predictors_limits_and_the_manifests_agree():
    """containerConcurrency is the queue the predictor derives from the pod's memory limit; the
    InferenceService's timeout is its deadline; terminationGracePeriodSeconds outlasts its drain; the
    probes hit the routes whose answers follow the watchdog and the drain."""
    from serving.__main__ import get_args_parser, limits_from
    from serving.limits import queue_for_memory

    objects = render("deployment/overlays/production")
    predictor = by_kind(objects, "InferenceService")["spec"]["predictor"]
    (container,) = by_kind(objects, "ServingRuntime")["spec"]["containers"]
    args = get_args_parser().parse_args(container["args"])
    assert args.host == "0.0.0.0"
    memory = quantity_bytes(predictor["model"]["resources"]["limits"]["memory"])
    args.memory_budget_mb = memory / (1 << 20)
    limits = limits_from(args, fd_limit=1 << 16)
    # the images in flight are pinned to the CPU request, so that the queue beside them is known here
    assert args.inference_workers == args.threads == 2
    assert predictor["containerConcurrency"] == limits.max_queue == \
        queue_for_memory(memory, limits.max_body_bytes, 2, args.max_pixels) == 27
    assert predictor["timeout"] == limits.request_timeout_s
    assert predictor["terminationGracePeriodSeconds"] >= limits.grace_period_s + 5
    readiness, liveness = predictor["model"]["readinessProbe"], predictor["model"]["livenessProbe"]
    assert readiness["httpGet"] == {"path": "/v1/models/maskrcnn", "port": 8080}
    assert liveness["httpGet"] == {"path": "/", "port": 8080}
    # explicit probe time-outs (Kubernetes' default is 1 s), shorter than the period they sit in
    assert all(0 < p["timeoutSeconds"] < p["periodSeconds"] for p in (readiness, liveness))
    # readiness turns at half the forward limit and is probed more often: it fails before liveness does
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) < \
        liveness["periodSeconds"] * liveness.get("failureThreshold", 3) + limits.forward_limit_s / 2


def test_the_predictor_trusts_the_configmaps_keys_and_the_promote_step_signs_with_the_secret():
    """The ServingRuntime's --public-keys is the folder where its ConfigMap volume (required: no pod without
    it) is mounted read-only; the compiled pipeline's promote step mounts the signing Secret where
    $MASKRCNN_SIGNING_KEY_FILE points, and no other step sees it."""
    from devstack.kserve import PUBLIC_KEYS_MOUNT

    runtime = by_kind(render("deployment/overlays/production"), "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    keys = container["args"][container["args"].index("--public-keys") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == keys]
    assert keys == PUBLIC_KEYS_MOUNT and mount["readOnly"] is True
    (volume,) = [v for v in runtime["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"] == {"name": "maskrcnn-signing-public-keys"}  # not optional: fail closed
    compiled = list(yaml.safe_load_all((ROOT / "pipelines" / "maskrcnn_pipeline.yaml").read_text()))
    executors = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_secret = {name: e for name, e in executors.items()
                   if any(s.get("secretName") == "maskrcnn-signing-key" for s in e.get("secretAsVolume", []))}
    assert list(with_secret) == ["exec-promote"]
    (secret,) = with_secret["exec-promote"]["secretAsVolume"]
    env = compiled[0]["deploymentSpec"]["executors"]["exec-promote"]["container"]["env"]
    assert {"name": "MASKRCNN_SIGNING_KEY_FILE", "value": f"{secret['mountPath']}/private.pem"} in env


def test_canary_overlay_splits_traffic():
    isvc = by_kind(render("deployment/overlays/canary"), "InferenceService")
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert storage_uri_of(isvc).endswith("/v2")


def test_promote_role_is_least_privilege():
    """The promoter may touch the one InferenceService, its Deployment and its release Lease (resourceNames);
    the pipeline's account may only mint the promoter's tokens; no pod runs as the promoter."""
    objects = render("deployment/overlays/production")
    role = by_kind(objects, "Role", "inferenceservice-promoter")
    assert role["rules"] == [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "resourceNames": ["maskrcnn"],
         "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["maskrcnn-predictor"], "verbs": ["get"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["maskrcnn-release"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}]
    from release.lease import LEASE_SUFFIX

    assert f"maskrcnn{LEASE_SUFFIX}" == "maskrcnn-release"  # the name release/lease.py gives the Lease
    binding = by_kind(objects, "RoleBinding", "inferenceservice-promoter")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "maskrcnn-promoter", "namespace": "models"}]
    assert by_kind(objects, "ServiceAccount", "maskrcnn-promoter")["automountServiceAccountToken"] is False
    minter = by_kind(objects, "Role", "promoter-token")
    assert minter["rules"] == [{"apiGroups": [""], "resources": ["serviceaccounts/token"],
                                "resourceNames": ["maskrcnn-promoter"], "verbs": ["create"]}]
    assert by_kind(objects, "RoleBinding", "promoter-token")["subjects"][0]["name"] == "pipeline-runner"
    # the pipeline's promote step acts as it
    spec, _ = yaml.safe_load_all((ROOT / "pipelines" / "maskrcnn_pipeline.yaml").read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["promoter_service_account"]["defaultValue"] == "maskrcnn-promoter"


def test_the_serving_runtime_serves_only_what_the_release_promised():
    """The ServingRuntime passes the release's annotations (written by promote with the storageUri) to the
    predictor through the downward API."""
    from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION

    (container,) = by_kind(render("deployment/overlays/production"), "ServingRuntime")["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"MASKRCNN_EXPECT_VERSION": f"metadata.annotations['{VERSION_ANNOTATION}']",
                   "MASKRCNN_EXPECT_DIGEST": f"metadata.annotations['{DIGEST_ANNOTATION}']"}


def test_ray_cluster_runs_the_project_image():
    cluster = by_kind(render("ray"), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["image"] == head["image"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ports["dashboard"] == 8265  # the Jobs API: the pipeline's ray_address http://...-head-svc.ray.svc:8265
    # the Ray of the image, token authentication, probes that need no wget
    locked = (ROOT / "uv.lock").read_text().split('name = "ray"\nversion = "', 1)[1].split('"', 1)[0]
    assert cluster["spec"]["rayVersion"] == locked
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    for group in (cluster["spec"]["headGroupSpec"], workers):
        (container,) = group["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/home/app/.cache"} <= mounts  # the writable places under a read-only root


@cache
def crd_schema(file: str, version: str) -> dict:
    """The CRD's openAPIV3Schema, strict: an object with declared properties accepts no others (what
    `kubectl apply --validate=strict` and the API server's field validation refuse)."""
    crd = yaml.safe_load((ROOT / "deployment" / "crds" / file).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]

    def strict(node):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str) and node["pattern"].startswith("^(?i)"):
                # Go's RE2 takes a flag group anywhere; Python's `re` only at the start: the same pattern
                node["pattern"] = "(?i)^" + node["pattern"][len("^(?i)"):]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return strict(served["schema"]["openAPIV3Schema"])


def custom_resources() -> list[tuple[str, dict]]:
    found = []
    for path in KUSTOMIZATIONS + MONITORING:
        for obj in render(path):
            if (obj["apiVersion"], obj["kind"]) in CRDS:
                found.append((f"{path}:{obj['kind']}", obj))
    return found


@pytest.mark.parametrize("where, obj", custom_resources(), ids=lambda v: v if isinstance(v, str) else "")
def test_custom_resources_are_valid_against_the_published_crds(where, obj):
    schema = crd_schema(CRDS[(obj["apiVersion"], obj["kind"])], obj["apiVersion"].split("/")[1])
    jsonschema.validate(obj, schema)  # raises with the path of the offending field


def test_the_crd_check_can_fail():
    isvc = by_kind(render("deployment/overlays/production"), "InferenceService")
    schema = crd_schema(CRDS[("serving.kserve.io/v1beta1", "InferenceService")], "v1beta1")
    isvc["spec"]["predictor"]["model"]["storageURI"] = "gs://typo"  # a misspelt field
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        jsonschema.validate(isvc, schema)
    isvc["spec"]["predictor"]["model"].pop("storageURI")
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="minReplicas|'one'"):
        jsonschema.validate(isvc, schema)


def pod_specs(objects: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(where, pod-level securityContext holder, containers) of every workload the manifests define."""
    pods = []
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "Deployment":
            pods.append((kind, spec["template"]["spec"], spec["template"]["spec"]["containers"]))
        elif kind == "CronJob":
            template = spec["jobTemplate"]["spec"]["template"]["spec"]
            pods.append((kind, template, template["containers"]))
        elif kind == "RayCluster":
            for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
                pods.append((kind, group["template"]["spec"], group["template"]["spec"]["containers"]))
    runtimes = [o for o in objects if o["kind"] == "ServingRuntime"]
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        (runtime,) = runtimes  # KServe merges the runtime's container into the predictor's pod
        pods.append(("InferenceService", isvc["spec"]["predictor"], runtime["spec"]["containers"]))
    return pods


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_pod_runs_non_root_with_least_privilege(path):
    pods = pod_specs(render(path))
    assert pods, path
    for where, pod, containers in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where  # none of them calls the API server
        for container in containers:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["readOnlyRootFilesystem"] is True, where


def test_network_policies_guard_the_predictor_mlflow_and_ray():
    policies = {}
    for path in ("deployment/overlays/production", "mlflow/k8s/overlays/gcs", "ray"):
        for obj in render(path):
            if obj["kind"] == "NetworkPolicy":
                policies[obj["metadata"]["name"]] = obj
    assert set(policies) == {"maskrcnn-predictor", "mlflow", "ray-cluster"}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["podSelector"]["matchLabels"]
        for rule in policy["spec"]["ingress"]:
            assert all("ipBlock" not in peer for peer in rule["from"])  # no "from anywhere"
    (from_outside,) = [r for r in policies["ray-cluster"]["spec"]["ingress"] if "ports" in r]
    assert from_outside["ports"] == [{"port": 8265, "protocol": "TCP"}]  # only the Jobs API, and it wants the token
    assert policies["mlflow"]["spec"]["ingress"][0]["ports"] == [{"port": 5000, "protocol": "TCP"}]


def test_multi_user_overlay_binds_the_profile_default_editor():
    binding = by_kind(render("deployment/overlays/kubeflow-multi-user"), "RoleBinding", "promoter-token")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor",
                                    "namespace": "kubeflow-user-example-com"}]
    standalone = by_kind(render("deployment/overlays/production"), "RoleBinding", "promoter-token")
    assert standalone["subjects"][0]["name"] == "pipeline-runner"


def test_the_monitoring_resources_carry_the_one_rules_file_and_scrape_the_predictor():
    """The PrometheusRule and GKE's Rules hold exactly deployment/monitoring/rules.yaml's groups (tested by
    promtool in test_monitoring_rules.py); both scrapers select the InferenceService's pods on the port the
    predictor serves /metrics on, and the NetworkPolicy lets exactly those scrapers reach it."""
    groups = yaml.safe_load((ROOT / "deployment" / "monitoring" / "rules.yaml").read_text())["groups"]
    operator, managed = (render(path) for path in MONITORING)
    assert by_kind(operator, "PrometheusRule")["spec"]["groups"] == groups
    assert by_kind(managed, "Rules")["spec"]["groups"] == groups
    isvc = by_kind(render("deployment/overlays/production"), "InferenceService")
    runtime = by_kind(render("deployment/overlays/production"), "ServingRuntime")
    (port,) = [p["containerPort"] for c in runtime["spec"]["containers"] for p in c.get("ports", [])]
    pods = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (endpoint,) = by_kind(operator, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert by_kind(operator, "PodMonitor")["spec"]["selector"]["matchLabels"] == pods
    assert (endpoint["portNumber"], endpoint["path"]) == (port, "/metrics")
    (endpoint,) = by_kind(managed, "PodMonitoring")["spec"]["endpoints"]
    assert by_kind(managed, "PodMonitoring")["spec"]["selector"]["matchLabels"] == pods
    assert (endpoint["port"], endpoint["path"]) == (port, "/metrics")
    policy = by_kind(render("deployment/overlays/production"), "NetworkPolicy")
    scrapers = [rule for rule in policy["spec"]["ingress"] if any("podSelector" in peer for peer in rule["from"])]
    assert len(scrapers) == 1 and {p["port"] for p in scrapers[0]["ports"]} == {port, 9091}
    assert [(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], peer["podSelector"]["matchLabels"])
            for peer in scrapers[0]["from"]] == [("monitoring", {"app.kubernetes.io/name": "prometheus"}),
                                                 ("gmp-system", {"app.kubernetes.io/name": "collector"})]

