"""Read a full image of any supported format as float32 ``(H, W)`` in [0, 1] with its pixel pitch.

Formats: DICOM (see :mod:`scripts.data.prepare.dicom_io`), PNG / PGM / TIFF (PIL; 8- or 16-bit grayscale, scaled by
the type's maximum), NIfTI (``.nii`` / ``.nii.gz``; nibabel; array axis 0 = columns x, axis 1 = rows y, as ITK and
most converters write 2-D images; pitch from the header's zooms).

The image comes as a :class:`~scripts.data.prepare.pixels.MappedImage`: the stored values, held once, and their map
to [0, 1], applied to the window a crop reads (and block by block for the whole-image checks), so that the peak memory
of one image stays close to its stored size (``benchmarks/input_memory.py``, docs/robustness.md). Conversions that
would lose information are per-file errors, not warnings: colour or multi-channel images, multi-frame files, complex
values, negative values of signed integer rasters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.imageio import ImageFileError, raster_unit_map, read_raster
from scripts.data.prepare.bounds import check_pitch, check_size
from scripts.data.prepare.dicom_io import is_dicom, read_dicom
from scripts.data.prepare.errors import PrepareError
from scripts.data.prepare.pixels import MappedImage, block_range

RASTER_SUFFIXES = (".png", ".pgm", ".pnm", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class LoadedImage:
    """``mapped``: the image as float32 ``(H, W)`` in [0, 1], brighter = denser, mapped from the stored values where
    it is read (:class:`~scripts.data.prepare.pixels.MappedImage`: crop it, do not copy it); ``pixels``: the same as
    one array; ``spacing_mm``: ``(row, col)`` or ``None``."""

    mapped: MappedImage
    spacing_mm: tuple[float, float] | None
    kind: str

    @property
    def pixels(self) -> np.ndarray:
        """The whole image as one float32 array (a full-size copy: prefer ``mapped`` for crops)."""
        return np.asarray(self.mapped)


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _read_raster(path: Path, max_pixels: int | None = None) -> MappedImage:
    try:
        arr = read_raster(path, max_pixels)
        return MappedImage(arr, raster_unit_map(arr))
    except ImageFileError as e:
        raise PrepareError(str(e)) from None


def _raw_pixdim(path: Path, img) -> list[float] | None:
    """``pixdim[1:]`` as stored in the file (unchecked), or ``None`` when the header cannot be re-read."""
    from nibabel.openers import ImageOpener  # optional: NIfTI only (the deploy app's environment has no nibabel)

    try:
        with ImageOpener(str(path)) as f:
            header = type(img.header).from_fileobj(f, check=False)
        return [float(v) for v in header["pixdim"][1:]]
    except Exception:
        return None


def _read_nifti(
    path: Path, max_pixels: int | None = None, read_spacing: bool = True
) -> tuple[MappedImage, tuple[float, float] | None]:
    """A 2-D NIfTI image, min-max scaled to [0, 1] where read (array axis 0 = columns x, axis 1 = rows y).

    The stored values are read once, as stored (memory-mapped for an uncompressed ``.nii``); the header's scaling
    (``scl_slope``/``scl_inter``) and the min-max scaling are applied block by block and to the windows a crop reads.
    Complex-valued, RGB and multi-channel (more than 2 dimensions of more than one element) images are refused
    before any pixel is read: a grayscale reading would drop the imaginary part, the colour or the other channels.
    """
    import nibabel as nib  # optional: NIfTI only (the deploy app's environment has no nibabel)

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        zooms = [float(z) for z in img.header.get_zooms()]
        dtype = np.dtype(img.get_data_dtype())
    except FileNotFoundError:
        raise PrepareError("file not found") from None
    except MemoryError:
        raise PrepareError("corrupt NIfTI header (needs more memory than available)") from None
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable NIfTI header ({type(e).__name__})") from None
    if dtype.fields is not None:
        raise PrepareError(
            f"multi-channel NIfTI (datatype with fields {', '.join(dtype.names)}, e.g. RGB): a single-channel "
            "grayscale image is expected"
        )
    if dtype.kind == "c":
        raise PrepareError(
            f"complex-valued NIfTI (datatype {dtype.name}): a real-valued grayscale image is expected (the imaginary "
            "part would be dropped)"
        )
    if dtype.kind not in "uifb":
        raise PrepareError(f"NIfTI datatype {dtype.name} is not numeric: a grayscale image is expected")
    kept = [n for n in shape if n != 1]
    if len(kept) != 2:
        raise PrepareError(
            f"expected a 2-D NIfTI image, got shape {shape} (more than one slice, channel or time point is not "
            "converted to one grayscale image)"
        )
    check_size(kept[1], kept[0], "NIfTI image", 1, max_pixels)
    axes = [i for i, n in enumerate(shape) if n != 1]
    raw = _raw_pixdim(path, img)  # nibabel replaces a pixdim of 0 by 1 on loading: read what the file says
    pixdim = [raw[i] if raw is not None and i < len(raw) else (zooms[i] if i < len(zooms) else 0.0) for i in axes]
    # axis 0 = x (columns) -> (rows, cols); pixdim 0 (unset) is an error, never "1 mm" assumed
    spacing = check_pitch([pixdim[1], pixdim[0]], "NIfTI pixdim") if read_spacing else None
    proxy = img.dataobj
    try:
        if hasattr(proxy, "get_unscaled"):  # as stored; slope/intercept applied below, where read
            data = np.asarray(proxy.get_unscaled()).reshape(kept)
            slope, inter = float(proxy.slope), float(proxy.inter)
        else:
            data, slope, inter = np.asarray(proxy, dtype=np.float32).reshape(kept), 1.0, 0.0
    except MemoryError:
        raise PrepareError("NIfTI data cannot be read: not enough memory") from None
    except Exception as e:
        raise PrepareError(f"corrupt or truncated NIfTI data ({type(e).__name__})") from None
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        raise PrepareError(f"NIfTI scl_slope/scl_inter {slope:g}/{inter:g}: finite numbers and a non-zero slope")

    def scaled(block: np.ndarray) -> np.ndarray:
        if slope == 1.0 and inter == 0.0:
            return block.astype(np.float32)
        return (block * slope + inter).astype(np.float32)

    try:
        lo, hi, bad = block_range(data, scaled)  # in the file's order: a memory map is read front to back
    except (OSError, ValueError) as e:
        raise PrepareError(f"corrupt or truncated NIfTI data ({type(e).__name__})") from None
    if bad:
        raise PrepareError(f"NIfTI image: {bad} pixel(s) are NaN or infinite")
    if hi <= lo:
        raise PrepareError(f"NIfTI image: every pixel has the same value {lo:g} (blank image)")
    return MappedImage(data.T, lambda block: (scaled(block) - lo) / (hi - lo)), spacing


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
        mapped, spacing = _read_nifti(path, max_pixels, read_spacing=spacing_mm is None)
        kind = "nifti"
    elif suffix in RASTER_SUFFIXES:
        mapped, spacing, kind = _read_raster(path, max_pixels), None, suffix.lstrip(".")
    elif is_dicom(path) or suffix == "":
        dimg = read_dicom(path, apply_voi=apply_voi, max_pixels=max_pixels, read_spacing=spacing_mm is None)
        mapped, spacing, kind = dimg.mapped, dimg.spacing_mm, "dicom"
    else:
        raise PrepareError(f"unsupported image format {suffix!r}: use DICOM, PNG, PGM, TIFF or NIfTI (.nii, .nii.gz)")
    if not allow_blank:
        bad = mapped.count_nonfinite()
        if bad:
            raise PrepareError(f"{bad} pixel(s) are NaN or infinite")
        lo, hi = mapped.value_range()
        if mapped.size and hi <= lo:
            raise PrepareError(f"every pixel has the same value {lo:g} (blank image)")
    if spacing_mm is not None:
        spacing = spacing_mm
    return LoadedImage(mapped, spacing, kind)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lesion mask (any supported format) as boolean ``(H, W)``: non-zero = lesion (one byte per pixel, made
    block by block)."""
    path = Path(path)
    if _suffix(path) in RASTER_SUFFIXES or _suffix(path) in NIFTI_SUFFIXES:
        return load_image(path, allow_blank=True).mapped.above(0.0)
    # DICOM masks: raw stored values, no windowing
    return load_image(path, apply_voi=False, allow_blank=True).mapped.above(0.5)
