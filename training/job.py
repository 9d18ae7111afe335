"""`python -m training.job`: the driver of a training job submitted by `training.remote.submit`.

It runs on the Ray cluster's head node: it reads the job's description from $MASKRCNN_JOB, loads the
staged dataset (keeping the content hash the submitter computed), runs `train()` on the cluster it was
started in, and writes the result (run, model URI, metrics) where the submitter reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from maskrcnn.config import Config
from maskrcnn.logs import setup_logging
from training.remote import JOB_ENV

log = logging.getLogger("training")


def main() -> int:
    setup_logging()
    spec = json.loads(os.environ[JOB_ENV])
    cfg = Config.from_dict(spec["config"])
    from training.data.prepare import load_prepared
    from maskrcnn.storage import fetch_prefix, upload_object
    from training.trainer import train

    data = None
    if spec.get("staged"):
        folder = fetch_prefix(spec["staged"], cfg.data.resolved_cache_dir())
        data = load_prepared(folder, cfg.data.max_image_pixels)
    result = train(cfg, resume=spec.get("resume"), data=data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        out.write_text(json.dumps(dataclasses.asdict(result)))
        upload_object(spec["result"], out)
    log.info("result written to %s", spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
