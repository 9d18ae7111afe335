"""COCO evaluation speed: faster-coco-eval (our evaluator) against pycocotools, same data, same numbers.

Builds a COCO ground truth of random masks and noisy predictions, runs both evaluators for bbox and
segm, checks they agree on every summary statistic, and prints the time ratio.

    uv run python benchmarks/coco_eval.py [--images 300] [--per-image 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time

import numpy as np


def make_case(images: int, per_image: int, size: int = 128, seed: int = 0):
    from faster_coco_eval.core import mask as mask_util

    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": size, "height": size})
        for _ in range(per_image):
            x, y = rng.integers(0, size - 40, 2)
            w, h = rng.integers(8, 40, 2)
            m = np.zeros((size, size), np.uint8)
            m[y:y + h, x:x + w] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            cat = int(rng.integers(1, 4))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "segmentation": {"size": [size, size], "counts": rle["counts"].decode()},
                                      "area": float(w * h), "bbox": [float(x), float(y), float(w), float(h)], "iscrowd": 0})
            for _ in range(3):
                dx, dy = rng.integers(-4, 5, 2)
                pm = np.roll(np.roll(m, dx, 1), dy, 0)
                prle = mask_util.encode(np.asfortranarray(pm))
                results.append({"image_id": image_id, "category_id": cat if rng.random() < 0.8 else int(rng.integers(1, 4)),
                                "bbox": [float(x + dx), float(y + dy), float(w), float(h)], "score": float(rng.random()),
                                "segmentation": {"size": [size, size], "counts": prle["counts"].decode()}})
    return gt, results


def run_faster(gt, results, iou_type):
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(copy.deepcopy(gt))
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType=iou_type)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return np.asarray(ev.stats[:12])


def run_pycocotools(gt, results, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return np.asarray(ev.stats[:12])


def timed(fn, *args, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--per-image", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    gt, results = make_case(args.images, args.per_image)
    print(f"{args.images} images, {len(gt['annotations'])} instances, {len(results)} predictions; best of {args.repeats}")
    print(f"{'iou type':<10}{'pycocotools s':>15}{'faster-coco-eval s':>20}{'speed-up':>10}{'same stats':>12}")
    for iou_type in ("bbox", "segm"):
        t_ref, ref = timed(run_pycocotools, gt, results, iou_type, repeats=args.repeats)
        t_new, new = timed(run_faster, gt, results, iou_type, repeats=args.repeats)
        same = bool(np.allclose(ref, new, atol=1e-9))
        print(f"{iou_type:<10}{t_ref:>15.3f}{t_new:>20.3f}{t_ref / t_new:>10.2f}{str(same):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
