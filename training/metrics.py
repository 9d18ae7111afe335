"""COCO mAP (bbox and segm, with per-class AP) and mean mask IoU of matched instances.

mAP comes from faster-coco-eval, a C++ reimplementation of pycocotools' COCOeval that gives the
same numbers (checked in tests/test_metrics.py against pycocotools) several times faster
(benchmarks/coco_eval.py). Predictions are plain dicts so that training, the pipeline and tests
share one format:
`{"image_id": int, "boxes": (N,4) xyxy, "scores": (N,), "labels": (N,) contiguous, "masks": [RLE]}`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_util

from training.data.labels import LabelMap
from training.data.masks import Prediction, segmentation_to_rle

log = logging.getLogger(__name__)

def to_coco_results(predictions: list[Prediction], label_map: LabelMap) -> list[dict[str, Any]]:
    """Our predictions -> COCO result records with dataset category ids and xywh boxes."""
    results = []
    for pred in predictions:
        for box, score, label, rle in zip(pred["boxes"], pred["scores"], pred["labels"], pred["masks"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": int(pred["image_id"]), "category_id": label_map.category_of(int(label)),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score), "segmentation": rle})
    return results


def _per_class_ap(evaluator: COCOeval_faster) -> list[float]:
    precision = evaluator.eval["precision"]  # [T iou thresholds, R recall, K classes, A areas, M max dets]
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(float(p.mean()) if p.size else float("nan"))
    return out


def coco_map(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, label_map: LabelMap,
             coco_gt: COCO | None = None) -> dict[str, float]:
    """AP, AP50, AP75 and per-class AP for `iou_type` ("bbox" or "segm"); 0.0 when there are no results.

    `coco_gt` is `gt` already indexed, for callers that evaluate several IoU types.
    """
    names = {c["id"]: c["name"] for c in gt["categories"]}
    zero = {f"{iou_type}_mAP": 0.0, f"{iou_type}_AP50": 0.0, f"{iou_type}_AP75": 0.0}
    zero.update({f"{iou_type}_AP_{n}": 0.0 for n in label_map.names})
    if not results or not gt["annotations"]:
        return zero
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_gt or COCO(copy.deepcopy(gt))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=log.debug)
        ev.params.catIds = sorted(label_map.category_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]
    out = {f"{iou_type}_mAP": stats[0], f"{iou_type}_AP50": stats[1], f"{iou_type}_AP75": stats[2]}
    for cat_id, ap in zip(ev.params.catIds, _per_class_ap(ev)):
        out[f"{iou_type}_AP_{names[cat_id]}"] = 0.0 if np.isnan(ap) else ap
    return out


def mask_iou(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap,
             score_threshold: float = 0.5, iou_match: float = 0.5) -> dict[str, float]:
    """Mean mask IoU of matched instances, and the share of ground-truth instances matched.

    Per image and class, predictions at or above `score_threshold` are matched greedily by descending
    score to the unmatched non-crowd ground-truth instance of highest IoU, if that IoU >= `iou_match`.
    `mask_iou` is the mean IoU over matched pairs (0.0 when nothing matches); `mask_recall` is
    matched / ground-truth instances.
    """
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    gt_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            gt_by_image.setdefault(ann["image_id"], []).append(ann)
    by_image = {int(p["image_id"]): p for p in predictions}
    ious: list[float] = []
    total = sum(len(v) for v in gt_by_image.values())
    for image_id, anns in gt_by_image.items():
        pred = by_image.get(image_id)
        if pred is None or len(pred["scores"]) == 0:
            continue
        h, w = sizes[image_id]
        for cat_id in {a["category_id"] for a in anns}:
            g = [segmentation_to_rle(a["segmentation"], h, w) for a in anns if a["category_id"] == cat_id]
            label = label_map.label_of(cat_id)
            idx = [i for i in np.argsort(-np.asarray(pred["scores"]), kind="stable")
                   if pred["labels"][i] == label and pred["scores"][i] >= score_threshold]
            if not idx:
                continue
            d = [segmentation_to_rle(pred["masks"][i], h, w) for i in idx]
            table = np.asarray(mask_util.iou(d, g, [0] * len(g))).reshape(len(d), len(g))
            taken = np.zeros(len(g), bool)
            for row in table:
                cand = np.where(taken, -1.0, row)
                j = int(cand.argmax())
                if cand[j] >= iou_match:
                    taken[j] = True
                    ious.append(float(cand[j]))
    return {"mask_iou": float(np.mean(ious)) if ious else 0.0, "mask_recall": len(ious) / total if total else 0.0}


def evaluate_predictions(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap,
                         score_threshold: float = 0.5, iou_match: float = 0.5) -> dict[str, float]:
    """All evaluation metrics for `predictions` against the COCO ground truth `gt`."""
    results = to_coco_results(predictions, label_map)
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
    metrics.update(coco_map(gt, results, "bbox", label_map, coco_gt))
    metrics.update(coco_map(gt, results, "segm", label_map, coco_gt))
    metrics.update(mask_iou(gt, predictions, label_map, score_threshold, iou_match))
    return metrics
