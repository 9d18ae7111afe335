import numpy as np

from maskrcnn.config import AugmentConfig, SyntheticConfig
from training.data.coco import load_coco
from training.data.dataset import CocoDataset
from maskrcnn.masks import masks_to_boxes
from training.data.synthetic import synthetic_dataset
from training.data.transforms import TrainAugment, build_train_transform


def _sample():
    image = np.zeros((40, 60, 3), np.uint8)
    image[5:15, 10:30] = 255
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:30] = 1
    return image, mask


def test_horizontal_flip_moves_image_and_mask_together():
    image, mask = _sample()
    aug = TrainAugment(AugmentConfig(hflip=1.0, vflip=0.0, scale_p=0.0, color_jitter=0.0))
    out_img, (out_mask,), labels = aug(image, [mask], [2])
    assert labels == [2]
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    np.testing.assert_array_equal(out_img[..., 0] > 0, out_mask.astype(bool))
    assert masks_to_boxes(out_mask[None]).tolist() == [[30, 5, 50, 15]]


def test_color_jitter_leaves_masks_alone():
    image, mask = _sample()
    image = (image // 2 + 60).astype(np.uint8)  # mid-tones, which jitter must move (0 and 255 may clip back)
    aug = TrainAugment(AugmentConfig(hflip=0.0, scale_p=0.0, color_jitter=0.5, color_p=1.0))
    out_img, (out_mask,), _ = aug(image, [mask], [1])
    np.testing.assert_array_equal(out_mask, mask)
    assert out_img.shape == image.shape and not np.array_equal(out_img, image)  # the image did change


def test_augmented_samples_have_boxes_equal_to_mask_extents(tmp_path):
    train, _ = synthetic_dataset(SyntheticConfig(seed=5, num_train=12, num_val=2, image_size=64, min_size=10, max_size=30), tmp_path)
    aug = TrainAugment(AugmentConfig(hflip=0.5, vflip=0.5, scale_min=0.5, scale_max=1.5, scale_p=1.0, color_p=1.0))
    aug.reseed(0)
    ds = CocoDataset(load_coco(train), aug)
    checked = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape[1:] == (64, 64)
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = np.nonzero(mask.numpy())
            assert len(xs) > 0, "empty instances must be dropped"
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            checked += 1
    assert checked > 10


def test_reseed_makes_augmentation_repeatable():
    image, mask = _sample()
    aug = TrainAugment(AugmentConfig(hflip=0.5, scale_p=1.0, color_p=1.0))
    aug.reseed(7)
    first = [aug(image, [mask], [1])[1][0] for _ in range(5)]
    aug.reseed(7)
    second = [aug(image, [mask], [1])[1][0] for _ in range(5)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # negative controls: the augmentation changes the masks, and another seed changes them otherwise
    assert any(a.shape != mask.shape or not np.array_equal(a, mask) for a in first)
    aug.reseed(8)
    third = [aug(image, [mask], [1])[1][0] for _ in range(5)]
    assert any(a.shape != c.shape or not np.array_equal(a, c) for a, c in zip(first, third))


def test_disabled_augmentation_builds_nothing():
    assert build_train_transform(AugmentConfig(enabled=False)) is None
