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

from scripts.atomic import atomic_path


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


def _open(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except Exception as e:
        raise ImageFileError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def read_roi_png(path: str | os.PathLike) -> np.ndarray:
    """Read a ROI PNG as float32 ``(H, W)`` in [0, 1] (16-bit scaled by 65535, 8-bit by 255)."""
    arr = _open(path)
    if arr.ndim == 3:
        raise ImageFileError(f"{path}: expected a single-channel image, got shape {arr.shape}")
    scale = 65535.0 if arr.dtype in (np.uint16, np.int32, np.int16) else 255.0
    return (arr.astype(np.float32) / scale).clip(0.0, 1.0)


def read_mask_png(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as boolean ``(H, W)``."""
    arr = _open(path)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr > 0
