"""`uv run -m batch SRC OUT (--package PACKAGE | --model models:/NAME@ALIAS)`: batch inference on Ray Data.

    uv run -m batch ./photos ./predictions --package ./package
    uv run -m batch s3://bucket/photos s3://bucket/predictions --model models:/maskrcnn@champion --overlays
    uv run -m batch gs://b/photos gs://b/out --model models:/maskrcnn@champion --address http://HEAD:8265

SRC: a folder, s3:// or gs:// prefix of JPG, PNG or TIFF images. OUT: a folder or prefix; it gets
`manifest.json`, `results/shard-NNNNN.json` (COCO results, RLE masks; image ids are positions in the sorted
list of SRC's images, listed with their names in `shard-NNNNN.images.json`) and, with `--overlays` and
`--masks`, PNGs under `overlays/` and `masks/`. Run it again to resume: finished shards are skipped; a
different package, image list (names, sizes, ETags) or setting is refused, and so is a second run
started on the same OUT meanwhile (the manifest is created with a conditional write). `--model` reads the
version's published, signed package when it was published (else MLflow's copy), checked against the
digest the version records; `--public-keys` requires a signature by one of the keys. `--address http://HEAD:8265` submits the run as a
Ray job to a cluster (KubeRay) through the Jobs API, as training does; `auto` joins a cluster from inside.
Exit 0 done, 1 failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from batch.job import Request, run_batch
from batch.shards import BatchError, Settings
from maskrcnn.storage import SourceError

log = logging.getLogger("batch")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="images: a folder, s3:// or gs:// prefix")
    p.add_argument("output", help="results: a folder, s3:// or gs:// prefix (resumable)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--package", help="a serving package: a folder, s3:// or gs:// prefix")
    which.add_argument("--model", help="a registered model: models:/NAME@ALIAS or models:/NAME/VERSION (MLflow)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""), help="MLflow, for --model")
    p.add_argument("--shard-size", type=int, default=64, help="images per results file (1-10000)")
    p.add_argument("--score-threshold", type=float, default=0.05, help="detections below are dropped")
    p.add_argument("--max-detections", type=int, default=100, help="per image")
    p.add_argument("--overlays", action="store_true", help="also write each image with its detections drawn")
    p.add_argument("--masks", action="store_true", help="also write each image's masks (one colour per instance)")
    p.add_argument("--concurrency", type=int, default=1, help="actors, each holding the model once")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per actor (default: cores / concurrency)")
    p.add_argument("--public-keys", action="append", default=None,
                   help="an Ed25519 public key file or folder (repeatable; default $MASKRCNN_PUBLIC_KEYS): the package must be "
                        "signed by one of them")
    p.add_argument("--address", default="", help="empty: a local Ray; http://HEAD:8265: a Ray job on that cluster; auto")
    return p


def main(argv: list[str] | None = None) -> int:
    from maskrcnn import cli
    from maskrcnn.logs import setup_logging
    from maskrcnn.package import PackageError
    from maskrcnn.signature import SignatureError, public_key_sources

    setup_logging()
    args = get_args_parser().parse_args(argv)

    def batch() -> int:
        keys = public_key_sources(args.public_keys)
        settings = Settings(args.shard_size, args.score_threshold, args.max_detections, args.overlays, args.masks)
        request = Request(args.source, args.output, args.package or "", args.model or "", args.tracking_uri, settings,
                          args.concurrency, args.threads, args.address, tuple(keys))
        log.info("done: %s", json.dumps(run_batch(request)))
        return 0

    return cli.run(batch, {(BatchError, PackageError, SourceError, SignatureError, ValueError): 2, RuntimeError: 1}, log)


if __name__ == "__main__":
    sys.exit(main())
