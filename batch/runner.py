"""The run: pending shards as a Ray Dataset, `map_batches` over a pool of actors that each hold the package
once, and the driver following the shards as they finish.

Memory is bounded by construction: a row is a shard's image names (never pixels); an actor decodes one
image at a time and writes its shard's outputs itself, so only a small summary comes back; the pool has
`concurrency` actors of `threads` CPUs each. Each shard writes `results/shard-NNNNN.images.json` (COCO
`images`), optional `overlays/` and `masks/` PNGs (`NAME.EXT.png`), and last `results/shard-NNNNN.json` (COCO results, RLE
masks): a shard with that file is done, and a resumed run skips it. An image that cannot be read or
decoded does not stop the run: it is listed in its shard's images with its `error`, logged and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from batch import store
from batch.shards import MANIFEST, MAX_IMAGE_BYTES, RESULTS, BatchError, Plan, Settings, Shard, check_manifest, manifest_bytes

log = logging.getLogger(__name__)


class ShardRunner:
    """A Ray Data actor: the package's network, loaded and probed once; then shard after shard."""

    def __init__(self, files: Any, source: str, output: str, settings: dict[str, Any], threads: int) -> None:
        import ray

        from maskrcnn.package import Package

        files = ray.get(files) if isinstance(files, ray.ObjectRef) else files  # the package's bytes, put once
        # the same reader as everywhere, from the bytes (verified again); the weights (torch) only without a graph
        package = Package.from_files(files, "the run's package", weights=None)
        self.source, self.output, self.settings = source, output, Settings(**settings)
        self.label_map, self.mask_threshold = package.label_map, package.config.eval.mask_threshold
        self.sizes = package.config.model.min_size, package.config.model.max_size
        self.network = package.network("auto", "cpu", threads).run  # probe-checked, graph or eager alike

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.run(Shard(int(i), list(names), int(first)))
                for i, names, first in zip(batch["index"], batch["names"], batch["first_id"])]
        return {key: np.asarray([r[key] for r in rows]) for key in rows[0]}

    def run(self, shard: Shard) -> dict[str, Any]:
        from maskrcnn.images import decode_image
        from maskrcnn.processing import detect
        from training.metrics import to_coco_results

        from maskrcnn.images import ImageError
        from maskrcnn.storage import SourceError

        started = time.perf_counter()
        images, results, failed = [], [], 0
        for offset, name in enumerate(shard.names):
            image_id = shard.first_id + offset
            try:
                pixels = decode_image(store.read_bytes(self.source, name, MAX_IMAGE_BYTES), name=store.join(self.source, name))
            except (ImageError, SourceError, OSError) as exc:  # one bad file does not stop a bucket's run
                log.warning("%s", exc)
                images.append({"id": image_id, "file_name": name, "error": str(exc)})
                failed += 1
                continue
            pred = detect(self.network, pixels, *self.sizes, self.mask_threshold, self.settings.score_threshold,
                          self.settings.max_detections)
            pred["image_id"] = image_id
            images.append({"id": image_id, "file_name": name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
            records = to_coco_results([pred], self.label_map)
            for record in records:
                record["segmentation"] = {"size": record["segmentation"]["size"],
                                          "counts": _text(record["segmentation"]["counts"])}
            results += records
            if self.settings.overlays or self.settings.masks:
                self._pictures(name, pixels, pred)
        store.write(self.output, f"{RESULTS}/{shard.stem}.images.json", json.dumps(images).encode())
        store.write(self.output, f"{RESULTS}/{shard.stem}.json", json.dumps(results).encode())  # last: the shard is done
        return {"index": shard.index, "images": len(shard.names), "detections": len(results), "failed": failed,
                "seconds": time.perf_counter() - started}

    def _pictures(self, name: str, pixels: np.ndarray, pred: dict[str, Any]) -> None:
        from PIL import Image

        from maskrcnn.masks import decode_segmentation
        from maskrcnn.visualize import colour, draw_predictions

        stem = f"{name}.png"  # the source's suffix kept: a.jpg and a.png are two images
        if self.settings.overlays:
            store.write(self.output, f"overlays/{stem}", _png(draw_predictions(pixels, pred, self.label_map, 0.0)))
        if self.settings.masks:
            h, w = pixels.shape[:2]
            canvas = np.zeros((h, w, 3), np.uint8)
            for n, rle in enumerate(pred["masks"]):
                canvas[decode_segmentation(rle, h, w).astype(bool)] = colour(n)
            store.write(self.output, f"masks/{stem}", _png(Image.fromarray(canvas)))


def _text(counts: Any) -> str:
    return counts.decode() if isinstance(counts, bytes) else counts


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pending(plan: Plan) -> list[Shard]:
    """The plan's shards whose results are not written yet; refuses an output holding another run. The
    manifest is created with a conditional write, so of two runs started on one output with different
    packages, images or settings, one starts and the other is refused."""
    if not store.create(plan.output, MANIFEST, manifest_bytes(plan)):
        check_manifest(store.read_json(plan.output, MANIFEST), plan)
    done = store.names_under(plan.output, RESULTS)
    return [s for s in plan.shards() if f"{s.stem}.json" not in done]


def run(plan: Plan, package_files: dict[str, bytes], concurrency: int, threads: int) -> dict[str, Any]:
    """Run the plan's pending shards on the Ray that is connected; returns the totals (and logs progress)."""
    import ray

    todo = pending(plan)
    shards = plan.shards()
    log.info("%d images in %d shards of %d: %d done already, %d to run on %d actor(s) of %d thread(s)",
             len(plan.names), len(shards), plan.settings.shard_size, len(shards) - len(todo), len(todo), concurrency, threads)
    totals = {"images": 0, "detections": 0, "failed_images": 0, "shards": 0, "skipped_shards": len(shards) - len(todo),
              "seconds": 0.0, "shard_seconds": 0.0}
    if not todo:
        return totals
    ref = ray.put(package_files)
    dataset = ray.data.from_items([{"index": s.index, "names": s.names, "first_id": s.first_id} for s in todo])
    dataset = dataset.map_batches(ShardRunner, batch_size=1, concurrency=concurrency, num_cpus=threads,
                                  fn_constructor_args=(ref, plan.source, plan.output, asdict(plan.settings), threads))
    started = time.perf_counter()
    for row in dataset.iter_rows():
        totals["images"] += int(row["images"])
        totals["detections"] += int(row["detections"])
        totals["failed_images"] += int(row["failed"])
        totals["shards"] += 1
        totals["shard_seconds"] += float(row["seconds"])  # the actors' time on shards (their start left out)
        elapsed = time.perf_counter() - started
        log.info("shard %d done (%d/%d): %d images, %d detections, %.1f s; %.2f images/s overall", int(row["index"]),
                 totals["shards"], len(todo), int(row["images"]), int(row["detections"]), float(row["seconds"]),
                 totals["images"] / max(elapsed, 1e-9))
    totals["seconds"] = time.perf_counter() - started
    return totals


def default_threads(concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def check(concurrency: int, threads: int) -> None:
    if not 1 <= concurrency <= 1024:
        raise BatchError(f"--concurrency: expected 1 to 1024, got {concurrency}")
    if not 1 <= threads <= 256:
        raise BatchError(f"--threads: expected 1 to 256, got {threads}")
