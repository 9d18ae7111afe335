"""Training augmentation with albumentations.

Only masks go through albumentations; boxes are derived from the transformed masks afterwards
(`coco.masks_to_boxes`), so a flip, a scale or a crop can never leave a box that disagrees with its
mask. Instances pushed out of the frame are dropped by the dataset.
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from maskrcnn.config import AugmentConfig


class TrainAugment:
    """Callable (image, masks, labels) -> (image, masks, labels) for `CocoDataset(transform=...)`."""

    def __init__(self, cfg: AugmentConfig) -> None:
        steps: list[A.BasicTransform] = []
        if cfg.hflip > 0:
            steps.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.vflip > 0:
            steps.append(A.VerticalFlip(p=cfg.vflip))
        if cfg.scale_p > 0 and (cfg.scale_min, cfg.scale_max) != (1.0, 1.0):
            # Same output size; content zoomed in (crop) or out (padded with zeros).
            steps.append(A.Affine(scale=(cfg.scale_min, cfg.scale_max), keep_ratio=True, border_mode=0, fill=0, fill_mask=0, p=cfg.scale_p))
        if cfg.color_jitter > 0 and cfg.color_p > 0:
            j = cfg.color_jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5), p=cfg.color_p))
        self.pipeline = A.Compose(steps)

    def reseed(self, seed: int) -> None:
        """Make the augmentation stream a function of `seed` (e.g. of epoch and rank), so resume repeats it."""
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray, masks: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        if not masks:
            return self.pipeline(image=image)["image"], masks, labels
        out = self.pipeline(image=image, masks=masks)
        return out["image"], [np.asarray(m, dtype=np.uint8) for m in out["masks"]], labels


def build_train_transform(cfg: AugmentConfig) -> TrainAugment | None:
    return TrainAugment(cfg) if cfg.enabled else None
