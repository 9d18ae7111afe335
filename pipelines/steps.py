"""The one piece of glue the components share: a step's config from the pipeline's parameters."""

from __future__ import annotations

from pathlib import Path

from maskrcnn.config import Config, load_config, option_overrides


def load_step_config(config: str, overrides: list[str], *, data: str = "", val_data: str = "", data_format: str = "",
                     dataset: str = "", ray_address: str = "", tracking_uri: str = "") -> Config:
    """`config` is a name in maskrcnn/configs (`default`, `tiny`, `gpu`) or a YAML path; `overrides` are
    `section.field=value` strings; the named parameters map to fields as the CLI's flags do. A prepared
    dataset folder replaces the data source. The train step never registers: only promotion does."""
    if dataset:  # the prepare step's output: COCO, whatever the source's format was
        data, val_data, data_format = str(Path(dataset) / "train"), str(Path(dataset) / "val"), "coco"
    named = option_overrides(data=data, val_data=val_data, data_format=data_format, address=ray_address,
                             tracking_uri=tracking_uri, register=False)
    return load_config(config, [*overrides, *named])
