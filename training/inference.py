"""Inference over a dataset: evaluation's predictions, through the pre- and post-processing that the
predictor and batch inference use (`training.transform`), one image at a time as the predictor runs them,
with the network in eager PyTorch or, given the package's graph, in ONNX Runtime.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from training.checkpoint import unwrap
from training.data.masks import Prediction
from training.graph import OnnxDetector
from training.model import input_sizes
from training.transform import Network, detect


def network_of(model: nn.Module, graph: OnnxDetector | None = None) -> Network:
    """The network `training.transform.detect` runs: the graph when given, else the eager model's."""
    from training.onnx_detector import eager_runner

    return graph.run if graph is not None else eager_runner(unwrap(model))


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: torch.device, mask_threshold: float = 0.5,
            graph: OnnxDetector | None = None) -> list[Prediction]:
    """Predictions for every image in `loader` (boxes, scores, labels, RLE masks), in image coordinates
    (the network in ONNX Runtime when `graph` is given). `device`: where the eager network runs."""
    model = unwrap(model).eval().to(device)
    network, (min_size, max_size) = network_of(model, graph), input_sizes(model)
    out: list[Prediction] = []
    for images, targets in loader:
        for image, target in zip(images, targets):  # 3xHxW float in [0, 1] -> HxWx3, as decoded images are
            pixels = image.detach().cpu().permute(1, 2, 0).numpy()
            out.append({"image_id": int(target["image_id"]), **detect(network, pixels, min_size, max_size, mask_threshold)})
    return out
