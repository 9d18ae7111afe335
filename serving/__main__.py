"""`uv run -m serving --model-dir PATH_OR_URI`: serve a serving package over KServe V1/V2, with the web page.

In a KServe InferenceService the storage initializer mounts `storageUri` at /mnt/models (the default).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from serving.predictor import BACKENDS, DEFAULT_MODEL_DIR, MaskRCNNPredictor
from training.logs import setup_logging

log = logging.getLogger("serving")
PUBLIC_KEYS_ENV = "MASKRCNN_PUBLIC_KEYS"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="package folder, or s3:// / gs:// prefix")
    p.add_argument("--model-name", default="maskrcnn")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="larger images are refused (decompression bombs)")
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="run the network in ONNX Runtime (the package's detector.onnx; auto: when the package has it) "
                        "or eager PyTorch")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads (default: the CPUs this process may use, capped by its container's CPU limit)")
    p.add_argument("--public-keys", default=os.environ.get(PUBLIC_KEYS_ENV, ""),
                   help=f"trusted Ed25519 public keys: a PEM file (one or more keys) or a folder of *.pem files, e.g. "
                        f"a mounted ConfigMap; with any, unsigned or wrongly signed packages are refused. Default "
                        f"${PUBLIC_KEYS_ENV}; empty: signatures are not checked")
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    setup_logging()
    args, _ = get_args_parser().parse_known_args(argv)  # kserve parses its own flags at import
    import uvicorn

    from serving.app import build_app

    from training.package import PackageError
    from training.signature import SignatureError

    try:
        model = MaskRCNNPredictor(args.model_name, args.model_dir, score_threshold=args.score_threshold,
                                  max_detections=args.max_detections, max_pixels=args.max_pixels, backend=args.backend,
                                  threads=args.threads, public_keys=args.public_keys or None)
        model.load()
    except (PackageError, SignatureError) as exc:  # never ready: the pod restarts and KServe reports the failed load
        log.error("not serving %s: %s", args.model_dir, exc)
        return 1
    app = build_app(model, int(args.max_body_mb * (1 << 20)))
    log.info("loaded in %.1f s; serving on http://%s:%d (web page: /ui)", time.perf_counter() - started, args.host,
             args.http_port)
    uvicorn.run(app, host=args.host, port=args.http_port, log_config=None, timeout_keep_alive=65)
    return 0


if __name__ == "__main__":
    sys.exit(main())
