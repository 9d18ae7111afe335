"""`release retrain`, the data-arrival trigger, against the real S3 server and MLflow (the dev stack) and
the real `kfp.Client` talking to a stand-in of the KFP API server (`kfp_stand_in`: the API server cannot
run here). One run per new dataset hash: not when the champion was trained on it, not twice when the
CronJob looks again, not twice when two triggers race; a run that cannot start releases its claim."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY
from kfp_stand_in import KfpStandIn
from mlflow.tracking import MlflowClient

from release.retrain import RetrainError, RetrainPlan, retrain
from release.ship import ShipPlan, Shipped, read_release_record, write_release_record
from maskrcnn.config import load_config
from maskrcnn.storage import create_object, list_objects, read_object, upload_object

pytestmark = pytest.mark.slow

PIPELINE_YAML = Path(__file__).resolve().parents[2] / "pipelines" / "maskrcnn_pipeline.yaml"


def upload_synthetic(tmp_path: Path, prefix: str, seed: int) -> str:
    """The tiny synthetic training split (seeded) as a COCO folder under `prefix` on the S3 server."""
    from training.data.synthetic import synthetic_dataset

    cfg = load_config(TINY, [f"data.synthetic.seed={seed}"])
    train_dir, _ = synthetic_dataset(cfg.data.synthetic, tmp_path / f"gen{seed}")
    for path in sorted(p for p in train_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        upload_object(f"{prefix}/{path.relative_to(train_dir).as_posix()}", path)
    return prefix


@pytest.fixture
def setting(mlflow_stack, tmp_path, monkeypatch):
    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASKRCNN_CACHE", str(tmp_path / "cache"))
    root = f"s3://{mlflow_stack.state.models_bucket}/retrain-{time.time_ns()}"
    with KfpStandIn() as kfp:
        import kfp as kfp_sdk

        client = kfp_sdk.Client(host=kfp.url)
        pipeline = client.upload_pipeline(str(PIPELINE_YAML), pipeline_name="maskrcnn-train-gate-serve")
        released = client.upload_pipeline_version(str(PIPELINE_YAML), pipeline_version_name="c0ffee1",
                                                  pipeline_id=pipeline.pipeline_id)
        client.upload_pipeline_version(str(PIPELINE_YAML), pipeline_version_name="newer, never released",
                                       pipeline_id=pipeline.pipeline_id)  # the newest by age: not what retrain runs
        record = f"{root}/release.json"  # as `release ship --record` writes it
        shipped = Shipped("registry.example/platform:c0ffee1", "sha256:" + "a" * 64, PIPELINE_YAML,
                          pipeline.pipeline_id, released.pipeline_version_id)
        write_release_record(ShipPlan(repository="registry.example/platform", commit="c0ffee1", kfp_host=kfp.url,
                                      record=record), shipped)
        assert read_release_record(record)["image"] == "registry.example/platform@sha256:" + "a" * 64

        def plan(data: str, **kwargs) -> RetrainPlan:
            return RetrainPlan(**{"data": data, "claims": f"{root}/claims", "kfp_host": kfp.url, "config": str(TINY),
                                  "tracking_uri": mlflow_stack.tracking_uri, "model_name": f"retrain-{time.time_ns()}",
                                  "params": {"storage_prefix": "s3://models/models"}, "release_record": record, **kwargs})
        kfp.released = released.pipeline_version_id
        yield root, kfp, plan


def test_one_run_per_new_dataset_and_none_for_the_champions(setting, tmp_path, mlflow_stack):
    root, kfp, plan = setting
    v1 = upload_synthetic(tmp_path, f"{root}/data/v1", seed=1)
    first = retrain(plan(v1))
    assert first.action == "started" and len(kfp.runs) == 1
    (run,) = kfp.runs
    params = run["runtime_config"]["parameters"]
    staged = f"{root}/claims/datasets/{first.dataset_hash}/train"
    assert params["data"] == staged and params["val_data"] == "" and params["data_hash"] == first.dataset_hash
    assert params["storage_prefix"] == "s3://models/models" and params["config"] == str(TINY)
    # the version `release ship` recorded, not the newest by age
    assert run["pipeline_version_reference"]["pipeline_version_id"] == kfp.released
    claims = [o.key.rsplit("/", 1)[1] for o in list_objects(f"{root}/claims") if "/datasets/" not in o.key]
    assert claims == [f"{first.dataset_hash}.json"]
    claim = json.loads(read_object(f"{root}/claims/{first.dataset_hash}.json")[0])
    assert claim["run_id"] == first.run_id == run["run_id"] and claim["staged"] == staged

    again = retrain(plan(v1))  # the CronJob's next look: the same data, no second run
    assert again.action == "already claimed" and again.dataset_hash == first.dataset_hash and len(kfp.runs) == 1
    # the live prefix changes after the trigger hashed it: the run's data is the staged copy, byte for byte
    upload_synthetic(tmp_path, v1, seed=9)
    from training.data.prepare import prepare_data

    cfg = load_config(TINY, []).replace(data={"train": staged, "cache_dir": str(tmp_path / "staged")})
    assert prepare_data(cfg.data, validate=True).content_hash == first.dataset_hash

    # two triggers racing on new data: one run
    v2 = upload_synthetic(tmp_path, f"{root}/data/v2", seed=2)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(retrain(plan(v2)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(r.action for r in results) == ["already claimed", "started"] and len(kfp.runs) == 2
    assert results[0].dataset_hash == results[1].dataset_hash != first.dataset_hash

    # the champion was trained on this data: nothing to do, nothing claimed
    v3 = upload_synthetic(tmp_path, f"{root}/data/v3", seed=3)
    name = f"champion-{time.time_ns()}"
    client = MlflowClient(mlflow_stack.tracking_uri)
    client.create_registered_model(name)
    from training.data.prepare import prepare_data

    cfg = load_config(TINY, []).replace(data={"train": v3, "cache_dir": str(tmp_path / "prep")})
    hash_v3 = prepare_data(cfg.data, validate=True).content_hash  # what the pipeline's prepare step records
    version = client.create_model_version(name, f"s3://{mlflow_stack.state.models_bucket}/unused", tags={"dataset_hash": hash_v3})
    client.set_registered_model_alias(name, "champion", version.version)
    kept = retrain(plan(v3, model_name=name))
    assert kept.action == "champion has it" and kept.dataset_hash == hash_v3 and len(kfp.runs) == 2
    assert f"{hash_v3}.json" not in [o.key.rsplit("/", 1)[1] for o in list_objects(f"{root}/claims")]


def test_a_trigger_killed_between_claim_and_run_loses_no_data(setting, tmp_path):
    """A claim written by a trigger that died before starting a run (no run id): honoured for the grace
    period, then taken over by a conditional overwrite, and the data is run, once."""
    from release.retrain import dataset_hash

    root, kfp, plan = setting
    data = upload_synthetic(tmp_path, f"{root}/data/v5", seed=5)
    digest = dataset_hash(plan(data), tmp_path / "hash")
    create_object(f"{root}/claims/{digest}.json", json.dumps({"dataset_hash": digest, "run_id": "",
                                                             "claimed_at": "2026-01-01T00:00:00+00:00"}).encode())
    assert retrain(plan(data, grace_s=10 ** 9)).action == "already claimed" and kfp.runs == []
    results: list = []  # two triggers take it over at once: one run
    threads = [threading.Thread(target=lambda: results.append(retrain(plan(data, grace_s=3600)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(r.action for r in results) == ["already claimed", "started"] and len(kfp.runs) == 1
    claim = json.loads(read_object(f"{root}/claims/{digest}.json")[0])
    assert claim["run_id"] == kfp.runs[0]["run_id"] and claim["took_over"]["claimed_at"] == "2026-01-01T00:00:00+00:00"
    # its run fails: the data is freed after the grace period, and started again (a live run never is)
    assert retrain(plan(data, grace_s=0)).action == "already claimed"  # PENDING: alive
    kfp.runs[0]["state"] = "FAILED"
    assert retrain(plan(data, grace_s=3600)).action == "already claimed"  # within the grace period
    assert retrain(plan(data, grace_s=0)).action == "started" and len(kfp.runs) == 2
    # a run that is gone (Kubeflow forgot it) frees the data too
    kfp.runs.clear()
    assert retrain(plan(data, grace_s=0)).action == "started" and len(kfp.runs) == 1


def test_a_run_that_cannot_start_releases_its_claim_and_bad_data_starts_nothing(setting, tmp_path):
    root, kfp, plan = setting
    v4 = upload_synthetic(tmp_path, f"{root}/data/v4", seed=4)
    with pytest.raises(RetrainError, match="run: .*the release record .* is for pipeline 'maskrcnn-train-gate-serve', "
                                           "not 'missing'.*claim removed"):
        retrain(plan(v4, pipeline_name="missing"))
    assert [o for o in list_objects(f"{root}/claims", allow_empty=True) if "/datasets/" not in o.key] == []
    assert kfp.runs == []
    assert retrain(plan(v4)).action == "started"  # the next look retries, and starts it

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "annotations.json").write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": "nope"}')
    upload_object(f"{root}/data/broken/annotations.json", broken / "annotations.json")
    from release.__main__ import main

    code = main(["--tracking-uri", plan(v4).tracking_uri, "retrain", "--data", f"{root}/data/broken", "--claims",
                 f"{root}/claims", "--kfp-host", kfp.url, "--config", str(TINY), "--release-record", plan(v4).release_record])
    assert code == 2 and len(kfp.runs) == 1
    # no release record: nothing runs (never the newest version by age)
    v6 = upload_synthetic(tmp_path, f"{root}/data/v6", seed=6)
    with pytest.raises(RetrainError, match="field 'pipeline_id' missing"):
        create_object(f"{root}/bad-release.json", b'{"pipeline_name": "maskrcnn-train-gate-serve"}')
        retrain(plan(v6, release_record=f"{root}/bad-release.json"))
    assert len(kfp.runs) == 1
    with pytest.raises(ValueError, match="claims 'claims': expected an s3:// or gs:// prefix"):
        plan(v4, claims="claims")
