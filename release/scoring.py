"""Score the candidate and the current champion on the same split, from their serving packages: the gate
judges exactly what would be served."""

from __future__ import annotations

import logging
from typing import Any

from training.data.coco import CocoSplit
from training.evaluate import evaluate_alias, evaluate_package, metric_summary
from training.package import Package
from training.registry import CHAMPION

log = logging.getLogger(__name__)


def score_candidate_and_champion(package: Package, split: CocoSplit, tracking_uri: str,
                                 model_name: str) -> dict[str, Any]:
    """The candidate's segm/bbox mAP, AP50, mask IoU and recall, and the champion's segm mAP and mask IoU
    (`champion_version` empty and `champion_segm_map` -1 when there is no comparable champion), both
    measured with the candidate package's evaluation settings."""
    eval_cfg = package.config.eval
    metrics, _ = evaluate_package(package, split, eval_cfg)
    log.info("candidate: %s", metric_summary(metrics))
    out: dict[str, Any] = {"segm_map": metrics["segm_mAP"], "mask_iou": metrics["mask_iou"], "bbox_map": metrics["bbox_mAP"],
                           "segm_ap50": metrics["segm_AP50"], "mask_recall": metrics.get("mask_recall", 0.0),
                           "champion_version": "", "champion_segm_map": -1.0}
    champion = evaluate_alias(tracking_uri, model_name, CHAMPION, split, eval_cfg)
    if champion is not None:
        version, champ = champion
        out.update({"champion_version": version, "champion_segm_map": champ["segm_mAP"],
                    "champion_mask_iou": champ["mask_iou"]})
    return out
