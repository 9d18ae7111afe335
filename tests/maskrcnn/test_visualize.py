import numpy as np

from maskrcnn.labels import LabelMap
from maskrcnn.masks import encode_masks
from maskrcnn.visualize import draw_predictions


def test_overlay_colours_only_the_predicted_mask_above_threshold():
    image = np.zeros((32, 32, 3), np.uint8)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, 4:12, 4:12] = 1
    masks[1, 20:30, 20:30] = 1
    pred = {"boxes": np.array([[4, 4, 12, 12], [20, 20, 30, 30]], float), "scores": np.array([0.9, 0.2]),
            "labels": np.array([1, 1]), "masks": encode_masks(masks)}
    out = np.asarray(draw_predictions(image, pred, LabelMap([1], ["thing"]), score_threshold=0.5))
    scale = out.shape[0] // 32
    assert out.shape == (32 * scale, 32 * scale, 3) and scale >= 2  # small images are enlarged
    assert out[8 * scale, 8 * scale].sum() > 0  # inside the kept mask
    assert out[25 * scale, 25 * scale].sum() == 0  # the low-score mask is not drawn
    assert out[16 * scale, 16 * scale].sum() == 0
