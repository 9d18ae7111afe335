"""The predictor under load and faults: the figures behind `tests/serving/test_serving_faults.py`.

`python -m serving` on 127.0.0.1 with a package of the default config's architecture (seeded weights,
images resized to `--image-size`), driven by the bounded clients of `devstack.load`:

1. load: concurrency 1, 4, 16 and 64 at the default limits (the queue from the 6 GiB budget beside the
   images in flight); p50/p99 latency of the 200s, 503s, errors (any other answer, or no answer); with
   the default inference workers (one per core) and with one (each image on every core: the baseline);
2. saturation: 16 concurrent 26 MB bodies, with a queue of 4 against a queue of 64 (the baseline, as
   good as no limit): peak RSS growth, and the memory each admitted request costs (the factor behind
   `serving.limits.REQUEST_MEMORY_FACTOR`);
3. abandoned work: 24 heavy requests (8 images each) whose clients leave at once, then one small
   request: its latency against one heavy request alone (the baseline), and what /metrics counted;
4. slow clients: 300 connections sending headers slowly while a good client is served, then 1100 under
   an open-file limit of 1024: refused with 503, reset, or held;
5. SIGTERM with 4 heavy requests in flight and a new one after it: answers, time to exit, exit status.

    uv run python benchmarks/serving_load.py [--image-size 512]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_vs_flask import make_package  # noqa: E402
from devstack import load  # noqa: E402
from maskrcnn.logs import setup_logging  # noqa: E402

log = logging.getLogger("benchmarks.serving_load")


def image_body(size: int, seed: int = 0, count: int = 1) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    instance = {"image": {"b64": base64.b64encode(buf.getvalue()).decode()}}
    return json.dumps({"instances": [instance] * count}).encode()


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=512)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serving-load-"))
    package = make_package(work, args.image_size)
    small, heavy = image_body(64), image_body(args.image_size, count=8)  # heavy: 8 images, the most one request holds
    report = []

    log.info("1. load at concurrency 1, 4, 16, 64 (default limits), one inference worker and the default")
    rows = []
    for workers in ("1", "default"):
        flags = ("--inference-workers", workers) if workers != "default" else ()
        with load.predictor(package, work / f"load-{workers}.log", *flags) as srv:
            load.run_load(srv.url, [small] * 4, 2)  # warm-up
            queue = int(load.metric(load.metrics(srv.url), "maskrcnn_queue_limit"))
            for c in (1, 4, 16, 64):
                row = load.summary(load.run_load(srv.url, [image_body(128, seed=i) for i in range(max(16, 2 * c))], c))
                rows.append({"workers": workers, "queue": queue, **row})
    report.append("Load (128 px images, default limits):\n\n" +
                  table(rows, ["workers", "queue", "concurrency", "requests", "ok", "503", "errors", "p50_ms", "p99_ms"]))

    log.info("2. saturation: 16 concurrent 26 MB bodies, queue 4 against queue 64")
    big = json.dumps({"instances": [{"image": {"b64": "A" * (26 << 20)}}]}).encode()
    rows = []
    for queue in (64, 4):
        with load.predictor(package, work / f"saturation-{queue}.log", "--max-queue", str(queue)) as srv:
            growth, answers = load.peak_rss_growth(srv.proc.pid, lambda: load.run_load(srv.url, [big] * 16, 16).answers)
            statuses = {s: [a.status for a in answers].count(s) for s in {a.status for a in answers}}
            admitted = sum(1 for a in answers if a.status != 503)
            rows.append({"queue": queue, "admitted": admitted, "answers": statuses, "peak_rss_growth_mb": round(growth),
                         "mb_per_admitted": round(growth / max(1, min(admitted, queue)), 1),
                         "factor_x_body": round(growth / max(1, min(admitted, queue)) / 26, 2)})
    rows[1]["vs_baseline"] = f"x{rows[1]['peak_rss_growth_mb'] / max(1, rows[0]['peak_rss_growth_mb']):.2f}"
    rows[0]["vs_baseline"] = "baseline"
    report.append("Saturation (16 concurrent 26 MB bodies):\n\n" +
                  table(rows, ["queue", "admitted", "answers", "peak_rss_growth_mb", "mb_per_admitted", "factor_x_body",
                               "vs_baseline"]))

    log.info("3. abandoned work: 24 heavy requests whose clients leave")
    with load.predictor(package, work / "abandon.log") as srv:
        load.predict(srv.url, heavy)
        one = min(load.predict(srv.url, heavy).seconds for _ in range(3))
        before = load.metrics(srv.url)
        with ThreadPoolExecutor(24) as pool:
            list(pool.map(lambda _: load.abandon(srv.url, heavy), range(24)))
        time.sleep(0.2)
        after_leave = load.predict(srv.url, small)
        time.sleep(1)
        after = load.metrics(srv.url)
        dropped = load.metric(after, "maskrcnn_requests_dropped_total", reason="client_left") - \
            load.metric(before, "maskrcnn_requests_dropped_total", reason="client_left")
        computed = load.metric(after, "maskrcnn_detections_per_image_count") - \
            load.metric(before, "maskrcnn_detections_per_image_count") - 1
    report.append("Abandoned work (24 requests of 8 images whose clients leave, then one small request):\n\n" + table(
        [{"one_heavy_request_s": round(one, 2), "next_request_s": round(after_leave.seconds, 2),
          "vs_one_heavy": f"x{after_leave.seconds / one:.2f}", "dropped_client_left": int(dropped),
          "images_computed_of_192": int(computed)}],
        ["one_heavy_request_s", "next_request_s", "vs_one_heavy", "dropped_client_left", "images_computed_of_192"]))

    log.info("4. slow clients: 300 held, then 1100 under an open-file limit of 1024")
    with load.predictor(package, work / "slow.log", fd_limit=1024) as srv:
        baseline = min(load.predict(srv.url, small).seconds for _ in range(3))
        held = load.slow_clients(srv.url, 300)
        good = min(load.predict(srv.url, small).seconds for _ in range(3))
        for s in held:
            s.close()
        time.sleep(0.5)
        many = load.slow_clients(srv.url, 1100)
        fds = load.open_fds(srv.proc.pid)
        outcomes = [load.read_status(s, timeout=15) for s in many]
        for s in many:
            s.close()
        counts = {str(k): outcomes.count(k) for k in sorted(set(outcomes), key=str)}
        after = load.predict(srv.url, small)
    report.append("Slow clients (headers never finished; header time-out 10 s; open-file limit 1024 -> 896 connections):\n\n" +
                  table([{"good_client_alone_ms": round(baseline * 1000, 1), "with_300_slow_ms": round(good * 1000, 1),
                          "1100_slow_outcomes": counts, "server_fds_at_peak": fds,
                          "good_client_after": after.status}],
                        ["good_client_alone_ms", "with_300_slow_ms", "1100_slow_outcomes", "server_fds_at_peak",
                         "good_client_after"]))

    log.info("5. SIGTERM with 4 heavy requests in flight")
    with load.predictor(package, work / "sigterm.log") as srv:
        with ThreadPoolExecutor(4) as pool:
            flying = [pool.submit(load.predict, srv.url, heavy) for _ in range(4)]
            time.sleep(0.3)
            sent = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            new = load.predict(srv.url, small)
            answers = [f.result().status for f in flying]
        code = srv.proc.wait(60)
        exit_s = time.perf_counter() - sent
    report.append("SIGTERM with 4 heavy requests in flight:\n\n" + table(
        [{"in_flight_answers": answers, "new_request": f"{new.status} retry-after={new.headers.get('retry-after')}",
          "exit_status": code, "signal_to_exit_s": round(exit_s, 2)}],
        ["in_flight_answers", "new_request", "exit_status", "signal_to_exit_s"]))
    print("\n\n".join(report))


if __name__ == "__main__":
    main()
