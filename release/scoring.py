"""Score the candidate and the current champion on the same split, from their serving packages: the gate
judges exactly what would be served."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.bootstrap import paired_bootstrap
from training.data.coco import CocoSplit
from training.evaluate import evaluate_alias, evaluate_package, metric_summary, write_report
from training.package import Package
from training.registry import CHAMPION

log = logging.getLogger(__name__)


def score_candidate_and_champion(package: Package, split: CocoSplit, tracking_uri: str, model_name: str,
                                 report: str | Path | None = None) -> dict[str, Any]:
    """The candidate's segm/bbox mAP, AP50, mask IoU and recall, and the champion's segm mAP and mask IoU
    (`champion_version` empty and `champion_segm_map` -1 when there is no comparable champion), both
    measured with the candidate package's evaluation settings; with a champion, `interval` is the paired
    bootstrap of candidate - champion segm mAP over the split's images (`training.bootstrap.Interval`'s
    fields; empty without a champion). `report`: also write the evaluation report there (one HTML page,
    `training.report`), comparing with the champion when there is one."""
    eval_cfg = package.config.eval
    metrics, predictions = evaluate_package(package, split, eval_cfg)
    log.info("candidate: %s", metric_summary(metrics))
    out: dict[str, Any] = {"segm_map": metrics["segm_mAP"], "mask_iou": metrics["mask_iou"], "bbox_map": metrics["bbox_mAP"],
                           "segm_ap50": metrics["segm_AP50"], "mask_recall": metrics.get("mask_recall", 0.0),
                           "champion_version": "", "champion_segm_map": -1.0, "interval": {}}
    champion = evaluate_alias(tracking_uri, model_name, CHAMPION, split, eval_cfg)
    versus, interval = None, None
    if champion is not None:
        version, champ, champion_predictions = champion
        versus = (version, champion_predictions)
        interval = paired_bootstrap(split.coco, predictions, champion_predictions, split.label_map,
                                    resamples=eval_cfg.bootstrap_resamples, seed=eval_cfg.bootstrap_seed)
        log.info("candidate - champion v%s: %s", version, interval.describe())
        out.update({"champion_version": version, "champion_segm_map": champ["segm_mAP"],
                    "champion_mask_iou": champ["mask_iou"], "interval": interval.to_dict()})
    if report is not None:
        title = f"{model_name}: the candidate of run {package.metadata.get('mlflow_run_id', '?')}"
        write_report(report, split, predictions, eval_cfg, title, versus, interval)
    return out
