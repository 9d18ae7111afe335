"""The serving package: export from a checkpoint, the one reader and writer, and publishing to the real S3
server (Ceph, from the local stack) and to the GCS emulator. Hostile packages: tests/maskrcnn/test_bad_packages.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from release.publish import PublishError, publish_package
from training.checkpoint import save_checkpoint
from training.export import export_checkpoint
from maskrcnn.package import CHECKSUM_FILE, FORMAT_VERSION, PackageError, open_package
from maskrcnn.labels import LabelMap
from maskrcnn.model import build_model


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from helpers import TINY
    from maskrcnn.config import load_config

    config = load_config(TINY, [])
    torch.manual_seed(0)
    labels = LabelMap([3, 7], ["cat", "dog"])
    model = build_model(config.model, labels.num_classes)
    return save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=None, scaler=None, epoch=4,
                           config=config, label_map=labels, metrics={"segm_mAP": 0.5},
                           run_info={"mlflow_run_id": "abc"})


def test_export_then_load_gives_the_same_model(checkpoint, tmp_path):
    written = export_checkpoint(checkpoint, tmp_path / "pkg", {"model_version": "7"})
    package = open_package(tmp_path / "pkg")
    assert set(package.checksums) == {"model.pt", "config.yaml", "label_map.json", "metadata.json", "probe.npz",
                                      "detector.onnx"}
    assert package.files == written.files  # what was written is what is read, byte for byte
    meta = json.loads((tmp_path / "pkg" / "metadata.json").read_text())
    assert meta["model_version"] == "7" and meta["mlflow_run_id"] == "abc" and meta["epoch"] == 4
    assert meta["format_version"] == FORMAT_VERSION == package.metadata["format_version"]
    assert package.label_map.names == ["cat", "dog"] and package.version == "7"
    original = torch.load(checkpoint / "checkpoint.pt", weights_only=True)["model"]
    for key, value in package.build_model().state_dict().items():
        assert torch.equal(value, original[key]), key


def test_a_changed_file_is_named(checkpoint, tmp_path):
    export_checkpoint(checkpoint, tmp_path / "pkg")
    package = tmp_path / "pkg"
    (package / "label_map.json").write_text("{}")
    with pytest.raises(PackageError, match=r"pkg/label_map\.json: sha256 .* does not match"):
        open_package(package)
    (package / CHECKSUM_FILE).unlink()
    with pytest.raises(PackageError, match="SHA256SUMS: missing"):
        open_package(package)


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
    export_checkpoint(checkpoint, tmp_path / "pkg")

    def no_network(*args, **kwargs):
        raise AssertionError("loading a package opened a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("MASKRCNN_CACHE", str(tmp_path / "empty-cache"))
    package = open_package(tmp_path / "pkg")
    model, cfg = package.build_model(), package.config
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
    assert set(open_package(tmp_path / "out").checksums) == {"model.pt", "config.yaml", "label_map.json",
                                                              "metadata.json", "probe.npz", "detector.onnx"}
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["epoch"] == 4
    assert main([str(checkpoint), str(tmp_path / "eager"), "--no-onnx"]) == 0
    assert set(open_package(tmp_path / "eager").checksums) == {"model.pt", "config.yaml", "label_map.json",
                                                                "metadata.json", "probe.npz"}
    assert main([str(tmp_path / "not-a-checkpoint"), str(tmp_path / "out2")]) == 2


def test_stamping_changes_metadata_only(checkpoint, tmp_path):
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    stamped = package.stamped({"model_version": "12"})
    stamped.save(tmp_path / "pkg")
    after = open_package(tmp_path / "pkg")
    assert after.metadata["model_version"] == "12" and after.metadata["mlflow_run_id"] == "abc"
    assert {k for k in package.checksums if package.checksums[k] != after.checksums[k]} == {"metadata.json"}


def _s3_env(monkeypatch, stack) -> None:
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_publish_to_s3_uploads_and_verifies(checkpoint, tmp_path, mlflow_stack, monkeypatch):
    _s3_env(monkeypatch, mlflow_stack)
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    uri = publish_package(package, f"s3://{mlflow_stack.state.models_bucket}/maskrcnn/v1/")
    assert uri == f"s3://{mlflow_stack.state.models_bucket}/maskrcnn/v1"
    from maskrcnn.storage import fetch_prefix

    back = fetch_prefix(uri, tmp_path / "cache")
    assert open_package(back).files == package.files


@pytest.mark.slow
def test_a_published_version_is_immutable_on_s3(checkpoint, tmp_path, mlflow_stack, monkeypatch):
    """Publishing the same bytes again is a no-op; other bytes (here: other metadata) are refused and the
    version keeps its files; a key written meanwhile by someone else is not overwritten (S3 If-None-Match)."""
    from maskrcnn.storage import ObjectExists, create_object, list_objects

    _s3_env(monkeypatch, mlflow_stack)
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    uri = f"s3://{mlflow_stack.state.models_bucket}/immutable/v1"
    publish_package(package, uri)
    before = {o.key: o.etag for o in list_objects(uri)}
    assert publish_package(package, uri) == uri  # the same bytes: nothing written
    with pytest.raises(PublishError, match=r"already holds a different serving package \(differing: SHA256SUMS, "
                                           r"metadata\.json\); a published version is immutable"):
        publish_package(package.stamped({"model_version": "other"}), uri)
    assert {o.key: o.etag for o in list_objects(uri)} == before
    with pytest.raises(ObjectExists, match="already exists"):
        create_object(f"{uri}/metadata.json", b"{}")
    assert {o.key: o.etag for o in list_objects(uri)} == before


@pytest.mark.slow
def test_publish_to_a_missing_bucket_fails_clearly(checkpoint, tmp_path, mlflow_stack, monkeypatch):
    _s3_env(monkeypatch, mlflow_stack)
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    with pytest.raises(PublishError, match="uploading the serving package to s3://no-such-bucket/x failed"):
        publish_package(package, "s3://no-such-bucket/x")


def test_publish_to_gcs_emulator(checkpoint, tmp_path, gcs_emulator):
    from maskrcnn.storage import gcs_client

    gcs_client().create_bucket("models")
    package = export_checkpoint(checkpoint, tmp_path / "pkg").signed(_key())
    uri = publish_package(package, "gs://models/maskrcnn/v2")
    names = sorted(b.name for b in gcs_client().list_blobs("models", prefix="maskrcnn/v2/"))
    assert names == [f"maskrcnn/v2/{n}" for n in sorted(["SHA256SUMS", "SHA256SUMS.sig", "config.yaml", "detector.onnx",
                                                          "label_map.json", "metadata.json", "model.pt", "probe.npz"])]
    assert uri == "gs://models/maskrcnn/v2"
    assert publish_package(package, uri) == uri  # again, the same bytes: a no-op
    with pytest.raises(PublishError, match="already holds a different serving package"):
        publish_package(package.stamped({"model_version": "other"}), uri)
    with pytest.raises(PublishError, match=r"already holds a different serving package .*SHA256SUMS\.sig"):
        publish_package(package.stamped({}).signed(_key()), uri)  # the same files, signed by another key


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def test_concurrent_fetches_of_one_prefix_share_one_download(checkpoint, tmp_path, gcs_emulator):
    """Two workers of one node fetch the same remote package at once: one downloads, the other waits on
    the cache entry's lock and reads the same complete folder (they used to share one `.partial` folder)."""
    from concurrent.futures import ThreadPoolExecutor

    from maskrcnn import storage as sources

    sources.gcs_client().create_bucket("shared")
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    publish_package(package, "gs://shared/p/v1")
    calls = []
    real = sources._GCS.download

    def counted(self, bucket, key, dest):
        calls.append(key)
        real(self, bucket, key, dest)

    sources.SCHEMES["gs"].download = counted.__get__(sources.SCHEMES["gs"])
    try:
        with ThreadPoolExecutor(4) as pool:
            folders = list(pool.map(lambda _: sources.fetch_prefix("gs://shared/p/v1", tmp_path / "cache"), range(4)))
    finally:
        del sources.SCHEMES["gs"].download
    assert len(set(folders)) == 1 and sorted(calls) == sorted(f"p/v1/{n}" for n in package.files)
    assert open_package(folders[0]).files == package.files
    assert [p.name for p in folders[0].parent.iterdir() if ".partial" in p.name] == []


def test_a_remote_package_is_bounded_from_its_listing_before_any_download(checkpoint, tmp_path, gcs_emulator):
    """An object that does not belong (or is over its file's limit) refuses the prefix from the listing,
    before anything is downloaded into the cache."""
    from maskrcnn.storage import gcs_client

    gcs_client().create_bucket("planted")
    package = export_checkpoint(checkpoint, tmp_path / "pkg")
    publish_package(package, "gs://planted/m/v1")
    gcs_client().bucket("planted").blob("m/v1/huge.bin").upload_from_string(b"x" * 1000)
    with pytest.raises(PackageError, match=r"gs://planted/m/v1/huge\.bin: not part of a serving package"):
        open_package("gs://planted/m/v1", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.pt"))
