"""The serving package: export from a checkpoint, checksums, and publishing to the real S3 server
(Ceph, from the local stack) and to the GCS emulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.publish import PublishError, publish_package
from serving.package import CHECKSUM_FILE, PackageError, export_package, load_package, verify_package
from training.checkpoint import save_checkpoint
from training.data.coco import LabelMap
from training.model import build_model


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from conftest import TINY
    from training.config import load_config

    config = load_config(TINY, [])
    torch.manual_seed(0)
    labels = LabelMap([3, 7], ["cat", "dog"])
    model = build_model(config.model, labels.num_classes)
    return save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=None, scaler=None, epoch=4,
                           config=config, label_map=labels, metrics={"segm_mAP": 0.5},
                           run_info={"mlflow_run_id": "abc"})


def test_export_then_load_gives_the_same_model(checkpoint, tmp_path):
    package = export_package(checkpoint, tmp_path / "pkg", {"model_version": "7"})
    sums = verify_package(package)
    assert set(sums) == {"model.pt", "config.yaml", "label_map.json", "metadata.json"}
    meta = json.loads((package / "metadata.json").read_text())
    assert meta["model_version"] == "7" and meta["mlflow_run_id"] == "abc" and meta["epoch"] == 4
    model, config, labels = load_package(package)
    assert labels.names == ["cat", "dog"]
    original = torch.load(checkpoint / "checkpoint.pt", weights_only=False)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_a_changed_file_is_named(checkpoint, tmp_path):
    package = export_package(checkpoint, tmp_path / "pkg")
    (package / "label_map.json").write_text("{}")
    with pytest.raises(PackageError, match=r"label_map\.json: sha256 .* does not match"):
        verify_package(package)
    (package / CHECKSUM_FILE).unlink()
    with pytest.raises(PackageError, match="SHA256SUMS: missing"):
        load_package(package)


def _s3_env(monkeypatch, stack) -> None:
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_publish_to_s3_uploads_and_verifies(checkpoint, tmp_path, mlflow_stack, monkeypatch):
    _s3_env(monkeypatch, mlflow_stack)
    package = export_package(checkpoint, tmp_path / "pkg")
    uri = publish_package(package, f"s3://{mlflow_stack.state.models_bucket}/maskrcnn/v1/")
    assert uri == f"s3://{mlflow_stack.state.models_bucket}/maskrcnn/v1"
    from training.data.sources import fetch_prefix

    back = fetch_prefix(uri, tmp_path / "cache")
    assert verify_package(back) == verify_package(package)


@pytest.mark.slow
def test_publish_to_a_missing_bucket_fails_clearly(checkpoint, tmp_path, mlflow_stack, monkeypatch):
    _s3_env(monkeypatch, mlflow_stack)
    package = export_package(checkpoint, tmp_path / "pkg")
    with pytest.raises(PublishError, match="uploading the serving package to s3://no-such-bucket/x failed"):
        publish_package(package, "s3://no-such-bucket/x")


def test_publish_to_gcs_emulator(checkpoint, tmp_path, gcs_emulator):
    from training.data.sources import gcs_client

    gcs_client().create_bucket("models")
    package = export_package(checkpoint, tmp_path / "pkg")
    uri = publish_package(package, "gs://models/maskrcnn/v2")
    names = sorted(b.name for b in gcs_client().list_blobs("models", prefix="maskrcnn/v2/"))
    assert names == [f"maskrcnn/v2/{n}" for n in sorted(["SHA256SUMS", "config.yaml", "label_map.json", "metadata.json", "model.pt"])]
    assert uri == "gs://models/maskrcnn/v2"
