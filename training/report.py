"""The evaluation report: why a model is wrong, on one self-contained HTML page.

From a model's predictions on a split (as `training.evaluate` returns them) and, when there is one, the
champion's: per-class AP and AR (COCOeval, segm, the numbers `training.metrics` reports), precision-recall
curves per class at IoU 0.5 and 0.75, AP by object size, a confusion matrix with background, a sweep of
the score threshold (precision, recall, F1), the images with the most errors with their false positives
and misses drawn, and the candidate against the champion per class with the paired bootstrap's interval.

Matching outside COCOeval (the confusion matrix, the sweep, the error counts) is `training.metrics.match`,
the one the mask IoU metric is computed with. Greedy by score means a prediction's fate depends only on
higher-scored ones, so one matching serves every score threshold. The page has no script and loads nothing: charts are inline SVG, images data URIs.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import html
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_util
from PIL import ImageDraw

from training.bootstrap import Interval
from training.data.coco import CocoSplit
from maskrcnn.images import decode_image
from maskrcnn.labels import LabelMap
from maskrcnn.masks import Prediction, segmentation_to_rle
from training.metrics import CROWD, Matching, above_threshold, match, to_coco_results
from maskrcnn.visualize import draw_predictions

log = logging.getLogger(__name__)

SWEEP = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))
WORST_IMAGES = 6
THUMB_SIDE = 480
SIZES = ("small", "medium", "large")  # COCO's area ranges: < 32^2, 32^2-96^2, > 96^2 pixels


@dataclass
class Report:
    """The report's numbers (the page is `to_html`)."""

    class_names: list[str]
    summary: dict[str, float]  # segm mAP, AP50, AP75, AP by size, AR100
    per_class: dict[str, dict[str, float]]  # name -> ap, ap50, ap75, ar, ap_small, ap_medium, ap_large, instances
    curves: dict[str, dict[str, list[float]]]  # name -> {"0.50": precision at 101 recall points, "0.75": ...}
    confusion: np.ndarray  # (K+1, K+1): rows ground truth (last: background), columns predicted (last: missed)
    sweep: list[dict[str, float]]  # threshold, precision, recall, f1
    worst: list[dict[str, Any]]  # image id, file, false positives, misses, the drawing (PNG bytes)
    score_threshold: float
    iou_match: float
    champion: dict[str, Any] = field(default_factory=dict)  # version, summary, per_class AP, interval


def coco_analysis(gt: dict[str, Any], predictions: list[Prediction],
                  label_map: LabelMap) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """COCOeval (segm) read in full: the summary, per-class AP/AR (all areas and by size) and the
    precision-recall curves at IoU 0.5 and 0.75. A number with nothing to measure (no instance of a class
    or size: COCO's -1) is NaN, shown as a dash; with no prediction at all, the APs are 0."""
    names = dict(zip(label_map.category_ids, label_map.names))
    results = to_coco_results(predictions, label_map)
    counts = {n: 0 for n in label_map.names}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0) and ann["category_id"] in names:
            counts[names[ann["category_id"]]] += 1
    empty = {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ar": 0.0, **{f"ap_{s}": 0.0 for s in SIZES}}
    if not results or not gt["annotations"]:
        summary = {k: 0.0 for k in ("segm_mAP", "segm_AP50", "segm_AP75", "segm_AP_small", "segm_AP_medium",
                                    "segm_AP_large", "segm_AR100")}
        flat = [0.0] * 101
        return summary, {n: {**empty, "instances": float(counts[n])} for n in label_map.names}, \
            {n: {"0.50": flat, "0.75": flat} for n in label_map.names}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="segm", print_function=log.debug)
        ev.params.catIds = sorted(label_map.category_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) if s > -1 else float("nan") for s in ev.stats]  # NaN: no instance of that size
    summary = {"segm_mAP": stats[0], "segm_AP50": stats[1], "segm_AP75": stats[2], "segm_AP_small": stats[3],
               "segm_AP_medium": stats[4], "segm_AP_large": stats[5], "segm_AR100": stats[8]}
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    per_class, curves = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = names[cat_id]
        per_class[name] = {"ap": mean(precision[:, :, k, 0, -1]), "ap50": mean(precision[0, :, k, 0, -1]),
                           "ap75": mean(precision[5, :, k, 0, -1]), "ar": mean(recall[:, k, 0, -1]),
                           **{f"ap_{s}": mean(precision[:, :, k, a + 1, -1]) for a, s in enumerate(SIZES)},
                           "instances": float(counts[name])}
        curves[name] = {f"{t:.2f}": [max(float(p), 0.0) for p in precision[i, :, k, 0, -1]]
                        for i, t in ((0, 0.5), (5, 0.75))}
    return summary, per_class, curves


def confusion_matrix(gt: dict[str, Any], predictions: list[Prediction], label_map: LabelMap, score_threshold: float,
                     iou_match: float) -> np.ndarray:
    """(K+1) x (K+1) counts at `score_threshold`: [true class, predicted class] for predictions that found an
    instance (of any class), [background, predicted] for predictions that found nothing, [true, missed] for
    instances nothing found. Predictions on crowd regions are not counted."""
    k = len(label_map.category_ids)
    out = np.zeros((k + 1, k + 1), np.int64)
    m = match(gt, above_threshold(predictions, score_threshold), label_map, iou_match, class_aware=False)
    for label, hit in zip(m.labels, m.found):
        if hit != CROWD:
            out[(hit - 1) if hit else k, label - 1] += 1
    for image_id, indexes in m.missed.items():
        for j in indexes:
            out[label_map.label_of(m.instances_of[image_id][j]["category_id"]) - 1, k] += 1
    return out


def threshold_sweep(m: Matching, thresholds: tuple[float, ...] = SWEEP) -> list[dict[str, float]]:
    """Precision, recall and F1 of the class-aware matching `m` at each score threshold."""
    out = []
    counted = m.found != CROWD
    for t in thresholds:
        above = (m.scores >= t) & counted
        tp = int((above & (m.found > 0)).sum())
        fp = int((above & (m.found == 0)).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / m.instances if m.instances else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"threshold": float(t), "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp})
    return out


def build_report(split: CocoSplit, predictions: list[Prediction], score_threshold: float, iou_match: float,
                 champion: tuple[str, list[Prediction]] | None = None, interval: Interval | None = None,
                 worst: int = WORST_IMAGES) -> Report:
    """The report of `predictions` on `split`; `champion`: (its version, its predictions on the same split)."""
    gt, label_map = split.coco, split.label_map
    summary, per_class, curves = coco_analysis(gt, predictions, label_map)
    kept = above_threshold(predictions, score_threshold)
    aware = match(gt, kept, label_map, iou_match, class_aware=True)
    errors = []
    for image_id, misses in aware.missed.items():
        fp = int(((aware.images == image_id) & (aware.found == 0)).sum())
        if fp + len(misses):
            errors.append((fp + len(misses), image_id))
    errors.sort(key=lambda e: (-e[0], e[1]))
    by_image = {int(p["image_id"]): p for p in kept}
    drawn = [_draw_errors(split, by_image.get(image_id), image_id, aware, score_threshold) for _, image_id in errors[:worst]]
    report = Report(class_names=list(label_map.names), summary=summary, per_class=per_class, curves=curves,
                    confusion=confusion_matrix(gt, predictions, label_map, score_threshold, iou_match),
                    sweep=threshold_sweep(match(gt, predictions, label_map, iou_match, class_aware=True)),
                    worst=drawn, score_threshold=score_threshold, iou_match=iou_match)
    if champion is not None:
        version, champion_predictions = champion
        champ_summary, champ_class, _ = coco_analysis(gt, champion_predictions, label_map)
        report.champion = {"version": version, "summary": champ_summary,
                           "per_class": {n: v["ap"] for n, v in champ_class.items()},
                           "interval": interval.to_dict() if interval is not None else {}}
    return report


def _draw_errors(split: CocoSplit, pred: Prediction | None, image_id: int, m: Matching,
                 score_threshold: float) -> dict[str, Any]:
    """One image with its predictions above the threshold drawn, false positives boxed in red and the
    instances nothing found boxed in yellow (from the class-aware matching `m`)."""
    info = next(img for img in split.coco["images"] if img["id"] == image_id)
    image = decode_image(split.root / info["file_name"])
    empty = {"image_id": image_id, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int), "masks": []}
    pred = pred or empty
    canvas = draw_predictions(image, pred, split.label_map, score_threshold)
    scale = canvas.width / image.shape[1]
    draw = ImageDraw.Draw(canvas)
    here = m.images == image_id
    false_positives = m.index[here & (m.found == 0)]
    for i in false_positives:
        x0, y0, x1, y1 = (float(v) * scale for v in pred["boxes"][i])
        draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], outline=(255, 0, 0), width=3)
    missed = [m.instances_of[image_id][j] for j in m.missed[image_id]]
    for ann in missed:
        x, y, bw, bh = (float(v) * scale for v in _bbox(ann, info["height"], info["width"]))
        draw.rectangle([x - 1, y - 1, x + bw + 1, y + bh + 1], outline=(255, 220, 0), width=3)
        draw.text((x + 2, y + bh - 12), f"missed {split.label_map.name_of(split.label_map.label_of(ann['category_id']))}",
                  fill=(255, 220, 0))
    if max(canvas.size) > THUMB_SIDE:
        ratio = THUMB_SIDE / max(canvas.size)
        canvas = canvas.resize((max(1, int(canvas.width * ratio)), max(1, int(canvas.height * ratio))))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return {"image_id": image_id, "file": info["file_name"], "false_positives": int(len(false_positives)),
            "misses": len(missed), "png": buf.getvalue()}


def _bbox(ann: dict[str, Any], h: int, w: int) -> list[float]:
    if ann.get("bbox"):
        return [float(v) for v in ann["bbox"]]
    return [float(v) for v in mask_util.toBbox(segmentation_to_rle(ann["segmentation"], h, w))]


# ---- the page ---------------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _f(value: float) -> str:
    return "&ndash;" if value != value else f"{value:.3f}"  # NaN: nothing to measure (COCO's -1)


def _delta(a: float, b: float) -> str:
    return _f(a - b) if a - b != a - b else f"{a - b:+.3f}"


def _svg_lines(series: list[tuple[str, list[float], list[float]]], x_label: str, y_label: str, title: str,
               width: int = 360, height: int = 240) -> str:
    """A line chart of `series` (name, xs, ys) on [0, 1] x [0, 1], as inline SVG with a legend."""
    left, bottom, top, right = 40, 34, 22, 10
    pw, ph = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> str:
        return f"{left + x * pw:.1f},{top + (1 - y) * ph:.1f}"

    parts = [f'<svg class="chart" role="img" aria-label="{_e(title)}" width="{width}" height="{height + 16 * len(series)}" '
             f'viewBox="0 0 {width} {height + 16 * len(series)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="14" class="t">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left + tick * pw:.0f}" y="{top + ph + 14}" class="a" text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{left - 4}" y="{top + (1 - tick) * ph + 4:.0f}" class="a" text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 28}" class="a" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text x="10" y="{top + ph / 2:.0f}" class="a" transform="rotate(-90 10 {top + ph / 2:.0f})" '
                 f'text-anchor="middle">{_e(y_label)}</text>')
    for n, (name, xs, ys) in enumerate(series):
        r, g, b = _palette(n)
        points = " ".join(xy(x, y) for x, y in zip(xs, ys))
        parts.append(f'<polyline fill="none" stroke="rgb({r},{g},{b})" stroke-width="1.5" points="{points}"/>')
        ly = height + 12 + 16 * n
        parts.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 18}" y2="{ly - 4}" stroke="rgb({r},{g},{b})" stroke-width="2"/>')
        parts.append(f'<text x="{left + 24}" y="{ly}" class="a">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _palette(n: int) -> tuple[int, int, int]:
    from maskrcnn.visualize import colour

    r, g, b = colour(n)
    return int(r * 0.8), int(g * 0.8), int(b * 0.8)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</tbody></table>"


def to_html(report: Report, title: str) -> str:
    """The report as one HTML page: no script, nothing loaded from elsewhere."""
    s, names = report.summary, report.class_names
    sections = [f"<h1>{_e(title)}</h1>",
                f'<p class="note">Segm metrics by COCOeval; matching for the '
                f"confusion matrix, the sweep and the error counts: greedy by score at mask IoU &ge; {_f(report.iou_match)}; "
                f"score threshold {_f(report.score_threshold)}.</p>"]
    sections.append('<h2 id="summary">Summary</h2>' + _table(
        ["segm mAP", "AP50", "AP75", "AP small", "AP medium", "AP large", "AR@100"],
        [[f'<span data-metric="{k}">{_f(s[k])}</span>' for k in ("segm_mAP", "segm_AP50", "segm_AP75", "segm_AP_small",
                                                                   "segm_AP_medium", "segm_AP_large", "segm_AR100")]]))
    rows = []
    for n in names:
        c = report.per_class[n]
        rows.append([f"<code>{_e(n)}</code>", f'<span data-class-ap="{_e(n)}">{_f(c["ap"])}</span>', _f(c["ap50"]),
                     _f(c["ap75"]), _f(c["ar"]), _f(c["ap_small"]), _f(c["ap_medium"]), _f(c["ap_large"]),
                     str(int(c["instances"]))])
    sections.append('<h2 id="per-class">Per class</h2>' + _table(
        ["class", "AP", "AP50", "AP75", "AR@100", "AP small", "AP medium", "AP large", "instances"], rows))
    recall = [i / 100 for i in range(101)]
    sections.append('<h2 id="pr-curves">Precision-recall curves</h2><div class="charts">' + "".join(
        _svg_lines([(f"IoU {t}", recall, report.curves[n][t]) for t in ("0.50", "0.75")], "recall", "precision",
                   f"{n}") for n in names) + "</div>")
    k = len(names)
    peak = max(1, int(report.confusion.max()))
    head = ["true \\ predicted"] + [f"<code>{_e(n)}</code>" for n in names] + ["missed"]
    rows = []
    for i, row_name in enumerate([*names, "background"]):
        cells = [f"<code>{_e(row_name)}</code>" if i < k else "<em>background (false positive)</em>"]
        for j, v in enumerate(report.confusion[i]):
            shade = 255 - int(180 * v / peak)
            diagonal = " diag" if i == j and i < k else ""
            cells.append(f'<span class="cell{diagonal}" style="background:rgb({shade},{shade},255)" '
                         f'data-confusion="{i},{j}">{int(v)}</span>')
        rows.append(cells)
    sections.append('<h2 id="confusion">Confusion matrix (with background)</h2>' + _table(head, rows, "confusion"))
    sweep = report.sweep
    xs = [r["threshold"] for r in sweep]
    best = max(sweep, key=lambda r: r["f1"]) if sweep else None
    sections.append('<h2 id="sweep">Score threshold</h2><div class="charts">' + _svg_lines(
        [("precision", xs, [r["precision"] for r in sweep]), ("recall", xs, [r["recall"] for r in sweep]),
         ("F1", xs, [r["f1"] for r in sweep])], "score threshold", "", "precision, recall and F1") + "</div>"
        + (f'<p>Best F1 {_f(best["f1"])} at threshold {best["threshold"]:.2f}.</p>' if best else "")
        + _table(["threshold", "precision", "recall", "F1", "true positives", "false positives"],
                 [[f'{r["threshold"]:.2f}', _f(r["precision"]), _f(r["recall"]), _f(r["f1"]), str(r["tp"]), str(r["fp"])]
                  for r in sweep], "sweep"))
    figures = "".join(
        f'<figure><img alt="image {w["image_id"]}" src="data:image/png;base64,{base64.b64encode(w["png"]).decode()}"/>'
        f'<figcaption><code>{_e(w["file"])}</code>: {w["false_positives"]} false positive(s) (red), '
        f'{w["misses"]} missed (yellow)</figcaption></figure>' for w in report.worst)
    sections.append('<h2 id="worst">The images with the most errors</h2>'
                    + (f'<div class="figures">{figures}</div>' if figures else "<p>No errors at this threshold.</p>"))
    if report.champion:
        ch = report.champion
        rows = [[f"<code>{_e(n)}</code>", _f(report.per_class[n]["ap"]), _f(ch["per_class"].get(n, 0.0)),
                 _delta(report.per_class[n]["ap"], ch["per_class"].get(n, 0.0))] for n in names]
        rows.insert(0, ["<strong>segm mAP</strong>", _f(s["segm_mAP"]), _f(ch["summary"]["segm_mAP"]),
                        _delta(s["segm_mAP"], ch["summary"]["segm_mAP"])])
        interval = ch.get("interval") or {}
        noise = (f'<p id="interval">Paired bootstrap of the segm mAP difference: {interval["delta"]:+.4f}, '
                 f'{interval["level"]:.0%} interval [{interval["low"]:+.4f}, {interval["high"]:+.4f}] '
                 f'({interval["resamples"]} resamples of {interval["images"]} images, seed {interval["seed"]}).</p>'
                 if interval else "")
        sections.append(f'<h2 id="champion">Against the champion (v{_e(ch["version"])})</h2>'
                        + _table(["class", "candidate AP", "champion AP", "difference"], rows, "versus") + noise)
    style = ("body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child{text-align:left}.charts,.figures{display:flex;flex-wrap:wrap;gap:12px}"
             ".chart .t{font-weight:600;font-size:12px}.chart .a{font-size:10px}.cell{display:block;padding:2px 6px}"
             ".diag{font-weight:700}figure{margin:0}figcaption{font-size:12px;max-width:480px}.note{color:#555}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")
