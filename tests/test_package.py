"""The serving package: export from a checkpoint, checksums, and publishing to the real S3 server
(Ceph, from the local stack) and to the GCS emulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from release.publish import PublishError, publish_package
from training.export import CHECKSUM_FILE, PackageError, export_package, load_package, verify_package
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
    assert set(sums) == {"model.pt", "config.yaml", "label_map.json", "metadata.json", "detector.onnx"}
    meta = json.loads((package / "metadata.json").read_text())
    assert meta["model_version"] == "7" and meta["mlflow_run_id"] == "abc" and meta["epoch"] == 4
    model, config, labels = load_package(package)
    assert labels.names == ["cat", "dog"]
    original = torch.load(checkpoint / "checkpoint.pt", weights_only=True)["model"]
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


def test_a_package_naming_unreachable_init_weights_loads_without_network(checkpoint, tmp_path, monkeypatch):
    """A model trained from init weights (a URI only the training cluster could reach) loads in a serving
    pod without egress: the architecture comes from the config, the weights from model.pt, nothing is fetched."""
    import socket

    import yaml

    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["model"].update(weights="https://weights.invalid/coco.pt", backbone_weights="s3://no-such-bucket/imagenet.pt")
    state = torch.load(checkpoint / "checkpoint.pt", weights_only=True)
    state["config"] = config
    torch.save(state, checkpoint / "checkpoint.pt")
    package = export_package(checkpoint, tmp_path / "pkg")

    def no_network(*args, **kwargs):
        raise AssertionError("loading a package opened a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("MASKRCNN_CACHE", str(tmp_path / "empty-cache"))
    model, cfg, _ = load_package(package)
    assert cfg.model.weights == "https://weights.invalid/coco.pt"
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       state["model"]["roi_heads.box_predictor.cls_score.weight"])
    assert not (tmp_path / "empty-cache").exists()


def test_checkpoints_load_as_weights_only(checkpoint):
    """A checkpoint.pt holding a pickled object (code that would run on load) is refused."""
    import pickle

    from training.checkpoint import load_checkpoint

    state = torch.load(checkpoint / "checkpoint.pt", weights_only=True)
    assert load_checkpoint(checkpoint)["epoch"] == 4  # ours load: tensors and plain values only
    state["run_info"] = {"payload": Path("/etc/passwd")}  # any non-allow-listed class
    torch.save(state, checkpoint / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights only"):
        load_checkpoint(checkpoint)


def test_export_command_writes_a_package(checkpoint, tmp_path):
    from training.export import main

    assert main([str(checkpoint), str(tmp_path / "out")]) == 0
    assert set(verify_package(tmp_path / "out")) == {"model.pt", "config.yaml", "label_map.json", "metadata.json",
                                                     "detector.onnx"}
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["epoch"] == 4
    assert main([str(checkpoint), str(tmp_path / "eager"), "--no-onnx"]) == 0
    assert set(verify_package(tmp_path / "eager")) == {"model.pt", "config.yaml", "label_map.json", "metadata.json"}
    assert main([str(tmp_path / "not-a-checkpoint"), str(tmp_path / "out2")]) == 2


def test_stamping_changes_metadata_only(checkpoint, tmp_path):
    from training.export import read_metadata, stamp_package

    package = export_package(checkpoint, tmp_path / "pkg")
    before = verify_package(package)
    stamp_package(package, {"model_version": "12"})
    after = verify_package(package)
    assert read_metadata(package)["model_version"] == "12" and read_metadata(package)["mlflow_run_id"] == "abc"
    assert {k for k in before if before[k] != after[k]} == {"metadata.json"}


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
    assert names == [f"maskrcnn/v2/{n}" for n in sorted(["SHA256SUMS", "config.yaml", "detector.onnx", "label_map.json",
                                                          "metadata.json", "model.pt"])]
    assert uri == "gs://models/maskrcnn/v2"
