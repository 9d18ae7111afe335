import re

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn.config import ModelConfig
from training.initialize import freeze_backbone, initialize
from maskrcnn.model import BACKBONE_TABLE, build_model


def _initialized(cfg: ModelConfig, num_classes: int, cache_dir=None):
    """What a training run does: the architecture, then its initial weights and frozen stages."""
    from pathlib import Path

    return initialize(build_model(cfg, num_classes), cfg, Path(cache_dir or "/nonexistent-cache"))


def _tiny(backbone: str, **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, min_size=64, max_size=64, fpn_channels=32, representation_size=64,
                       mask_head_channels=32, mask_head_layers=1, anchor_sizes=[16, 32, 64, 128, 256],
                       rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, **kw)


def _target():
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    return {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small_fpn", "mobilenet_v3_large_fpn", "resnet18_fpn"])
def test_light_backbones_train_and_predict(backbone):
    torch.manual_seed(0)
    model = build_model(_tiny(backbone), num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.backbone.out_channels == 32
    model.train()
    losses = model([torch.rand(3, 64, 64)], [_target()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    assert out["masks"].shape[1:] == (1, 64, 80)  # predictions come back in the input's own size


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "resnet50_fpn_v2"])
def test_resnet50_variants_are_torchvisions_own(backbone):
    model = build_model(ModelConfig(backbone=backbone, min_size=64, max_size=64), num_classes=5)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert model.backbone.out_channels == 256
    # From scratch: trainable BatchNorm, not torchvision's frozen one (an identity without weights).
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)


def test_weights_load_from_a_path_and_skip_a_head_of_another_size(tmp_path, caplog):
    torch.manual_seed(1)
    source = build_model(_tiny("mobilenet_v3_small_fpn"), num_classes=3)
    path = tmp_path / "weights.pt"
    torch.save({"model": source.state_dict()}, path)
    same = _initialized(_tiny("mobilenet_v3_small_fpn", weights=str(path), frozen_batchnorm=True), num_classes=3)
    # With frozen_batchnorm, BatchNorm becomes torchvision's FrozenBatchNorm (fine-tuning); its tensors carry over.
    assert any(isinstance(m, FrozenBatchNorm2d) for m in same.backbone.body.modules())
    loaded = same.state_dict()
    common = [k for k in source.state_dict() if k in loaded]
    assert len(common) > 100
    for k in common:
        assert torch.equal(source.state_dict()[k], loaded[k]), k
    source.eval(), same.eval()
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(source.backbone(image[None])["0"], same.backbone(image[None])["0"], atol=1e-5)
    caplog.set_level("INFO")
    skipped = lambda: int(re.findall(r"skipped (\d+)", caplog.text)[-1])  # noqa: E731
    _initialized(_tiny("mobilenet_v3_small_fpn", weights=str(path), frozen_batchnorm=True), num_classes=3)
    same_classes = skipped()  # BatchNorm's num_batches_tracked, which FrozenBatchNorm has not
    other = _initialized(_tiny("mobilenet_v3_small_fpn", weights=str(path), frozen_batchnorm=True), num_classes=7)
    # 6 more: weight and bias of cls_score, bbox_pred and mask_fcn_logits, whose shapes depend on the classes
    assert skipped() == same_classes + 6
    assert other.roi_heads.box_predictor.cls_score.out_features == 7
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(other.state_dict()[key], source.state_dict()[key])


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="none of its 1 tensors match"):
        _initialized(_tiny("mobilenet_v3_small_fpn", weights=str(path)), num_classes=3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    from maskrcnn.storage import SourceError

    with pytest.raises(SourceError, match="no such file"):
        _initialized(_tiny("mobilenet_v3_small_fpn", weights=str(tmp_path / "absent.pt")), num_classes=3)


def test_building_the_architecture_reads_no_weights(monkeypatch):
    """A config naming init weights on an unreachable host builds without touching the network."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("build_model opened a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = _tiny("mobilenet_v3_small_fpn", weights="https://weights.invalid/model.pt",
                backbone_weights="s3://no-such-bucket/backbone.pt")
    model = build_model(cfg, num_classes=3)
    assert all(p.requires_grad for p in model.parameters())  # freezing is initialisation's job too


@pytest.mark.parametrize("backbone,trainable,frozen_prefixes,trainable_prefixes", [
    ("resnet18_fpn", 3, ["conv1", "layer1"], ["layer2", "layer3", "layer4"]),
    ("resnet18_fpn", 0, ["conv1", "layer4"], []),
    ("mobilenet_v3_small_fpn", 5, [], ["0.", "12."]),
])
def test_initialize_freezes_all_but_the_last_stages(backbone, trainable, frozen_prefixes, trainable_prefixes):
    model = _initialized(_tiny(backbone, trainable_backbone_layers=trainable), 3)
    grads = dict((name, p.requires_grad) for name, p in model.backbone.body.named_parameters())
    for prefix in frozen_prefixes:
        assert not any(v for k, v in grads.items() if k.startswith(prefix)), prefix
    for prefix in trainable_prefixes:
        assert all(v for k, v in grads.items() if k.startswith(prefix)), prefix
    assert all(p.requires_grad for p in model.roi_heads.parameters())  # heads always train


def test_mobilenet_keeps_exactly_the_last_n_stages_trainable():
    from maskrcnn.model import stage_ends

    model = _initialized(_tiny("mobilenet_v3_large_fpn", trainable_backbone_layers=3), 3)
    blocks = list(model.backbone.body.children())
    ends = stage_ends(blocks)
    first = ends[-4] + 1  # the first block of the third-to-last stage
    assert [all(p.requires_grad for p in b.parameters()) for b in blocks] == [i >= first for i in range(len(blocks))]


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small_fpn", "resnet50_fpn"])
def test_roi_sampling_ratio_reaches_both_poolers(backbone):
    """The pooled features are torchvision's RoIAlign at the configured sampling, for box and mask heads."""
    from torchvision.ops import roi_align

    cfg = _tiny(backbone, roi_sampling_ratio=1) if backbone != "resnet50_fpn" else ModelConfig(backbone=backbone, roi_sampling_ratio=1)
    model = build_model(cfg, num_classes=3)
    assert model.roi_heads.box_roi_pool.sampling_ratio == model.roi_heads.mask_roi_pool.sampling_ratio == 1
    torch.manual_seed(0)
    features = {"0": torch.rand(1, 4, 16, 16)}
    box = torch.tensor([[1.0, 2.0, 13.0, 11.0]])
    pooler = model.roi_heads.mask_roi_pool
    pooler.featmap_names = ["0"]
    got = pooler(features, [box], [(64, 64)])
    expected = roi_align(features["0"], [box], (14, 14), spatial_scale=0.25, sampling_ratio=1)
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, roi_align(features["0"], [box], (14, 14), spatial_scale=0.25, sampling_ratio=2))


def test_roi_sampling_ratio_must_be_positive():
    from maskrcnn.config import ConfigError

    with pytest.raises(ConfigError, match="model.roi_sampling_ratio: expected 1 to 8, got 0"):
        ModelConfig(roi_sampling_ratio=0)


def test_every_backbone_is_one_row_of_the_table_and_an_unknown_name_is_refused():
    """Adding a backbone is one row (`BACKBONE_TABLE`) plus its name in the config's `Backbone` type; an
    unknown name is refused by name when the config is read, never built as some other backbone."""
    from maskrcnn.config import BACKBONES, ConfigError, load_config
    from maskrcnn.model import backbone_row

    assert set(BACKBONE_TABLE) == set(BACKBONES)
    with pytest.raises(ConfigError, match=r"model.backbone: expected one of resnet50_fpn, .*, got 'vit_b_16'"):
        load_config(None, ["model.backbone=vit_b_16"])
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_b_16', expected one of resnet50_fpn, "):
        backbone_row("vit_b_16")
    model = _initialized(_tiny("mobilenet_v3_small_fpn", trainable_backbone_layers=5), 3)
    with pytest.raises(ValueError, match="unknown backbone 'resnet34_fpn'"):
        freeze_backbone(model, "resnet34_fpn", 2)


@pytest.mark.parametrize("name", sorted(BACKBONE_TABLE))
def test_every_row_builds_with_its_outputs_and_freezes_by_its_stages(name):
    """For each row of the table: the built model's FPN reads the row's outputs with their channels (the
    last `fpn_levels` of them for the light backbones, all four for torchvision's ResNet-50 models), and
    freezing keeps exactly the row's last N stages trainable."""
    row = BACKBONE_TABLE[name]
    model = build_model(_tiny(name) if row.torchvision is None else ModelConfig(backbone=name, min_size=64, max_size=64), 3)
    outputs = row.outputs(row.body())[-len(model.backbone.fpn.inner_blocks):]
    assert [block[0].in_channels for block in model.backbone.fpn.inner_blocks] == [channels for _, channels in outputs]
    assert list(model.backbone.body.return_layers) == [layer for layer, _ in outputs]
    stages = row.stages(model.backbone.body)
    body_params = dict(model.backbone.body.named_parameters())
    for trainable in range(len(stages) + 1):
        freeze_backbone(model, name, trainable)
        kept = {id(p) for stage in stages[len(stages) - trainable:] if trainable for m in stage for p in m.parameters()}
        assert {n for n, p in body_params.items() if p.requires_grad} == {n for n, p in body_params.items() if id(p) in kept}
