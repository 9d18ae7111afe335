"""The evaluation report (training.report, `uv run -m training.evaluate --report`): its numbers are the
metrics', its confusion matrix and threshold sweep count what they say on hand-built cases, and the page
opens in Chromium with nothing loaded from elsewhere and no script."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from maskrcnn.config import EvalConfig, SyntheticConfig
from training.data.coco import load_coco
from maskrcnn.labels import LabelMap
from maskrcnn.masks import decode_segmentation, encode_masks
from training.data.synthetic import synthetic_dataset
from training.evaluate import main as evaluate_main, write_report
from training.metrics import evaluate_predictions
from training.report import CROWD, build_report, confusion_matrix, match, threshold_sweep, to_html

W = H = 32


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    _, val = synthetic_dataset(SyntheticConfig(num_train=2, num_val=24, image_size=96, seed=3),
                               tmp_path_factory.mktemp("cache"))
    return load_coco(val)


def _noisy(split, found: float, seed: int) -> list:
    """Ground truth found with probability `found`, shifted 0-2 px, one class in six wrong, 0-2 spurious squares."""
    rng = np.random.default_rng(seed)
    out = []
    for img in split.coco["images"]:
        h, w = img["height"], img["width"]
        masks, scores, labels = [], [], []
        for ann in split.coco["annotations"]:
            if ann["image_id"] != img["id"] or rng.random() > found:
                continue
            masks.append(np.roll(decode_segmentation(ann["segmentation"], h, w), int(rng.integers(0, 3)), axis=1))
            scores.append(float(rng.uniform(0.3, 1.0)))
            labels.append(split.label_map.label_of(ann["category_id"]) if rng.random() > 1 / 6 else int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(0, 3))):
            mask = np.zeros((h, w), np.uint8)
            x, y = (int(v) for v in rng.integers(0, w - 10, 2))
            mask[y:y + 10, x:x + 10] = 1
            masks.append(mask)
            scores.append(float(rng.uniform(0.0, 0.9)))
            labels.append(int(rng.integers(1, 4)))
        boxes = [[*(np.argwhere(m)[:, ::-1].min(0)), *(np.argwhere(m)[:, ::-1].max(0) + 1)] for m in masks]
        out.append({"image_id": img["id"], "boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores),
                    "labels": np.array(labels, int), "masks": encode_masks(np.array(masks, np.uint8).reshape(-1, h, w))})
    return out


def test_the_reports_numbers_are_the_metrics(split):
    predictions = _noisy(split, 0.8, 0)
    cfg = EvalConfig()
    metrics = evaluate_predictions(split.coco, predictions, split.label_map, cfg.score_threshold, cfg.iou_match)
    report = build_report(split, predictions, cfg.score_threshold, cfg.iou_match)
    for key in ("segm_mAP", "segm_AP50", "segm_AP75"):
        assert report.summary[key] == pytest.approx(metrics[key], abs=1e-12), key
    for name in split.label_map.names:
        assert report.per_class[name]["ap"] == pytest.approx(metrics[f"segm_AP_{name}"], abs=1e-12), name
        assert report.per_class[name]["instances"] == sum(
            1 for a in split.coco["annotations"] if split.label_map.name_of(split.label_map.label_of(a["category_id"])) == name)
    # the sweep at the evaluation's threshold is the mask IoU metric's matching: its recall is mask_recall
    at = next(r for r in report.sweep if r["threshold"] == cfg.score_threshold)
    assert at["recall"] == pytest.approx(metrics["mask_recall"], abs=1e-12)
    # every instance is in one cell of its row: found as some class, or missed
    k = len(split.label_map.names)
    assert report.confusion[:k].sum() == len([a for a in split.coco["annotations"] if not a["iscrowd"]])
    assert report.confusion[k, k] == 0
    # the worst images are ordered by errors, and their drawings are PNGs
    errors = [w["false_positives"] + w["misses"] for w in report.worst]
    assert errors == sorted(errors, reverse=True) and len(report.worst) == 6 and errors[-1] > 0
    assert Image.open(io.BytesIO(report.worst[0]["png"])).format == "PNG"


LM = LabelMap.from_categories([{"id": 5, "name": "a"}, {"id": 9, "name": "b"}])


def _square(x: int, y: int, size: int = 10) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y:y + size, x:x + size] = 1
    return mask


def _ann(i: int, category: int, mask: np.ndarray, crowd: int = 0) -> dict:
    ys, xs = np.nonzero(mask)
    return {"id": i, "image_id": 1, "category_id": category, "iscrowd": crowd, "segmentation": encode_masks(mask[None])[0],
            "area": float(mask.sum()), "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]}


def _hand_case():
    """Four instances (a at 0,0; b at 20,0; a at 0,20; a crowd region at 20,20) and five predictions: a right
    (0.9), b predicted as a (0.8), a spurious b (0.7), one on the crowd region (0.6), and a duplicate of the
    first (0.4). The a at 0,20 is missed."""
    gt = {"images": [{"id": 1, "width": W, "height": H}], "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
          "annotations": [_ann(1, 5, _square(0, 0)), _ann(2, 9, _square(20, 0)), _ann(3, 5, _square(0, 20)),
                          _ann(4, 5, _square(20, 20, 12), crowd=1)]}
    masks = [_square(0, 0), _square(20, 0), _square(10, 10, 6), _square(21, 21), _square(0, 0)]
    pred = {"image_id": 1, "boxes": np.zeros((5, 4)), "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.4]),
            "labels": np.array([1, 1, 2, 1, 1]), "masks": encode_masks(np.array(masks))}
    return gt, [pred]


def test_the_confusion_matrix_counts_classes_background_and_misses():
    gt, preds = _hand_case()
    matrix = confusion_matrix(gt, preds, LM, score_threshold=0.5, iou_match=0.5)
    # rows: true a, true b, background; columns: predicted a, predicted b, missed
    assert matrix.tolist() == [[1, 0, 1],
                               [1, 0, 0],
                               [0, 1, 0]]
    # at 0.3 the duplicate of the first counts too: a second prediction on a taken instance is a false positive
    assert confusion_matrix(gt, preds, LM, score_threshold=0.3, iou_match=0.5)[2].tolist() == [1, 1, 0]


def test_the_threshold_sweep_counts_true_and_false_positives_per_threshold():
    gt, preds = _hand_case()
    m = match(gt, preds, LM, iou_match=0.5, class_aware=True)
    assert m.found.tolist() == [1, 0, 0, CROWD, 0] and m.instances == 3
    rows = {r["threshold"]: r for r in threshold_sweep(m, (0.3, 0.5, 0.85, 0.95))}
    assert (rows[0.3]["tp"], rows[0.3]["fp"]) == (1, 3)  # the crowd prediction is neither
    assert (rows[0.5]["tp"], rows[0.5]["fp"]) == (1, 2)
    assert rows[0.5]["precision"] == pytest.approx(1 / 3) and rows[0.5]["recall"] == pytest.approx(1 / 3)
    assert rows[0.5]["f1"] == pytest.approx(1 / 3)
    assert (rows[0.85]["precision"], rows[0.85]["recall"]) == (1.0, pytest.approx(1 / 3))
    assert (rows[0.95]["tp"], rows[0.95]["fp"], rows[0.95]["f1"]) == (0, 0, 0.0)


def test_names_from_the_dataset_are_escaped(split):
    report = build_report(split, _noisy(split, 0.5, 1), 0.5, 0.5, worst=1)
    report.class_names = ['<script>alert(1)</script>', *report.class_names[1:]]
    report.per_class['<script>alert(1)</script>'] = report.per_class.pop(split.label_map.names[0])
    report.curves['<script>alert(1)</script>'] = report.curves.pop(split.label_map.names[0])
    page = to_html(report, 'title "<b>"')
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;" in page


def test_the_command_writes_the_report_and_refuses_bad_input(split, serving_package, tmp_path, caplog):
    out = tmp_path / "out" / "report.html"
    assert evaluate_main(["--report", str(out), str(serving_package), str(split.root)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Per class" in page and "Against the champion" not in page
    assert evaluate_main(["--report", str(out), str(tmp_path / "nothing"), str(split.root)]) == 2
    assert "nothing" in caplog.text
    assert evaluate_main(["--report", str(out), str(serving_package), str(tmp_path)]) == 2


def test_the_page_opens_in_chromium_self_contained(split, tmp_path):
    """The page as a browser shows it: every section, the numbers of the report, the drawings decoded, the
    champion's comparison with the interval, and no request beyond the page itself."""
    from playwright.sync_api import sync_playwright

    from helpers import CHROMIUM_ARGS

    predictions, champion = _noisy(split, 0.85, 2), _noisy(split, 0.6, 3)
    cfg = EvalConfig(bootstrap_resamples=200)
    path = tmp_path / "report.html"
    write_report(path, split, predictions, cfg, "maskrcnn v2", ("1", champion))
    metrics = evaluate_predictions(split.coco, predictions, split.label_map)
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(path.as_uri())
            for section in ("summary", "per-class", "pr-curves", "confusion", "sweep", "worst", "champion", "interval"):
                assert page.locator(f"#{section}").is_visible(), section
            assert page.locator('[data-metric="segm_mAP"]').inner_text() == f"{metrics['segm_mAP']:.3f}"
            for name in split.label_map.names:
                assert page.locator(f'[data-class-ap="{name}"]').inner_text() == f"{metrics[f'segm_AP_{name}']:.3f}"
            assert page.locator("svg.chart").count() == len(split.label_map.names) + 1
            k = len(split.label_map.names) + 1
            assert page.locator("[data-confusion]").count() == k * k
            widths = page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 6 and min(widths) > 0
            assert re.search(r"95% interval \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", page.locator("#interval").inner_text())
            assert page.locator("script").count() == 0
        finally:
            browser.close()
    assert requests == [path.as_uri()] and errors == []
