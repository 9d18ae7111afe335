"""torchvision Mask R-CNN builder: backbones, input sizes, head sizes, optional weights.

The ResNet-50 variants are torchvision's own `maskrcnn_resnet50_fpn(_v2)` so that torchvision's
COCO checkpoints load into them; only the RPN/ROI sampling settings come from the config. The light
backbones (ResNet-18, MobileNetV3) get FPN width, box-head width and mask-head size from the config,
and anchors with one size tuple per FPN level, which those backbones need.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from training.config import ModelConfig
from training.data.sources import fetch_file

log = logging.getLogger(__name__)


def _load_state_dict(uri: str, cache_dir: Path) -> dict[str, torch.Tensor]:
    path = fetch_file(uri, cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # our checkpoints and common training scripts nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load the tensors whose names and shapes match; log what was skipped (e.g. a head with other classes)."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise ValueError(f"{what}: none of its {len(state)} tensors match this model; is it for another architecture?")
    module.load_state_dict(usable, strict=False)
    log.info("%s: loaded %d tensors, skipped %d (name or shape differs)%s", what, len(usable), len(skipped),
             f", e.g. {skipped[:3]}" if skipped else "")


def _light_backbone(cfg: ModelConfig, norm_layer: type[nn.Module], trainable: int) -> BackboneWithFPN:
    if cfg.backbone == "resnet18_fpn":
        body = resnet18(weights=None, norm_layer=norm_layer)
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        for name, param in body.named_parameters():
            param.requires_grad_(any(name.startswith(layer) for layer in layers) or trainable >= 5)
        names, channels = ["layer1", "layer2", "layer3", "layer4"][-cfg.fpn_levels:], [64, 128, 256, 512][-cfg.fpn_levels:]
        return BackboneWithFPN(body, {name: str(n) for n, name in enumerate(names)}, channels, cfg.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    make = mobilenet_v3_large if cfg.backbone == "mobilenet_v3_large_fpn" else mobilenet_v3_small
    features = make(weights=None, norm_layer=norm_layer).features
    # A stage ends just before each stride-2 block (marked `_is_cn`), and at the last block. torchvision's
    # own recipe feeds the FPN two stride-32 maps, 4x4 at 128 px: far too coarse for small objects.
    # Stage ends at strides 4, 8, 16, 32 give the FPN the fine levels Mask R-CNN expects.
    ends = [i - 1 for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    returned = ends[-cfg.fpn_levels:]
    trainable_blocks = {i for i in range(len(features)) if i > (ends[-trainable] if trainable < len(ends) else -1)}
    for i, block in enumerate(features):
        block.requires_grad_(i in trainable_blocks)
    return BackboneWithFPN(features, {str(i): str(n) for n, i in enumerate(returned)},
                           [_out_channels(features[i]) for i in returned], cfg.fpn_channels, extra_blocks=LastLevelMaxPool())


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return block.out_channels
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def build_model(cfg: ModelConfig, num_classes: int, cache_dir: Path | None = None) -> MaskRCNN:
    """A Mask R-CNN for `num_classes` (background included) as `cfg` describes."""
    cache_dir = cache_dir or Path.home() / ".cache" / "maskrcnn-platform"
    pretrained = cfg.weights != "none" or cfg.backbone_weights != "none"
    trainable = cfg.trainable_backbone_layers if cfg.trainable_backbone_layers >= 0 else (3 if pretrained else 5)
    # From scratch, torchvision's FrozenBatchNorm is an identity: train real BatchNorm instead.
    norm_layer = misc_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    kwargs = dict(
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh,
    )
    if cfg.backbone in ("resnet50_fpn", "resnet50_fpn_v2"):
        build = maskrcnn_resnet50_fpn if cfg.backbone == "resnet50_fpn" else maskrcnn_resnet50_fpn_v2
        model = build(weights=None, weights_backbone=None, num_classes=num_classes,
                      trainable_backbone_layers=trainable if pretrained else None, **kwargs)
        backbone_module = model.backbone.body
    else:
        backbone = _light_backbone(cfg, norm_layer, trainable)
        levels = len(backbone.body.return_layers) + 1  # the FPN's returned levels plus the max-pool level
        sizes = tuple((s,) for s in cfg.anchor_sizes[:levels])
        if len(sizes) < levels:
            raise ValueError(f"model.anchor_sizes: {cfg.backbone} has {levels} feature levels, got {len(cfg.anchor_sizes)} sizes")
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * levels)
        out = backbone.out_channels
        mask_layers = (cfg.mask_head_channels,) * cfg.mask_head_layers
        model = MaskRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(out * 7 * 7, cfg.representation_size),
            box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes),
            mask_head=MaskRCNNHeads(out, mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(mask_layers[-1], cfg.mask_head_channels, num_classes),
            **kwargs,
        )
        backbone_module = backbone.body
    if cfg.backbone_weights != "none":
        load_matching(backbone_module, _load_state_dict(cfg.backbone_weights, cache_dir), f"backbone weights {cfg.backbone_weights}")
    if cfg.weights != "none":
        load_matching(model, _load_state_dict(cfg.weights, cache_dir), f"weights {cfg.weights}")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
