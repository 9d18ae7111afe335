"""What the predictor's traffic says about the model, on /metrics, every series labelled `model_name` and
`model_version` (the registered model and its version, from the package's metadata).

- `maskrcnn_request_seconds{protocol,status,model_version}`: a prediction request's time in the server,
  from its arrival to its response (histogram; the app's `RequestMetrics` observes it).
- `maskrcnn_forward_seconds{model_version}`: one image's forward pass and mask post-processing.
- `maskrcnn_inflight_requests{model_version}`: images in a forward pass right now (the queue is
  `maskrcnn_queue_depth{model_version}`: requests admitted, running or waiting).
- `maskrcnn_detections_per_image{model_version}`, `maskrcnn_detection_score{model_version}` (each returned
  detection's score) and `maskrcnn_detections_total{model_version,label}` (the class mix).
- `maskrcnn_input_megapixels`, `maskrcnn_input_brightness`, `maskrcnn_input_contrast` (`{model_version}`):
  each decoded image's `maskrcnn.images.image_statistics`, the function the package's reference
  statistics are computed with.
- The package's reference (`maskrcnn.reference`, when the package has one), with the same buckets:
  `maskrcnn_reference_mean{statistic}`, `maskrcnn_reference_bucket{statistic,le}` (cumulative shares, the
  live histogram's `_bucket / _count`), `maskrcnn_reference_class_share{label}`, `maskrcnn_reference_images`.
  `statistic` is one of brightness, contrast, megapixels (`maskrcnn_input_*`), detections_per_image
  (`maskrcnn_detections_per_image`) and score (`maskrcnn_detection_score`).

Cardinality is bounded: one `model_version` per process, the HTTP statuses the server answers, two
protocols, and at most `MAX_CLASS_LABELS` class labels (beyond them, classes are counted as `other`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from maskrcnn.images import image_statistics
from maskrcnn.reference import BUCKETS, Reference

MAX_CLASS_LABELS = 100
OTHER = "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MODEL = ["model_name", "model_version"]
"""The labels every series carries first: two models (or a model in two namespaces) serving the same
version number never add up, and a canary's analysis selects its own model by name and version."""

REQUEST_SECONDS = Histogram("maskrcnn_request_seconds", "Prediction requests' time in the server, arrival to response",
                            ["protocol", "status", *MODEL], buckets=LATENCY_BUCKETS)
FORWARD_SECONDS = Histogram("maskrcnn_forward_seconds", "One image's forward pass and mask post-processing",
                            MODEL, buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("maskrcnn_inflight_requests", "Images in a forward pass now", MODEL)
CLASSES = Counter("maskrcnn_detections_total", "Returned detections by class (at most MAX_CLASS_LABELS classes, then 'other')",
                  [*MODEL, "label"])
# The live distributions, with the reference's buckets (maskrcnn.reference.BUCKETS), by statistic
LIVE = {
    "detections_per_image": Histogram("maskrcnn_detections_per_image", "Detections returned per image", MODEL,
                                      buckets=BUCKETS["detections_per_image"]),
    "score": Histogram("maskrcnn_detection_score", "Score of each returned detection", MODEL,
                       buckets=BUCKETS["score"]),
    "megapixels": Histogram("maskrcnn_input_megapixels", "Decoded input images' size (width x height / 1e6)",
                            MODEL, buckets=BUCKETS["megapixels"]),
    "brightness": Histogram("maskrcnn_input_brightness", "Decoded input images' mean luminance (0-1)", MODEL,
                            buckets=BUCKETS["brightness"]),
    "contrast": Histogram("maskrcnn_input_contrast", "Decoded input images' luminance standard deviation (0-0.5)",
                          MODEL, buckets=BUCKETS["contrast"]),
}
REFERENCE_IMAGES = Gauge("maskrcnn_reference_images", "Validation images the package's reference was computed on",
                         MODEL)
REFERENCE_MEAN = Gauge("maskrcnn_reference_mean", "The reference's mean of a statistic (the live histogram's sum/count)",
                       [*MODEL, "statistic"])
REFERENCE_BUCKET = Gauge("maskrcnn_reference_bucket", "The reference's share of observations <= le (the live histogram's "
                         "bucket/count)", [*MODEL, "statistic", "le"])
REFERENCE_CLASS = Gauge("maskrcnn_reference_class_share", "The reference's share of detections of a class",
                        [*MODEL, "label"])


def model_labels(name: str | None, version: str | None) -> tuple[str, str]:
    """The values of MODEL for a served model ("unknown" where the package does not say)."""
    return name or "unknown", version or "unknown"


class ModelMetrics:
    """The series of one served model version (children bound once: observing is a lock and an add).
    `model`: its `model_labels`."""

    def __init__(self, model: tuple[str, str], class_names: Sequence[str], reference: Reference | None = None):
        self.model = v = model
        self.forward_seconds, self.in_flight = FORWARD_SECONDS.labels(*v), IN_FLIGHT.labels(*v)
        self.per_image, self.scores = LIVE["detections_per_image"].labels(*v), LIVE["score"].labels(*v)
        self.megapixels, self.brightness = LIVE["megapixels"].labels(*v), LIVE["brightness"].labels(*v)
        self.contrast = LIVE["contrast"].labels(*v)
        labels = list(class_names)[:MAX_CLASS_LABELS]
        self._classes = {name: CLASSES.labels(*v, name) for name in labels}
        self._other = CLASSES.labels(*v, OTHER)
        self.in_flight.set(0)
        if reference is not None:
            self._publish(reference, labels)

    def _publish(self, reference: Reference, labels: list[str]) -> None:
        """The package's reference as gauges, with the live histograms' `le` labels (so rules can join them)."""
        v = self.model
        REFERENCE_IMAGES.labels(*v).set(reference.images)
        for statistic, dist in reference.stats.items():
            REFERENCE_MEAN.labels(*v, statistic).set(dist.mean)
            for bound, share in zip(BUCKETS[statistic], dist.fractions):
                REFERENCE_BUCKET.labels(*v, statistic, floatToGoString(bound)).set(share)
            REFERENCE_BUCKET.labels(*v, statistic, "+Inf").set(1.0)
        shown = set(labels)
        for name in labels:
            REFERENCE_CLASS.labels(*v, name).set(reference.classes.get(name, 0.0))
        REFERENCE_CLASS.labels(*v, OTHER).set(sum(share for name, share in reference.classes.items() if name not in shown))

    def image(self, image: np.ndarray) -> None:
        stats = image_statistics(image)
        self.megapixels.observe(stats.megapixels)
        self.brightness.observe(stats.brightness)
        self.contrast.observe(stats.contrast)

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.in_flight.inc()
        began = time.perf_counter()
        try:
            yield
        finally:
            self.forward_seconds.observe(time.perf_counter() - began)
            self.in_flight.dec()

    def detections(self, detections: list[dict[str, Any]]) -> None:
        self.per_image.observe(len(detections))
        for detection in detections:
            self.scores.observe(detection["score"])
            self._classes.get(detection["label"], self._other).inc()
