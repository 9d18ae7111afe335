"""The project's string-keyed names, each defined once: whoever needs one imports it from here.

The model's registered name, the pipelines' names in Kubeflow, the environment variables read for the
signing key, the trusted public keys and the cache folder, and the cache folder's one default.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_NAME = "maskrcnn"  # the registered model, the InferenceService's predictor, the V1/V2 model name
PIPELINE_NAME = "maskrcnn-train-gate-serve"  # the training pipeline in Kubeflow (pipelines.pipeline, release ship/retrain)
BATCH_PIPELINE_NAME = "maskrcnn-batch-inference"
SIGNING_KEY_ENV = "MASKRCNN_SIGNING_KEY_FILE"  # the Ed25519 private key (a file) that `release` signs packages with
PUBLIC_KEYS_ENV = "MASKRCNN_PUBLIC_KEYS"  # the trusted public keys of the predictor and batch: a PEM file or a folder of them
CACHE_ENV = "MASKRCNN_CACHE"  # where remote datasets and packages are cached (the serving image: /tmp/maskrcnn-serving)


def cache_dir(explicit: str | Path | None = None) -> Path:
    """The cache folder: `explicit` when given, else $MASKRCNN_CACHE, else ~/.cache/maskrcnn-platform."""
    return Path(explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "maskrcnn-platform")
