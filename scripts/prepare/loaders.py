"""Read a full image of any supported format into float32 ``(H, W)`` in [0, 1] with its pixel pitch.

Formats: DICOM (see :mod:`scripts.prepare.dicom_io`), PNG / PGM / TIFF (PIL; 8- or 16-bit grayscale, scaled by
the type's maximum), NIfTI (``.nii`` / ``.nii.gz``; nibabel; array axis 0 = columns x, axis 1 = rows y, as ITK and
most converters write 2-D images; pitch from the header's zooms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.prepare.dicom_io import is_dicom, read_dicom
from scripts.prepare.errors import PrepareError

RASTER_SUFFIXES = (".png", ".pgm", ".pnm", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class LoadedImage:
    """``pixels``: float32 ``(H, W)`` in [0, 1], brighter = denser; ``spacing_mm``: ``(row, col)`` or ``None``."""

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    kind: str


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA"):
                raise PrepareError(f"colour image (PIL mode {im.mode}): a grayscale image is expected")
            arr = np.array(im)
    except PrepareError:
        raise
    except FileNotFoundError:
        raise PrepareError("file not found") from None
    except UnidentifiedImageError:
        raise PrepareError("not a readable image file (unknown or corrupt format)") from None
    except Exception as e:  # truncated PNG/TIFF
        raise PrepareError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise PrepareError(f"expected a 2-D grayscale image, got shape {arr.shape}")
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
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()
    except FileNotFoundError:
        raise PrepareError("file not found") from None
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable NIfTI ({type(e).__name__}: {e})") from None
    data = np.squeeze(data)
    if data.ndim != 2:
        raise PrepareError(f"expected a 2-D NIfTI image, got shape {data.shape}")
    lo, hi = float(data.min()), float(data.max())
    pixels = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    # axis 0 = x (columns), axis 1 = y (rows) -> (rows, cols)
    return np.ascontiguousarray(pixels.T), (float(zooms[1]), float(zooms[0]))


def load_image(
    path: str | os.PathLike, spacing_mm: float | tuple[float, float] | None = None, apply_voi: bool = True
) -> LoadedImage:
    """Read ``path``; ``spacing_mm`` (mm, or ``(row, col)``) overrides the pitch the file states (or lacks)."""
    path = Path(path)
    if not path.exists():
        raise PrepareError("file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise PrepareError("file is empty")
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        pixels, spacing = _read_nifti(path)
        kind = "nifti"
    elif suffix in RASTER_SUFFIXES:
        pixels, spacing, kind = _read_raster(path), None, suffix.lstrip(".")
    elif is_dicom(path) or suffix == "":
        dimg = read_dicom(path, apply_voi=apply_voi)
        pixels, spacing, kind = dimg.pixels, dimg.spacing_mm, "dicom"
    else:
        raise PrepareError(f"unsupported image format {suffix!r}: use DICOM, PNG, PGM, TIFF or NIfTI (.nii, .nii.gz)")
    if spacing_mm is not None:
        spacing = (float(spacing_mm), float(spacing_mm)) if np.isscalar(spacing_mm) else tuple(map(float, spacing_mm))
    return LoadedImage(pixels.astype(np.float32, copy=False), spacing, kind)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask (any supported format) as boolean ``(H, W)``: non-zero = lesion."""
    path = Path(path)
    if _suffix(path) in RASTER_SUFFIXES or _suffix(path) in NIFTI_SUFFIXES:
        return load_image(path).pixels > 0
    # DICOM masks: raw stored values, no windowing
    return load_image(path, apply_voi=False).pixels > 0.5
