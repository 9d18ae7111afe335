"""`uv run -m serving --model-dir PATH_OR_URI`: serve a serving package over KServe V1/V2, with the web page.

In a KServe InferenceService the storage initializer mounts `storageUri` at /mnt/models (the default).
Listens on 127.0.0.1 unless `--host` says otherwise (the ServingRuntime passes 0.0.0.0). The limits
under load (`serving.limits`): a bounded queue derived from the memory budget, a per-request deadline,
read time-outs for slow clients, a connection limit under the open-file limit (raised to its hard limit
at start), a watchdog on the forward pass, and a graceful drain on SIGTERM (`serving.server`).
Exit status: 0 after a drain, 1 when the package is refused or a forward pass is stuck at exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from serving.limits import (ANSWER_FACTOR, MAX_PIXELS, MIB, ServingLimits, backlog_for_fds, connections_for_fds, memory_budget,
                            queue_for_memory, raise_fd_limit)
from serving.predictor import BACKENDS, DEFAULT_MODEL_DIR, MAX_DETECTIONS, SCORE_THRESHOLD, MaskRCNNPredictor
from maskrcnn.onnx_runtime import DEVICES
from maskrcnn.logs import setup_logging
from maskrcnn.names import MODEL_NAME
from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION
from maskrcnn.names import PUBLIC_KEYS_ENV
from maskrcnn.signature import public_key_sources

SWITCH_INTERVAL_S = 0.0005

log = logging.getLogger("serving")
EXPECT_VERSION_ENV, EXPECT_DIGEST_ENV = "MASKRCNN_EXPECT_VERSION", "MASKRCNN_EXPECT_DIGEST"


def get_args_parser() -> argparse.ArgumentParser:
    limits = ServingLimits()  # the defaults, defined once
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="package folder, or s3:// / gs:// prefix")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD)
    p.add_argument("--max-detections", type=int, default=MAX_DETECTIONS)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger images are refused (decompression bombs)")
    p.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / MIB, help="one request's body; larger: 400")
    p.add_argument("--max-queue", type=int, default=None,
                   help="prediction requests admitted at once (running and waiting); beyond: 503 with Retry-After. "
                        "Default: what the memory budget affords at --max-body-mb (serving.limits)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="the memory the queue and the images in flight may assume (default: the container's memory "
                        "limit, else 6144)")
    p.add_argument("--request-timeout-s", type=float, default=limits.request_timeout_s,
                   help="deadline from admission to answer; a request still queued then is dropped with 504")
    p.add_argument("--forward-limit-s", type=float, default=limits.forward_limit_s,
                   help="a forward pass running longer: liveness fails (readiness at half of it)")
    p.add_argument("--header-timeout-s", type=float, default=limits.header_timeout_s,
                   help="request headers must arrive within this")
    p.add_argument("--body-timeout-s", type=float, default=limits.body_timeout_s, help="longest pause inside a request body")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open client connections (default: the open-file limit less a reserve, at most 2048)")
    p.add_argument("--grace-period-s", type=float, default=limits.grace_period_s,
                   help="after SIGTERM: finish admitted requests for at most this long (below the pod's "
                        "terminationGracePeriodSeconds)")
    p.add_argument("--drain-delay-s", type=float, default=limits.drain_delay_s,
                   help="after SIGTERM: keep answering (503) at least this long before exiting")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="run the network in ONNX Runtime (the package's detector.onnx; auto: when the package has it) "
                        "or eager PyTorch")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the graph runs: auto (the GPU when one is visible and onnxruntime-gpu is installed, "
                        "else the CPU, saying why), cpu, or cuda (refused at start when it cannot be had); the eager "
                        "network likewise, on the GPU PyTorch sees")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads in all (default: the CPUs this process may use, capped by its container's "
                        "CPU limit)")
    p.add_argument("--inference-workers", type=int, default=None,
                   help="images inferred at once, each on threads/N intra-op threads (default: with the graph on the "
                        "CPU, one per thread, at most 8; on the GPU or in eager PyTorch, 1, the most eager allows)")
    p.add_argument("--public-keys", action="append", default=None,
                   help=f"trusted Ed25519 public keys: a PEM file (one or more keys) or a folder of *.pem files, e.g. "
                        f"a mounted ConfigMap; with any, unsigned or wrongly signed packages are refused. Repeatable "
                        f"(every key given is trusted); an empty value is refused, since KServe appends an "
                        f"InferenceService's args to the runtime's and an empty one would turn the check off. Default "
                        f"${PUBLIC_KEYS_ENV}; none: signatures are not checked")
    p.add_argument("--expect-version", default=os.environ.get(EXPECT_VERSION_ENV, ""),
                   help=f"serve only a package stamped with this model version (default ${EXPECT_VERSION_ENV}, which the "
                        f"ServingRuntime reads from the InferenceService's {VERSION_ANNOTATION} annotation that "
                        f"`release promote` sets; empty: not checked)")
    p.add_argument("--expect-digest", default=os.environ.get(EXPECT_DIGEST_ENV, ""),
                   help=f"serve only the package whose SHA256SUMS has this digest, sha256:<hex> (default "
                        f"${EXPECT_DIGEST_ENV}, from the {DIGEST_ANNOTATION} annotation; empty: not checked)")
    return p


def limits_from(args: argparse.Namespace, fd_limit: int, workers: int | None = None) -> ServingLimits:
    """The limits the flags ask for; the queue, when not given, from the memory budget beside `workers`
    images in flight (default: `--inference-workers`, else one)."""
    max_body = int(args.max_body_mb * MIB)
    budget = memory_budget_of(args)
    connections = args.max_connections if args.max_connections is not None else connections_for_fds(fd_limit)
    workers = workers or args.inference_workers or 1
    return ServingLimits(
        max_queue=args.max_queue if args.max_queue is not None else
        queue_for_memory(budget, max_body, workers, args.max_pixels),
        max_body_bytes=max_body, request_timeout_s=args.request_timeout_s, forward_limit_s=args.forward_limit_s,
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        max_connections=connections, backlog=backlog_for_fds(fd_limit, connections),
        grace_period_s=args.grace_period_s, drain_delay_s=args.drain_delay_s)


def memory_budget_of(args: argparse.Namespace) -> int:
    return int(args.memory_budget_mb * MIB) if args.memory_budget_mb else memory_budget()


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    setup_logging()
    # The event loop (probes, every connection's I/O) shares the GIL with the inference and parsing threads;
    # handing it over every 0.5 ms instead of Python's 5 ms keeps a probe from waiting out several threads'
    # full slices (benchmarks/serving_liveness.py)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    args, _ = get_args_parser().parse_known_args(argv)  # kserve parses its own flags at import
    fd_limit = raise_fd_limit()
    try:
        limits = limits_from(args, fd_limit)  # every flag checked before the package is read
        keys = public_key_sources(args.public_keys)
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    from serving.app import build_app
    from serving.server import make_server

    from maskrcnn.onnx_runtime import GraphError
    from maskrcnn.package import PackageError
    from maskrcnn.signature import SignatureError

    try:
        model = MaskRCNNPredictor(args.model_name, args.model_dir, score_threshold=args.score_threshold,
                                  max_detections=args.max_detections, max_pixels=args.max_pixels, backend=args.backend,
                                  threads=args.threads, public_keys=keys or None, expect_version=args.expect_version,
                                  expect_digest=args.expect_digest,
                                  forward_limit_s=limits.forward_limit_s, device=args.device,
                                  workers=args.inference_workers, memory_budget_bytes=memory_budget_of(args),
                                  max_answer_bytes=ANSWER_FACTOR * limits.max_body_bytes)
    except ValueError as exc:  # a flag out of its range
        log.error("%s", exc)
        return 2
    except SignatureError as exc:  # unreadable public keys
        log.error("not serving %s: %s", args.model_dir, exc)
        return 1
    try:
        model.load()
    except (PackageError, SignatureError, GraphError) as exc:  # never ready: the pod restarts and KServe reports the failed load
        log.error("not serving %s: %s", args.model_dir, exc)
        return 1
    limits = limits_from(args, fd_limit, model.workers)  # the queue beside the images in flight
    app = build_app(model, limits)
    log.info("loaded in %.1f s; serving on http://%s:%d (web page: /ui); %s", time.perf_counter() - started, args.host,
             args.http_port, limits)
    make_server(app, app.state.admission, limits, args.host, args.http_port).run()
    if model.forward_seconds() > 0:  # an inference thread cannot be joined: leave without waiting for it
        log.error("exiting with a forward pass still running after %.0f s", model.forward_seconds())
        logging.shutdown()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
