"""Serving as KServe runs it, in real containers of the real images: KServe's storage initializer
(kserve-storage, its own image) downloads the published storageUri from the S3 server into a volume;
the predictor container (the lean serving image: ONNX Runtime, no torch) runs as uid 1000 with a read-only root filesystem, no capabilities, no new
privileges, and the volume mounted read-only at /mnt/models. Host networking: everything on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request

import numpy as np
import pytest
from helpers import encode_image

from devstack.kserve import initialize_storage, start_predictor
from devstack.podman import HARDENED as HARDENED_ARGS
from devstack.procs import free_port

pytestmark = pytest.mark.slow

def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def served_package(serving_package):
    """The tiny package with a reference (`maskrcnn.reference`) computed on a few synthetic images."""
    from maskrcnn.package import open_package
    from maskrcnn.reference import compute_reference

    package = open_package(serving_package)
    images = [np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8) for i in range(4)]
    empty = {"scores": np.array([]), "labels": np.array([], int)}
    return package.with_reference(compute_reference(images, [empty] * 4, package.label_map.names))


@pytest.fixture(scope="module")
def model_volume(podman, initializer_image, mlflow_stack, serving_package, tmp_path_factory):
    """The storageUri downloaded by KServe's storage initializer into a folder (the pod's emptyDir)."""
    from release.publish import publish_package

    with pytest.MonkeyPatch.context() as mp:
        for key, value in mlflow_stack.env().items():
            mp.setenv(key, value)
        uri = publish_package(served_package(serving_package), f"s3://{mlflow_stack.state.models_bucket}/containers/v7")
    volume = tmp_path_factory.mktemp("mnt-models")
    env = mlflow_stack.storage_initializer_env()
    out = initialize_storage(podman, initializer_image, uri, volume, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
    return uri, volume


def test_storage_initializer_downloads_the_published_package(model_volume, serving_package):
    from maskrcnn.package import open_package

    _, volume = model_volume
    assert open_package(volume).files == served_package(serving_package).files  # every file, byte for byte


def test_storage_initializer_fails_on_a_missing_uri(podman, initializer_image, mlflow_stack, tmp_path):
    out = initialize_storage(podman, initializer_image, f"s3://{mlflow_stack.state.models_bucket}/no-such/prefix",
                             tmp_path, mlflow_stack.storage_initializer_env())
    assert out.returncode == 1 and "storage initialization failed" in out.stderr


@pytest.fixture(scope="module")
def predictor_url(podman, serving_image, model_volume):
    _, volume = model_volume
    port = free_port()
    name = start_predictor(podman, serving_image, volume, port, cpus=1)  # a pod's CPU limit
    try:
        yield f"http://127.0.0.1:{port}", name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_the_predictor_runs_hardened_and_answers_readiness_v1_v2_and_the_page(predictor_url, podman):
    url, name = predictor_url
    # who it runs as, and what it cannot write
    assert podman("exec", name, "id", "-u") == "1000"
    for path in ("/mnt/models/model.pt", "/app/serving/x", "/work/x", "/home/app/x", "/var/tmp/x"):
        out = subprocess.run(["podman", "exec", name, "touch", path], env=podman.env, capture_output=True, text=True)
        assert out.returncode != 0 and "Read-only file system" in out.stderr, (path, out.stderr)
    podman("exec", name, "touch", "/tmp/x")  # the one writable place
    caps = podman("exec", name, "grep", "CapEff", "/proc/1/status")
    assert caps.split()[-1] == "0000000000000000"
    with urllib.request.urlopen(f"{url}/v1/models/maskrcnn", timeout=10) as resp:
        assert json.loads(resp.read())["ready"] is True
    with urllib.request.urlopen(f"{url}/v2/models/maskrcnn/ready", timeout=10) as resp:
        assert resp.status == 200
    # the package's ONNX graph runs in ONNX Runtime, under the read-only root filesystem, on as many
    # threads as the container's CPU limit allows (1 here: one inference worker of one thread), not the
    # host's cores
    logs = subprocess.run(["podman", "logs", name], env=podman.env, capture_output=True, text=True)
    assert "network on ONNX Runtime (inference workers 1, threads per image 1)" in logs.stdout + logs.stderr, \
        (logs.stdout + logs.stderr)[-2000:]
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:60, 30:80] = 255
    b64 = base64.b64encode(encode_image(image)).decode()
    status, v1 = _post(f"{url}/v1/models/maskrcnn:predict", {"instances": [{"image": {"b64": b64}}]})
    assert status == 200 and len(v1["predictions"]) == 1 and isinstance(v1["predictions"][0], dict), v1
    status, v2 = _post(f"{url}/v2/models/maskrcnn/infer", {"id": "1", "inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]})
    assert status == 200 and v2["model_name"] == "maskrcnn" and v2["outputs"]
    with urllib.request.urlopen(f"{url}/ui", timeout=10) as resp:
        page = resp.read().decode()
    assert resp.status == 200 and "/v1/models/${encodeURIComponent(MODEL)}:predict" in page and "circle" in page
    # an oversized body is refused by the container too
    status, _ = _post(f"{url}/v1/models/maskrcnn:predict", {"instances": [{"image": {"b64": "A" * (40 << 20)}}]})
    assert status in (400, 413)


def test_with_public_keys_the_predictor_container_serves_signed_packages_only(podman, serving_image, model_volume,
                                                                              serving_package, tmp_path):
    """The public keys mounted read-only as the ServingRuntime mounts its ConfigMap: the package KServe's
    storage initializer downloaded (unsigned) never becomes ready and the container says why; the same
    package signed by the matching key is served."""
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from devstack.procs import StackError
    from maskrcnn.package import open_package

    key = Ed25519PrivateKey.generate()
    keys = tmp_path / "configmap"
    keys.mkdir()
    (keys / "current.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    keys.chmod(0o755)
    _, volume = model_volume
    with pytest.raises(StackError, match=r"exited:[\s\S]*not serving /mnt/models: /mnt/models/SHA256SUMS\.sig: missing"):
        start_predictor(podman, serving_image, volume, free_port(), public_keys=keys)
    signed = open_package(volume).signed(key).save(tmp_path / "signed")
    for path in (signed, *signed.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # as the storage initializer leaves them: readable by uid 1000
    name = start_predictor(podman, serving_image, signed, free_port(), public_keys=keys)
    try:
        assert "probe matched, signed by key" in podman.logs(name)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    shutil.rmtree(signed)


def test_the_serving_image_is_lean_and_refuses_a_package_without_a_graph(podman, serving_image, serving_package,
                                                                        tmp_path):
    """The serving image holds no torch, torchvision, CUDA libraries or Triton and weighs under 1 GB (the
    platform image: 7.5 GB). A package without a graph (served eagerly by the platform image) is refused
    at start, and the container says which image serves it."""
    from devstack.procs import StackError
    from maskrcnn.package import open_package
    from training.export import write_package

    assert podman.size(serving_image) < 1e9, podman.size(serving_image)
    found = podman("run", "--rm", *HARDENED_ARGS, serving_image, "python", "-c",
                   "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'triton', 'nvidia', "
                   "'cv2', 'ray', 'mlflow') if u.find_spec(m)])")
    assert found == "[]"
    package = open_package(serving_package)
    eager = write_package(package.build_model(), package.config, package.label_map, package.metadata, onnx=False)
    folder = eager.save(tmp_path / "eager")
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    with pytest.raises(StackError, match=r"exited:[\s\S]*/mnt/models/model\.pt: this image has no PyTorch, so it "
                                         r"serves only packages with a graph \(detector\.onnx\); serve this one with "
                                         r"the platform image \(REGION-docker\.pkg\.dev/PROJECT/maskrcnn/platform"):
        start_predictor(podman, serving_image, folder, free_port(), timeout=60)


def test_every_dashboard_panel_has_data_from_a_real_prometheus_scraping_the_container(predictor_url, tmp_path):
    """deployment/monitoring/grafana/dashboard.json: a real Prometheus with the project's rules (evaluated every
    second, windows unchanged) scrapes the predictor container, as KServe runs it, under a bounded load of six
    requests; then every panel's query returns data through Prometheus' HTTP API."""
    import time
    from pathlib import Path

    from devstack import monitoring

    url, _ = predictor_url
    dashboard = json.loads((Path(monitoring.RULES).parent / "grafana" / "dashboard.json").read_text())
    rules = monitoring.time_scaled_rules(monitoring.RULES, tmp_path / "rules.yaml", {}, min_count=100)
    mon = monitoring.start(tmp_path / "mon", [url.removeprefix("http://")], [rules])
    try:
        deadline = time.monotonic() + 30
        while not mon.targets_up():
            assert time.monotonic() < deadline, "Prometheus never scraped the container"
            time.sleep(0.5)
        image = np.random.default_rng(7).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        for _ in range(6):
            status, _ = _post(f"{url}/v1/models/maskrcnn:predict",
                              {"instances": [{"image": {"b64": base64.b64encode(encode_image(image)).decode()}}]})
            assert status == 200
            time.sleep(0.5)
        time.sleep(4)  # a few more scrapes and rule evaluations
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if not mon.query(target["expr"]):
                    empty.append((panel["title"], target["expr"]))
        assert not empty, f"panels whose query returned no data: {empty}"
    finally:
        mon.stop()

