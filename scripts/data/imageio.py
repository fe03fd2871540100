"""ROI and mask files: the one on-disk image format that every data source writes and every workflow reads.

ROI: single-channel 16-bit PNG; intensity in [0, 1] is stored as 0..65535 (brighter = denser tissue).
Mask: single-channel 8-bit PNG, 0 = background, 255 = lesion (calcification or annotated region).
Arrays are ``(H, W)``, row-major (row = y).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.engine.atomic import atomic_path


class ImageFileError(ValueError):
    """An image file that cannot be read as the bundle's ROI or mask format; the message names the file."""


def write_roi_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an ``(H, W)`` float image in [0, 1] (values outside are clipped) as 16-bit PNG, atomically."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"ROI must be 2-D (H, W), got shape {image.shape}")
    data = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")
    return Path(path)


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write an ``(H, W)`` boolean mask as 8-bit PNG (0 / 255), atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(tmp, format="PNG")
    return Path(path)


def read_raster(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a PNG / PGM / TIFF as a 2-D array; the one raster reader of data preparation and inference.

    The decoded size is checked from the file header against ``max_pixels`` (default: the cap of
    :mod:`scripts.data.prepare.bounds`) before decoding. Grayscale modes are returned as stored; a palette image whose
    palette is gray is converted to its gray levels (8-bit); colour images (RGB, RGBA, LA, colour palettes) are
    refused. Raises :class:`ImageFileError` (a ``ValueError``) whose message says what is wrong, in words.
    """
    import warnings

    from PIL import UnidentifiedImageError

    from scripts.data.prepare.bounds import check_size
    from scripts.data.prepare.bounds import max_pixels as default_max_pixels
    from scripts.data.prepare.errors import PrepareError

    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    Image.MAX_IMAGE_PIXELS = max(limit, 1)  # PIL's own bomb check, consistent with ours (it refuses above 2x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            try:
                check_size(h, w, "image", 1, limit)
            except PrepareError as e:
                raise ImageFileError(str(e)) from None
            im.load()
            if im.mode == "P":
                rgb = np.array(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise ImageFileError("colour palette image: a grayscale image is expected")
                return np.ascontiguousarray(rgb[..., 0])
            if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "PA", "RGBX", "La"):
                raise ImageFileError(f"colour image (PIL mode {im.mode}): a grayscale image is expected")
            arr = np.array(im)
    except ImageFileError:
        raise
    except FileNotFoundError:
        raise ImageFileError("file not found") from None
    except UnidentifiedImageError:
        raise ImageFileError("not a readable image file (unknown or corrupt format)") from None
    except Image.DecompressionBombError:
        raise ImageFileError(
            f"image size exceeds the decode limit of {limit / 1e6:g} Mpixel (from its header)"
        ) from None
    except MemoryError:
        raise ImageFileError("image cannot be decoded: not enough memory") from None
    except Exception as e:  # truncated PNG/TIFF, bad chunk
        raise ImageFileError(f"corrupt or truncated image ({type(e).__name__})") from None
    if arr.ndim != 2:
        raise ImageFileError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    return arr


def raster_to_unit(arr: np.ndarray) -> np.ndarray:
    """Scale a raster's stored values to float32 [0, 1]: 8-bit by 255, 16-bit by 65535, 32-bit integers by
    ``max(65535, max)``, floats by min-max."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype.kind in "ui":
        if arr.dtype.itemsize == 1:
            top = 255.0
        elif arr.dtype.itemsize == 2:
            top = 65535.0
        else:  # PIL mode "I" (32-bit) usually holds 16-bit data
            top = max(65535.0, float(arr.max()))
        return np.clip(arr.astype(np.float32) / top, 0.0, 1.0)
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        raise ImageFileError(f"{int(arr.size - finite.sum())} pixel(s) are NaN or infinite")
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _open(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    try:
        return read_raster(path, max_pixels)
    except ImageFileError as e:
        raise ImageFileError(f"{Path(path).name}: {e}") from None


def read_roi_png(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a ROI PNG as float32 ``(H, W)`` in [0, 1] (16-bit scaled by 65535, 8-bit by 255; see
    :func:`read_raster` for the accepted modes and the size cap)."""
    arr = _open(path, max_pixels)
    scale = 65535.0 if arr.dtype in (np.uint16, np.int32, np.int16) else 255.0
    if arr.dtype == np.bool_:
        scale = 1.0
    return (arr.astype(np.float32) / scale).clip(0.0, 1.0)


def read_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as boolean ``(H, W)``."""
    arr = _open(path)
    return arr > 0
