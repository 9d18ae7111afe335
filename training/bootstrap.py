"""How sure is "the candidate beats the champion"? A paired bootstrap of segm mAP over validation images.

COCO mAP is not a mean over images, so it cannot be resampled from per-image scores. Each model's
predictions are matched to the ground truth once, image by image, exactly as COCOeval's `evaluateImg`
does (10 IoU thresholds, crowd regions ignored, 100 detections per image, all areas); a resample is then
a multiplicity per image, and COCOeval's `accumulate` is replayed with those multiplicities as weights.
With every image counted once this gives `training.metrics.coco_map`'s segm mAP (tested to 1e-9); with
an image counted twice, the mAP of the split with that image duplicated (tested).

The bootstrap is paired: both models are scored on the same resampled images, so the spread is that of
the difference, not of two independent numbers. The interval is the percentile interval of
candidate - champion over `resamples` resamples drawn with `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_util

from maskrcnn.labels import LabelMap
from maskrcnn.masks import Prediction, segmentation_to_rle

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100
MAX_RESAMPLES = 100_000
ALL_THRESHOLDS = tuple(range(len(IOU_THRESHOLDS)))
SUMMARIES = {"segm_mAP": ALL_THRESHOLDS, "segm_AP50": (0,), "segm_AP75": (5,)}  # metric -> IoU threshold indexes


@dataclass(frozen=True)
class _Category:
    """One category's detections over the split, in COCOeval's accumulate order (score, then image)."""

    image: np.ndarray  # (D,) index of each detection's image
    true: np.ndarray  # (T, D) matched to a ground-truth instance that is not ignored
    false: np.ndarray  # (T, D) matched to nothing (and not ignored)
    ground_truth: np.ndarray  # (N,) instances per image that are not ignored


class ImageMatches:
    """One model's predictions matched to the ground truth, per image and category, ready to be re-weighted."""

    def __init__(self, gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap) -> None:
        self.image_ids = sorted(img["id"] for img in gt["images"])
        index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
        by_image = {int(p["image_id"]): p for p in predictions}
        gts: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for ann in gt["annotations"]:
            gts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
        self.categories: list[_Category] = []
        for cat_id in sorted(label_map.category_ids):
            label = label_map.label_of(cat_id)
            scores, images, true, false = [], [], [], []
            counts = np.zeros(len(self.image_ids), np.int64)
            for image_id in self.image_ids:
                h, w = sizes[image_id]
                anns = gts.get((image_id, cat_id), [])
                pred = by_image.get(image_id)
                dets = ([] if pred is None else
                        [(float(s), m) for s, lab, m in zip(pred["scores"], pred["labels"], pred["masks"]) if int(lab) == label])
                t, f, n = _evaluate_image(anns, dets, h, w)
                counts[index[image_id]] = n
                ranked = sorted((s for s, _ in dets), key=lambda s: -s)[:MAX_DETECTIONS]
                scores.extend(ranked)
                images.extend([index[image_id]] * len(ranked))
                true.append(t)
                false.append(f)
            order = np.argsort(-np.asarray(scores, float), kind="mergesort")
            self.categories.append(_Category(
                image=np.asarray(images, np.int64)[order],
                true=np.concatenate(true, axis=1)[:, order] if true else np.zeros((len(IOU_THRESHOLDS), 0), bool),
                false=np.concatenate(false, axis=1)[:, order] if false else np.zeros((len(IOU_THRESHOLDS), 0), bool),
                ground_truth=counts))

    def segm_map(self, weights: np.ndarray | None = None, thresholds: tuple[int, ...] = ALL_THRESHOLDS) -> float:
        """COCO segm mAP with image i counted `weights[i]` times (default once each), over the IoU thresholds
        of index `thresholds` (default all ten; `(0,)` is AP50, `(5,)` AP75); 0.0 when no category has a
        ground-truth instance, as `training.metrics.coco_map` reports it."""
        weights = np.ones(len(self.image_ids), np.int64) if weights is None else weights
        aps = [ap for ap in (_category_ap(c, weights, thresholds) for c in self.categories) if ap is not None]
        return float(np.mean(aps)) if aps else 0.0


def _evaluate_image(anns: list[dict[str, Any]], dets: list[tuple[float, Any]], h: int,
                    w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """COCOeval's evaluateImg for one image and category, all areas: per IoU threshold, which of the
    score-ranked detections (at most 100) are true and false positives, and how many instances count."""
    gt_ignore = np.array([int(a.get("iscrowd", 0)) for a in anns], np.int64)
    gt_order = np.argsort(gt_ignore, kind="mergesort")  # instances that count first
    anns = [anns[i] for i in gt_order]
    gt_ignore = gt_ignore[gt_order]
    ranked = [dets[i] for i in np.argsort([-s for s, _ in dets], kind="mergesort")][:MAX_DETECTIONS]
    T, D, G = len(IOU_THRESHOLDS), len(ranked), len(anns)
    matched = np.zeros((T, D), bool)
    ignored = np.zeros((T, D), bool)
    if D and G:
        crowd = [int(a.get("iscrowd", 0)) for a in anns]
        g = [segmentation_to_rle(a["segmentation"], h, w) for a in anns]
        d = [segmentation_to_rle(m, h, w) for _, m in ranked]
        ious = np.asarray(mask_util.iou(d, g, crowd)).reshape(D, G)
        for t, threshold in enumerate(IOU_THRESHOLDS):
            taken = np.zeros(G, bool)
            for di in range(D):
                best, m = min(threshold, 1 - 1e-10), -1
                for gi in range(G):
                    if taken[gi] and not crowd[gi]:
                        continue
                    if m > -1 and gt_ignore[m] == 0 and gt_ignore[gi] == 1:
                        break
                    if ious[di, gi] < best:
                        continue
                    best, m = ious[di, gi], gi
                if m == -1:
                    continue
                ignored[t, di] = bool(gt_ignore[m])
                matched[t, di] = True
                taken[m] = True
    return matched & ~ignored, ~matched & ~ignored, int((gt_ignore == 0).sum())


def _category_ap(cat: _Category, weights: np.ndarray, thresholds: tuple[int, ...] = ALL_THRESHOLDS) -> float | None:
    """COCOeval's accumulate for one category with image multiplicities: the mean over IoU thresholds
    and 101 recall points of the interpolated precision; None when no instance counts (COCO's -1)."""
    positives = float((weights * cat.ground_truth).sum())
    if positives == 0:
        return None
    w = weights[cat.image]
    keep = w > 0
    w = w[keep].astype(float)
    if not w.size:
        return 0.0
    tp = np.cumsum(cat.true[:, keep] * w, axis=1)
    fp = np.cumsum(cat.false[:, keep] * w, axis=1)
    recall = tp / positives
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope, right to left
    total = 0.0
    for t in thresholds:
        at = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        total += precision[t, at[at < w.size]].sum()
    return total / (len(thresholds) * len(RECALL_POINTS))


@dataclass(frozen=True)
class Interval:
    """candidate - champion segm mAP on the split (`delta`) and its paired-bootstrap percentile interval."""

    delta: float
    low: float
    high: float
    level: float
    resamples: int
    seed: int
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Interval:
        """The interval `to_dict` wrote (e.g. through a KFP step's output); ValueError names a missing field."""
        missing = [f for f in cls.__dataclass_fields__ if f not in values]
        if missing:
            raise ValueError(f"bootstrap interval: missing {', '.join(missing)}")
        return cls(**{f: (int if f in ("resamples", "seed", "images") else float)(values[f]) for f in cls.__dataclass_fields__})

    def tags(self) -> dict[str, str]:
        """The interval as evidence tags (`segm_map_delta*`, `bootstrap`)."""
        return {"segm_map_delta": f"{self.delta:.6f}", "segm_map_delta_low": f"{self.low:.6f}",
                "segm_map_delta_high": f"{self.high:.6f}",
                "bootstrap": f"paired, {self.resamples} resamples of {self.images} images, seed {self.seed}, level {self.level}"}

    def describe(self) -> str:
        return (f"segm mAP difference {self.delta:+.4f}, {self.level:.0%} interval [{self.low:+.4f}, {self.high:+.4f}] "
                f"(paired bootstrap, {self.resamples} resamples of {self.images} images, seed {self.seed})")


def _check(resamples: int, level: float) -> None:
    if not 1 <= resamples <= MAX_RESAMPLES:
        raise ValueError(f"resamples: expected 1 to {MAX_RESAMPLES}, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected between 0 and 1, got {level}")


def _resamples(n: int, resamples: int, seed: int):
    """`resamples` image multiplicities for a split of `n` images (with replacement), from `seed`."""
    if n == 0:
        raise ValueError("the split has no images to resample")
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, n, n), minlength=n)


def metric_intervals(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap, *, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """One model's percentile bootstrap intervals of segm mAP, AP50 and AP75 over the images of `gt`."""
    _check(resamples, level)
    matches = ImageMatches(gt, predictions, label_map)
    values = {name: np.empty(resamples) for name in SUMMARIES}
    for b, weights in enumerate(_resamples(len(matches.image_ids), resamples, seed)):
        for name, thresholds in SUMMARIES.items():
            values[name][b] = matches.segm_map(weights, thresholds)
    tail = (1 - level) / 2 * 100
    return {name: tuple(float(v) for v in np.percentile(v, [tail, 100 - tail])) for name, v in values.items()}


def paired_bootstrap(gt: dict[str, Any], candidate: list[Prediction], champion: list[Prediction], label_map: LabelMap,
                     *, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """The paired bootstrap of candidate - champion segm mAP over the images of `gt` (see the module)."""
    _check(resamples, level)
    cand, champ = ImageMatches(gt, candidate, label_map), ImageMatches(gt, champion, label_map)
    n = len(cand.image_ids)
    deltas = np.empty(resamples)
    for b, weights in enumerate(_resamples(n, resamples, seed)):
        deltas[b] = cand.segm_map(weights) - champ.segm_map(weights)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Interval(delta=cand.segm_map() - champ.segm_map(), low=float(low), high=float(high), level=level,
                    resamples=resamples, seed=seed, images=n)
