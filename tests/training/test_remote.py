"""A run for a remote Ray cluster (the Jobs API) is refused before anything starts when its nodes could
not reach its data, its checkpoints or its tracking store. The address is a closed port: nothing may
be contacted before the refusal."""

from __future__ import annotations

import logging

import pytest
from helpers import TINY

from maskrcnn.config import ConfigError, load_config
from training.remote import check_remote, is_jobs_api

CLOSED = "http://127.0.0.1:9"


def test_jobs_api_addresses_are_told_apart():
    assert is_jobs_api("http://raycluster-head-svc.ray.svc:8265") and is_jobs_api("https://ray.example.com")
    assert not is_jobs_api("auto") and not is_jobs_api("ray://head:10001") and not is_jobs_api("")


@pytest.mark.parametrize("overrides, named", [
    (["ray.storage_path=/data/ray"], ["ray.storage_path=/data/ray", "must be s3://bucket/prefix or gs://bucket/prefix"]),
    (["ray.storage_path="], ["(empty: ./ray_results)"]),
    (["data.train=/home/me/coco"], ["data.train=/home/me/coco is a local path"]),
    (["data.val=./val"], ["data.val=./val is a local path"]),
    (["tracking.tracking_uri=sqlite:///mlflow.db"], ["tracking.tracking_uri=sqlite:///mlflow.db is local"]),
    (["tracking.tracking_uri="], ["(empty: ./mlflow.db)"]),
])
def test_local_paths_are_refused_for_a_remote_cluster(overrides, named):
    good = ["ray.storage_path=s3://bucket/ray", "tracking.tracking_uri=http://mlflow:5000", f"ray.address={CLOSED}"]
    check_remote(load_config(TINY, good))  # all remote: accepted
    with pytest.raises(ConfigError) as info:
        check_remote(load_config(TINY, [*good, *overrides]))
    message = str(info.value)
    assert f"cannot train on the Ray cluster at {CLOSED}" in message
    for part in named:
        assert part in message


def test_a_staged_dataset_may_be_local():
    cfg = load_config(TINY, ["ray.storage_path=gs://bucket/ray", "tracking.tracking_uri=https://mlflow.example.com",
                             "data.train=/tmp/prepared/train", f"ray.address={CLOSED}"])
    check_remote(cfg, staged_data=True)  # the train step uploads it to storage_path/datasets/<hash> first
    with pytest.raises(ConfigError, match="data.train"):
        check_remote(cfg)


def test_the_cli_refuses_every_problem_at_once_with_exit_2(tmp_path, caplog, monkeypatch):
    from training.ray_main import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.ERROR)
    code = main(["--config", "tiny", "--address", CLOSED, "--data", str(tmp_path), "--storage-path", str(tmp_path / "ray")])
    assert code == 2
    text = caplog.text
    assert f"data.train={tmp_path} is a local path" in text and f"ray.storage_path={tmp_path / 'ray'}" in text
    assert "tracking.tracking_uri=(empty: ./mlflow.db)" in text
    assert not (tmp_path / "ray").exists()
