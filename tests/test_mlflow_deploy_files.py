"""The files users deploy MLflow with: docker compose (parsed; no Docker engine runs here), the server's
Dockerfile, `.env.example`, and the kustomize manifests (rendered with the real `kubectl kustomize`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import render_kustomization

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose-mlflow.yaml"
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|ACCESS_KEY", re.I)


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == package)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_four_services_with_pinned_images(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "mlflow"}
    assert re.fullmatch(r"postgres:16\.\d+-bookworm", services["postgres"]["image"])
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", services["minio"]["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", services["create-bucket"]["image"])
    for name in ("postgres", "minio"):
        volume = services[name]["volumes"][0].split(":")[0]
        assert volume in compose["volumes"], f"{name} data must be on a named volume"
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["command"] == ["--serve-artifacts"]
    assert "127.0.0.1:5000:5000" in mlflow["ports"]
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "create-bucket": {"condition": "service_completed_successfully"}}
    bucket_cmd = " ".join(compose["services"]["create-bucket"]["command"])
    assert "mc anonymous set none" in bucket_cmd and "mc mb --ignore-existing" in bucket_cmd  # private bucket


def test_no_secret_is_written_in_the_compose_file(compose):
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), f"{key} must come from .env, not {value!r}"
    text = COMPOSE.read_text()
    for line in (ROOT / ".env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#") and SECRET_WORDS.search(line.split("=")[0]):
            assert line.split("=", 1)[1] not in text
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_env_example_defines_every_variable_the_compose_file_reads():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", COMPOSE.read_text()))
    defined = {line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert used and used <= defined, used - defined


def test_server_image_pins_the_locked_versions():
    text = (ROOT / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={locked_version('mlflow')}" in text
    for package in ("psycopg2-binary", "boto3", "google-cloud-storage"):
        assert f'"{package}=={locked_version(package)}"' in text, package
    assert "USER mlflow" in text


@pytest.mark.parametrize("overlay, scheme", [("gcs", "gs://"), ("minio", "s3://")])
def test_kubernetes_manifests_render_and_take_credentials_from_secrets(overlay, scheme):
    objects = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"]): o
               for o in render_kustomization(f"mlflow/k8s/overlays/{overlay}")}
    assert {("Namespace", "mlflow"), ("ServiceAccount", "mlflow"), ("Service", "mlflow"), ("Deployment", "mlflow"),
            ("ConfigMap", "mlflow-artifacts")} <= set(objects)
    deploy = objects[("Deployment", "mlflow")]
    assert deploy["metadata"]["namespace"] == "mlflow"
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {e["name"]: e for e in container["env"]}
    for name, item in env.items():
        if SECRET_WORDS.search(name):
            assert "secretKeyRef" in item.get("valueFrom", {}), f"{name} must come from a Secret"
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://$(DB_USER):$(DB_PASSWORD)@")
    configmap = next(o for (k, n), o in objects.items() if k == "ConfigMap")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]["name"] == configmap["metadata"]["name"]
    assert configmap["data"]["destination"].startswith(scheme)
    service = objects[("Service", "mlflow")]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    annotations = objects[("ServiceAccount", "mlflow")]["metadata"].get("annotations", {})
    assert ("iam.gke.io/gcp-service-account" in annotations) == (overlay == "gcs")
