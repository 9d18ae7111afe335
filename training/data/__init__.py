"""Datasets: COCO parsing and validation, the synthetic shapes set, remote sources, augmentation."""
