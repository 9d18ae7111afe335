"""Evaluate a serving package on a split: COCO mAP (bbox, segm), per-class AP, mask IoU, sample overlays,
and the evaluation report (`training.report`).

    uv run -m training.evaluate --report report.html PACKAGE DATA [--champion PACKAGE]

scores PACKAGE (a folder, `s3://` or `gs://` prefix) on the COCO split DATA (the same) and writes the
report as one HTML page; with `--champion`, the page compares the two, with the paired bootstrap's interval.

What is scored is what is served: training scores the package it logs, and the release layer scores
the candidate's package and the registered champion's package with the same function on the same split,
each through the same `Package` and with the backend the predictor runs (the graph when there is one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from training.bootstrap import Interval
from maskrcnn.config import EvalConfig
from training.data.coco import CocoSplit
from training.data.dataset import CocoDataset, collate
from maskrcnn.images import decode_image
from maskrcnn.masks import Prediction
from training.engine import is_primary
from training.inference import predict
from maskrcnn.package import Package, open_package
from training.metrics import evaluate_predictions
from maskrcnn.reference import Reference, compute_reference
from maskrcnn.eager import EagerNetwork
from maskrcnn.onnx_runtime import OnnxDetector
from maskrcnn.visualize import draw_predictions

log = logging.getLogger(__name__)


def evaluate_model(model: torch.nn.Module, split: CocoSplit, cfg: EvalConfig, *, loader: Iterable | None = None,
                   device: torch.device | None = None, network: OnnxDetector | EagerNetwork | None = None,
                   batch_size: int = 4) -> tuple[dict[str, float] | None, list[Prediction]]:
    """The one evaluation: predict `split` (through `loader` when given, e.g. a distributed one, on `device`,
    default the CPU), gather every rank's predictions, and score them: COCO mAP (bbox, segm), per-class AP,
    mask IoU, detections per image. Under DDP only rank 0 scores (the others get None as metrics); the
    training loop and `evaluate_package` both come here."""
    loader = loader if loader is not None else DataLoader(CocoDataset(split), batch_size=batch_size, collate_fn=collate)
    predictions = gather_predictions(predict(model, loader, device or torch.device("cpu"), cfg.mask_threshold, network))
    if not is_primary():
        return None, predictions
    metrics = evaluate_predictions(split.coco, predictions, split.label_map, cfg.score_threshold, cfg.iou_match)
    metrics.update(summarize_scores(predictions, cfg))
    return metrics, predictions


def gather_predictions(predictions: list[Prediction]) -> list[Prediction]:
    """All ranks' predictions on every rank, each image once (DistributedSampler pads with repeats)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return predictions
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    unique: dict[int, Prediction] = {}
    for part in parts:
        for p in part:
            unique.setdefault(p["image_id"], p)
    return [unique[k] for k in sorted(unique)]


def summarize_scores(predictions: list[Prediction], cfg: EvalConfig) -> dict[str, float]:
    """Detections per image above the evaluation score threshold (a quick sanity number)."""
    counts = [int((np.asarray(p["scores"]) >= cfg.score_threshold).sum()) for p in predictions]
    return {"detections_per_image": float(np.mean(counts)) if counts else 0.0}


def evaluate_package(package: Package | str | Path, split: CocoSplit, cfg: EvalConfig | None = None,
                     backend: str = "auto") -> tuple[dict[str, float], list[Prediction]]:
    """Metrics and predictions of a serving package (a `Package`, or a folder/URI it is read from) on `split`
    (CPU, all cores), with the backend the predictor will use: the package's ONNX graph when it has one
    (`auto`), else eager PyTorch; `eager` forces PyTorch. `cfg` defaults to the package's own settings."""
    if not isinstance(package, Package):
        package = open_package(package)
    if package.label_map.category_ids != split.label_map.category_ids:
        raise ValueError(f"package {package.source} predicts categories {package.label_map.category_ids}, "
                         f"the split has {split.label_map.category_ids}")
    threads = os.cpu_count() or 1
    # the predictor's network: the same package -> network step, probe-checked (a graph that does not answer
    # as the weights did is refused here too, not scored)
    network = package.network("eager" if backend == "eager" else "auto", "cpu", threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if network.backend == "onnxruntime" else threads)  # with the graph, torch only pre- and post-processes
    try:
        model = network.model if isinstance(network, EagerNetwork) else package.build_model()  # built once
        return evaluate_model(model, split, cfg or package.config.eval, network=network)
    finally:
        torch.set_num_threads(before)


def split_reference(split: CocoSplit, predictions: list[Prediction], class_names: list[str]) -> Reference:
    """The model's reference (`maskrcnn.reference`) on `split`: its images' statistics and `predictions`
    (as `evaluate_model` returns them), matched by image id."""
    by_id = {p["image_id"]: p for p in predictions}
    images = split.coco["images"]
    missing = [img["id"] for img in images if img["id"] not in by_id]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} image(s) of the split, e.g. id {missing[0]}")
    decoded = (decode_image(split.root / img["file_name"]) for img in images)
    return compute_reference(decoded, (by_id[img["id"]] for img in images), class_names)


def write_samples(split: CocoSplit, predictions: list[Prediction], out_dir: Path, count: int, score_threshold: float) -> list[Path]:
    """Draw the first `count` images' predictions into `out_dir` as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = CocoDataset(split)
    by_id = {p["image_id"]: p for p in predictions}
    paths = []
    for index in range(min(count, len(dataset))):
        image, _, _ = dataset.load(index)
        image_id = dataset.images[index]["id"]
        path = out_dir / f"val_{image_id}.png"
        draw_predictions(image, by_id[image_id], split.label_map, score_threshold).save(path)
        paths.append(path)
    return paths


def metric_summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("segm_mAP", "bbox_mAP", "segm_AP50", "mask_iou") if k in metrics)


def evaluate_alias(tracking_uri: str, name: str, alias: str, split: CocoSplit,
                   cfg: EvalConfig | None = None) -> tuple[str, dict[str, float], list[Prediction]] | None:
    """Evaluate the serving package of the registered version holding `alias` (e.g. the champion) on `split`.

    Returns (version, metrics, predictions), or None when no version holds the alias, or when it was trained on other
    categories than `split` has (then its numbers are not comparable; logged).
    """
    from mlflow.tracking import MlflowClient

    from training.registry import get_alias
    from training.tracking import download_model

    holder = get_alias(MlflowClient(tracking_uri), name, alias)
    if holder is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        package = open_package(download_model(tracking_uri, f"models:/{name}/{holder.version}", tmp))
    if package.label_map.category_ids != split.label_map.category_ids:
        log.warning("%s@%s (v%s) predicts other categories than this dataset; not compared", name, alias, holder.version)
        return None
    metrics, predictions = evaluate_package(package, split, cfg)
    log.info("%s@%s (v%s): %s", name, alias, holder.version, metric_summary(metrics))
    return str(holder.version), metrics, predictions


def write_report(path: str | Path, split: CocoSplit, predictions: list[Prediction], cfg: EvalConfig, title: str,
                 champion: tuple[str, list[Prediction]] | None = None, interval: Interval | None = None):
    """The evaluation report of `predictions` on `split` (`training.report`), as one HTML page at `path`;
    `champion`: (its version, its predictions on the same split), compared class by class and by the
    paired bootstrap of the segm mAP difference (`interval`, computed with `cfg`'s resamples and seed when
    not given). Returns the `training.report.Report` (its numbers, e.g. for the model card)."""
    from training.bootstrap import paired_bootstrap
    from training.report import build_report, to_html

    if champion is not None and interval is None:
        interval = paired_bootstrap(split.coco, predictions, champion[1], split.label_map,
                                    resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
    report = build_report(split, predictions, cfg.score_threshold, cfg.iou_match, champion, interval)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(report, title), encoding="utf-8")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", help="the serving package: a folder, or an s3:// or gs:// prefix")
    p.add_argument("data", help="the COCO split to score it on: a folder, or an s3:// or gs:// prefix")
    p.add_argument("--report", required=True, metavar="OUT", help="write the evaluation report (one HTML page) here")
    p.add_argument("--annotations", default="annotations.json", help="the split's annotation file, relative to DATA")
    p.add_argument("--champion", default="", metavar="PACKAGE", help="compare with this package (e.g. the champion's)")
    p.add_argument("--eager", action="store_true", help="score with eager PyTorch even when the package has a graph")
    return p


def main(argv: list[str] | None = None) -> int:
    from maskrcnn import cli
    from training.data.coco import DatasetError, load_coco
    from maskrcnn.storage import fetch_prefix
    from maskrcnn.logs import setup_logging
    from maskrcnn.package import PackageError

    setup_logging()
    args = get_args_parser().parse_args(argv)
    backend = "eager" if args.eager else "auto"

    def run() -> int:
        package = open_package(args.package)
        cache = package.config.data.resolved_cache_dir()
        root = fetch_prefix(args.data, cache) if "://" in args.data else Path(args.data)
        split = load_coco(root, args.annotations, max_pixels=package.config.data.max_image_pixels)
        metrics, predictions = evaluate_package(package, split, backend=backend)
        champion = None
        if args.champion:
            other = open_package(args.champion)
            champion_metrics, champion_predictions = evaluate_package(other, split, package.config.eval, backend=backend)
            log.info("champion %s: %s", args.champion, metric_summary(champion_metrics))
            champion = (str(other.metadata.get("model_version") or args.champion), champion_predictions)
        log.info("%s: %s", args.package, metric_summary(metrics))
        title = f"{package.config.tracking.model_name} v{package.metadata.get('model_version', '?')} on {args.data}"
        write_report(args.report, split, predictions, package.config.eval, title, champion)
        log.info("wrote the evaluation report to %s", args.report)
        return 0

    return cli.run(run, {(PackageError, DatasetError, FileNotFoundError, ValueError): 2}, log)


if __name__ == "__main__":
    sys.exit(main())
