"""`training.data.convert`'s peak memory and time against the export's size (issue 32, item 2).

CVAT XML exports of one 2000x2000 image with K `<mask>` elements whose box is the whole image and whose
RLE is two runs (one foreground pixel: about 78 bytes of XML each, the issue's case), for K in `--masks`; and one export holding a single 3-point polygon at +-1e7 (refused now before anything is
drawn). Each conversion runs in a fresh process; the number is its peak RSS (`ru_maxrss`) less the peak of
the same process importing the converter and converting a 1-mask export (the baseline, in the same run).
`--tree PATH` adds the same rows for another checkout (e.g. a `git worktree` of the commit before the
change), for a before/after table in one session.

    uv run python benchmarks/convert_memory.py [--masks 15,60,240] [--tree PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from training.data.convert import convert
from training.data.coco import DatasetError
began = time.perf_counter()
try:
    convert("cvat-xml", sys.argv[2], sys.argv[3])
    outcome = "converted"
except DatasetError as exc:
    outcome = "refused: " + str(exc).splitlines()[1].strip()[:80]
print(json.dumps({"seconds": time.perf_counter() - began, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "outcome": outcome}))
"""


def export(folder: Path, masks: int, far_polygon: bool = False) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (2000, 2000), (90, 90, 90)).save(folder / "images" / "a.png")
    shapes = "".join(f'<mask label="cat" rle="{1000 * i + 7},1,{4_000_000 - 1000 * i - 8}" left="0" top="0" width="2000" '
                     f'height="2000"/>' for i in range(masks))
    if far_polygon:
        shapes = '<polygon label="cat" points="-1e7,-1e7;1e7,-1e7;1e7,1e7"/>'
    (folder / "annotations.xml").write_text(f'<annotations><version>1.1</version><image name="a.png" width="2000" '
                                            f'height="2000">{shapes}</image></annotations>')
    return folder


def run(tree: Path, src: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(src), str(out)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        return {"seconds": float("nan"), "peak_mb": float("nan"), "outcome": f"exit {done.returncode}: "
                f"{done.stderr.strip().splitlines()[-1][:80] if done.stderr.strip() else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", default="15,60,240")
    p.add_argument("--tree", default="", help="another checkout to measure beside this one")
    args = p.parse_args()
    trees = [("this checkout", ROOT)] + ([(f"tree {args.tree}", Path(args.tree).resolve())] if args.tree else [])
    cases = [("1 mask (baseline)", 1, False)] + [(f"{k} masks", k, False) for k in map(int, args.masks.split(","))] + \
        [("one polygon at +-1e7", 0, True)]
    print("| code | export | XML bytes | peak RSS MB | over baseline MB | seconds | outcome |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in trees:
            baseline = None
            for i, (case, masks, far) in enumerate(cases):
                src = export(Path(tmp) / f"{name}-{i}", masks, far)
                started = time.perf_counter()
                result = run(tree, src, Path(tmp) / f"{name}-{i}-out")
                baseline = result["peak_mb"] if baseline is None else baseline
                print(f"| {name} | {case} | {(src / 'annotations.xml').stat().st_size} | {result['peak_mb']:.0f} | "
                      f"{result['peak_mb'] - baseline:.0f} | {result['seconds']:.2f} ({time.perf_counter() - started:.1f} with start) | "
                      f"{result['outcome']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
