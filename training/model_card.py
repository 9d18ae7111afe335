"""The model card: a Markdown page per trained model, generated from what the run measured.

It travels in the serving package as `MODEL_CARD.md` (listed in `SHA256SUMS`, so signed with the rest)
and is the registered version's description in MLflow (the UI shows it on the version's page), shortened
to the registry's 5000 characters when it must be. Everything in it is read from the package (metadata,
config, label map) and from the evaluation of that package on the validation split: the data's identity
and statistics, the metrics with bootstrap intervals, per-class results, the training config and commit,
the intended use, and the limitations those numbers show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from training.data.coco import CocoSplit
from maskrcnn.package import CARD_FILE, Package

if TYPE_CHECKING:
    from training.report import Report

MAX_DESCRIPTION = 5000  # MLflow's model version description column (String(5000))
WEAK_CLASS = 0.5  # a class whose AP is below this share of the mean is named as a limitation
FEW_EXAMPLES = 20  # training instances under which a class is named as thinly covered
WIDE_INTERVAL = 0.1  # a segm mAP interval wider than this is named as a limitation
CONFUSED = 0.1  # a share of a class's instances taken for another class (or missed) that is named
CONFIG_MARK = "## Training config"


@dataclass(frozen=True)
class CardInputs:
    """What a card is written from. `metrics`: `training.evaluate`'s metrics of the package on the validation
    split; `intervals`: `training.bootstrap.metric_intervals` on the same predictions; `stats`: the prepared
    data's `{"train": ..., "val": ...}` statistics (`training.data.prepare.split_stats`); `image_sizes`:
    (min width, min height, max width, max height) of the validation images."""

    name: str
    class_names: list[str]
    metadata: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    stats: dict[str, Any]
    image_sizes: tuple[int, int, int, int]
    resamples: int
    has_graph: bool
    confusions: list[tuple[str, str, int, int]] = field(default_factory=list)
    """From the evaluation report: (true class, predicted class or "missed", count, the true class's instances)."""
    best_f1: tuple[float, float] | None = None
    """From the report's threshold sweep: (the score threshold of the best F1, that F1)."""
    score_threshold: float = 0.5


def card_inputs(package: Package, split: CocoSplit, stats: dict[str, Any], metrics: dict[str, float],
                intervals: dict[str, tuple[float, float]], resamples: int, report: Report | None = None) -> CardInputs:
    """The inputs of `package`'s card, evaluated on the validation `split` (see `CardInputs`); `report`, the
    evaluation report's numbers (`training.report.Report`), adds its confusions and threshold sweep."""
    widths = [int(img["width"]) for img in split.coco["images"]] or [0]
    heights = [int(img["height"]) for img in split.coco["images"]] or [0]
    confusions, best = [], None
    if report is not None:
        names, matrix = report.class_names, report.confusion
        k = len(names)
        for i, true in enumerate(names):
            total = int(matrix[i].sum())
            for j in range(k + 1):
                if j != i and matrix[i, j]:
                    confusions.append((true, names[j] if j < k else "missed", int(matrix[i, j]), total))
        confusions.sort(key=lambda c: -c[2] / max(c[3], 1))
        if report.sweep:
            top = max(report.sweep, key=lambda r: r["f1"])
            best = (top["threshold"], top["f1"])
    return CardInputs(name=package.config.tracking.model_name, class_names=list(package.label_map.names),
                      metadata=package.metadata, config=package.config.to_dict(), metrics=metrics, intervals=intervals,
                      stats=stats, image_sizes=(min(widths), min(heights), max(widths), max(heights)),
                      resamples=resamples, has_graph=package.graph is not None, confusions=confusions, best_f1=best,
                      score_threshold=package.config.eval.score_threshold)


def _num(value: float) -> str:
    return f"{value:.3f}"


def _with_interval(inputs: CardInputs, key: str) -> str:
    value = inputs.metrics.get(key, 0.0)
    if key in inputs.intervals:
        low, high = inputs.intervals[key]
        return f"{_num(value)} [{_num(low)}, {_num(high)}]"
    return _num(value)


def limitations(inputs: CardInputs) -> list[str]:
    """What the numbers say the model is not good at, or what they cannot vouch for, one sentence each."""
    out = []
    data = inputs.config.get("data", {})
    if not data.get("train"):
        out.append("Trained and evaluated on the embedded synthetic dataset (coloured shapes): its numbers say "
                   "nothing about real images.")
    val = inputs.stats.get("val", {})
    train = inputs.stats.get("train", {})
    low, high = inputs.intervals.get("segm_mAP", (0.0, 0.0))
    if high - low > WIDE_INTERVAL:
        out.append(f"The validation split has {val.get('images', '?')} images: segm mAP is known only to within "
                   f"[{_num(low)}, {_num(high)}] (95%). A larger validation split narrows it.")
    mean = inputs.metrics.get("segm_mAP", 0.0)
    for name in inputs.class_names:
        ap = inputs.metrics.get(f"segm_AP_{name}", 0.0)
        val_count = val.get("per_class", {}).get(name)
        train_count = train.get("per_class", {}).get(name)
        if val_count == 0:
            out.append(f"`{name}` has no validation instance: it is not evaluated.")
        elif ap < WEAK_CLASS * mean:
            out.append(f"`{name}` is weak: segm AP {_num(ap)} against the mean {_num(mean)}; expect misses and "
                       "confusions on it.")
        if train_count is not None and train_count < FEW_EXAMPLES:
            out.append(f"`{name}` has only {train_count} training instances.")
    for true, predicted, count, total in inputs.confusions:
        if count >= max(2, CONFUSED * total):
            out.append(f"`{true}`: {count} of its {total} validation instances are missed at score "
                       f"{inputs.score_threshold:g}." if predicted == "missed" else
                       f"`{true}` is taken for `{predicted}`: {count} of its {total} validation instances.")
    if inputs.best_f1 is not None and abs(inputs.best_f1[0] - inputs.score_threshold) >= 0.2:
        out.append(f"The best F1 ({inputs.best_f1[1]:.3f}) is at score threshold {inputs.best_f1[0]:.2f}, not "
                   f"{inputs.score_threshold:g}: clients should choose their threshold (the evaluation report's sweep).")
    if inputs.metrics.get("segm_AP75", 0.0) < 0.5 * inputs.metrics.get("segm_AP50", 0.0):
        out.append(f"Masks are coarse: AP75 {_num(inputs.metrics.get('segm_AP75', 0.0))} is under half of AP50 "
                   f"{_num(inputs.metrics.get('segm_AP50', 0.0))}; boundaries are less precise than the detections.")
    w0, h0, w1, h1 = inputs.image_sizes
    model = inputs.config.get("model", {})
    out.append(f"Evaluated on images from {w0}x{h0} to {w1}x{h1} px; the model resizes them to a shorter side of "
               f"{model.get('min_size', '?')} px (longer side at most {model.get('max_size', '?')}). Other sizes, "
               "and images unlike the training data, are not covered by these numbers.")
    return out


def render_card(inputs: CardInputs) -> str:
    """The card's Markdown."""
    meta, stats = inputs.metadata, inputs.stats
    train, val = stats.get("train", {}), stats.get("val", {})
    lines = [f"# Model card: {inputs.name}", ""]
    if meta.get("model_version"):
        lines += [f"Registered version {meta['model_version']}.", ""]
    lines += [
        "## Intended use", "",
        f"Instance segmentation (Mask R-CNN, backbone `{inputs.config.get('model', {}).get('backbone', '?')}`) of "
        f"{len(inputs.class_names)} categories: {', '.join(f'`{n}`' for n in inputs.class_names)}, on images like "
        "its training data, served by KServe (V1/V2) from this package. Each detection has a box, a mask and a score; "
        f"the masks are thresholded at {inputs.config.get('eval', {}).get('mask_threshold', 0.5)}. Not for decisions "
        "about people, and not for categories or image sources it was not trained on.", "",
        "## Data", "",
        f"- Dataset content hash: `{meta.get('dataset_hash', '') or 'unknown'}`",
        f"- Training: {train.get('images', '?')} images, {train.get('instances', '?')} instances "
        f"({train.get('crowd', 0)} crowd); validation: {val.get('images', '?')} images, "
        f"{val.get('instances', '?')} instances ({val.get('crowd', 0)} crowd)",
        f"- Validation image sizes: {inputs.image_sizes[0]}x{inputs.image_sizes[1]} to "
        f"{inputs.image_sizes[2]}x{inputs.image_sizes[3]} px",
        f"- Source: `{inputs.config.get('data', {}).get('train') or 'embedded synthetic dataset'}`", "",
        "## Metrics on the validation split", "",
        f"95% intervals: percentile bootstrap over the validation images ({inputs.resamples} resamples).", "",
        "| metric | value [95% interval] |", "|---|---|",
        f"| segm mAP | {_with_interval(inputs, 'segm_mAP')} |",
        f"| segm AP50 | {_with_interval(inputs, 'segm_AP50')} |",
        f"| segm AP75 | {_with_interval(inputs, 'segm_AP75')} |",
        f"| bbox mAP | {_num(inputs.metrics.get('bbox_mAP', 0.0))} |",
        f"| mask IoU (matched) | {_num(inputs.metrics.get('mask_iou', 0.0))} |",
        f"| mask recall | {_num(inputs.metrics.get('mask_recall', 0.0))} |",
        f"| detections per image | {inputs.metrics.get('detections_per_image', 0.0):.1f} |", "",
        "## Per class", "",
        "| class | segm AP | bbox AP | training instances | validation instances |", "|---|---|---|---|---|",
    ]
    for name in inputs.class_names:
        lines.append(f"| `{name}` | {_num(inputs.metrics.get(f'segm_AP_{name}', 0.0))} | "
                     f"{_num(inputs.metrics.get(f'bbox_AP_{name}', 0.0))} | {train.get('per_class', {}).get(name, '?')} | "
                     f"{val.get('per_class', {}).get(name, '?')} |")
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in limitations(inputs)]
    lines += ["", "## Provenance", "",
              f"- Code commit: `{meta.get('git_commit', '') or 'unknown'}`",
              f"- MLflow run: `{meta.get('mlflow_run_id', '') or 'none'}`",
              f"- Served by: {'the ONNX graph (detector.onnx) with ONNX Runtime' if inputs.has_graph else 'eager PyTorch (no graph)'}",
              "", CONFIG_MARK, "", "```yaml", yaml.safe_dump(inputs.config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def version_description(card: str, gate_reason: str = "") -> str:
    """The registered version's description: the card without its config (a version's `config` tag has it),
    the gate's reason first when a gate decided, cut at a line to MLflow's 5000 characters."""
    body = card.split(CONFIG_MARK)[0].rstrip() + "\n"
    if gate_reason:
        body = f"**Gate:** {gate_reason}\n\n{body}"
    if len(body) <= MAX_DESCRIPTION:
        return body
    note = f"\n\n(cut: the whole card is {CARD_FILE} in the version's package)\n"
    return body[: body.rfind("\n", 0, MAX_DESCRIPTION - len(note))] + note
