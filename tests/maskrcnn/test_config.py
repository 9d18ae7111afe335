import re
from pathlib import Path
from typing import get_args

import pytest

from maskrcnn.config import CONFIG_DIR, Config, ConfigError, flatten, load_config


def test_default_config_loads_with_documented_defaults():
    cfg = load_config()
    assert cfg.data.train == ""  # the synthetic dataset
    assert cfg.model.weights == "none"
    assert cfg.ray.num_workers == 2


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "gpu.yaml"])
def test_every_shipped_config_is_valid(name):
    assert isinstance(load_config(CONFIG_DIR / name), Config)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=5", "train.lr=0.001", "data.augment.enabled=false",
                             "model.anchor_sizes=[8,16,32]", "ray.address=ray://head:10001"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.data.augment.enabled is False
    assert cfg.model.anchor_sizes == [8, 16, 32]
    assert cfg.ray.address == "ray://head:10001"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=5", "unknown field(s) ['epoch']"),
    ("train.epochs=five", "train.epochs: expected an integer, got 'five'"),
    ("model.backbone=vgg", "model.backbone: expected one of resnet50_fpn, resnet50_fpn_v2, resnet18_fpn, "
                           "mobilenet_v3_large_fpn, mobilenet_v3_small_fpn, got 'vgg'"),
    ("train.optimizer=lamb", "train.optimizer: expected one of sgd, adamw, got 'lamb'"),
    ("train.lr_schedule=linear", "train.lr_schedule: expected one of cosine, step, constant, got 'linear'"),
    ("ray.use_gpu=maybe", "ray.use_gpu: expected one of auto, true, false, got 'maybe'"),
    ("train.epochs", "expected key.sub=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_round_trip_and_flatten(tmp_path: Path):
    cfg = load_config(None, ["train.epochs=3"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    flat = flatten(cfg.to_dict())
    assert flat["train.epochs"] == 3
    assert flat["model.anchor_sizes"] == "16,32,64,128,256"


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_flags_and_pipeline_parameters_set_the_same_fields(tmp_path):
    """One mapping from named options to config fields, whether they come from flags or the pipeline."""
    from pipelines.steps import load_step_config
    from maskrcnn.config import option_overrides
    from training.ray_main import config_from_args, get_args_parser

    args = get_args_parser().parse_args(["--config", "tiny", "--data", "s3://b/train", "--val-data", "s3://b/val",
                                         "--data-format", "cvat-xml", "--address", "ray://head:10001", "--no-register"])
    from_cli = config_from_args(args)
    from_pipeline = load_step_config("tiny", [], data="s3://b/train", val_data="s3://b/val", data_format="cvat-xml",
                                     ray_address="ray://head:10001")
    for cfg in (from_cli, from_pipeline):
        assert (cfg.data.train, cfg.data.val, cfg.data.format, cfg.ray.address, cfg.tracking.register) == \
            ("s3://b/train", "s3://b/val", "cvat-xml", "ray://head:10001", False)
    with pytest.raises(ConfigError, match="data.format"):
        load_step_config("tiny", [], data="s3://b/train", data_format="pascal")
    # the importers and the config name the same formats
    from maskrcnn.config import DataFormat
    from training.data.convert import FORMATS

    assert get_args(DataFormat) == ("coco", *FORMATS)
    assert option_overrides(epochs=5, skip_invalid=True, data="", address=None) == ["train.epochs=5", "data.skip_invalid=true"]
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        option_overrides(epoch=5)
    # a prepared dataset folder names both splits
    prepared = load_step_config("tiny", ["train.epochs=1"], dataset=str(tmp_path))
    assert (prepared.data.train, prepared.data.val, prepared.train.epochs) == (str(tmp_path / "train"), str(tmp_path / "val"), 1)
    # ...and is COCO, whatever the source's format was
    assert load_step_config("tiny", ["data.format=yolo"], dataset=str(tmp_path)).data.format == "coco"
