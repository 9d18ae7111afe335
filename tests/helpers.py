"""The tests' shared helpers (constants and functions; the fixtures are conftest.py's): tiny configs, COCO
folders written by hand, images encoded, kustomizations rendered, rows read from the stack's PostgreSQL.
Tests import them from here (`from helpers import TINY`), never from conftest."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskrcnn.config import CONFIG_DIR, Config

TINY = CONFIG_DIR / "tiny.yaml"
# `uvx`, as the uv that runs the tests (`uv run` sets $UV): CI may call uv as `python3 -m uv`, with no uvx on PATH
UVX = [os.environ.get("UV") or "uv", "tool", "run"]


def write_coco(root: Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
               categories: list[dict[str, Any]] | None = None, name: str = "annotations.json") -> Path:
    """Write a COCO folder; each image dict may carry `pixels` (HxWx3 uint8) which is saved as its file."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for img in images:
        img = dict(img)
        pixels = img.pop("pixels", None)
        if pixels is None:
            pixels = np.full((img["height"], img["width"], 3), 127, np.uint8)
        Image.fromarray(pixels).save(root / img["file_name"])
        records.append(img)
    cats = categories if categories is not None else [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
    (root / name).write_text(json.dumps({"images": records, "annotations": annotations, "categories": cats}))
    return root


def with_sections(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with fields of some sections replaced: `with_sections(cfg, train={"epochs": 1})`."""
    return cfg.replace(**sections)


def sql_rows(stack, query: str, *args: Any) -> list[tuple]:
    """Rows straight from the stack's PostgreSQL (not through MLflow)."""
    import psycopg2

    pg = stack.postgres
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname=pg.db)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


def square(x: float, y: float, size: float) -> list[list[float]]:
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


# Chromium as the browser tests run it: without its sandbox (the tests may run as root), no requests of its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SERVING_MAX_BODY = 1 << 20
SERVING_MAX_PIXELS = 1_000_000


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    if fmt == "TIFF":
        import tifffile

        tifffile.imwrite(buf, pixels)
    else:
        Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def render_kustomization(path: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from `path` (relative to the repository root)."""
    import shutil

    import yaml

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomizations"
    out = subprocess.run([kubectl, "kustomize", str(Path(__file__).resolve().parents[1] / path)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


ISVC = "maskrcnn"  # the InferenceService the release tests point at the model


def logged_run(client, experiment: str, package) -> str:
    """A run that logged `package` as its model, as training does (the package's config is the tiny one,
    so its validation split is the tiny synthetic one)."""
    from maskrcnn.package import open_package
    from training.tracking import log_package

    exp = client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    run_id = client.create_run(exp.experiment_id).info.run_id
    open_package(package).stamped({"mlflow_run_id": run_id, "dataset_hash": "d" * 64, "git_commit": "c" * 40}).save(package)
    log_package(client, run_id, package)
    return run_id


class FlakyApi:
    """The real client with GETs of the InferenceService failing as told: `fail(n)` is
    the exception for the n-th GET after the patch, or None. The patch and everything else go through."""

    def __init__(self, kubeconfig: str, fail, real=None):
        from release.deploy import custom_objects_api

        self.real, self.fail, self.gets, self.patched = real or custom_objects_api(kubeconfig), fail, 0, False
        self.api_client = self.real.api_client

    def get_namespaced_custom_object(self, *args):
        if self.patched:
            self.gets += 1
            error = self.fail(self.gets)
            if error is not None:
                raise error
        return self.real.get_namespaced_custom_object(*args)

    def patch_namespaced_custom_object(self, *args):
        self.patched = True
        return self.real.patch_namespaced_custom_object(*args)


def unavailable():
    """The API server's 503, as the client raises it."""
    from kubernetes.client.exceptions import ApiException

    return ApiException(status=503, reason="Service Unavailable")
