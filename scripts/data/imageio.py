"""ROI and mask files: the one on-disk image format that every data source writes and every workflow reads.

ROI: single-channel 16-bit PNG; intensity in [0, 1] is stored as 0..65535 (brighter = denser tissue).
Mask: single-channel 8-bit PNG, 0 = background, 255 = lesion (calcification or annotated region).
Arrays are ``(H, W)``, row-major (row = y).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from scripts.data.prepare.bounds import check_size
from scripts.data.prepare.bounds import max_pixels as default_max_pixels
from scripts.data.prepare.errors import PrepareError
from scripts.data.prepare.pixels import BLOCK_PIXELS, block_range, value_histogram
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


GRAY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "F")  # PIL's single-channel modes (+ "P")


def read_raster(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a PNG / PGM / TIFF as a 2-D array; the one raster reader of data preparation and inference.

    The decoded size is checked from the file header against ``max_pixels`` (default: the cap of
    :mod:`scripts.data.prepare.bounds`) before decoding. Single-channel grayscale modes are returned as stored
    (copied out of PIL in row strips: the image is held twice at most); a palette image whose used colours are gray
    is converted to their gray levels (8-bit). Anything a grayscale reading would lose is refused, never converted:
    colour and multi-channel images (RGB, RGBA, LA, colour palettes, ...) and multi-frame files (multi-page TIFF,
    animated PNG), of which only the first frame would be read. Raises :class:`ImageFileError` (a ``ValueError``)
    whose message says what is wrong, in words.
    """
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
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                raise ImageFileError(
                    f"{frames} frames (a multi-page TIFF or an animated image): one 2-D grayscale image is expected"
                )
            if im.mode == "P":
                return _gray_palette(im)
            if im.mode not in GRAY_MODES:
                raise ImageFileError(
                    f"colour or multi-channel image (PIL mode {im.mode}): a single-channel grayscale image is expected"
                )
            arr = _pixels_of(im)
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


def _pixels_of(im: Image.Image) -> np.ndarray:
    """The decoded pixels of a single-channel image as an array, copied out of PIL in row strips of about 1 Mpixel:
    the image is held twice at most (PIL's and ours), where exporting it whole holds it three times (PIL's buffer,
    the exported bytes and the array)."""
    im.load()
    w, h = im.size
    if w * h <= BLOCK_PIXELS:
        return np.asarray(im)
    step = max(1, BLOCK_PIXELS // max(w, 1))
    first = np.asarray(im.crop((0, 0, w, step)))
    out = np.empty((h, *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for r0 in range(step, h, step):
        out[r0 : r0 + step] = np.asarray(im.crop((0, r0, w, min(r0 + step, h))))
    return out


def _gray_palette(im: Image.Image) -> np.ndarray:
    """The gray levels of a palette image whose used palette entries are all gray; colour is refused."""
    index = _pixels_of(im)
    palette = np.asarray(im.getpalette("RGB") or [0, 0, 0], dtype=np.uint8).reshape(-1, 3)
    _, counts = value_histogram(index)
    used = np.flatnonzero(counts)
    if used.size and used[-1] >= len(palette):
        raise ImageFileError("palette image with pixel indices beyond its palette")
    colours = palette[used]
    if not (np.array_equal(colours[:, 0], colours[:, 1]) and np.array_equal(colours[:, 0], colours[:, 2])):
        raise ImageFileError("colour palette image: a grayscale image is expected")
    return palette[:, 0][index]


def raster_unit_map(arr: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The point-wise map from a raster's stored values to float32 [0, 1]: 8-bit by 255, 16-bit by 65535, 32-bit
    integers by ``max(65535, max)``, floats by min-max, booleans as 0/1. Applied to blocks or windows of ``arr``
    (so that no full float copy is needed); the whole-image facts it needs (maximum, minimum) are read here.

    Raises:
        ImageFileError: for a conversion that would lose more than scaling: negative integer values (they would be
            clipped to 0) or NaN/inf floats.
    """
    if arr.dtype == np.bool_:
        return lambda block: block.astype(np.float32)
    if arr.dtype.kind in "ui":
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            bits = arr.dtype.itemsize * 8
            raise ImageFileError(
                f"negative pixel values (down to {int(arr.min())}) in a signed {bits}-bit image: they would be "
                "clipped to 0; an unsigned grayscale image is expected"
            )
        if arr.dtype.itemsize == 1:
            top = 255.0
        elif arr.dtype.itemsize == 2:
            top = 65535.0
        else:  # PIL mode "I" (32-bit) usually holds 16-bit data
            top = max(65535.0, float(arr.max()) if arr.size else 0.0)
        return lambda block: np.clip(block.astype(np.float32) / top, 0.0, 1.0)
    if arr.dtype.kind != "f":
        raise ImageFileError(
            f"pixel type {arr.dtype} (complex or not numeric): a real-valued grayscale image is expected"
        )
    lo, hi, bad = block_range(arr, lambda block: block.astype(np.float32))
    if bad:
        raise ImageFileError(f"{bad} pixel(s) are NaN or infinite")
    if not hi > lo:
        return lambda block: np.zeros(np.shape(block), dtype=np.float32)
    return lambda block: (block.astype(np.float32) - lo) / (hi - lo)


def raster_to_unit(arr: np.ndarray) -> np.ndarray:
    """Scale a raster's stored values to float32 [0, 1] (the whole array; see :func:`raster_unit_map`)."""
    return np.asarray(raster_unit_map(arr)(arr), dtype=np.float32)


def _open(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    try:
        return read_raster(path, max_pixels)
    except ImageFileError as e:
        raise ImageFileError(f"{Path(path).name}: {e}") from None


def read_roi_png(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a ROI PNG as float32 ``(H, W)`` in [0, 1] (16-bit scaled by 65535, 8-bit by 255; see
    :func:`read_raster` for the accepted modes and the size cap). A 32-bit image with values outside 0..65535 is
    refused (they would be clipped)."""
    arr = _open(path, max_pixels)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    scale = 65535.0 if arr.dtype in (np.uint16, np.int32, np.int16) else 255.0
    if arr.dtype.kind == "i" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ImageFileError(
            f"{Path(path).name}: pixel values {int(arr.min())}..{int(arr.max())} outside 0..65535: a 16-bit "
            "grayscale ROI is expected"
        )
    out = arr.astype(np.float32)
    out /= scale
    return np.clip(out, 0.0, 1.0, out=out)


def read_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as boolean ``(H, W)``."""
    arr = _open(path)
    return arr > 0
