"""The Terraform for GKE (`infra/gke/`), checked offline: no `terraform` with the Google provider can be
installed here. Every file parses (python-hcl2); checkov passes with only the listed, justified skips;
and what the manifests assume of the cloud is what Terraform makes: the Google service accounts their
Workload Identity annotations name, bound to exactly those Kubernetes ServiceAccounts; the placeholders
they carry; the GPU pool's accelerator and taint against the RayCluster's selector and tolerations (and
the predictor's lack of one); the image repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import UVX
from helpers import render_kustomization as render

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "gke"
CHECKOV = "checkov==3.3.30"  # in its own environment (uvx): it clashes with python-hcl2 over the `hcl2` module
SKIPS = {"CKV_GCP_12", "CKV_GCP_65", "CKV_GCP_6", "CKV_GCP_84", "CKV_GCP_62", "CKV_GCP_125", "CKV_GCP_82"}  # each justified where it is
MANIFESTS = ["deployment/overlays/production", "deployment/overlays/kubeflow-multi-user", "ray", "mlflow/k8s/overlays/gcs",
             "deployment/retrain"]
PLACEHOLDER = re.compile(r"\b(PROJECT|REGION|[A-Z]+_BUCKET)\b")


def by_kind(objects: list[dict], kind: str, all_: bool = False):
    found = [o for o in objects if o["kind"] == kind]
    if all_:
        return found
    (obj,) = found
    return obj


def unquote(value):
    """python-hcl2 keeps string literals' quotes ("\\"models\\""); expressions stay `${...}`."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    return value


@pytest.fixture(scope="module")
def tf() -> dict:
    """Every .tf file parsed and merged: {"resource": {type: {name: body}}, "variable": {...}, "locals": {...}, ...}."""
    import hcl2

    merged: dict = {"resource": {}, "variable": {}, "locals": {}, "output": {}}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as f:
            doc = unquote(hcl2.load(f))
        for block in doc.get("resource", []):
            for kind, named in block.items():
                merged["resource"].setdefault(kind, {}).update(named)
        for key in ("variable", "output"):
            for block in doc.get(key, []):
                merged[key].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        merged.setdefault("files", []).append(path.name)
    return merged


def default(tf: dict, name: str):
    return tf["variable"][name]["default"]


def test_every_file_parses_and_state_stays_out_of_git(tf):
    assert {"versions.tf", "variables.tf", "network.tf", "gke.tf", "storage.tf", "sql.tf", "iam.tf", "outputs.tf",
            "cicd.tf"} <= set(tf["files"])
    tracked = subprocess.run(["git", "ls-files", "infra"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and not [p for p in tracked if p.endswith((".tfstate", ".tfstate.backup", ".tfvars")) or "/.terraform/" in p]
    ignored = (ROOT / ".gitignore").read_text()
    assert "*.tfstate" in ignored and ".terraform/" in ignored
    backend = (INFRA / "versions.tf").read_text()
    assert 'backend "gcs" {}' in backend  # remote state; its bucket is given at `terraform init`


def test_checkov_passes_with_only_the_listed_skips():
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "1"}
    done = subprocess.run([*UVX, "--from", CHECKOV, "checkov", "-d", str(INFRA), "--framework", "terraform",
                           "--skip-download", "--output", "json"],
                          capture_output=True, text=True, env=env, timeout=600)
    report = json.loads(done.stdout)
    summary, results = report["summary"], report["results"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in results.get("failed_checks", [])]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["passed"] >= 80, summary
    skipped = {c["check_id"] for c in results.get("skipped_checks", [])}
    assert skipped == SKIPS, skipped
    for c in results["skipped_checks"]:  # each skip says why
        assert len(c["check_result"].get("suppress_comment", "")) > 20, c


def _annotated_service_accounts() -> dict[str, str]:
    """namespace/name of each Kubernetes ServiceAccount in the manifests -> the Google account id it names."""
    out = {}
    for kustomization in MANIFESTS:
        for sa in by_kind(render(kustomization), "ServiceAccount", all_=True):
            email = sa["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account")
            if email:
                assert email.endswith("@PROJECT.iam.gserviceaccount.com"), email
                out[f"{sa['metadata']['namespace']}/{sa['metadata']['name']}"] = email.split("@")[0]
    return out


def test_workload_identity_binds_exactly_the_manifests_service_accounts(tf):
    identities = tf["locals"]["workload_identities"]
    identities["maskrcnn-pipeline"] = default(tf, "kubeflow_pipeline_service_accounts")
    annotated = _annotated_service_accounts()
    assert annotated == {"models/maskrcnn-predictor": "maskrcnn-predictor", "ray/ray-worker": "maskrcnn-training",
                         "mlflow/mlflow": "mlflow", "kubeflow/maskrcnn-retrain": "maskrcnn-pipeline"}
    for subject, account in annotated.items():
        assert subject in identities[account], (subject, account)
    # the pipeline's steps run as the subjects that may act as the promoter
    bound = {f"{s['namespace']}/{s['name']}" for kustomization in ("deployment/overlays/production",
                                                                    "deployment/overlays/kubeflow-multi-user")
             for rb in by_kind(render(kustomization), "RoleBinding", all_=True)
             if rb["metadata"]["name"] == "promoter-token" for s in rb["subjects"]}
    assert bound | {"kubeflow/maskrcnn-retrain"} == set(identities["maskrcnn-pipeline"]), bound
    # least privilege: roles on buckets only, none project-wide but the nodes' logging and metrics
    roles = {(r["account"], r["bucket"], r["role"]) for r in tf["locals"]["bucket_roles"]}
    assert ("maskrcnn-predictor", "models", "roles/storage.objectViewer") in roles
    assert not [r for r in roles if r[0] == "maskrcnn-predictor" and r[2] != "roles/storage.objectViewer"]
    assert {r[2] for r in roles} <= {"roles/storage.objectViewer", "roles/storage.objectCreator", "roles/storage.objectUser"}
    assert set(tf["locals"]["node_roles"]) == {"roles/logging.logWriter", "roles/monitoring.metricWriter",
                                               "roles/monitoring.viewer", "roles/stackdriver.resourceMetadata.writer"}
    assert "google_project_iam_member" in tf["resource"] and len(tf["resource"]["google_project_iam_member"]) == 1


def test_every_placeholder_in_the_manifests_is_an_output(tf):
    used = set()
    for folder in ("deployment/base", "deployment/overlays", "deployment/retrain", "ray", "mlflow/k8s"):
        for path in (ROOT / folder).rglob("*.yaml"):
            used |= set(PLACEHOLDER.findall(path.read_text()))
    assert used == {"PROJECT", "REGION", "MODELS_BUCKET", "MLFLOW_BUCKET", "RAY_BUCKET"}, used
    outputs = tf["output"]["placeholders"]["value"]
    assert used <= set(outputs)
    buckets = tf["locals"]["buckets"]
    assert set(buckets) == {"models", "mlflow", "ray"}
    assert outputs["MODELS_BUCKET"] == '${google_storage_bucket.main["models"].name}'
    registry = tf["resource"]["google_artifact_registry_repository"]["images"]
    assert registry["repository_id"] == "${var.name}" and default(tf, "name") == "maskrcnn"
    for kustomization in ("deployment/base", "ray", "mlflow/k8s/base", "deployment/retrain"):
        text = (ROOT / kustomization / "kustomization.yaml").read_text()
        assert re.search(r"newName: REGION-docker\.pkg\.dev/PROJECT/maskrcnn/(platform|serving|mlflow)", text), kustomization


def test_buckets_are_private_uniform_and_models_versioned(tf):
    bucket = tf["resource"]["google_storage_bucket"]["main"]
    assert bucket["uniform_bucket_level_access"] is True and bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"][0]["enabled"] == '${each.key == "models" || each.key == "mlflow"}'
    sql = tf["resource"]["google_sql_database_instance"]["mlflow"]["settings"][0]
    assert sql["ip_configuration"][0]["ipv4_enabled"] is False and sql["ip_configuration"][0]["ssl_mode"] == "ENCRYPTED_ONLY"


def test_the_gpu_pool_is_what_the_raycluster_asks_for_and_the_predictor_avoids(tf):
    pools = tf["locals"]["pools"]
    assert set(pools) == {"cpu", "gpu"} and pools["cpu"]["gpu"] == [] and pools["cpu"]["taints"] == []
    assert pools["gpu"]["gpu"] == ["${var.gpu_type}"] and pools["gpu"]["min"] == 0
    (taint,) = pools["gpu"]["taints"]
    assert (taint["key"], taint["effect"]) == ("nvidia.com/gpu", "NO_SCHEDULE")
    node_config = tf["resource"]["google_container_node_pool"]["pool"]["node_config"][0]
    assert node_config["dynamic"]  # the accelerator and the taint come from the pool's entry
    assert node_config["workload_metadata_config"][0]["mode"] == "GKE_METADATA"
    cluster = by_kind(render("ray"), "RayCluster")
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if g["template"]["spec"].get("nodeSelector", {}).get("cloud.google.com/gke-accelerator")]
    assert gpu_groups, "the RayCluster has no GPU worker group"
    for group in gpu_groups:
        spec = group["template"]["spec"]
        assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == default(tf, "gpu_type")
        assert any(t["key"] == taint["key"] and t.get("effect") == "NoSchedule" and t.get("operator") == "Exists"
                   for t in spec["tolerations"]), spec["tolerations"]
    isvc = by_kind(render("deployment/overlays/production"), "InferenceService")
    assert not isvc["spec"]["predictor"].get("tolerations")  # the CPU predictor stays off the GPU nodes
    cluster_tf = tf["resource"]["google_container_cluster"]["main"]
    assert cluster_tf["workload_identity_config"][0]["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert cluster_tf["datapath_provider"] == "ADVANCED_DATAPATH"  # enforces the manifests' NetworkPolicies


def test_the_outputs_fill_every_placeholder_of_a_copy_of_the_manifests(tmp_path):
    import shutil

    from release.placeholders import fill

    for folder in ("deployment", "ray", "mlflow"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.py", "Dockerfile"))
    values = {"PROJECT": "acme-ml", "REGION": "europe-west4", "MODELS_BUCKET": "acme-ml-maskrcnn-models",
              "MLFLOW_BUCKET": "acme-ml-maskrcnn-mlflow", "RAY_BUCKET": "acme-ml-maskrcnn-ray"}
    changed = {p.relative_to(tmp_path).as_posix() for p in fill(values, tmp_path)}
    assert {"deployment/base/inferenceservice.yaml", "deployment/base/serviceaccount.yaml", "ray/serviceaccount.yaml",
            "mlflow/k8s/overlays/gcs/kustomization.yaml", "deployment/retrain/cronjob.yaml"} <= changed
    assert not [c for c in changed if "crds" in c]
    for path in [*tmp_path.rglob("*.yaml")]:
        if "crds" not in path.parts:
            assert not PLACEHOLDER.findall(path.read_text()), path
    text = (tmp_path / "deployment/base/inferenceservice.yaml").read_text()
    assert "storageUri: gs://acme-ml-maskrcnn-models/models/maskrcnn/v1" in text
    assert "maskrcnn-predictor@acme-ml.iam.gserviceaccount.com" in (tmp_path / "deployment/base/serviceaccount.yaml").read_text()
    assert "europe-west4-docker.pkg.dev/acme-ml/maskrcnn/serving" in (tmp_path / "deployment/base/kustomization.yaml").read_text()
    assert "europe-west4-docker.pkg.dev/acme-ml/maskrcnn/platform" in (tmp_path / "deployment/retrain/kustomization.yaml").read_text()
    with pytest.raises(ValueError, match="placeholder 'PROJECT'"):
        fill({"PROJECT": "a b; rm -rf /"}, tmp_path)


def test_only_the_repositorys_production_environment_may_release(tf):
    provider = tf["resource"]["google_iam_workload_identity_pool_provider"]["github"]
    assert provider["oidc"][0]["issuer_uri"] == "https://token.actions.githubusercontent.com"
    assert provider["attribute_condition"] == 'assertion.sub == \\"repo:${var.github_repository}:environment:production\\"'
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    assert release["jobs"]["ship"]["environment"] == "production"  # the sub claim's environment
    roles = {r["role"] for kind in ("google_artifact_registry_repository_iam_member", "google_service_account_iam_member")
             for name, r in tf["resource"][kind].items() if "release" in name}
    assert roles == {"roles/artifactregistry.writer", "roles/iam.workloadIdentityUser", "roles/iam.serviceAccountOpenIdTokenCreator"}
    outputs = tf["output"]["github_actions"]["value"]
    assert set(outputs) == {"GCP_PROJECT", "GCP_REGION", "GCP_WORKLOAD_IDENTITY_PROVIDER", "GCP_RELEASE_SERVICE_ACCOUNT",
                            "BINAUTHZ_ATTESTOR", "BINAUTHZ_KEY_VERSION"}
    for variable in outputs:  # each is a variable release.yml reads
        assert f"vars.{variable}" in (ROOT / ".github" / "workflows" / "release.yml").read_text()


def test_binary_authorization_admits_only_what_the_release_attested(tf):
    """The cluster enforces the project's policy, and the policy is not the default allow-all: images need the
    release attestor's attestation (its key in Cloud KMS, used by the release account alone); the exemptions
    are Google's system images and the listed third-party components."""
    (cluster,) = tf["resource"]["google_container_cluster"].values()
    assert cluster["binary_authorization"][0]["evaluation_mode"] == "PROJECT_SINGLETON_POLICY_ENFORCE"
    policy = tf["resource"]["google_binary_authorization_policy"]["release"]
    (rule,) = policy["default_admission_rule"]
    assert rule["evaluation_mode"] == "REQUIRE_ATTESTATION" and rule["enforcement_mode"] == "ENFORCED_BLOCK_AND_AUDIT_LOG"
    assert rule["require_attestations_by"] == ["${google_binary_authorization_attestor.release.name}"]
    assert policy["global_policy_evaluation_mode"] == "ENABLE"
    assert all(p.endswith("/*") and "maskrcnn" not in p for p in default(tf, "binauthz_allowed_images"))
    keys = tf["resource"]["google_kms_crypto_key"]
    assert keys["attestations"]["purpose"] == keys["packages"]["purpose"] == "ASYMMETRIC_SIGN"
    assert keys["packages"]["version_template"][0]["algorithm"] == "EC_SIGN_ED25519"  # the predictor's Ed25519
    members = {name: b["member"] for name, b in tf["resource"]["google_kms_crypto_key_iam_member"].items()}
    assert members == {"attestations": "serviceAccount:${google_service_account.release.email}",
                       "packages": 'serviceAccount:${google_service_account.workload["maskrcnn-pipeline"].email}'}
    outputs = tf["output"]["github_actions"]["value"]
    assert {"BINAUTHZ_ATTESTOR", "BINAUTHZ_KEY_VERSION"} <= set(outputs)
