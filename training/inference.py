"""Inference over a dataset: evaluation's predictions, through the pre- and post-processing that the
predictor and batch inference use (`maskrcnn.processing`), one image at a time as the predictor runs them,
with the network in eager PyTorch or, given a package's network (`maskrcnn.package.Package.network`: its
graph in ONNX Runtime, or its weights, probe-checked), that network.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from training.checkpoint import unwrap
from maskrcnn.masks import Prediction
from maskrcnn.eager import EagerNetwork, eager_runner
from maskrcnn.onnx_runtime import OnnxDetector
from maskrcnn.model import input_sizes
from maskrcnn.processing import Network, detect


def network_of(model: nn.Module, network: OnnxDetector | EagerNetwork | None = None) -> Network:
    """The network `maskrcnn.processing.detect` runs: `network`'s when given, else the eager model's."""
    return network.run if network is not None else eager_runner(unwrap(model))


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: torch.device, mask_threshold: float = 0.5,
            network: OnnxDetector | EagerNetwork | None = None) -> list[Prediction]:
    """Predictions for every image in `loader` (boxes, scores, labels, RLE masks), in image coordinates
    (by `network` when given, e.g. a package's graph). `device`: where the eager model runs otherwise."""
    model = unwrap(model).eval().to(device)
    run, (min_size, max_size) = network_of(model, network), input_sizes(model)
    out: list[Prediction] = []
    for images, targets in loader:
        for image, target in zip(images, targets):  # 3xHxW float in [0, 1] -> HxWx3, as decoded images are
            pixels = image.detach().cpu().permute(1, 2, 0).numpy()
            out.append({"image_id": int(target["image_id"]), **detect(run, pixels, min_size, max_size, mask_threshold)})
    return out
