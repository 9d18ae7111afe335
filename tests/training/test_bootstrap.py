"""The gate's noise: the paired bootstrap of candidate - champion segm mAP (training.bootstrap), on constructed
predictions whose answer is known, and its replay of COCOeval checked against faster-coco-eval itself."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from release.gate import decide
from training.bootstrap import SUMMARIES, ImageMatches, Interval, metric_intervals, paired_bootstrap
from maskrcnn.labels import LabelMap
from maskrcnn.masks import decode_segmentation, encode_masks
from training.metrics import coco_map, to_coco_results

H = W = 48
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 11, "name": "c"}]
LM = LabelMap.from_categories(CATEGORIES)


def _split(images: int = 40, seed: int = 1) -> dict:
    """Images with 0-3 rectangles of three categories, one in ten a crowd region."""
    rng = np.random.default_rng(seed)
    out = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(1, images + 1):
        out["images"].append({"id": i, "width": W, "height": H})
        for _ in range(int(rng.integers(0, 4))):
            x, y = (int(v) for v in rng.integers(0, 30, 2))
            w, h = (int(v) for v in rng.integers(4, 18, 2))
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": i, "category_id": int(rng.choice([3, 7, 11])),
                "iscrowd": int(rng.random() < 0.1), "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                "area": float(w * h), "bbox": [x, y, w, h]})
    return out


def _predict(gt: dict, found: float, seed: int, shift: int = 3, wrong_class: float = 0.1, spurious: int = 2) -> list:
    """A model that finds each instance with probability `found`, its mask shifted by up to `shift` px and its
    class wrong one time in ten, plus up to `spurious` false detections per image."""
    rng = np.random.default_rng(seed)
    out = []
    for img in gt["images"]:
        masks, scores, labels = [], [], []
        for ann in gt["annotations"]:
            if ann["image_id"] != img["id"] or rng.random() > found:
                continue
            dx = int(rng.integers(-shift, shift + 1)) if shift else 0
            masks.append(np.roll(decode_segmentation(ann["segmentation"], H, W), dx, axis=1))
            scores.append(float(rng.uniform(0.2, 1.0)))
            labels.append(LM.label_of(ann["category_id"]) if rng.random() >= wrong_class else int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(0, spurious + 1))):
            mask = np.zeros((H, W), np.uint8)
            x, y = rng.integers(0, 40, 2)
            mask[y:y + 8, x:x + 8] = 1
            masks.append(mask)
            scores.append(float(rng.uniform(0.0, 1.0)))
            labels.append(int(rng.integers(1, 4)))
        out.append({"image_id": img["id"], "boxes": np.zeros((len(masks), 4)), "scores": np.array(scores),
                    "labels": np.array(labels, int), "masks": encode_masks(np.array(masks, np.uint8).reshape(-1, H, W))})
    return out


def _segm_map(gt: dict, predictions: list) -> float:
    return coco_map(gt, to_coco_results(predictions, LM), "segm", LM)["segm_mAP"]


@pytest.mark.parametrize("found,seed", [(0.95, 0), (0.6, 1), (0.2, 2)])
def test_the_replay_gives_coco_evals_segm_map(found, seed):
    gt = _split()
    predictions = _predict(gt, found, seed)
    matches = ImageMatches(gt, predictions, LM)
    expected = coco_map(gt, to_coco_results(predictions, LM), "segm", LM)
    for name, thresholds in SUMMARIES.items():  # mAP, AP50, AP75
        assert matches.segm_map(thresholds=thresholds) == pytest.approx(expected[name], abs=1e-9), name
    intervals = metric_intervals(gt, predictions, LM, resamples=200)
    for name, (low, high) in intervals.items():
        assert low <= expected[name] <= high and low < high, name


def test_a_resample_is_the_split_with_images_repeated_and_left_out():
    """Weights 3 on the first five images and 0 on the eleventh: COCOeval on a split where those five
    images appear three times (under new ids) and the eleventh not at all gives the same mAP."""
    gt = _split()
    predictions = _predict(gt, 0.6, 4)
    weights = np.ones(len(gt["images"]), np.int64)
    weights[:5], weights[10] = 3, 0
    dropped = gt["images"][10]["id"]
    copied = copy.deepcopy(gt)
    copied["images"] = [im for im in gt["images"] if im["id"] != dropped]
    copied["annotations"] = [a for a in gt["annotations"] if a["image_id"] != dropped]
    copied_predictions = [p for p in predictions if p["image_id"] != dropped]
    for repeat in (1, 2):
        for im in gt["images"][:5]:
            new_id = 1000 * repeat + im["id"]
            copied["images"].append({**im, "id": new_id})
            copied["annotations"] += [{**a, "id": 10_000 * repeat + a["id"], "image_id": new_id}
                                      for a in gt["annotations"] if a["image_id"] == im["id"]]
            copied_predictions += [{**p, "image_id": new_id} for p in predictions if p["image_id"] == im["id"]]
    expected = _segm_map(copied, copied_predictions)
    assert expected != pytest.approx(_segm_map(gt, predictions), abs=1e-4)  # the resample does change the number
    assert ImageMatches(gt, predictions, LM).segm_map(weights) == pytest.approx(expected, abs=1e-9)


def test_identical_models_give_an_interval_of_zero():
    gt = _split()
    predictions = _predict(gt, 0.7, 5)
    interval = paired_bootstrap(gt, predictions, copy.deepcopy(predictions), LM, resamples=300, seed=7)
    assert (interval.delta, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert (interval.resamples, interval.seed, interval.images, interval.level) == (300, 7, 40, 0.95)


def test_two_equally_good_models_give_an_interval_around_zero():
    """Two draws of the same model (the same skill, different mistakes): the difference is noise, so the
    interval holds 0 and is wider than a point-estimate margin of a few points would suggest."""
    gt = _split(images=60)
    interval = paired_bootstrap(gt, _predict(gt, 0.8, 10, shift=1), _predict(gt, 0.8, 11, shift=1), LM, resamples=500)
    assert interval.low < 0 < interval.high
    assert interval.high - interval.low > 0.02


def test_a_clearly_better_model_has_a_lower_bound_above_zero():
    gt = _split()
    perfect = _predict(gt, 1.0, 20, shift=0, wrong_class=0.0, spurious=0)
    weak = _predict(gt, 0.5, 21)
    interval = paired_bootstrap(gt, perfect, weak, LM, resamples=500)
    assert interval.delta == pytest.approx(_segm_map(gt, perfect) - _segm_map(gt, weak), abs=1e-9)
    assert 0 < interval.low <= interval.delta <= interval.high
    reversed_ = paired_bootstrap(gt, weak, perfect, LM, resamples=500)
    assert reversed_.high < 0


def test_the_interval_is_reproducible_from_its_seed_and_moves_with_it():
    gt = _split()
    a, b = _predict(gt, 0.8, 30), _predict(gt, 0.7, 31)
    first = paired_bootstrap(gt, a, b, LM, resamples=200, seed=3)
    assert paired_bootstrap(gt, a, b, LM, resamples=200, seed=3) == first
    assert paired_bootstrap(gt, a, b, LM, resamples=200, seed=4) != first
    assert Interval.from_dict(first.to_dict()) == first


def test_bad_bootstrap_settings_are_refused_by_name():
    gt = _split(images=3)
    with pytest.raises(ValueError, match="resamples: expected 1 to 100000, got 0"):
        paired_bootstrap(gt, [], [], LM, resamples=0)
    with pytest.raises(ValueError, match="level: expected between 0 and 1"):
        paired_bootstrap(gt, [], [], LM, level=1.0)
    with pytest.raises(ValueError, match="bootstrap interval: missing low, high"):
        Interval.from_dict({"delta": 0.1, "level": 0.95, "resamples": 10, "seed": 0, "images": 3})


def _interval(delta: float, low: float, high: float) -> Interval:
    return Interval(delta=delta, low=low, high=high, level=0.95, resamples=1000, seed=0, images=50)


def test_the_gate_can_require_the_lower_bound_to_beat_the_margin():
    common = dict(min_segm_map=0.5, min_mask_iou=0.7, margin=0.01, champion_segm_map=0.6, champion_version="3")
    noisy = _interval(0.04, -0.01, 0.09)
    # the point estimate beats the margin: promoted without the option, with the interval in the reason and tags
    d = decide(0.64, 0.8, interval=noisy, **common)
    assert d.promote and "95% interval [-0.0100, +0.0900]" in d.reason
    assert d.tags()["segm_map_delta_low"] == "-0.010000" and d.tags()["decision"] == "promote"
    # with it, the noise decides
    d = decide(0.64, 0.8, interval=noisy, require_lower_bound=True, **common)
    assert not d.promote
    assert "lower bound -0.0100 does not exceed the margin +0.0100" in d.reason and "within the split's noise" in d.reason
    assert decide(0.64, 0.8, interval=_interval(0.04, 0.02, 0.06), require_lower_bound=True, **common).promote
    # a lower bound equal to the margin is not above it
    assert not decide(0.64, 0.8, interval=_interval(0.04, 0.01, 0.06), require_lower_bound=True, **common).promote
    # no interval to judge: refused, not waved through
    d = decide(0.64, 0.8, require_lower_bound=True, **common)
    assert not d.promote and "none was computed" in d.reason
    # no champion: the thresholds decide, the option has nothing to compare
    d = decide(0.64, 0.8, min_segm_map=0.5, min_mask_iou=0.7, margin=0.01, require_lower_bound=True)
    assert d.promote and d.evidence == {}
