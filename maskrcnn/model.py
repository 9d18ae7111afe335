"""torchvision Mask R-CNN builder: the architecture only, from the config. It reads no file.

Every backbone is one row of `BACKBONE_TABLE`: its trunk, the layers (and channels) an FPN reads, its
stages (which `training.initialize` freezes) and, for the ResNet-50 variants, torchvision's builder. The
config's `Backbone` type names the same keys (a name in one place only fails at import), so an unknown
name is refused when the config is read, never built as another backbone.

The ResNet-50 variants are torchvision's own `maskrcnn_resnet50_fpn(_v2)` so that torchvision's
COCO checkpoints load into them; only the RPN/ROI sampling settings come from the config. The light
backbones (ResNet-18, MobileNetV3) get FPN width, box-head width and mask-head size from the config,
and anchors with one size tuple per FPN level, which those backbones need.

Initial weights and frozen layers are a training-only step (`training.initialize`); a checkpoint or a
serving package is loaded into the architecture built here (`maskrcnn.package.Package.build_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18, resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskrcnn.config import BACKBONES, ModelConfig


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
    row = backbone_row(cfg.backbone)
    if row.torchvision is not None:  # torchvision's own model, so that its COCO checkpoints load (all layers trainable)
        model = row.torchvision(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    else:
        model = _light_model(row, cfg, num_classes, kwargs)
    if cfg.frozen_batchnorm:
        # torchvision picks FrozenBatchNorm2d only when it downloads weights itself, which it never does here.
        freeze_batchnorm(model.backbone.body)
    return model


def _light_model(row: Backbone, cfg: ModelConfig, num_classes: int, kwargs: dict) -> MaskRCNN:
    """A light backbone's trunk under an FPN on its last `fpn_levels` outputs, with the config's FPN width,
    anchors (one size tuple per level) and head sizes."""
    body = row.body()
    outputs = row.outputs(body)[-cfg.fpn_levels:]
    backbone = BackboneWithFPN(body, {name: str(n) for n, (name, _) in enumerate(outputs)}, [c for _, c in outputs],
                               cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
    levels = len(outputs) + 1  # the FPN's returned levels plus the max-pool level
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


RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resnet_outputs(body: nn.Module) -> list[tuple[str, int]]:
    """A ResNet's stage outputs, input to output: layer1-4 and their channels."""
    return [(name, _out_channels(getattr(body, name)[-1])) for name in RESNET_LAYERS]


def resnet_stages(body: nn.Module) -> list[list[nn.Module]]:
    """A ResNet body's stages, input to output: the stem (conv1, bn1), then layer1-4 (as torchvision freezes them)."""
    children = dict(body.named_children())
    return [[children[n] for n in ("conv1", "bn1") if n in children]] + [[children[n]] for n in RESNET_LAYERS if n in children]


def mobilenet_outputs(body: nn.Module) -> list[tuple[str, int]]:
    """A MobileNetV3 trunk's stage outputs, input to output: the last block of each stage (strides 2 to 32).
    torchvision's own recipe feeds the FPN two stride-32 maps, 4x4 at 128 px: far too coarse for small
    objects; the stage ends at strides 4, 8, 16, 32 give the FPN the fine levels Mask R-CNN expects."""
    return [(str(i), _out_channels(body[i])) for i in stage_ends(body)]


def mobilenet_stages(body: nn.Module) -> list[list[nn.Module]]:
    """A MobileNetV3 trunk's stages, input to output: its blocks, cut after each stage's last block."""
    blocks = list(body.children())
    ends = stage_ends(blocks)
    return [blocks[start:end + 1] for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]


@dataclass(frozen=True)
class Backbone:
    """One backbone: its randomly initialised trunk, the layers an FPN reads with their channels, the trunk's
    stages (which `training.initialize` freezes), and, for torchvision's own detection models, their builder."""

    body: Callable[[], nn.Module]
    outputs: Callable[[nn.Module], list[tuple[str, int]]]
    stages: Callable[[nn.Module], list[list[nn.Module]]]
    torchvision: Callable[..., MaskRCNN] | None = None


BACKBONE_TABLE: dict[str, Backbone] = {
    "resnet50_fpn": Backbone(lambda: resnet50(weights=None), resnet_outputs, resnet_stages, maskrcnn_resnet50_fpn),
    "resnet50_fpn_v2": Backbone(lambda: resnet50(weights=None), resnet_outputs, resnet_stages, maskrcnn_resnet50_fpn_v2),
    "resnet18_fpn": Backbone(lambda: resnet18(weights=None), resnet_outputs, resnet_stages),
    "mobilenet_v3_large_fpn": Backbone(lambda: mobilenet_v3_large(weights=None).features, mobilenet_outputs, mobilenet_stages),
    "mobilenet_v3_small_fpn": Backbone(lambda: mobilenet_v3_small(weights=None).features, mobilenet_outputs, mobilenet_stages),
}
if set(BACKBONE_TABLE) != set(BACKBONES):  # a backbone named in one place only: fail now, not build another one
    raise ImportError(f"maskrcnn.model.BACKBONE_TABLE {sorted(BACKBONE_TABLE)} and maskrcnn.config.BACKBONES "
                      f"{sorted(BACKBONES)} must name the same backbones")


def backbone_row(name: str) -> Backbone:
    """The table's row for `name`; an unknown name is refused, naming the known ones."""
    try:
        return BACKBONE_TABLE[name]
    except KeyError:
        raise ValueError(f"model.backbone: unknown backbone {name!r}, expected one of {', '.join(BACKBONE_TABLE)}") from None


def input_sizes(model: nn.Module) -> tuple[int, int]:
    """(min_size, max_size) of the model's resize at inference (`maskrcnn.processing.preprocess`'s;
    torchvision keeps its last `min_size`). A bare model: `training.checkpoint.unwrap` a DDP one first."""
    transform = model.transform
    return int(transform.min_size[-1]), int(transform.max_size)
