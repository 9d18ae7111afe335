"""Evaluation numbers on hand-built cases, checked against values computed by hand."""

import numpy as np
import pytest

from maskrcnn.labels import LabelMap

from maskrcnn.masks import decode_segmentation
from maskrcnn.masks import encode_masks
from training.metrics import coco_map, evaluate_predictions, mask_iou, to_coco_results

W = H = 32


def _gt():
    """Three 32x32 images, category ids 5 and 9 (non-contiguous), one instance each."""
    return {
        "images": [{"id": i, "width": W, "height": H} for i in (1, 2, 3)],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "area": 100, "bbox": [2, 2, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 9, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], "area": 400, "bbox": [10, 10, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 5, "segmentation": [[0, 0, 16, 0, 16, 8, 0, 8]], "area": 128, "bbox": [0, 0, 16, 8], "iscrowd": 0},
        ],
    }


LM = LabelMap.from_categories(_gt()["categories"])


def _pred_from_gt(ann, dx=0, score=0.9, label=None):
    mask = np.roll(decode_segmentation(ann["segmentation"], H, W), dx, axis=1)
    ys, xs = np.nonzero(mask)
    return {"image_id": ann["image_id"], "boxes": np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float),
            "scores": np.array([score]), "labels": np.array([label or LM.label_of(ann["category_id"])]), "masks": encode_masks(mask[None])}


def test_perfect_predictions_score_one():
    gt = _gt()
    metrics = evaluate_predictions(gt, [_pred_from_gt(a) for a in gt["annotations"]], LM)
    for key in ("bbox_mAP", "segm_mAP", "segm_AP50", "segm_AP75", "segm_AP_a", "segm_AP_b", "mask_iou", "mask_recall"):
        assert metrics[key] == pytest.approx(1.0), key


def test_shifted_mask_gives_hand_computed_iou():
    gt = _gt()
    # The 10x10 square shifted right by 2 px: intersection 8x10 = 80, union 120, IoU 2/3.
    preds = [_pred_from_gt(gt["annotations"][0], dx=2)]
    out = mask_iou(gt, preds, LM)
    assert out["mask_iou"] == pytest.approx(80 / 120)
    assert out["mask_recall"] == pytest.approx(1 / 3)
    # Shifted by 6: 40 / 160 = 0.25 < 0.5, so no match.
    assert mask_iou(gt, [_pred_from_gt(gt["annotations"][0], dx=6)], LM) == {"mask_iou": 0.0, "mask_recall": 0.0}
    # COCO segm AP for class a: one of its two instances found at IoU 2/3, i.e. at thresholds .50-.65 (4 of 10);
    # recall is 1/2 at most, so the 101-point precision curve is 1.0 up to recall 0.5: AP = 4/10 * 51/101.
    segm = coco_map(gt, to_coco_results(preds, LM), "segm", LM)
    assert segm["segm_AP_a"] == pytest.approx(0.4 * 51 / 101, abs=1e-6)
    assert segm["segm_AP_b"] == 0.0


def test_empty_predictions_score_zero():
    gt = _gt()
    metrics = evaluate_predictions(gt, [], LM)
    assert metrics["segm_mAP"] == 0.0 and metrics["bbox_mAP"] == 0.0 and metrics["mask_iou"] == 0.0
    no_dets = [{"image_id": 1, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int), "masks": []}]
    assert evaluate_predictions(gt, no_dets, LM)["segm_mAP"] == 0.0


def test_wrong_class_does_not_count():
    gt = _gt()
    preds = [_pred_from_gt(a, label=2 if a["category_id"] == 5 else 1) for a in gt["annotations"]]
    metrics = evaluate_predictions(gt, preds, LM)
    assert metrics["segm_mAP"] == 0.0 and metrics["mask_iou"] == 0.0


def test_low_scores_are_ignored_by_mask_iou_but_not_by_map():
    gt = _gt()
    preds = [_pred_from_gt(a, score=0.1) for a in gt["annotations"]]
    metrics = evaluate_predictions(gt, preds, LM, score_threshold=0.5)
    assert metrics["segm_mAP"] == pytest.approx(1.0)
    assert metrics["mask_iou"] == 0.0


def test_matches_pycocotools_on_noisy_predictions():
    """faster-coco-eval must give pycocotools' numbers (it is our evaluator of record)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import copy
    import io

    rng = np.random.default_rng(0)
    gt = _gt()
    preds = []
    for ann in gt["annotations"]:
        for _ in range(3):
            p = _pred_from_gt(ann, dx=int(rng.integers(-3, 4)), score=float(rng.uniform(0.1, 1.0)),
                              label=int(rng.integers(1, 3)))
            preds.append(p)
    results = to_coco_results(preds, LM)
    ours = coco_map(gt, results, "segm", LM)
    with contextlib.redirect_stdout(io.StringIO()):
        ref_gt = COCO()
        ref_gt.dataset = copy.deepcopy(gt)
        ref_gt.createIndex()
        ev = COCOeval(ref_gt, ref_gt.loadRes(copy.deepcopy(results)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["segm_mAP"] == pytest.approx(max(ev.stats[0], 0), abs=1e-9)
    assert ours["segm_AP50"] == pytest.approx(max(ev.stats[1], 0), abs=1e-9)
