"""Evaluate a serving package on a split: COCO mAP (bbox, segm), per-class AP, mask IoU, sample overlays.

What is scored is what is served: training scores the package it logs, and the release layer scores
the candidate's package and the registered champion's package with the same function on the same split,
each through the same `Package` and with the backend the predictor runs (the graph when there is one).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from training.config import EvalConfig
from training.data.coco import CocoDataset, CocoSplit, collate
from training.engine import predict, summarize_scores
from training.package import Package, open_package
from training.metrics import Prediction, evaluate_predictions
from training.graph import OnnxDetector
from training.visualize import draw_predictions

log = logging.getLogger(__name__)


def evaluate_model(model: torch.nn.Module, split: CocoSplit, cfg: EvalConfig, batch_size: int = 4,
                   graph: OnnxDetector | None = None) -> tuple[dict[str, float], list[Prediction]]:
    loader = DataLoader(CocoDataset(split), batch_size=batch_size, collate_fn=collate)
    predictions = predict(model, loader, torch.device("cpu"), cfg.mask_threshold, graph)
    metrics = evaluate_predictions(split.coco, predictions, split.label_map, cfg.score_threshold, cfg.iou_match)
    metrics.update(summarize_scores(predictions, cfg))
    return metrics, predictions


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
    graph = OnnxDetector(package.graph, threads) if package.graph is not None and backend == "auto" else None
    before = torch.get_num_threads()
    torch.set_num_threads(1 if graph is not None else threads)  # with the graph, torch only pre- and post-processes
    try:
        return evaluate_model(package.build_model(), split, cfg or package.config.eval, graph=graph)
    finally:
        torch.set_num_threads(before)


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
                   cfg: EvalConfig | None = None) -> tuple[str, dict[str, float]] | None:
    """Evaluate the serving package of the registered version holding `alias` (e.g. the champion) on `split`.

    Returns (version, metrics), or None when no version holds the alias, or when it was trained on other
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
    metrics, _ = evaluate_package(package, split, cfg)
    log.info("%s@%s (v%s): %s", name, alias, holder.version, metric_summary(metrics))
    return str(holder.version), metrics
