"""The predictor's start-up before and after the verified package (issue 18): load time and peak memory.

Each row is a fresh process that imports the predictor, loads a package of the same seeded model
(the main job's default architecture: `maskrcnn/configs/default.yaml`) and reports how long `load()`
took and its peak RSS:

- `before`: the code at `--before` (default ea358d2, the last commit before the package reader), from a
  git worktree, on a package its own export wrote (checksums, weights, config, label map, graph);
- `after`: this tree, on a package `write_package` wrote: every file read once and checked (limits,
  zips, YAML, ranges, label map against the head, graph rules), then the probe run through the graph;
- `after, signed`: the same, signed, with the public key configured (signature verified as well).

Rows alternate, `--runs` times each; the table gives medians (and the spread). With `--breakdown`, the
new load's steps are timed apart in one more process.

    uv run python benchmarks/predictor_startup.py [--runs 5] [--before REF] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE_BEFORE = """
import sys, torch
from training.checkpoint import save_checkpoint
from maskrcnn.config import CONFIG_DIR, load_config
from maskrcnn.labels import LabelMap
from training.export import export_package
from maskrcnn.model import build_model
cfg = load_config(CONFIG_DIR / "default.yaml", [])
torch.manual_seed(0)
labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
ckpt = save_checkpoint(sys.argv[1] + "/ckpt", model=build_model(cfg.model, labels.num_classes), optimizer=None,
                       scheduler=None, scaler=None, epoch=0, config=cfg, label_map=labels, metrics={})
export_package(ckpt, sys.argv[1] + "/package", {"model_version": "bench"})
"""

MAKE_AFTER = """
import sys, torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
from maskrcnn.config import CONFIG_DIR, load_config
from maskrcnn.labels import LabelMap
from maskrcnn.model import build_model
from training.export import write_package
cfg = load_config(CONFIG_DIR / "default.yaml", [])
torch.manual_seed(0)
labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
package = write_package(build_model(cfg.model, labels.num_classes), cfg, labels, {"model_version": "bench"},
                        sys.argv[1] + "/package")
key = Ed25519PrivateKey.generate()
package.signed(key).save(sys.argv[1] + "/signed")
open(sys.argv[1] + "/public.pem", "wb").write(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
"""

LOAD = """
import json, resource, sys, time
started = time.perf_counter()
from serving.predictor import MaskRCNNPredictor
imported = time.perf_counter()
kwargs = {"public_keys": sys.argv[2]} if len(sys.argv) > 2 else {}
model = MaskRCNNPredictor("maskrcnn", sys.argv[1], threads=2, **kwargs)
assert model.load() and model.graph is not None
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BREAKDOWN = """
import json, sys, time
import torch
import maskrcnn.model, training.onnx_export  # imported before the clock starts, as in the predictor
from maskrcnn.package import open_package
from maskrcnn.onnx_runtime import OnnxDetector
from maskrcnn.signature import load_public_keys
keys = load_public_keys(sys.argv[2])
t = [time.perf_counter()]
package = open_package(sys.argv[1]); t.append(time.perf_counter())
open_package(sys.argv[1], public_keys=keys); t.append(time.perf_counter())
model = package.build_model(); t.append(time.perf_counter())
graph = OnnxDetector(package.graph, 2); t.append(time.perf_counter())
torch.set_num_threads(1)
assert package.probe.mismatch(graph.run, 60) == ""; t.append(time.perf_counter())
names = ["read and verify", "read, verify and check the signature", "build the eager model",
         "ONNX Runtime session", "probe (3 inputs through the graph)"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


def run(code: str, *args: str, pythonpath: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600,
                         cwd=pythonpath)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--before", default="ea358d2", help="git ref of the code before the change")
    p.add_argument("--breakdown", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before_tree = tmp / "before-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before],
                       check=True, capture_output=True)
        try:
            run(MAKE_BEFORE, str(tmp / "before"), pythonpath=before_tree)
            run(MAKE_AFTER, str(tmp / "after"), pythonpath=ROOT)
            rows = {"before": (before_tree, [str(tmp / "before" / "package")]),
                    "after": (ROOT, [str(tmp / "after" / "package")]),
                    "after, signed": (ROOT, [str(tmp / "after" / "signed"), str(tmp / "after" / "public.pem")])}
            results: dict[str, list[dict]] = {name: [] for name in rows}
            for _ in range(args.runs):
                for name, (tree, argv) in rows.items():
                    results[name].append(run(LOAD, *argv, pythonpath=tree))
            breakdown = run(BREAKDOWN, str(tmp / "after" / "signed"), str(tmp / "after" / "public.pem"),
                            pythonpath=ROOT) if args.breakdown else {}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False)
    base = statistics.median(r["load_s"] for r in results["before"])
    print(f"\npredictor start-up, default architecture, 2 threads, {args.runs} fresh processes per row (medians; "
          f"min-max)\n")
    print("| code | load() s | vs before | import s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        load = [r["load_s"] for r in rs]
        print(f"| {name} | {statistics.median(load):.3f} ({min(load):.3f}-{max(load):.3f}) | "
              f"x{statistics.median(load) / base:.2f} | {statistics.median(r['import_s'] for r in rs):.2f} | "
              f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} "
              f"({min(r['peak_rss_mb'] for r in rs):.0f}-{max(r['peak_rss_mb'] for r in rs):.0f}) |")
    if breakdown:
        print("\nthe new load's steps (one process):\n")
        for step, seconds in breakdown.items():
            print(f"- {step}: {seconds * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
