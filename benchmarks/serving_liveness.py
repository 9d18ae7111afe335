"""The predictor's liveness latency while its queue is full of the largest bodies (issue 32, item 6).

`python -m serving` on a seeded tiny package, on 127.0.0.1, with the InferenceService's queue
(`--max-queue 27`, its containerConcurrency) and two inference workers. `clients` threads each send, in a
loop for `--seconds`, a V1 request whose body is one large PNG (`--body-mb`, the default 26 MB as the issue's
run: a 2450x2450 noise image), while a prober asks for liveness (`GET /`) every 50 ms. The baseline is the
same prober against the idle server, in the same run. The prober is a process of its own, so that the
clients' threads (in this one) add no GIL waits to its numbers. Rows: liveness latency p50/p99/max, probes over
Kubernetes' default 1 s time-out, and the server's RSS growth.

`--tree PATH` runs the predictor of another checkout (e.g. a `git worktree` of the commit before the
change), for a before/after table in one session.

    uv run python benchmarks/serving_liveness.py [--clients 27] [--seconds 20] [--body-mb 26] [--protocol v1|v2] [--tree PATH]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_package(folder: Path) -> Path:
    import torch

    from maskrcnn.config import CONFIG_DIR, load_config
    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    cfg = load_config(CONFIG_DIR / "tiny.yaml", [])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    write_package(build_model(cfg.model, labels.num_classes), cfg, labels, {"epoch": 0}, folder / "package")
    return folder / "package"


def large_body(megabytes: float, protocol: str = "v1") -> bytes:
    """A V1 (or V2) request of one noise PNG whose base64 body is about `megabytes` MB."""
    from PIL import Image

    side = int((megabytes * 1e6 * 3 / 4 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    text = base64.b64encode(buf.getvalue()).decode()
    if protocol == "v2":
        return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()
    return json.dumps({"instances": [{"image": {"b64": text}}]}).encode()


PROBER = """
import json, sys, time, urllib.request
url, seconds, period = sys.argv[1], float(sys.argv[2]), 0.05
latencies, deadline = [], time.monotonic() + seconds
while time.monotonic() < deadline:
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(url + "/", timeout=30) as answer:
            answer.read()
            ok = answer.status == 200
    except OSError:
        ok = False
    latencies.append((time.perf_counter() - began) * 1000 if ok else float("inf"))
    time.sleep(max(0.0, period - (time.perf_counter() - began)))
print(json.dumps(latencies))
"""


def probe(url: str, seconds: float) -> list[float]:
    """Liveness latencies (ms) from a prober in a process of its own (the clients' threads share this
    process's GIL, which would add their waits to the numbers)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PROBER, url, str(seconds)], capture_output=True, text=True,
                          timeout=seconds + 120, check=True)
    return json.loads(done.stdout)


def row(name: str, latencies: list[float], growth: float | None = None, answered: dict | None = None) -> str:
    values = np.asarray(latencies)
    over = int((values > 1000).sum())
    return (f"| {name} | {len(values)} | {np.percentile(values, 50):.1f} | {np.percentile(values, 99):.1f} | {values.max():.1f} | "
            f"{over} | {'' if growth is None else f'{growth:.0f}'} | {'' if answered is None else answered} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=27)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--body-mb", type=float, default=26)
    p.add_argument("--queue", type=int, default=27)
    p.add_argument("--tree", default="", help="another checkout whose predictor to run")
    p.add_argument("--protocol", choices=["v1", "v2"], default="v1")
    args = p.parse_args()

    from devstack import load

    body = large_body(args.body_mb, args.protocol)
    path = "/v2/models/maskrcnn/infer" if args.protocol == "v2" else load.V1_PREDICT
    launcher = None
    if args.tree:
        code = (f"import sys, runpy; sys.path.insert(0, {str(Path(args.tree).resolve())!r}); "
                "runpy.run_module('serving', run_name='__main__', alter_sys=True)")
        launcher = [sys.executable, "-c", code]
    with tempfile.TemporaryDirectory() as tmp:
        package = make_package(Path(tmp))
        with load.predictor(package, Path(tmp) / "serving.log", "--max-queue", str(args.queue), "--inference-workers", "2",
                            "--threads", "2", launcher=launcher) as server:
            idle = probe(server.url, 5)
            stop = time.monotonic() + args.seconds
            statuses: dict[int | str, int] = {}
            lock = threading.Lock()

            def client() -> None:
                while time.monotonic() < stop:
                    answer = load.request(server.url, "POST", path, body, 120)
                    with lock:
                        statuses[answer.status] = statuses.get(answer.status, 0) + 1

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(2)  # the queue fills
            growth, loaded = load.peak_rss_growth(server.proc.pid, lambda: probe(server.url, args.seconds - 2), interval=0.05)
            for t in threads:
                t.join()
    print(f"{'tree ' + args.tree if args.tree else 'this checkout'}: {args.clients} clients, {len(body) / 1e6:.1f} MB "
          f"{args.protocol.upper()} bodies, "
          f"queue {args.queue}, {args.seconds:g} s")
    print("| server | probes | p50 ms | p99 ms | max ms | over 1 s | RSS growth MB | answers |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("idle (baseline)", idle))
    print(row("queue full of the largest bodies", loaded, growth, dict(sorted(statuses.items(), key=str))))
    print(f"ratio p99 loaded / idle: {np.percentile(loaded, 99) / np.percentile(idle, 99):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
