"""`release retrain`, the data-arrival trigger, against the real S3 server and MLflow (the dev stack) and
the real `kfp.Client` talking to a stand-in of the KFP API server (`kfp_stand_in`: the API server cannot
run here). One run per new dataset hash: not when the champion was trained on it, not twice when the
CronJob looks again, not twice when two triggers race; a run that cannot start releases its claim."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import TINY
from kfp_stand_in import KfpStandIn
from mlflow.tracking import MlflowClient

from release.retrain import RetrainError, RetrainPlan, retrain
from training.config import load_config
from training.data.sources import list_objects, upload_object

pytestmark = pytest.mark.slow

PIPELINE_YAML = Path(__file__).resolve().parents[1] / "pipelines" / "maskrcnn_pipeline.yaml"


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

        kfp_sdk.Client(host=kfp.url).upload_pipeline(str(PIPELINE_YAML), pipeline_name="maskrcnn-train-gate-serve")

        def plan(data: str, **kwargs) -> RetrainPlan:
            return RetrainPlan(**{"data": data, "claims": f"{root}/claims", "kfp_host": kfp.url, "config": str(TINY),
                                  "tracking_uri": mlflow_stack.tracking_uri, "model_name": f"retrain-{time.time_ns()}",
                                  "params": {"storage_prefix": "s3://models/models"}, **kwargs})
        yield root, kfp, plan


def test_one_run_per_new_dataset_and_none_for_the_champions(setting, tmp_path, mlflow_stack):
    root, kfp, plan = setting
    v1 = upload_synthetic(tmp_path, f"{root}/data/v1", seed=1)
    first = retrain(plan(v1))
    assert first.action == "started" and len(kfp.runs) == 1
    (run,) = kfp.runs
    params = run["runtime_config"]["parameters"]
    assert params["data"] == v1 and params["storage_prefix"] == "s3://models/models" and params["config"] == str(TINY)
    newest = max(kfp.versions.values(), key=lambda v: v["created_at"])
    assert run["pipeline_version_reference"]["pipeline_version_id"] == newest["pipeline_version_id"]
    assert [o.key.rsplit("/", 1)[1] for o in list_objects(f"{root}/claims")] == [f"{first.dataset_hash}.json"]

    again = retrain(plan(v1))  # the CronJob's next look: the same data, no second run
    assert again.action == "already claimed" and again.dataset_hash == first.dataset_hash and len(kfp.runs) == 1

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


def test_a_run_that_cannot_start_releases_its_claim_and_bad_data_starts_nothing(setting, tmp_path):
    root, kfp, plan = setting
    v4 = upload_synthetic(tmp_path, f"{root}/data/v4", seed=4)
    with pytest.raises(RetrainError, match="run: .*no pipeline named 'missing'.*claim removed"):
        retrain(plan(v4, pipeline_name="missing"))
    assert list_objects(f"{root}/claims", allow_empty=True) == [] and kfp.runs == []
    assert retrain(plan(v4)).action == "started"  # the next look retries, and starts it

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "annotations.json").write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": "nope"}')
    upload_object(f"{root}/data/broken/annotations.json", broken / "annotations.json")
    from release.__main__ import main

    code = main(["--tracking-uri", plan(v4).tracking_uri, "retrain", "--data", f"{root}/data/broken", "--claims",
                 f"{root}/claims", "--kfp-host", kfp.url, "--config", str(TINY)])
    assert code == 2 and len(kfp.runs) == 1
    with pytest.raises(ValueError, match="claims 'claims': expected an s3:// or gs:// prefix"):
        plan(v4, claims="claims")
