"""The model's reference: what its inputs and its predictions look like on the validation split.

Computed when the best checkpoint's package is scored (`training.trainer.finalize`), from the same
predictions and with the same image statistics (`maskrcnn.images.image_statistics`) the predictor
exports live, and stored in the package as `reference.json` (checksummed and signed with the rest). The
predictor exposes it as gauges beside its live histograms, with the same buckets, so that alerting rules
compare live traffic against the model's own reference without numbers copied into YAML:

- per statistic (`brightness`, `contrast`, `megapixels`, `detections_per_image`, `score`): the mean and
  the cumulative fraction of observations at or below each bucket bound (as a Prometheus histogram's
  `le` buckets, divided by the count);
- `classes`: each class's share of the detections.

Predictions count as the predictor returns them by default: scores >= `SCORE_THRESHOLD`, at most
`MAX_DETECTIONS` per image.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskrcnn.images import DEFAULT_MAX_PIXELS, image_statistics

REFERENCE_FILE = "reference.json"
SCORE_THRESHOLD, MAX_DETECTIONS = 0.5, 100  # the predictor's defaults (serving.predictor uses these)
FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
BUCKETS: dict[str, tuple[float, ...]] = {  # the live histograms' buckets (serving.observe) and the reference's
    "brightness": FRACTIONS,
    "contrast": tuple(round(0.025 * i, 3) for i in range(1, 21)),  # 0.025 .. 0.5
    "megapixels": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    "detections_per_image": (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
    "score": FRACTIONS,
}
MEAN_LIMITS = {"brightness": 1.0, "contrast": 0.5, "megapixels": DEFAULT_MAX_PIXELS / 1e6,
               "detections_per_image": float(MAX_DETECTIONS), "score": 1.0}
MAX_IMAGES = 10_000_000


class ReferenceError(ValueError):
    """A reference.json that cannot be used; the message names the file, the field and the rule."""


@dataclass(frozen=True)
class Distribution:
    """A statistic's mean and its cumulative bucket fractions (`fractions[i]`: share of values <= `BUCKETS[...][i]`)."""

    mean: float
    fractions: tuple[float, ...]


def distribution(values: Sequence[float], buckets: Sequence[float]) -> Distribution:
    data = np.asarray(values, np.float64)
    if data.size == 0:
        return Distribution(0.0, tuple(1.0 for _ in buckets))  # nothing observed: every bucket holds "all" of none
    return Distribution(float(data.mean()), tuple(float((data <= b).mean()) for b in buckets))


@dataclass(frozen=True)
class Reference:
    images: int
    detections: int
    stats: dict[str, Distribution]
    classes: dict[str, float]
    score_threshold: float = SCORE_THRESHOLD

    def to_json(self) -> bytes:
        return json.dumps({"images": self.images, "detections": self.detections, "score_threshold": self.score_threshold,
                           "buckets": {k: list(v) for k, v in BUCKETS.items()},
                           "stats": {k: {"mean": d.mean, "fractions": list(d.fractions)} for k, d in self.stats.items()},
                           "classes": self.classes}, indent=2, sort_keys=True).encode()


def compute_reference(images: Iterable[np.ndarray], predictions: Iterable[Mapping[str, Any]], class_names: Sequence[str],
                      score_threshold: float = SCORE_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> Reference:
    """The reference of decoded RGB `images` and the model's `predictions` for them (`scores` and contiguous
    `labels`, 1 = `class_names[0]`), counted as the predictor returns them."""
    stats: dict[str, list[float]] = {"brightness": [], "contrast": [], "megapixels": []}
    for image in images:
        s = image_statistics(image)
        stats["brightness"].append(s.brightness)
        stats["contrast"].append(s.contrast)
        stats["megapixels"].append(s.megapixels)
    per_image, scores, classes = [], [], Counter()
    for prediction in predictions:
        kept = np.asarray(prediction["scores"], np.float64)
        order = np.argsort(-kept, kind="stable")[:max_detections]
        order = order[kept[order] >= score_threshold]
        per_image.append(len(order))
        scores += kept[order].tolist()
        classes.update(class_names[int(np.asarray(prediction["labels"])[i]) - 1] for i in order)
    if len(per_image) != len(stats["brightness"]):
        raise ValueError(f"{len(stats['brightness'])} images but {len(per_image)} predictions")
    total = sum(per_image)
    stats = {**stats, "detections_per_image": per_image, "score": scores}
    return Reference(len(per_image), total, {k: distribution(v, BUCKETS[k]) for k, v in stats.items()},
                     {name: classes[name] / total for name in class_names if classes[name]} if total else {},
                     score_threshold)


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ReferenceError(f"{where}: {value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def parse_reference(data: bytes, where: str, class_names: Sequence[str]) -> Reference:
    """Read and check a reference.json (`where` names it in errors): every field present, finite and in its
    range, fractions cumulative (non-decreasing, ending at 1), the buckets this reader's, classes from
    `class_names`, shares summing to 1."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReferenceError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"images", "detections", "score_threshold", "buckets", "stats", "classes"}:
        raise ReferenceError(f"{where}: expected an object with images, detections, score_threshold, buckets, stats, "
                             f"classes; got {sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    images = _number(doc["images"], f"{where}: images", 1, MAX_IMAGES)
    detections = _number(doc["detections"], f"{where}: detections", 0, MAX_IMAGES * MAX_DETECTIONS)
    if images != int(images) or detections != int(detections):
        raise ReferenceError(f"{where}: images and detections must be whole numbers")
    threshold = _number(doc["score_threshold"], f"{where}: score_threshold", 0, 1)
    if doc["buckets"] != {k: list(v) for k, v in BUCKETS.items()}:
        raise ReferenceError(f"{where}: buckets differ from this reader's (maskrcnn.reference.BUCKETS): the live "
                             f"histograms could not be compared with it; export the package again")
    if not isinstance(doc["stats"], dict) or set(doc["stats"]) != set(BUCKETS):
        raise ReferenceError(f"{where}: stats must have exactly {sorted(BUCKETS)}")
    stats = {}
    for name, entry in doc["stats"].items():
        at = f"{where}: stats.{name}"
        if not isinstance(entry, dict) or set(entry) != {"mean", "fractions"}:
            raise ReferenceError(f"{at}: expected {{mean, fractions}}")
        mean = _number(entry["mean"], f"{at}.mean", 0, MEAN_LIMITS[name])
        fractions = entry["fractions"]
        if not isinstance(fractions, list) or len(fractions) != len(BUCKETS[name]):
            raise ReferenceError(f"{at}.fractions: expected {len(BUCKETS[name])} numbers, one per bucket")
        values = [_number(f, f"{at}.fractions[{i}]", 0, 1) for i, f in enumerate(fractions)]
        if any(b < a for a, b in zip(values, values[1:])):
            raise ReferenceError(f"{at}.fractions: must not decrease (they are cumulative)")
        stats[name] = Distribution(mean, tuple(values))
    classes = doc["classes"]
    if not isinstance(classes, dict) or len(classes) > len(class_names):
        raise ReferenceError(f"{where}: classes must be an object of at most {len(class_names)} class shares")
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise ReferenceError(f"{where}: classes {unknown[:5]} are not in the label map")
    shares = {k: _number(v, f"{where}: classes.{k}", 0, 1) for k, v in classes.items()}
    if shares and abs(sum(shares.values()) - 1) > 1e-6:
        raise ReferenceError(f"{where}: class shares sum to {sum(shares.values()):.6f}, expected 1")
    return Reference(int(images), int(detections), stats, shares, threshold)
