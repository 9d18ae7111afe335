"""The admission policy that narrows what the promote step may change (deployment/policy/). The test API
server (kube-apiserver 1.20) is too old to run a ValidatingAdmissionPolicy (GA in 1.30), so it is checked
offline: against Kubernetes' own JSON schema (kubernetes-validate), for coverage against KServe's CRD, and by
evaluating every expression with a CEL interpreter (`common-expression-language`) on the patch a release
makes and on the patches an attacker holding the promoter's token would try."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import cel
import kubernetes_validate
import pytest
import yaml
from helpers import render_kustomization as render

from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"  # the oldest GKE version the README names for the policy is 1.30; its schema is the same
PROMOTER = "system:serviceaccount:models:maskrcnn-promoter"
ALLOWED = {"spec": {"predictor"}, "spec.predictor": {"model", "canaryTrafficPercent"},
           "spec.predictor.model": {"storageUri"}}


@pytest.fixture(scope="module")
def policy() -> dict:
    docs = render("deployment/policy")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises naming the field at fault
    (found,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == found["metadata"]["name"] and "Deny" in binding["spec"]["validationActions"]
    # the storageUri rule reads the placeholder `release placeholders` fills from Terraform's outputs
    assert any("gs://MODELS_BUCKET/models/" in v["expression"] for v in found["spec"]["validations"])
    return yaml.safe_load(yaml.safe_dump(found).replace("MODELS_BUCKET", "models-bucket"))


@pytest.fixture(scope="module")
def served() -> dict:
    """The InferenceService as the production overlay deploys it (with a bucket filled in), serving v1."""
    (isvc,) = [d for d in render("deployment/overlays/production") if d["kind"] == "InferenceService"]
    text = yaml.safe_dump(isvc).replace("MODELS_BUCKET", "models-bucket")
    isvc = yaml.safe_load(text)
    isvc["spec"]["predictor"]["model"]["storageUri"] = "gs://models-bucket/models/maskrcnn/v1"
    return isvc


@functools.cache
def crd_fields(path: str) -> set[str]:
    with open(ROOT / "deployment" / "crds" / "kserve-v0.20.0-inferenceservices.yaml") as f:
        docs = [d for d in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]
    (version,) = [v for v in docs[0]["spec"]["versions"] if v["name"] == "v1beta1"]
    node = version["schema"]["openAPIV3Schema"]
    for part in path.split("."):
        node = node["properties"][part]
    return set(node["properties"])


def verdicts(policy: dict, old: dict, new: dict, username: str = PROMOTER) -> dict[str, bool] | None:
    """Each validation's message -> whether it passes, as the API server would evaluate them (None: the
    policy does not apply to this user)."""
    request = {"userInfo": {"username": username}}
    if not all(cel.evaluate(c["expression"], {"request": request}) for c in policy["spec"]["matchConditions"]):
        return None
    context = {"object": new, "oldObject": old, "request": request}
    variables = {}
    for variable in policy["spec"]["variables"]:
        variables[variable["name"]] = cel.evaluate(variable["expression"], {**context, "variables": variables})
    return {v["message"]: bool(cel.evaluate(v["expression"], {**context, "variables": variables}))
            for v in policy["spec"]["validations"]}


def test_every_field_kserve_defines_is_compared_except_what_a_release_changes(policy):
    """A KServe upgrade that adds a field to the spec fails here until the policy compares it too."""
    text = "\n".join(v["expression"] for v in policy["spec"]["validations"])
    for path, allowed in ALLOWED.items():
        compared = set(re.findall(rf"has\(object\.{re.escape(path)}\.(\w+)\) \? has\(oldObject\.{re.escape(path)}\.\1\)",
                                  text))
        assert compared == crd_fields(path) - allowed, (path, crd_fields(path) - allowed - compared)
        assert compared, path


def test_a_release_passes_and_the_policy_applies_to_the_promoter_only(policy, served):
    release = copy.deepcopy(served)
    release["spec"]["predictor"]["model"]["storageUri"] = "gs://models-bucket/models/maskrcnn/v2"
    release["spec"]["predictor"]["canaryTrafficPercent"] = 10
    release["metadata"].setdefault("annotations", {}).update({VERSION_ANNOTATION: "2", DIGEST_ANNOTATION: "sha256:" + "a" * 64})
    result = verdicts(policy, served, release)
    assert result and all(result.values()), result
    finished = copy.deepcopy(release)
    del finished["spec"]["predictor"]["canaryTrafficPercent"]
    assert all(verdicts(policy, release, finished).values())
    assert verdicts(policy, served, release, username="system:serviceaccount:kubeflow:pipeline-runner") is None


def _set(obj: dict, path: str, value) -> dict:
    changed = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return changed


@pytest.mark.parametrize("path, value, refused", [
    ("spec.predictor.model.args", ["--public-keys", ""], "model.storageUri only"),  # verification off
    ("spec.predictor.model.image", "attacker/predictor:latest", "model.storageUri only"),
    ("spec.predictor.model.env", [{"name": "MASKRCNN_EXPECT_VERSION", "value": ""}], "model.storageUri only"),
    ("spec.predictor.model.runtime", "another-runtime", "model.storageUri only"),
    ("spec.predictor.serviceAccountName", "cluster-admin-sa", "model and canaryTrafficPercent only"),
    ("spec.predictor.containers", [{"name": "sidecar", "image": "attacker/x"}], "model and canaryTrafficPercent only"),
    ("spec.predictor.minReplicas", 0, "model and canaryTrafficPercent only"),
    ("spec.transformer", {"containers": [{"name": "t", "image": "attacker/t"}]}, "spec.predictor only"),
    ("spec.predictor.model.storageUri", "gs://attacker-bucket/models/maskrcnn/v9", "published package under gs://"),
    ("spec.predictor.model.storageUri", "gs://models-bucket/other/v9", "published package under gs://"),
    ("metadata.annotations.serving\\.kserve\\.io/deploymentMode", "RawDeployment", "release annotations only"),
    ("metadata.labels.team", "attacker", "no label"),
], ids=["public-keys-empty", "image", "env", "runtime", "service-account", "sidecar", "replicas", "transformer",
        "outside-bucket", "outside-prefix", "other-annotation", "label"])
def test_every_other_change_by_the_promoter_is_refused(policy, served, path, value, refused):
    if "\\." in path:  # an annotation key with dots
        section, key = path.split(".", 2)[1], path.split(".", 2)[2].replace("\\.", ".")
        changed = copy.deepcopy(served)
        changed["metadata"].setdefault(section, {})[key] = value
    else:
        changed = _set(served, path, value)
    result = verdicts(policy, served, changed)
    failed = [message for message, passed in result.items() if not passed]
    assert len(failed) == 1 and refused in failed[0], result
