"""Peak memory of one prediction request: image size x detections x images per request.

`before`: what the predictor did until issue 11, torchvision's own post-processing: all images of the
request decoded, one batched forward pass, and every detection's mask pasted at full resolution as
float32 at once (twice over: a list, then a stacked copy), then thresholded. `after`: the predictor now,
one image at a time through `maskrcnn.processing.detect`, masks pasted a few at a time within
`MASK_BUDGET_BYTES` and encoded as they go, with the network in ONNX Runtime (the package's
`detector.onnx`, the predictor's default); `eager`: the same with `--backend eager`.

Each configuration runs in a fresh process; the number is the peak of the process's resident memory
during the request (sampled every 2 ms from /proc/self/statm) minus its resident memory just before,
after loading the model and a warm-up request. `before` runs are skipped where
their own estimate exceeds --max-gb (they would take the machine down).

    uv run python benchmarks/serving_memory.py [--sizes 1,4,12] [--detections 10,100] [--images 1,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_package(folder: Path, detections: int) -> Path:
    import torch

    from maskrcnn.config import CONFIG_DIR, load_config
    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    # An untrained model with no score floor returns exactly `detections` instances per image.
    cfg = load_config(CONFIG_DIR / "default.yaml", [f"model.box_detections_per_img={detections}", "model.box_score_thresh=0",
                                                    f"model.rpn_post_nms_top_n_test={max(200, 2 * detections)}"])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    write_package(build_model(cfg.model, labels.num_classes), cfg, labels, {"epoch": 0}, folder / "package")
    return folder / "package"


def png(megapixels: float, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 255 // side), (y * 255 // side), np.full_like(x, 60 + 40 * seed)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def measure(mode: str, package: str, megapixels: float, detections: int, count: int) -> dict:
    """In this (fresh) process: peak RSS growth of one request, in MB."""
    import os
    import threading

    import torch

    from serving.predictor import MaskRCNNPredictor
    from maskrcnn.images import decode_image, to_tensor
    from maskrcnn.masks import encode_masks

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    predictor = MaskRCNNPredictor("m", package, score_threshold=0.0, max_detections=detections, max_pixels=64_000_000,
                                  backend="onnxruntime" if mode == "after" else "eager")
    predictor.load()
    blobs = [png(megapixels, i) for i in range(count)]
    predictor._run([png(0.01, 0)], 0.0, detections, False)  # warm-up
    baseline, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if mode in ("after", "eager"):
        results, _ = predictor._run(blobs, 0.0, detections, False)
        found = sum(len(r["detections"]) for r in results)
    else:
        with torch.inference_mode():
            from maskrcnn.package import open_package

            model = open_package(package).build_model()  # torchvision's own, every mask pasted at once
            outputs = model([to_tensor(decode_image(b, 64_000_000)) for b in blobs])
            found = 0
            for out in outputs:
                found += len(encode_masks((out["masks"][:, 0] > 0.5).to(torch.uint8).numpy()))
    done.set()
    sampler.join()
    return {"mode": mode, "mp": megapixels, "detections": detections, "images": count, "found": found,
            "peak_mb": round(max(peak[0] - baseline, 0) / 2**20, 1)}


def estimate_before_gb(megapixels: float, detections: int, count: int) -> float:
    """torchvision's pasted masks alone: float32, held twice, for every image of the request."""
    return 2 * 4 * megapixels * 1e6 * detections * count / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4,12", help="megapixels per image")
    p.add_argument("--detections", default="10,100")
    p.add_argument("--images", default="1,4", help="images per request")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip `before` runs estimated above this")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, package, mp, det, n = args.child
        print(json.dumps(measure(mode, package, float(mp), int(det), int(n))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for det in [int(v) for v in args.detections.split(",")]:
            package = make_package(Path(tmp) / f"d{det}", det)
            for mp in [float(v) for v in args.sizes.split(",")]:
                for n in [int(v) for v in args.images.split(",")]:
                    row = {"mp": mp, "detections": det, "images": n, "estimate_before_gb": round(estimate_before_gb(mp, det, n), 1)}
                    for mode in ("before", "eager", "after"):
                        if mode == "before" and row["estimate_before_gb"] > args.max_gb:
                            row[mode] = None
                            continue
                        out = subprocess.run([sys.executable, __file__, "--child", mode, str(package), str(mp), str(det), str(n)],
                                             capture_output=True, text=True, check=True)
                        result = json.loads(out.stdout.strip().splitlines()[-1])
                        row[mode], row["found"] = result["peak_mb"], result["found"]
                    rows.append(row)
                    print(f"{mp:>5.0f} MP  {det:>4} det  {n} img  found {row['found']:>4}  "
                          f"before {row['before'] if row['before'] is not None else 'skipped (est. %.0f GB)' % row['estimate_before_gb']:>8} MB  "
                          f"eager {row['eager']:>7} MB  after {row['after']:>7} MB", flush=True)
    print("\n| MP/image | detections | images | before: peak RSS during the request (MB) | after, eager (MB) "
          "| after, ONNX Runtime (MB) | before / after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['before'] / max(r['after'], 1):.1f}x" if r["before"] is not None else "-"
        before = f"{r['before']:.0f}" if r["before"] is not None else f"not run (est. {r['estimate_before_gb']:.0f} GB)"
        print(f"| {r['mp']:.0f} | {r['detections']} | {r['images']} | {before} | {r['eager']:.0f} | {r['after']:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
