"""The main job for real: local Ray with 2 CPU workers, the tiny config, the real MLflow server (local stack)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import with_sections
from mlflow.tracking import MlflowClient

from training.checkpoint import load_checkpoint
from maskrcnn.config import Config
from training.ray_main import main
from training.trainer import find_latest_checkpoint, train

pytestmark = pytest.mark.slow


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def three_epochs(ray_cluster, cache_dir, tmp_path_factory, mlflow_stack):
    """One uninterrupted 3-epoch run, shared by the assertions below and the resume comparison."""
    from maskrcnn.config import load_config
    from helpers import TINY

    tmp = tmp_path_factory.mktemp("run3")
    cfg = load_config(TINY, [f"data.cache_dir={cache_dir}", f"ray.storage_path={tmp / 'ray'}", "train.epochs=3",
                             "train.eval_every=2", f"tracking.tracking_uri={mlflow_stack.tracking_uri}"])
    return cfg, train(cfg)


def test_loss_falls_and_checkpoint_holds_everything(three_epochs):
    cfg, result = three_epochs
    client = MlflowClient(result.tracking_uri)
    losses = _history(client, result.run_id, "train_loss")
    assert [s for s, _ in losses] == [0, 1, 2]
    assert losses[-1][1] < losses[0][1], losses
    state = load_checkpoint(result.checkpoint)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "label_map", "metrics"} <= set(state)
    assert Config.from_dict(state["config"]) == cfg
    assert [c["name"] for c in state["label_map"]["categories"]] == ["circle", "square", "triangle"]
    for name in ("config.yaml", "label_map.json", "metrics.json", "checkpoint.pt"):
        assert (Path(result.checkpoint) / name).is_file()
    # num_to_keep=2: Ray keeps the best two of three checkpoints
    assert len([p for p in Path(result.checkpoint).parent.glob("checkpoint_*") if p.is_dir()]) == 2


def test_run_is_tracked_in_mlflow(three_epochs, tmp_path):
    cfg, result = three_epochs
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["model.backbone"] == "mobilenet_v3_small_fpn"
    assert len(run.data.params) > 60  # the whole resolved config, flattened
    assert len(run.data.tags["dataset_hash"]) == 64
    for key in ("lr", "images_per_sec", "train_loss_mask"):
        assert [s for s, _ in _history(client, result.run_id, key)] == [0, 1, 2], key
    # eval_every=2: epoch 1 and the last epoch were evaluated; nothing is logged where nothing was measured
    for key in ("segm_mAP", "bbox_mAP", "mask_iou", "segm_AP_circle"):
        assert [s for s, _ in _history(client, result.run_id, key)] == [1, 2], key
    assert "final_segm_mAP" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "label_map.json", "dataset_stats.json", "checkpoint", "samples"} <= artifacts
    assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}
    samples = [a.path for a in client.list_artifacts(result.run_id, "samples")]
    assert len(samples) == 2 and all(p.endswith(".png") for p in samples)
    version = client.get_model_version(cfg.tracking.model_name, result.model_version)
    assert version.run_id == result.run_id
    assert version.source == result.model_uri and result.model_uri.startswith("models:/m-")
    assert version.tags["dataset_hash"] == run.data.tags["dataset_hash"]
    assert float(version.tags["segm_mAP"]) == pytest.approx(result.metrics["segm_mAP"], abs=1e-6)
    assert Config.from_dict(json.loads(version.tags["config"])) == cfg
    assert len(version.tags["git_commit"]) == 40 and version.tags["run_id"] == result.run_id
    from training.registry import alias_history

    held = [i for i in alias_history(client, cfg.tracking.model_name, "challenger") if i.version == result.model_version]
    assert len(held) == 1 and result.run_id in held[0].reason
    # The registered model is the serving package, weights only, byte for byte what KServe would load
    from maskrcnn.package import open_package
    from training.tracking import download_model

    folder = download_model(result.tracking_uri, f"models:/{cfg.tracking.model_name}/{result.model_version}",
                            tmp_path / "model")
    package = open_package(folder)
    assert set(package.checksums) == {"model.pt", "config.yaml", "label_map.json", "metadata.json", "probe.npz",
                                      "detector.onnx", "reference.json", "MODEL_CARD.md"}
    # the model card: the run's own numbers, with the bootstrap interval the run logged, and the version's description
    card = package.card
    low, high = run.data.metrics["final_segm_mAP_low"], run.data.metrics["final_segm_mAP_high"]
    assert low <= result.metrics["segm_mAP"] <= high
    assert f"| segm mAP | {result.metrics['segm_mAP']:.3f} [{low:.3f}, {high:.3f}] |" in card
    for name in package.label_map.names:
        assert f"| `{name}` | {result.metrics[f'segm_AP_{name}']:.3f} |" in card
    assert f"`{run.data.tags['dataset_hash']}`" in card and f"`{version.tags['git_commit']}`" in card
    assert "embedded synthetic dataset" in card and "## Limitations" in card and "epochs: 3" in card
    assert version.description.startswith("# Model card") and "## Training config" not in version.description
    assert version.description.split("## Provenance")[0] == card.split("## Provenance")[0]
    # the reference: the validation split's statistics and the scored predictions', counted as the predictor does
    from training.data.prepare import prepare_data

    val_images = len(prepare_data(cfg.data, validate=True).val.coco["images"])
    reference = package.reference
    assert reference.images == val_images and reference.stats["brightness"].fractions[-1] == 1.0
    assert reference.detections == round(reference.stats["detections_per_image"].mean * val_images)
    assert not list(folder.rglob("*.pkl")) and not (folder / "MLmodel").exists()
    assert package.metadata["metrics"]["segm_mAP"] == pytest.approx(result.metrics["segm_mAP"], abs=1e-9)
    model = package.build_model()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def _inject_fault(monkeypatch, epoch: int, marker: Path) -> None:
    """The last rank dies once at `epoch`, some time into it, as a lost node would; `marker` is created
    before it dies, so the restarted worker group goes on. Injected through the worker config's
    `on_epoch_start` callback (a nested function: Ray pickles it by value to the workers)."""
    import dataclasses

    import training.trainer as trainer

    real = trainer.make_trainer
    marker_path = str(marker)

    def lose_last_rank_once(at_epoch: int, rank: int, world: int) -> None:
        import logging
        import os
        import time

        if at_epoch != epoch or rank != world - 1 or os.path.exists(marker_path):
            return
        open(marker_path, "w").close()
        time.sleep(3.0)  # after Ray has registered the previous checkpoint
        logging.getLogger("training").warning("fault injection: rank %d exits at epoch %d", rank, at_epoch)
        os._exit(1)

    def with_fault(cfg, worker, run_name, callbacks=None):
        return real(cfg, dataclasses.replace(worker, on_epoch_start=lose_last_rank_once), run_name, callbacks)

    monkeypatch.setattr(trainer, "make_trainer", with_fault)


def test_resume_continues_where_it_stopped(three_epochs, tmp_path, monkeypatch):
    cfg3, full = three_epochs
    cfg = with_sections(cfg3, ray={"storage_path": str(tmp_path / "ray"), "max_failures": 0})
    _inject_fault(monkeypatch, 2, tmp_path / "crashed")
    with pytest.raises(Exception, match="(?i)worker|fail"):
        train(cfg)  # the same 3-epoch run, crashing as epoch 2 starts
    latest = find_latest_checkpoint(str(tmp_path / "ray"), cfg.ray.name)
    assert json.loads((Path(latest) / "metrics.json").read_text())["epoch"] == 1
    first_run = json.loads((Path(latest) / "metrics.json").read_text())["mlflow_run_id"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(first_run).info.status == "FAILED"

    resumed = train(cfg, resume="latest")
    assert resumed.run_id == first_run  # the same MLflow run goes on
    losses = _history(client, resumed.run_id, "train_loss")
    assert [s for s, _ in losses] == [0, 1, 2]
    full_losses = _history(MlflowClient(full.tracking_uri), full.run_id, "train_loss")
    # Same seeds, sampler order, augmentation and sampling streams, optimizer and scheduler state:
    # the numbers of the uninterrupted run, within floating-point noise.
    for (_, a), (_, b) in zip(losses, full_losses):
        assert a == pytest.approx(b, rel=1e-3)
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_lost_worker_restarts_from_the_last_checkpoint(ray_cluster, tiny_config, tmp_path, monkeypatch):
    marker = tmp_path / "worker-lost"
    _inject_fault(monkeypatch, 1, marker)
    result = train(tiny_config)  # ray.max_failures=1: one restart allowed
    assert marker.exists(), "the fault was not injected"
    client = MlflowClient(result.tracking_uri)
    # epoch 0 ran once, the group restarted from its checkpoint, and epoch 1 ran once
    assert [s for s, _ in _history(client, result.run_id, "train_loss")] == [0, 1]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert json.loads((Path(result.checkpoint) / "metrics.json").read_text())["epoch"] in (0, 1)


def test_tune_runs_trials_as_child_runs(ray_cluster, tiny_config):
    from training.tune import tune

    cfg = with_sections(tiny_config, tune={"num_samples": 2, "max_concurrent": 1, "grace_period": 1, "workers_per_trial": 1})
    result = tune(cfg)
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert "best.lr" in parent.data.params
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 2
    for child in children:  # every trial runs both epochs here, or is stopped early and says so
        assert child.info.status == "FINISHED" or "tune.stopped_early" in child.data.tags, child.info
    lrs = {c.data.params["train.lr"] for c in children}
    assert len(lrs) == 2 and float(parent.data.params["best.lr"]) in {float(v) for v in lrs}
    assert result.model_version is not None


def test_cli_reports_a_bad_dataset_and_exits_2(tmp_path, caplog):
    (tmp_path / "annotations.json").write_text("{not json")
    assert main(["--data", str(tmp_path), "--val-data", str(tmp_path)]) == 2
    assert "not valid JSON at line 1" in caplog.text


def test_cli_rejects_an_unknown_field(caplog):
    assert main(["--set", "train.epochz=3"]) == 2
    assert "unknown field(s) ['epochz']" in caplog.text
