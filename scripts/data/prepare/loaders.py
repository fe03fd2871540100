"""Read a full image of any supported format into float32 ``(H, W)`` in [0, 1] with its pixel pitch.

Formats: DICOM (see :mod:`scripts.data.prepare.dicom_io`), PNG / PGM / TIFF (PIL; 8- or 16-bit grayscale, scaled by
the type's maximum), NIfTI (``.nii`` / ``.nii.gz``; nibabel; array axis 0 = columns x, axis 1 = rows y, as ITK and
most converters write 2-D images; pitch from the header's zooms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.prepare.bounds import check_pitch, check_size
from scripts.data.prepare.dicom_io import is_dicom, read_dicom
from scripts.data.prepare.errors import PrepareError

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


def _read_raster(path: Path, max_pixels: int | None = None) -> np.ndarray:
    from scripts.data.imageio import ImageFileError, raster_to_unit, read_raster

    try:
        return raster_to_unit(read_raster(path, max_pixels))
    except ImageFileError as e:
        raise PrepareError(str(e)) from None


def _raw_pixdim(path: Path, img) -> list[float] | None:
    """``pixdim[1:]`` as stored in the file (unchecked), or ``None`` when the header cannot be re-read."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            header = type(img.header).from_fileobj(f, check=False)
        return [float(v) for v in header["pixdim"][1:]]
    except Exception:
        return None


def _read_nifti(
    path: Path, max_pixels: int | None = None, read_spacing: bool = True
) -> tuple[np.ndarray, tuple[float, float] | None]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        zooms = [float(z) for z in img.header.get_zooms()]
    except FileNotFoundError:
        raise PrepareError("file not found") from None
    except MemoryError:
        raise PrepareError("corrupt NIfTI header (needs more memory than available)") from None
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable NIfTI header ({type(e).__name__})") from None
    kept = [n for n in shape if n != 1]
    if len(kept) != 2:
        raise PrepareError(f"expected a 2-D NIfTI image, got shape {shape}")
    check_size(kept[1], kept[0], "NIfTI image", 1, max_pixels)
    axes = [i for i, n in enumerate(shape) if n != 1]
    raw = _raw_pixdim(path, img)  # nibabel replaces a pixdim of 0 by 1 on loading: read what the file says
    pixdim = [raw[i] if raw is not None and i < len(raw) else (zooms[i] if i < len(zooms) else 0.0) for i in axes]
    # axis 0 = x (columns) -> (rows, cols); pixdim 0 (unset) is an error, never "1 mm" assumed
    spacing = check_pitch([pixdim[1], pixdim[0]], "NIfTI pixdim") if read_spacing else None
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError:
        raise PrepareError("NIfTI data cannot be read: not enough memory") from None
    except Exception as e:
        raise PrepareError(f"corrupt or truncated NIfTI data ({type(e).__name__})") from None
    data = np.squeeze(data)
    if data.ndim != 2:
        raise PrepareError(f"expected a 2-D NIfTI image, got shape {data.shape}")
    finite = np.isfinite(data)
    if not finite.all():
        raise PrepareError(f"NIfTI image: {int(data.size - finite.sum())} pixel(s) are NaN or infinite")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise PrepareError(f"NIfTI image: every pixel has the same value {lo:g} (blank image)")
    pixels = (data - lo) / (hi - lo)
    return np.ascontiguousarray(pixels.T), spacing


def load_image(
    path: str | os.PathLike,
    spacing_mm: float | tuple[float, float] | None = None,
    apply_voi: bool = True,
    max_pixels: int | None = None,
    allow_blank: bool = False,
) -> LoadedImage:
    """Read ``path``; ``spacing_mm`` (mm, or ``(row, col)``) overrides the pitch the file states (or lacks).

    One reader, one set of rules for preparation and inference: the bounds of :mod:`scripts.data.prepare.bounds`
    (pitch, magnification, window, rescale, decoded size ``max_pixels``) are checked before decoding, and an image
    with NaN/inf pixels or a single value everywhere (blank) is refused (``allow_blank`` for masks)."""
    path = Path(path)
    if spacing_mm is not None:
        spacing_mm = check_pitch(
            [spacing_mm, spacing_mm] if np.isscalar(spacing_mm) else list(spacing_mm), "spacing_mm"
        )
    if path.is_symlink() and not path.exists():
        raise PrepareError("dangling symbolic link (its target does not exist)")
    if not path.exists():
        raise PrepareError("file not found")
    if not path.is_file():
        raise PrepareError("not a regular file")
    if path.stat().st_size == 0:
        raise PrepareError("file is empty")
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        pixels, spacing = _read_nifti(path, max_pixels, read_spacing=spacing_mm is None)
        kind = "nifti"
    elif suffix in RASTER_SUFFIXES:
        pixels, spacing, kind = _read_raster(path, max_pixels), None, suffix.lstrip(".")
    elif is_dicom(path) or suffix == "":
        dimg = read_dicom(path, apply_voi=apply_voi, max_pixels=max_pixels, read_spacing=spacing_mm is None)
        pixels, spacing, kind = dimg.pixels, dimg.spacing_mm, "dicom"
    else:
        raise PrepareError(f"unsupported image format {suffix!r}: use DICOM, PNG, PGM, TIFF or NIfTI (.nii, .nii.gz)")
    if not allow_blank:
        finite = np.isfinite(pixels)
        if not finite.all():
            raise PrepareError(f"{int(pixels.size - finite.sum())} pixel(s) are NaN or infinite")
        if pixels.size and float(pixels.max()) <= float(pixels.min()):
            raise PrepareError(f"every pixel has the same value {float(pixels.flat[0]):g} (blank image)")
    if spacing_mm is not None:
        spacing = spacing_mm
    return LoadedImage(pixels.astype(np.float32, copy=False), spacing, kind)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask (any supported format) as boolean ``(H, W)``: non-zero = lesion."""
    path = Path(path)
    if _suffix(path) in RASTER_SUFFIXES or _suffix(path) in NIFTI_SUFFIXES:
        return load_image(path, allow_blank=True).pixels > 0
    # DICOM masks: raw stored values, no windowing
    return load_image(path, apply_voi=False, allow_blank=True).pixels > 0.5
