"""DICOM pixels done right: photometric interpretation, rescale, VOI LUT / window, BitsStored, pixel spacing.

:func:`read_dicom` returns a float32 ``(H, W)`` image in [0, 1] with "brighter = denser" (MONOCHROME1 is
inverted) and the pixel pitch in mm as ``(row, col)`` when the file states it. Nothing that identifies the
patient (names, ids, dates) is returned, logged or put into error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from scripts.prepare.errors import PrepareError

# transfer syntax UID -> (name, pip packages that give pydicom a decoder)
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": ("JPEG Baseline", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.57": ("JPEG Lossless", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.70": ("JPEG Lossless SV1", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS Lossless", "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS Near-Lossless", "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000 Lossless", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.201": ("HTJ2K Lossless", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.202": ("HTJ2K Lossless RPCL", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.203": ("HTJ2K", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.5": ("RLE Lossless", "pylibjpeg pylibjpeg-rle"),
}


class DicomReadError(PrepareError):
    """A DICOM file that cannot be turned into pixels (not DICOM, truncated, no decoder, unsupported layout)."""


@dataclass
class DicomImage:
    """Pixels and geometry of one DICOM image (no patient identifiers).

    ``pixels``: float32 ``(H, W)`` in [0, 1], brighter = denser; ``spacing_mm``: ``(row, col)`` pitch in mm or
    ``None``; ``spacing_source``: the attribute it came from; ``voi``: how intensities were mapped to [0, 1].
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    photometric: str
    voi: str


def missing_decoder_message(transfer_syntax_uid: str) -> str | None:
    """Return an install hint when pydicom has no working decoder for ``transfer_syntax_uid``, else ``None``."""
    from pydicom.uid import UID

    uid = UID(str(transfer_syntax_uid))
    if not uid.is_compressed:
        return None
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2 (the MONAI Label app's environment): pixel data handlers instead of decoders
        import pydicom.config

        handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(uid)]
        if not handlers:
            return f"transfer syntax {uid} ({uid.name}) has no pixel decoder in pydicom"
        available = any(h.is_available() for h in handlers)
    else:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            return f"transfer syntax {uid} ({uid.name}) has no pixel decoder in pydicom"
    if available:
        return None
    name, packages = _DECODER_HINTS.get(str(uid), (uid.name, "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"))
    return (
        f"compressed pixel data ({name}, transfer syntax {uid}) and no decoder plugin is installed: "
        f"pip install {packages}  (or python-gdcm)"
    )


def spacing_from_dataset(ds) -> tuple[tuple[float, float] | None, str | None]:
    """Pixel pitch ``(row, col)`` in mm: ``PixelSpacing``, else ``ImagerPixelSpacing`` corrected by
    ``EstimatedRadiographicMagnificationFactor`` when present; ``(None, None)`` when the file states neither."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None or len(value) < 2:
            continue
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
        if row <= 0 or col <= 0:
            continue
        if keyword == "ImagerPixelSpacing":
            mag = ds.get("EstimatedRadiographicMagnificationFactor")
            try:
                mag = float(mag) if mag is not None else 1.0
            except (TypeError, ValueError):
                mag = 1.0
            if mag > 0 and mag != 1.0:
                return (row / mag, col / mag), "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        return (row, col), keyword
    return None, None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return (x - lo) / (hi - lo)


def dataset_to_pixels(ds, apply_voi: bool = True) -> tuple[np.ndarray, str]:
    """Turn a decoded dataset into float32 ``(H, W)`` in [0, 1], brighter = denser; returns (pixels, voi note)."""
    try:
        from pydicom.pixels import apply_modality_lut
        from pydicom.pixels import apply_voi as voi_lookup
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_modality_lut
        from pydicom.pixel_data_handlers.util import apply_voi as voi_lookup

    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomReadError(f"{int(ds.SamplesPerPixel)} samples per pixel (colour): only grayscale is supported")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomReadError(f"multi-frame image ({ds.NumberOfFrames} frames): only single-frame is supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(f"photometric interpretation {photometric} is not supported (grayscale only)")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise DicomReadError(f"expected a 2-D image, got pixel array shape {arr.shape}")
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    if arr.dtype.kind == "u" and bits_stored < arr.dtype.itemsize * 8:
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)  # drop overlay / junk in unused high bits
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    voi = "minmax"
    if apply_voi and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = ds.VOILUTSequence[0]
        out_bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        xin = x.astype(np.int64) if np.all(np.mod(x, 1.0) == 0) else x  # LUT lookups need integer input
        x = np.asarray(voi_lookup(xin, ds, index=0), dtype=np.float64) / float((1 << out_bits) - 1)
        voi = "VOILUTSequence[0]"
    elif apply_voi and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR"))
        x = _window(x, center, width, function)
        voi = f"window {center:g}/{width:g} {function.lower()}"
    else:
        x = _minmax(x)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x, voi


def read_dicom(path: str | os.PathLike, apply_voi: bool = True) -> DicomImage:
    """Read one DICOM image file into :class:`DicomImage`; raise :class:`DicomReadError` with a clear reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(os.fspath(path))
    except FileNotFoundError:
        raise DicomReadError("file not found") from None
    except InvalidDicomError:
        raise DicomReadError("not a DICOM file (no DICM preamble/header)") from None
    except Exception as e:  # truncated header, bad element lengths ...
        raise DicomReadError(f"corrupt DICOM header ({type(e).__name__})") from None
    if "PixelData" not in ds:
        raise DicomReadError("DICOM file has no pixel data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None:
        hint = missing_decoder_message(tsyntax)
        if hint:
            raise DicomReadError(hint)
    try:
        pixels, voi = dataset_to_pixels(ds, apply_voi=apply_voi)
    except DicomReadError:
        raise
    except Exception as e:  # truncated pixel data, decoder failure, inconsistent attributes
        raise DicomReadError(f"pixel data cannot be decoded ({type(e).__name__}: {_safe(e)})") from None
    spacing, source = spacing_from_dataset(ds)
    return DicomImage(pixels, spacing, source, str(ds.get("PhotometricInterpretation", "")), voi)


def _safe(e: Exception, limit: int = 200) -> str:
    """Exception text for a report, trimmed (pydicom messages describe lengths and syntaxes, not identities)."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file starts with a DICOM preamble (``DICM`` at byte 128) or has a ``.dcm`` suffix."""
    p = os.fspath(path)
    if p.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"
