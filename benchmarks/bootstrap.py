"""The gate's paired bootstrap (training.bootstrap): its cost against one COCO segm evaluation, same data.

Two models' predictions on a split (`coco_eval.make_case`'s random masks and noisy predictions; the champion
loses a tenth of them and its scores are drawn again); times one faster-coco-eval segm evaluation of the candidate (the baseline), the
per-image matching of both models, and the paired bootstrap, and prints the bootstrap's cost in baseline
evaluations (running COCOeval on every resample would cost 2 x resamples of them).

    uv run python benchmarks/bootstrap.py [--images 50] [--per-image 8] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np

from coco_eval import make_case


def to_predictions(results: list[dict], label_of: dict[int, int]) -> list[dict]:
    """COCO result records -> the platform's per-image predictions."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    out = []
    for image_id, rows in by_image.items():
        out.append({"image_id": image_id,
                    "boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)], float),
                    "scores": np.array([r["score"] for r in rows]), "labels": np.array([label_of[r["category_id"]] for r in rows]),
                    "masks": [r["segmentation"] for r in rows]})
    return out


def main(argv: list[str] | None = None) -> int:
    from training.bootstrap import ImageMatches, paired_bootstrap
    from maskrcnn.labels import LabelMap
    from training.metrics import coco_map, to_coco_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--per-image", type=int, default=8)
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(argv)
    gt, cand_results = make_case(args.images, args.per_image, seed=0)
    rng = np.random.default_rng(1)  # the champion: a tenth of the candidate's predictions lost, scores drawn again
    champ_results = [{**r, "score": float(rng.random())} for r in cand_results if rng.random() > 0.1]
    label_map = LabelMap.from_categories(gt["categories"])
    label_of = {c: label_map.label_of(c) for c in label_map.category_ids}
    candidate, champion = to_predictions(cand_results, label_of), to_predictions(champ_results, label_of)

    t0 = time.perf_counter()
    coco = coco_map(gt, to_coco_results(candidate, label_map), "segm", label_map)["segm_mAP"]
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = ImageMatches(gt, candidate, label_map).segm_map()
    t_match = time.perf_counter() - t0
    t0 = time.perf_counter()
    interval = paired_bootstrap(gt, candidate, champion, label_map, resamples=args.resamples)
    t_boot = time.perf_counter() - t0
    print(f"{args.images} images, {len(gt['annotations'])} instances, {len(cand_results)} predictions per model")
    print(f"segm mAP: faster-coco-eval {coco:.6f}, replay {ours:.6f} (same: {abs(coco - ours) < 1e-9})")
    print(f"{'step':<44}{'seconds':>9}{'x one evaluation':>18}")
    for name, seconds in (("one faster-coco-eval segm evaluation", t_eval), ("matching one model, per image", t_match),
                          (f"paired bootstrap, {args.resamples} resamples, 2 models", t_boot),
                          (f"COCOeval per resample (2 x {args.resamples}, estimated)", 2 * args.resamples * t_eval)):
        print(f"{name:<44}{seconds:>9.3f}{seconds / t_eval:>18.1f}")
    print(interval.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
