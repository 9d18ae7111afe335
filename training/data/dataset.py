"""Samples for torchvision's detection models from a validated COCO split, and their collation."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.coco import CocoSplit
from maskrcnn.images import DEFAULT_MAX_PIXELS, decode_image, to_tensor
from maskrcnn.masks import decode_segmentation, masks_to_boxes

Transform = Callable[[np.ndarray, list[np.ndarray], list[int]], tuple[np.ndarray, list[np.ndarray], list[int]]]


class CocoDataset(Dataset):
    """Samples for torchvision detection models: (3xHxW float image, target dict).

    Crowd annotations are left out of training targets (as in torchvision's references) but stay in
    the COCO ground truth that evaluation uses. Boxes are derived from the (possibly augmented)
    masks, so the two can never disagree.
    """

    def __init__(self, split: CocoSplit, transform: Transform | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.split = split
        self.transform = transform
        self.max_pixels = max_pixels
        self.images = split.coco["images"]
        self.anns_by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in split.coco["annotations"]:
            if not ann["iscrowd"]:
                self.anns_by_image[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        """Raw sample: HxWx3 uint8 image, list of HxW masks, contiguous labels."""
        img = self.images[index]
        image = decode_image(self.split.root / img["file_name"], max_pixels=self.max_pixels)
        anns = self.anns_by_image[img["id"]]
        masks = [decode_segmentation(a["segmentation"], img["height"], img["width"]) for a in anns]
        labels = [self.split.label_map.label_of(a["category_id"]) for a in anns]
        return image, masks, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, masks, labels = self.load(index)
        if self.transform is not None:
            image, masks, labels = self.transform(image, masks, labels)
        h, w = image.shape[:2]
        keep = [i for i, m in enumerate(masks) if m.any()]
        mask_arr = np.stack([masks[i] for i in keep]).astype(np.uint8) if keep else np.zeros((0, h, w), np.uint8)
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(mask_arr)).reshape(-1, 4),
            "labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
            "masks": torch.from_numpy(mask_arr),
            "image_id": torch.tensor(self.images[index]["id"]),
        }
        return to_tensor(image), target


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
