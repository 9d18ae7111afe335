"""Image decoding shared by training and serving: JPG, PNG, TIFF (8/16-bit, grayscale/RGB) to uint8 RGB."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be decoded, is too large, or has an unsupported layout."""


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Scale any integer or float pixel type to uint8.

    uint8 passes through; wider integers are scaled by their type's full range (16-bit: /257), so the
    same scene maps to the same values in every image; floats in [0, 1] are scaled by 255, other floats
    are min-max stretched per image.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        scaled = (array.astype(np.float64) - info.min) / (info.max - info.min) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64))
        lo, hi = float(finite.min()), float(finite.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(finite * 255.0).astype(np.uint8)
        span = hi - lo or 1.0
        return np.rint((finite - lo) / span * 255.0).astype(np.uint8)
    raise ImageError(f"{where}: unsupported pixel type {array.dtype}")


def _to_rgb(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels == 1:
            return np.repeat(array, 3, axis=2)
        if channels == 2:  # grayscale + alpha
            return np.repeat(array[:, :, :1], 3, axis=2)
        if channels in (3, 4):
            return np.ascontiguousarray(array[:, :, :3])
        if array.shape[0] in (1, 3, 4) and channels > 4:  # planar (C, H, W) TIFF
            return _to_rgb(np.moveaxis(array, 0, 2), where)
    raise ImageError(f"{where}: unsupported image shape {array.shape}, expected HxW, HxWx1, HxWx3 or HxWx4")


FORMATS = "JPG, PNG or TIFF"
MAX_SAMPLES_PER_PIXEL = 4
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """A decoder's message without Python object reprs (`<_io.BytesIO object at 0x...>`)."""
    text = _OBJECT_REPR.sub("the data", str(exc)).strip()
    return text or type(exc).__name__


def _first_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data[:8])


def _is_tiff(head: bytes) -> bool:
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode an image file or its bytes to an HxWx3 uint8 RGB array.

    Raises ImageError naming the file (or `name`) when the data is not an image, is corrupt, or has
    more than `max_pixels` pixels (checked from the header, before the pixels are decoded).
    """
    where = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"{where}: cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(f"{where}: empty file, expected a {FORMATS} image")
    if _is_tiff(data[:4]):
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                # Width x height (x depth, for volumes) from the tags, whatever the sample layout: a planar
                # (C, H, W) page has its width last, so the shape's first two axes do not bound it.
                width, height, depth = int(page.imagewidth), int(page.imagelength), max(int(page.imagedepth or 1), 1)
                pixels = width * height * depth
                if pixels > max_pixels:
                    raise ImageError(f"{where}: TIFF image is {width}x{height}{f'x{depth}' if depth > 1 else ''} = "
                                     f"{pixels} pixels, above the limit of {max_pixels}")
                if int(page.size) > max_pixels * MAX_SAMPLES_PER_PIXEL:
                    raise ImageError(f"{where}: TIFF image holds {int(page.size)} samples ({page.shape}), above the limit "
                                     f"of {max_pixels * MAX_SAMPLES_PER_PIXEL} ({MAX_SAMPLES_PER_PIXEL} per pixel)")
                array = page.asarray()
        except ImageError:
            raise
        except Exception as exc:  # tifffile raises many types for corrupt data
            raise ImageError(f"{where}: corrupt or unsupported TIFF: {_reason(exc)}") from None
        return _to_rgb(_to_uint8(array, where), where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"{where}: image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(img).astype(np.uint16 if img.mode.startswith("I;16") else np.int32)
                    if img.mode == "I":
                        array = np.clip(array, 0, 65535).astype(np.uint16)
                    return _to_rgb(_to_uint8(array, where), where)
                if img.mode != "RGB":
                    img = img.convert("RGB")
                return np.asarray(img, dtype=np.uint8).copy()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not a decodable image, expected {FORMATS} (its first bytes are {_first_bytes(data)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{where}: image too large to decode safely: {_reason(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{where}: corrupt image data, expected {FORMATS}: {_reason(exc)}") from None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1], the input torchvision detection models expect in training
    (at inference, `maskrcnn.processing.preprocess` takes the decoded image as it is)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


@dataclass(frozen=True)
class ImageStats:
    """Cheap statistics of one decoded image, the same in training's reference and in serving's metrics:
    `megapixels` (width x height / 1e6), `brightness` (mean luminance, 0-1) and `contrast` (standard
    deviation of luminance, 0-0.5), luminance as ITU-R BT.601 (0.299 R + 0.587 G + 0.114 B)."""

    megapixels: float
    brightness: float
    contrast: float


STATS_STRIDE = 4  # luminance from every 4th pixel of every 4th row: 1/16 of the pixels, ~0.4 ms per megapixel


def image_statistics(image: np.ndarray) -> ImageStats:
    """`ImageStats` of an HxWx3 uint8 RGB image (as `decode_image` returns)."""
    h, w = image.shape[:2]
    sample = image[::STATS_STRIDE, ::STATS_STRIDE].reshape(-1, 3).astype(np.float32)
    luminance = sample @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    return ImageStats(h * w / 1e6, float(luminance.mean()), float(luminance.std()))
