"""Score the candidate and the current champion on the same split, from their serving packages: the gate
judges exactly what would be served."""

from __future__ import annotations

import logging
from pathlib import Path

from release.gate import Champion, Evidence
from training.bootstrap import paired_bootstrap
from training.data.coco import CocoSplit
from training.evaluate import evaluate_alias, evaluate_package, metric_summary, write_report
from maskrcnn.package import Package
from training.registry import CHAMPION

log = logging.getLogger(__name__)


def score_candidate_and_champion(package: Package, split: CocoSplit, tracking_uri: str, model_name: str,
                                 report: str | Path | None = None) -> Evidence:
    """The gate's evidence: the candidate's segm/bbox mAP, AP50, mask IoU and recall, and the champion's segm
    mAP and mask IoU (None when there is no comparable champion), both measured with the candidate package's
    evaluation settings, with the paired bootstrap of candidate - champion segm mAP over the split's images.
    `report`: also write the evaluation report there (one HTML page, `training.report`), comparing with the
    champion when there is one."""
    eval_cfg = package.config.eval
    metrics, predictions = evaluate_package(package, split, eval_cfg)
    log.info("candidate: %s", metric_summary(metrics))
    champion = evaluate_alias(tracking_uri, model_name, CHAMPION, split, eval_cfg)
    versus, interval, best = None, None, None
    if champion is not None:
        version, champ, champion_predictions = champion
        versus = (version, champion_predictions)
        interval = paired_bootstrap(split.coco, predictions, champion_predictions, split.label_map,
                                    resamples=eval_cfg.bootstrap_resamples, seed=eval_cfg.bootstrap_seed)
        log.info("candidate - champion v%s: %s", version, interval.describe())
        best = Champion(version, champ["segm_mAP"], champ["mask_iou"])
    if report is not None:
        title = f"{model_name}: the candidate of run {package.metadata.get('mlflow_run_id', '?')}"
        write_report(report, split, predictions, eval_cfg, title, versus, interval)
    return Evidence(metrics["segm_mAP"], metrics["mask_iou"], metrics["bbox_mAP"], metrics["segm_AP50"],
                    metrics.get("mask_recall", 0.0), best, interval)
