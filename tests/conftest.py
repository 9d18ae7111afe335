"""Shared fixtures: tiny configs, a private dataset cache, hand-built COCO folders, one local Ray."""

from __future__ import annotations

import functools
import os

# Before anything imports Ray: no rebuilt virtualenv for the local Ray's workers under `uv run pytest`
# (training.trainer.init_ray does the same for the CLI).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devstack.procs import free_port
from helpers import SERVING_MAX_BODY, SERVING_MAX_PIXELS, TINY, render_kustomization, square, write_coco
from maskrcnn.config import Config, load_config


def pytest_sessionstart(session: pytest.Session) -> None:
    """The README's one test command sets itself up: the Debian packages the real servers and containers
    need are installed first when missing (as root, or through sudo), or it stops at once with the command."""
    from devstack.provision import ProvisionError, ensure

    try:
        ensure()
    except ProvisionError as exc:
        pytest.exit(str(exc), returncode=4)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole session (the synthetic data is generated once)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MASKRCNN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def mlflow_stack():
    """The real local stack (PostgreSQL, Ceph's S3 gateway, `mlflow server`), started once, on free ports.

    It lives under /tmp (not pytest's 0700 tmp folder): PostgreSQL runs as the `postgres` user when the
    tests run as root, and that user must reach its data folder.
    """
    import shutil
    import tempfile

    from devstack import LocalStack, Ports

    root = Path(tempfile.mkdtemp(prefix="maskrcnn-stack-"))
    root.chmod(0o711)
    stack = LocalStack(root, Ports(postgres=free_port(), s3=free_port(), ceph_mon=free_port(), mlflow=free_port()))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_config(cache_dir: Path, tmp_path: Path, mlflow_stack) -> Config:
    """The tiny config with a private cache and Ray storage under tmp_path, tracked on the real MLflow server."""
    return load_config(TINY, [f"data.cache_dir={cache_dir}", f"ray.storage_path={tmp_path / 'ray'}",
                              f"tracking.tracking_uri={mlflow_stack.tracking_uri}"])


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    """Two 32x32 images, non-contiguous category ids 3 and 17, a polygon, an RLE and a crowd region."""
    from faster_coco_eval.core import mask as mask_util

    m = np.zeros((32, 32), np.uint8)
    m[4:12, 20:30] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    crowd = mask_util.encode(np.asfortranarray(np.pad(np.ones((4, 4), np.uint8), ((24, 4), (24, 4)))))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 10), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 17, "segmentation": {"size": [32, 32], "counts": rle["counts"].decode()}, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 17, "segmentation": {"size": [32, 32], "counts": [0, 32 * 32]}, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 3, "segmentation": {"size": [32, 32], "counts": crowd["counts"].decode()}, "iscrowd": 1},
    ]
    # annotation 3: an uncompressed RLE covering the whole image
    return write_coco(tmp_path / "coco", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                                          {"id": 2, "file_name": "b.png", "width": 32, "height": 32}], anns)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that trains (start-up is ~10 s)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield
    ray.shutdown()


def _wait(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"emulator did not listen on {port}")


@pytest.fixture(scope="module")
def s3_emulator():
    """moto's S3 server (an emulator: the fast tier; the real S3 server is the stack's)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(port, proc)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def gcs_emulator():
    """gcp-storage-emulator: a local GCS endpoint, in memory."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(port, proc)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    proc.terminate()
    proc.wait(10)


KSERVE_CRDS = sorted((Path(__file__).resolve().parents[1] / "deployment" / "crds").glob("kserve-*.yaml"))


@pytest.fixture(scope="session")
def kube_api():
    """A real Kubernetes API server (kube-apiserver 1.20 and etcd on 127.0.0.1, RBAC on) with KServe's CRDs,
    adapted for 1.20 (`devstack.kubeapi.adapt_crd_for_1_20`: their `default: ""` lines dropped, in a copy).
    Built from Debian's source package the first time on a machine (minutes; cached). No controllers run."""
    import shutil
    import tempfile

    from devstack import kubeapi

    root = Path(tempfile.mkdtemp(prefix="maskrcnn-kube-"))
    api = kubeapi.start(root)
    try:
        api.apply_crds(KSERVE_CRDS)
        yield api
    finally:
        api.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class KubeNamespace:
    """One test's namespace on the real API server: `kubeconfig` acts as its `promoter` ServiceAccount (a
    TokenRequest token, bound by the project's own Role from deployment/base/rbac-promote.yaml); `admin`
    is the cluster admin's (for the KServe stand-in and for checks)."""

    api: Any
    namespace: str
    kubeconfig: str
    admin: str


_namespaces = iter(range(1, 1 << 30))


@functools.cache
def _production_overlay() -> list[dict[str, Any]]:
    return render_kustomization("deployment/overlays/production")  # rendered once per session, not per test


def promoter_rbac(namespace: str, subject: dict[str, str]) -> list[dict[str, Any]]:
    """The production overlay's Role and RoleBinding for the promote step, moved to `namespace` and bound
    to `subject` (a ServiceAccount reference)."""
    import copy

    out = []
    for doc in copy.deepcopy(_production_overlay()):
        if doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"] == "inferenceservice-promoter":
            doc["metadata"]["namespace"] = namespace
            if doc["kind"] == "RoleBinding":
                doc["subjects"] = [subject]
            out.append(doc)
    assert len(out) == 2, "the production overlay lost the promote step's Role or RoleBinding"
    return out


@pytest.fixture
def k8s(kube_api, tmp_path) -> KubeNamespace:
    """A fresh namespace on the real API server, with the promote step's ServiceAccount and RBAC in it.
    (Namespaces are never deleted: without kube-controller-manager their deletion never completes.)"""
    import yaml

    namespace = f"t{next(_namespaces)}-{os.getpid()}"
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "promoter", "namespace": namespace}}
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, sa,
            *promoter_rbac(namespace, {"kind": "ServiceAccount", "name": "promoter", "namespace": namespace})]
    kube_api.apply(yaml.safe_dump_all(docs))
    kubeconfig = kube_api.token_kubeconfig(tmp_path / "promoter.kubeconfig", "promoter", namespace)
    return KubeNamespace(kube_api, namespace, str(kubeconfig), str(kube_api.kubeconfig))


@pytest.fixture(scope="session")
def serving_package(tmp_path_factory) -> Path:
    """A serving package of a tiny, untrained but seeded model (it predicts low-score instances)."""
    import torch

    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    cfg = load_config(TINY, [])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    model = build_model(cfg.model, labels.num_classes)
    folder = tmp_path_factory.mktemp("serving") / "package"
    write_package(model, cfg, labels, {"epoch": 0, "metrics": {}, "mlflow_run_id": "r1", "model_version": "7"}, folder)
    return folder


@pytest.fixture(scope="session")
def serving_predictor(serving_package):
    """The predictor on the tiny package, loaded once (threshold 0: the untrained model's detections show).
    The network runs in ONNX Runtime (the package's detector.onnx), as in production."""
    from serving.predictor import MaskRCNNPredictor

    model = MaskRCNNPredictor("maskrcnn", str(serving_package), score_threshold=0.0, max_pixels=SERVING_MAX_PIXELS)
    assert model.load() and model.ready
    return model


@pytest.fixture(scope="session")
def serving_client(serving_predictor):
    """FastAPI's TestClient on the predictor's app (default limits, but a 1 MiB body)."""
    from fastapi.testclient import TestClient

    from serving.app import build_app
    from serving.limits import ServingLimits

    with TestClient(build_app(serving_predictor, ServingLimits(max_body_bytes=SERVING_MAX_BODY)),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    """podman with the two settings these machines need (runc, rlimits), and its Docker-compatible API."""
    from devstack.podman import Podman

    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def platform_image(podman) -> str:
    """The project's image, built from the Dockerfile on a Debian base made offline (mmdebstrap); reused
    while the build context is unchanged. Build time and size go to the test log."""
    import logging

    from training.tracking import git_commit

    tag, seconds = podman.build(git_commit=git_commit())
    logging.getLogger("tests").warning("image %s: built in %.0f s (0: reused), %.2f GB", tag, seconds,
                                       podman.size(tag) / 1e9)
    return tag


@pytest.fixture(scope="session")
def serving_image(podman) -> str:
    """The lean serving image (the Dockerfile's `serving` target: ONNX Runtime, no torch), built as
    `platform_image` is; its build time and size go to the test log."""
    import logging

    from training.tracking import git_commit

    tag, seconds = podman.build_serving(git_commit=git_commit())
    logging.getLogger("tests").warning("image %s: built in %.0f s (0: reused), %.2f GB", tag, seconds,
                                       podman.size(tag) / 1e9)
    return tag


@pytest.fixture(scope="session")
def initializer_image(podman) -> str:
    """KServe's storage initializer (kserve-storage from PyPI) as its own image."""
    return podman.build_storage_initializer()[0]


@pytest.fixture(scope="session")
def ray_nodes(podman, platform_image, mlflow_stack):
    """A Ray head and a worker in two containers of the image (1 CPU each), with token authentication,
    S3 keys and endpoints from the stack (KubeRay: env from a Secret)."""
    from devstack.raynodes import RayNodes

    env = {k: v for k, v in mlflow_stack.env().items() if k.startswith("AWS_")}
    nodes = RayNodes(podman, platform_image, env=env).start(workers=1)
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="session")
def docker_host(podman):
    """podman's Docker-compatible API, for KFP's DockerRunner."""
    host, proc = podman.api()
    try:
        yield host
    finally:
        proc.terminate()
        proc.wait(10)
