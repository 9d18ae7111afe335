"""COCO mAP (bbox and segm, with per-class AP) and mean mask IoU of matched instances.

mAP comes from faster-coco-eval, a C++ reimplementation of pycocotools' COCOeval that gives the
same numbers (checked in tests/training/test_metrics.py against pycocotools) several times faster
(benchmarks/coco_eval.py). Predictions are plain dicts so that training, the pipeline and tests
share one format:
`{"image_id": int, "boxes": (N,4) xyxy, "scores": (N,), "labels": (N,) contiguous, "masks": [RLE]}`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_util

from maskrcnn.labels import LabelMap
from maskrcnn.masks import Prediction, segmentation_to_rle

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


CROWD = -2  # a prediction on a crowd region


@dataclass
class Matching:
    """Every prediction of a split, matched once, in the order of the split's images and, within an image,
    of descending score: its score, class, the class of the instance it found (0: none; CROWD: a crowd
    region) and their mask IoU, its image and its index in that image's prediction; and, per image, the
    non-crowd instances (indexes into `instances_of`) that nothing found."""

    scores: np.ndarray
    labels: np.ndarray
    found: np.ndarray
    iou: np.ndarray
    images: np.ndarray
    index: np.ndarray
    missed: dict[int, list[int]]
    instances_of: dict[int, list[dict[str, Any]]]

    @property
    def instances(self) -> int:
        return sum(len(v) for v in self.instances_of.values())

def match(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap, iou_match: float,
          class_aware: bool) -> Matching:
    """The greedy matching of the mask IoU metric and the evaluation report: by descending score, each
    prediction takes the unmatched non-crowd instance (of its class, when `class_aware`) of highest mask IoU
    if that IoU reaches `iou_match`; one that takes none but covers a crowd region by `iou_match` is marked
    CROWD (neither right nor wrong)."""
    anns_of: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        anns_of[ann["image_id"]].append(ann)
    by_image = {int(p["image_id"]): p for p in predictions}
    rows: list[tuple[float, int, int, float, int, int]] = []
    missed: dict[int, list[int]] = {}
    instances_of: dict[int, list[dict[str, Any]]] = {}
    for img in gt["images"]:
        image_id, h, w = img["id"], img["height"], img["width"]
        real = [a for a in anns_of[image_id] if not a.get("iscrowd", 0)]
        crowd = [a for a in anns_of[image_id] if a.get("iscrowd", 0)]
        instances_of[image_id] = real
        gt_labels = np.asarray([label_map.label_of(a["category_id"]) for a in real], int)
        pred = by_image.get(image_id)
        order = np.argsort(-np.asarray(pred["scores"], float), kind="stable") if pred is not None else np.zeros(0, int)
        taken = np.zeros(len(real), bool)
        d = [segmentation_to_rle(pred["masks"][i], h, w) for i in order]
        ious = (np.asarray(mask_util.iou(d, [segmentation_to_rle(a["segmentation"], h, w) for a in real], [0] * len(real)))
                .reshape(len(d), len(real)) if d and real else np.zeros((len(d), 0)))
        on_crowd = (np.asarray(mask_util.iou(d, [segmentation_to_rle(a["segmentation"], h, w) for a in crowd], [1] * len(crowd)))
                    .reshape(len(d), len(crowd)).max(axis=1) >= iou_match if d and crowd else np.zeros(len(d), bool))
        for row, i in enumerate(order):
            label, hit, iou = int(pred["labels"][i]), 0, 0.0
            if real:
                cand = np.where(taken | ((gt_labels != label) if class_aware else False), -1.0, ious[row])
                j = int(cand.argmax())
                if cand[j] >= iou_match:
                    taken[j] = True
                    hit, iou = int(gt_labels[j]), float(cand[j])
            if not hit and on_crowd[row]:
                hit = CROWD
            rows.append((float(pred["scores"][i]), label, hit, iou, image_id, int(i)))
        missed[image_id] = [int(j) for j in np.flatnonzero(~taken)]
    cols = list(zip(*rows)) if rows else [[]] * 6
    return Matching(np.asarray(cols[0], float), np.asarray(cols[1], int), np.asarray(cols[2], int),
                    np.asarray(cols[3], float), np.asarray(cols[4], int), np.asarray(cols[5], int), missed, instances_of)


def above_threshold(predictions: list[Prediction], threshold: float) -> list[Prediction]:
    """The predictions scoring at least `threshold`, image by image."""
    out = []
    for p in predictions:
        keep = [i for i, s in enumerate(p["scores"]) if s >= threshold]
        out.append({**p, "boxes": np.asarray(p["boxes"]).reshape(-1, 4)[keep], "scores": np.asarray(p["scores"])[keep],
                    "labels": np.asarray(p["labels"])[keep], "masks": [p["masks"][i] for i in keep]})
    return out


def mask_iou(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap,
             score_threshold: float = 0.5, iou_match: float = 0.5) -> dict[str, float]:
    """Mean mask IoU of matched instances, and the share of ground-truth instances matched.

    Predictions at or above `score_threshold` are matched by `match` (class-aware, greedy by descending
    score, IoU >= `iou_match`). `mask_iou` is the mean IoU over matched pairs (0.0 when nothing matches);
    `mask_recall` is matched / non-crowd ground-truth instances.
    """
    m = match(gt, above_threshold(predictions, score_threshold), label_map, iou_match, class_aware=True)
    ious = m.iou[m.found > 0]
    total = m.instances
    return {"mask_iou": float(ious.mean()) if ious.size else 0.0, "mask_recall": ious.size / total if total else 0.0}


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
