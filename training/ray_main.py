"""`uv run -m training.ray_main`: train Mask R-CNN with Ray Train, evaluate, and track in MLflow.

With no flags it trains on the embedded synthetic dataset with `maskrcnn/configs/default.yaml`,
on a local Ray with 2 CPU workers. Any config field can be overridden with `--set section.field=value`;
the common ones also have flags. See `--help`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from maskrcnn import cli
from maskrcnn.config import Config, ConfigError, load_config, option_overrides
from training.data.coco import DatasetError
from maskrcnn.storage import SourceError
from maskrcnn.logs import setup_logging
from training.trainer import TrainResult, train

log = logging.getLogger("training")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.ray_main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config, or a name in maskrcnn/configs: default, tiny, gpu (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.epochs=5 --set model.backbone=resnet50_fpn (repeatable)")
    p.add_argument("--data", help="training split: folder, s3://bucket/prefix or gs://bucket/prefix (sets data.train)")
    p.add_argument("--val-data", help="validation split, same forms (sets data.val)")
    p.add_argument("--epochs", type=int, help="sets train.epochs")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (sets ray.num_workers)")
    p.add_argument("--address", help="a Ray cluster: http://HEAD:8265 submits a Ray job (Jobs API; data and storage in s3:// or gs://), auto joins the local one (sets ray.address)")
    p.add_argument("--storage-path", help="checkpoint storage: folder or s3:// (sets ray.storage_path)")
    p.add_argument("--data-format", help="the splits' annotation format: coco (default), or an annotation tool's export: "
                                         "labelme, cvat-xml, cvat-coco, labelstudio, yolo, voc, masks (sets data.format)")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid images/annotations instead of failing")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint folder, or (no value) the latest checkpoint of ray.name in storage")
    p.add_argument("--tune", action="store_true", help="Ray Tune search (ASHA) over lr and weight decay; see the tune section")
    p.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    named = option_overrides(data=args.data, val_data=args.val_data, data_format=args.data_format, epochs=args.epochs,
                             num_workers=args.num_workers,
                             address=args.address, storage_path=args.storage_path,
                             skip_invalid=True if args.skip_invalid else None,
                             register=False if args.no_register else None)
    return load_config(args.config, [*args.overrides, *named])


def report(result: TrainResult) -> None:
    log.info("done: segm mAP %.4f, bbox mAP %.4f, mask IoU %.4f", result.metrics["segm_mAP"], result.metrics["bbox_mAP"],
             result.metrics["mask_iou"])
    log.info("best checkpoint: %s", result.checkpoint)
    log.info("MLflow run: %s (tracking URI %s)", result.run_id, result.tracking_uri)
    if result.model_version:
        log.info("registered model: models:/%s/%s", result.model_name, result.model_version)
    if result.model_uri:
        log.info("model URI: %s", result.model_uri)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    from training.tracking import ModelUploadError

    def run() -> int:
        cfg = config_from_args(args)
        if args.tune:
            from training.tune import tune

            result = tune(cfg)
        else:
            result = train(cfg, resume=args.resume)
        report(result)
        return 0

    return cli.run(run, {(ConfigError, DatasetError, SourceError, FileNotFoundError): 2, ModelUploadError: 1}, log)


if __name__ == "__main__":
    sys.exit(main())
