import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from maskrcnn.images import ImageError, decode_image, to_tensor


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_rgb_round_trips_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    out = decode_image(_encode(rgb, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    out = decode_image(_encode(gray, "JPEG", quality=100))
    assert out.shape == (8, 16, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - gray).max() <= 2


def test_png_rgba_drops_alpha():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    out = decode_image(_encode(rgba, "PNG"))
    assert out.shape == (4, 4, 3) and (out[..., 0] == 200).all()


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 3)])
def test_tiff_16bit_scales_full_range_to_8bit(shape):
    data = np.zeros(shape, np.uint16)
    data.flat[0] = 65535
    data.flat[1] = 257 * 100
    buf = io.BytesIO()
    tifffile.imwrite(buf, data)
    out = decode_image(buf.getvalue())
    assert out.shape == (6, 7, 3) and out.dtype == np.uint8
    assert sorted(set(out.ravel().tolist())) == [0, 100, 255]  # 0 -> 0, 257 * 100 -> 100, 65535 -> 255


def test_tiff_8bit_and_float():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((3, 3, 3), 42, np.uint8))
    assert (decode_image(buf.getvalue()) == 42).all()
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((3, 3), 0.5, np.float32))
    assert (decode_image(buf.getvalue()) == 128).all()


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not pixels")
    with pytest.raises(ImageError, match=r"notes\.jpg: not a decodable image"):
        decode_image(path)


def test_truncated_image_is_corrupt(tmp_path):
    data = _encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt image data"):
        decode_image(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(tmp_path / "absent.png")


def test_pixel_limit_is_checked_before_decoding():
    big = _encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(ImageError, match="10000 pixels, above the limit of 9999"):
        decode_image(big, max_pixels=9999, name="upload")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(buf.getvalue(), max_pixels=9999)


def test_to_tensor_layout_and_range():
    t = to_tensor(np.full((2, 3, 3), 255, np.uint8))
    assert tuple(t.shape) == (3, 2, 3) and float(t.max()) == 1.0


def test_image_statistics_are_luminance_mean_and_spread():
    from maskrcnn.images import image_statistics

    white = image_statistics(np.full((40, 50, 3), 255, np.uint8))
    assert white.megapixels == pytest.approx(0.002) and white.brightness == pytest.approx(1.0) and white.contrast == 0
    red = image_statistics(np.tile(np.array([255, 0, 0], np.uint8), (16, 16, 1)))
    assert red.brightness == pytest.approx(0.299, abs=1e-6)  # BT.601 luminance
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 255
    stats = image_statistics(halves)
    assert stats.brightness == pytest.approx(0.5) and stats.contrast == pytest.approx(0.5)
