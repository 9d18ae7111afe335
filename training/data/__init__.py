"""Datasets: COCO parsing and validation, the synthetic shapes set, remote sources, augmentation."""

from training.data.coco import CocoDataset, DatasetError, LabelMap, load_coco, collate
from training.data.images import ImageError, decode_image

__all__ = ["CocoDataset", "DatasetError", "ImageError", "LabelMap", "collate", "decode_image", "load_coco"]
