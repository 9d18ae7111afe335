"""Library glue the components call: config for a step, evaluation of candidate and champion, and
recording the gate's outcome in MLflow. Kept here so components stay a few lines each."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.config import CONFIG_DIR, Config, load_config

log = logging.getLogger(__name__)


def resolve_tracking(tracking_uri: str) -> str:
    from training.config import TrackingConfig
    from training.tracking import resolve_tracking_uri

    return resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))


def load_step_config(config: str, overrides: list[str], *, data: str = "", val_data: str = "", dataset: str = "",
                     ray_address: str = "", tracking_uri: str = "") -> Config:
    """`config` is a name in training/configs (`default`, `tiny`, `gpu`) or a YAML path; `overrides` are
    `section.field=value` strings. A prepared dataset folder replaces the data source."""
    path = Path(config) if config.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{config}.yaml"
    extra = list(overrides)
    if data:
        extra.append(f"data.train={data}")
    if val_data:
        extra.append(f"data.val={val_data}")
    if dataset:
        extra += [f"data.train={Path(dataset) / 'train'}", f"data.val={Path(dataset) / 'val'}"]
    if ray_address:
        extra.append(f"ray.address={ray_address}")
    if tracking_uri:
        extra.append(f"tracking.tracking_uri={tracking_uri}")
    extra.append("tracking.register=false")  # the promote step registers, only if the gate passes
    return load_config(path, extra)


def evaluate_candidate_and_champion(dataset_dir: str, checkpoint_dir: str, tracking_uri: str,
                                    model_name: str) -> dict[str, Any]:
    from training.data.coco import load_coco
    from training.evaluate import evaluate_alias, evaluate_checkpoint, metric_summary
    from training.registry import CHAMPION

    eval_cfg = load_config(Path(checkpoint_dir) / "config.yaml", []).eval  # the YAML beside checkpoint.pt
    val = load_coco(Path(dataset_dir) / "val")
    metrics, _ = evaluate_checkpoint(checkpoint_dir, val, eval_cfg)
    log.info("candidate: %s", metric_summary(metrics))
    out: dict[str, Any] = {"segm_map": metrics["segm_mAP"], "mask_iou": metrics["mask_iou"], "bbox_map": metrics["bbox_mAP"],
                           "segm_ap50": metrics["segm_AP50"], "mask_recall": metrics.get("mask_recall", 0.0),
                           "champion_version": "", "champion_segm_map": -1.0}
    champion = evaluate_alias(resolve_tracking(tracking_uri), model_name, CHAMPION, val, eval_cfg)
    if champion is not None:
        version, champ = champion
        out.update({"champion_version": version, "champion_segm_map": champ["segm_mAP"],
                    "champion_mask_iou": champ["mask_iou"]})
    return out


def record_gate(tracking_uri: str, run_id: str, promote: bool, reason: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking(tracking_uri))
    client.set_tag(run_id, "gate.decision", "promote" if promote else "reject")
    client.set_tag(run_id, "gate.reason", reason)
    log.info("gate: %s", reason)


def record_rejection(tracking_uri: str, run_id: str, reason: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking(tracking_uri))
    client.set_tag(run_id, "promoted", "false")
    client.log_text(run_id, json.dumps({"promoted": False, "reason": reason}, indent=2), "gate.json")
