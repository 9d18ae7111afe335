"""The files users deploy MLflow with: docker compose (parsed; no Docker engine runs here), the server's
Dockerfile, `.env.example`, and the kustomize manifests (rendered with the real `kubectl kustomize`)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import render_kustomization

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose-mlflow.yaml"
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|ACCESS_KEY", re.I)


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == package)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_five_services_with_pinned_images(compose):
    services = compose["services"]
    assert set(services) == {"check-secrets", "postgres", "minio", "create-bucket", "mlflow"}
    assert services["check-secrets"]["image"] == services["postgres"]["image"]  # no extra image to pull
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
    secrets = [(key, value) for service in compose["services"].values()
               for key, value in (service.get("environment") or {}).items() if SECRET_WORDS.search(key)]
    assert len(secrets) >= 4, secrets  # the check below saw the passwords and keys (POSTGRES_PASSWORD, ...)
    for key, value in secrets:
        assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)), f"{key} must come from .env, not {value!r}"
    text = COMPOSE.read_text()
    examples = [line for line in (ROOT / ".env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#") and SECRET_WORDS.search(line.split("=")[0])]
    assert examples, ".env.example names no secret: nothing was checked"
    for line in examples:
        assert line.split("=", 1)[1] not in text
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def _script(compose, service: str) -> str:
    """A one-shot service's shell script, with compose's `$$` escapes undone (what the container runs)."""
    return " ".join(compose["services"][service]["command"]).replace("$$", "$")


def _env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_the_stack_refuses_the_placeholder_secrets(compose):
    """The check-secrets script, run by a real shell: .env.example's placeholders stop everything that
    depends on it; real secrets let it through."""
    import subprocess

    script = _script(compose, "check-secrets")
    placeholder = subprocess.run(["/bin/sh", "-c", script], env=_env_example(), capture_output=True, text=True)
    assert placeholder.returncode == 1
    assert "POSTGRES_PASSWORD MINIO_ROOT_PASSWORD MLFLOW_S3_SECRET_KEY" in placeholder.stderr
    unset = subprocess.run(["/bin/sh", "-c", script], env={}, capture_output=True, text=True)
    assert unset.returncode == 1 and "POSTGRES_PASSWORD" in unset.stderr
    real = {**_env_example(), "POSTGRES_PASSWORD": "x7Pq9-long-random", "MINIO_ROOT_PASSWORD": "m1n10-long-random",
            "MLFLOW_S3_SECRET_KEY": "s3-long-random-secret"}
    assert subprocess.run(["/bin/sh", "-c", script], env=real, capture_output=True).returncode == 0
    for service in ("postgres", "minio"):
        assert compose["services"][service]["depends_on"]["check-secrets"] == {"condition": "service_completed_successfully"}


def test_mlflow_has_its_own_s3_user_scoped_to_its_bucket(compose):
    import subprocess

    env = compose["services"]["mlflow"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == "${MLFLOW_S3_ACCESS_KEY}" and env["AWS_SECRET_ACCESS_KEY"] == "${MLFLOW_S3_SECRET_KEY}"
    assert not any("MINIO_ROOT" in str(v) for v in env.values())
    script = _script(compose, "create-bucket")
    policy_cmd = next(part for part in script.split(" && ") if part.startswith("printf"))
    out = subprocess.run(["/bin/sh", "-c", policy_cmd.split(" > ")[0]], env={"MLFLOW_BUCKET": "mlflow"},
                         capture_output=True, text=True, check=True).stdout
    statements = json.loads(out)["Statement"]
    assert {r for st in statements for r in st["Resource"]} == {"arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*"}
    assert {a for st in statements for a in st["Action"]} <= {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject",
                                                              "s3:PutObject", "s3:DeleteObject"}
    assert 'mc admin policy attach local mlflow-artifacts --user "${MLFLOW_S3_ACCESS_KEY}"' in script


def test_env_example_defines_every_variable_the_compose_file_reads():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
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
    secrets = {name: item for name, item in env.items() if SECRET_WORDS.search(name)}
    assert "DB_PASSWORD" in secrets, sorted(env)  # the check below saw the database's password, at least
    for name, item in secrets.items():
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
