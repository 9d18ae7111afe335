"""The eager network: a package's weights in torchvision's Mask R-CNN (torch), run as the graph is run.

`EagerNetwork.run(images, image_size)` has `OnnxDetector.run`'s signature and outputs (numpy in and out), so
`maskrcnn.processing.detect` runs either; `maskrcnn.package.Package.network` is where a stage gets one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from maskrcnn.onnx_runtime import OUTPUTS, GraphError

log = logging.getLogger(__name__)


def eager_runner(model: nn.Module):
    """`run(images, image_size) -> OUTPUTS` of eager PyTorch on the model's device, with numpy in and out
    (as `OnnxDetector.run`): torchvision's own backbone, RPN and RoI heads, as `model(images)` runs them."""
    model = model.eval()
    device = next(model.parameters()).device

    def run(images: np.ndarray, image_size: np.ndarray, timeout_s: float | None = None) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            tensors = torch.from_numpy(np.ascontiguousarray(images)).to(device)
            batch = ImageList(tensors, [(int(image_size[0]), int(image_size[1]))])
            features = model.backbone(tensors)
            proposals, _ = model.rpn(batch, features)
            (detections,), _ = model.roi_heads(features, proposals, batch.image_sizes)
            return tuple(detections[name].cpu().numpy() for name in OUTPUTS)

    return run


def on_device(model: nn.Module, device: str) -> nn.Module:
    """The model on the GPU for `cuda` (refused without one) or `auto` when PyTorch sees one; else as it is."""
    if device != "cpu" and torch.cuda.is_available():
        log.info("the eager network runs on the GPU (%s)", torch.cuda.get_device_name(0))
        return model.to("cuda")
    if device == "cuda":
        raise GraphError("--device cuda: PyTorch sees no CUDA device")
    return model


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads for this block, restored after it (None: left as they are)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


class EagerNetwork:
    """A model as a network: `run` as `OnnxDetector.run`, on `threads` intra-op threads (None: PyTorch's
    setting at the time of the run), on `device`."""

    backend = "eager"

    def __init__(self, model: nn.Module, threads: int | None = None, device: str = "cpu"):
        self.model = on_device(model, device)
        self.threads = threads
        self._run = eager_runner(self.model)

    def run(self, images: Any, image_size: Any, timeout_s: float | None = None) -> tuple[np.ndarray, ...]:
        with torch_threads(self.threads):
            return self._run(images, image_size, timeout_s)
