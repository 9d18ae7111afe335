import re

import pytest
import torch

from training.config import ModelConfig
from training.model import build_model


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
    same = build_model(_tiny("mobilenet_v3_small_fpn", weights=str(path)), num_classes=3)
    # With weights, BatchNorm becomes torchvision's FrozenBatchNorm (fine-tuning); its tensors carry over.
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
    build_model(_tiny("mobilenet_v3_small_fpn", weights=str(path)), num_classes=3)
    same_classes = skipped()  # BatchNorm's num_batches_tracked, which FrozenBatchNorm has not
    other = build_model(_tiny("mobilenet_v3_small_fpn", weights=str(path)), num_classes=7)
    # 6 more: weight and bias of cls_score, bbox_pred and mask_fcn_logits, whose shapes depend on the classes
    assert skipped() == same_classes + 6
    assert other.roi_heads.box_predictor.cls_score.out_features == 7
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(other.state_dict()[key], source.state_dict()[key])


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="none of its 1 tensors match"):
        build_model(_tiny("mobilenet_v3_small_fpn", weights=str(path)), num_classes=3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    from training.data.sources import SourceError

    with pytest.raises(SourceError, match="no such file"):
        build_model(_tiny("mobilenet_v3_small_fpn", weights=str(tmp_path / "absent.pt")), num_classes=3)
