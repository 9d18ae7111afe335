"""torchvision Mask R-CNN builder: the architecture only, from the config. It reads no file.

The ResNet-50 variants are torchvision's own `maskrcnn_resnet50_fpn(_v2)` so that torchvision's
COCO checkpoints load into them; only the RPN/ROI sampling settings come from the config. The light
backbones (ResNet-18, MobileNetV3) get FPN width, box-head width and mask-head size from the config,
and anchors with one size tuple per FPN level, which those backbones need.

Initial weights and frozen layers are a training-only step (`training.initialize`); a checkpoint or a
serving package is loaded into the architecture built here (`training.package.Package.build_model`).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from training.config import ModelConfig


def _light_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    if cfg.backbone == "resnet18_fpn":
        body = resnet18(weights=None)
        names, channels = ["layer1", "layer2", "layer3", "layer4"][-cfg.fpn_levels:], [64, 128, 256, 512][-cfg.fpn_levels:]
        return BackboneWithFPN(body, {name: str(n) for n, name in enumerate(names)}, channels, cfg.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    make = mobilenet_v3_large if cfg.backbone == "mobilenet_v3_large_fpn" else mobilenet_v3_small
    features = make(weights=None).features
    # A stage ends just before each stride-2 block (marked `_is_cn`), and at the last block. torchvision's
    # own recipe feeds the FPN two stride-32 maps, 4x4 at 128 px: far too coarse for small objects.
    # Stage ends at strides 4, 8, 16, 32 give the FPN the fine levels Mask R-CNN expects.
    returned = stage_ends(features)[-cfg.fpn_levels:]
    return BackboneWithFPN(features, {str(i): str(n) for n, i in enumerate(returned)},
                           [_out_channels(features[i]) for i in returned], cfg.fpn_channels, extra_blocks=LastLevelMaxPool())


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` with FrozenBatchNorm2d (the same tensors, fixed statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = misc_ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def stage_ends(blocks: list[nn.Module] | nn.Sequential) -> list[int]:
    """Indices of the last block of each MobileNetV3 stage (one per output stride)."""
    blocks = list(blocks)
    return [i - 1 for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return block.out_channels
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def build_model(cfg: ModelConfig, num_classes: int) -> MaskRCNN:
    """A Mask R-CNN for `num_classes` (background included) as `cfg` describes, randomly initialised.

    Every parameter is trainable; `training.initialize.initialize` loads initial weights and freezes
    backbone stages when a training run asks for them.
    """
    kwargs = dict(
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh,
        # torchvision's poolers (every FPN level but the pooled one), with the configured sampling
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, cfg.roi_sampling_ratio),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, cfg.roi_sampling_ratio),
    )
    if cfg.backbone in ("resnet50_fpn", "resnet50_fpn_v2"):
        build = maskrcnn_resnet50_fpn if cfg.backbone == "resnet50_fpn" else maskrcnn_resnet50_fpn_v2
        model = build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)  # all layers trainable
    else:
        model = _light_model(cfg, num_classes, kwargs)
    if cfg.frozen_batchnorm:
        # torchvision picks FrozenBatchNorm2d only when it downloads weights itself, which it never does here.
        freeze_batchnorm(model.backbone.body)
    return model


def _light_model(cfg: ModelConfig, num_classes: int, kwargs: dict) -> MaskRCNN:
    backbone = _light_backbone(cfg)
    levels = len(backbone.body.return_layers) + 1  # the FPN's returned levels plus the max-pool level
    sizes = tuple((s,) for s in cfg.anchor_sizes[:levels])
    if len(sizes) < levels:
        raise ValueError(f"model.anchor_sizes: {cfg.backbone} has {levels} feature levels, got {len(cfg.anchor_sizes)} sizes")
    anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * levels)
    out = backbone.out_channels
    mask_layers = (cfg.mask_head_channels,) * cfg.mask_head_layers
    return MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(out * 7 * 7, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes),
        mask_head=MaskRCNNHeads(out, mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], cfg.mask_head_channels, num_classes),
        **kwargs,
    )
