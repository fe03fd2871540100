"""DICOM pixels done right: photometric interpretation, rescale, VOI LUT / window, BitsStored, pixel spacing.

:func:`read_dicom` returns a float32 ``(H, W)`` image in [0, 1] with "brighter = denser" (MONOCHROME1 is
inverted) and the pixel pitch in mm as ``(row, col)`` when the file states it. Nothing that identifies the
patient (names, ids, dates) is returned, logged or put into error messages.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info, read_preamble
from pydicom.uid import UID

try:  # pydicom 3
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi as voi_lookup
    from pydicom.pixels import get_decoder
except ImportError:  # pydicom 2 (the MONAI Label app's environment): pixel data handlers instead of decoders
    import pydicom.config
    from pydicom.pixel_data_handlers.util import apply_modality_lut
    from pydicom.pixel_data_handlers.util import apply_voi as voi_lookup

    get_decoder = None

from scripts.data.prepare.bounds import (
    check_finite,
    check_magnification,
    check_pitch,
    check_size,
    header_problem,
    scrub,
)
from scripts.data.prepare.errors import PrepareError, printable
from scripts.data.prepare.pixels import MappedImage, table_image, unused_bits_fix, value_histogram

logger = logging.getLogger(__name__)

# pip packages that give pydicom a decoder -> {transfer syntax UID: name}
_DECODERS = {
    "pylibjpeg pylibjpeg-libjpeg": {
        "1.2.840.10008.1.2.4.50": "JPEG Baseline",
        "1.2.840.10008.1.2.4.51": "JPEG Extended",
        "1.2.840.10008.1.2.4.57": "JPEG Lossless",
        "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    },
    "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)": {
        "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
        "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    },
    "pylibjpeg pylibjpeg-openjpeg": {
        "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
        "1.2.840.10008.1.2.4.91": "JPEG 2000",
        "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
        "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
        "1.2.840.10008.1.2.4.203": "HTJ2K",
    },
    "pylibjpeg pylibjpeg-rle": {"1.2.840.10008.1.2.5": "RLE Lossless"},
}
# transfer syntax UID -> (name, pip packages)
_DECODER_HINTS = {uid: (name, pkgs) for pkgs, uids in _DECODERS.items() for uid, name in uids.items()}


class DicomReadError(PrepareError):
    """A DICOM file that cannot be turned into pixels (not DICOM, truncated, no decoder, unsupported layout)."""


@dataclass
class DicomImage:
    """Pixels and geometry of one DICOM image (no patient identifiers).

    ``mapped``: the image as float32 ``(H, W)`` in [0, 1], brighter = denser, mapped from the stored values where
    read (:class:`~scripts.data.prepare.pixels.MappedImage`: crop it, do not copy it); ``pixels``: the same as one
    array; ``spacing_mm``: ``(row, col)`` pitch in mm or ``None``; ``spacing_source``: the attribute it came from;
    ``voi``: how intensities were mapped to [0, 1].
    """

    mapped: MappedImage
    spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    photometric: str
    voi: str

    @property
    def pixels(self) -> np.ndarray:
        """The whole image as one float32 array (a full-size copy: prefer ``mapped`` for crops)."""
        return np.asarray(self.mapped)


def missing_decoder_message(transfer_syntax_uid: str) -> str | None:
    """Return an install hint when pydicom has no working decoder for ``transfer_syntax_uid``, else ``None``."""
    uid = UID(str(transfer_syntax_uid))
    if not uid.is_compressed:
        return None
    if get_decoder is None:  # pydicom 2
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


def _values(ds, keyword: str) -> list | None:
    """The value(s) of an attribute as a list, ``None`` when absent or empty; never echoes a malformed value."""
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
    except Exception:
        raise DicomReadError(f"{keyword} cannot be read (malformed value)") from None
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _header_float(ds, keyword: str) -> float | None:
    """First number of a numeric attribute, ``None`` when absent; :class:`DicomReadError` (no value echoed) when
    the attribute is present but not numeric."""
    values = _values(ds, keyword)
    if not values:
        return None
    try:
        return float(values[0])
    except (TypeError, ValueError):
        raise DicomReadError(f"{keyword} is not a number") from None


def _header_numbers(ds, keyword: str) -> list[float] | None:
    """All numbers of a multi-valued numeric attribute (e.g. PixelSpacing), ``None`` when absent or empty."""
    values = _values(ds, keyword)
    if not values:
        return None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise DicomReadError(f"{keyword} is not numeric: a pixel pitch in mm (row\\column) is expected") from None


def spacing_from_dataset(ds) -> tuple[tuple[float, float] | None, str | None]:
    """Pixel pitch ``(row, col)`` in mm: ``PixelSpacing``, else ``ImagerPixelSpacing`` corrected by
    ``EstimatedRadiographicMagnificationFactor`` when present; ``(None, None)`` when the file states neither.

    A stated value outside the plausible range (:mod:`scripts.data.prepare.bounds`), a single value, or text raises
    :class:`DicomReadError` naming the attribute: a wrong pitch is never silently replaced by another."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _header_numbers(ds, keyword)
        if values is None:
            continue
        try:
            row, col = check_pitch(values, keyword)
            if keyword == "ImagerPixelSpacing":
                mag = _header_float(ds, "EstimatedRadiographicMagnificationFactor")
                if mag is not None and mag != 1.0:
                    check_magnification(mag)
                    row, col = check_pitch([row / mag, col / mag], "ImagerPixelSpacing / magnification factor")
                    return (row, col), "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        except DicomReadError:
            raise
        except PrepareError as e:
            raise DicomReadError(str(e)) from None
        return (row, col), keyword
    return None, None


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# PS3.3 C.7.6.3.1.2: the enumerated values, the only header text ever repeated in a message
PHOTOMETRIC_VALUES = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
)  # fmt: skip


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]; ``width`` > 0 (>= 1 for LINEAR) is checked first."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (x >= center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _photometric(ds) -> str:
    values = _values(ds, "PhotometricInterpretation")
    value = str(values[0]).strip().upper() if values else "MONOCHROME2"
    if value in ("MONOCHROME1", "MONOCHROME2"):
        return value
    if value in PHOTOMETRIC_VALUES:
        raise DicomReadError(f"unsupported PhotometricInterpretation {value}: only MONOCHROME1/2 (grayscale)")
    raise DicomReadError("unsupported PhotometricInterpretation (not a DICOM enumerated value): grayscale expected")


def _int_attr(ds, keyword: str, default: int) -> int:
    value = _header_float(ds, keyword)
    if value is None:
        return default
    if not np.isfinite(value) or value != int(value):
        raise DicomReadError(f"{keyword} is not a whole number")
    return int(value)


def check_header(ds, limit: int | None = None) -> dict:
    """Check the image attributes before decoding: layout, size cap, rescale, window; returns the parsed values.

    Raises :class:`DicomReadError` naming the attribute and the accepted range (values are shown only when they
    are numbers or enumerated terms)."""
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise DicomReadError(f"{samples} samples per pixel (colour): only grayscale is supported")
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1
    if frames != 1:
        raise DicomReadError(f"multi-frame image ({frames} frames): only single-frame is supported")
    photometric = _photometric(ds)
    rows, cols = _int_attr(ds, "Rows", 0), _int_attr(ds, "Columns", 0)
    out: dict = {"photometric": photometric, "rows": rows, "cols": cols}
    try:
        check_size(rows, cols, "DICOM Rows x Columns", frames, limit)
        slope, intercept = _header_float(ds, "RescaleSlope"), _header_float(ds, "RescaleIntercept")
        if slope is not None:
            check_finite(slope, "RescaleSlope")
            if slope == 0:
                raise PrepareError("RescaleSlope 0 maps every pixel to the same value (a non-zero slope is expected)")
        if intercept is not None:
            check_finite(intercept, "RescaleIntercept")
    except DicomReadError:
        raise
    except PrepareError as e:
        raise DicomReadError(str(e)) from None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _header_float(ds, "WindowCenter"), _header_float(ds, "WindowWidth")
        values = _values(ds, "VOILUTFunction")
        function = str(values[0]).strip().upper() if values else "LINEAR"
        if function not in VOI_FUNCTIONS:
            raise DicomReadError(f"unsupported VOILUTFunction: one of {', '.join(VOI_FUNCTIONS)} is expected")
        if center is not None and width is not None:
            if not (np.isfinite(center) and np.isfinite(width)):
                raise DicomReadError(f"WindowCenter/WindowWidth {center:g}/{width:g}: finite numbers are expected")
            least = 1.0 if function == "LINEAR" else 0.0
            if width < least or width <= 0:
                raise DicomReadError(
                    f"WindowWidth {width:g} is out of range: > 0 expected{' (>= 1 for LINEAR)' if least else ''}"
                )
            out["window"] = (center, width, function)
    return out


def check_pixels(x: np.ndarray, what: str = "image") -> None:
    """Refuse an image with NaN/inf values or one that holds a single value (blank): no such image is a result."""
    finite = np.isfinite(x)
    if not finite.all():
        raise DicomReadError(f"{what}: {int(x.size - finite.sum())} pixel(s) are NaN or infinite")
    if x.size and float(np.max(x)) <= float(np.min(x)):
        raise DicomReadError(f"{what}: every pixel has the same value {float(x.flat[0]):g} (blank image)")


def _stored_values(ds) -> np.ndarray:
    """The decoded stored values, before the unused-bits correction (see ``pixels.unused_bits_fix``).

    Native (uncompressed) pixel data come back as a read-only view on the dataset's own pixel data bytes, so the
    image is held once, not twice; compressed pixel data are decoded into a new array (their bytes are smaller)."""
    try:
        ds.pixel_array_options(view_only=True, correct_unused_bits=False)
    except (AttributeError, TypeError):  # pydicom 2 (the MONAI Label app's environment): a decoded copy
        pass
    return ds.pixel_array


def _intensities(ds, hdr: dict, values: np.ndarray, present: np.ndarray | None, apply_voi: bool) -> tuple:
    """Modality LUT, VOI (LUT, window or min-max), clip to [0, 1], MONOCHROME1 inversion of ``values``.

    ``values`` are stored values: every value of a lookup table's domain (``present`` marks those in the image) or
    the whole image (``present`` None). The checks (NaN/inf, blank before and after the VOI) look at the values in
    the image only. Returns ``(float32 intensities of values, voi note)``."""

    def seen(a: np.ndarray) -> np.ndarray:
        return a if present is None else a[present]

    x = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    check_pixels(seen(x), "decoded pixel values")
    voi = "minmax"
    if apply_voi and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = ds.VOILUTSequence[0]
        out_bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        if not 1 <= out_bits <= 16:
            raise DicomReadError("VOI LUTDescriptor bits out of range: 1-16 expected")
        xin = x.astype(np.int64) if np.all(np.mod(seen(x), 1.0) == 0) else x  # LUT lookups need integer input
        x = np.asarray(voi_lookup(xin, ds, index=0), dtype=np.float64) / float((1 << out_bits) - 1)
        voi = "VOILUTSequence[0]"
    elif apply_voi and "window" in hdr:
        center, width, function = hdr["window"]
        x = _window(x, center, width, function)
        voi = f"window {center:g}/{width:g} {function.lower()}"
    else:
        lo, hi = float(np.min(seen(x))), float(np.max(seen(x)))
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if voi != "minmax":
        check_pixels(seen(x), f"image after the VOI mapping ({voi.split(' ')[0]})")
    if hdr["photometric"] == "MONOCHROME1":
        x = 1.0 - x
    return x, voi


def dataset_to_mapped(ds, apply_voi: bool = True, limit: int | None = None) -> tuple[MappedImage, str]:
    """Turn a dataset into a :class:`~scripts.data.prepare.pixels.MappedImage` (float32 ``(H, W)`` in [0, 1],
    brighter = denser, mapped where read); returns (image, voi note).

    The header is checked (:func:`check_header`) before the pixel data are decoded; a decoded image with
    non-finite values, or one that is constant (before or after the VOI mapping), is refused. The stored values
    are kept once (a view on the pixel data where pydicom allows it); the intensity pipeline (:func:`_intensities`)
    runs once per distinct stored value, over a lookup table, and gives the same numbers as per pixel. Only data
    without a small value range (32-bit integers spanning more than 2**20 values) are mapped per pixel, into one
    float32 copy."""
    hdr = check_header(ds, limit)
    arr = _stored_values(ds)
    if arr.ndim != 2:
        raise DicomReadError(f"expected a 2-D image, got pixel array shape {arr.shape}")
    bits_stored = _int_attr(ds, "BitsStored", arr.dtype.itemsize * 8)
    fix = unused_bits_fix(arr.dtype, bits_stored)  # drop overlay / junk in unused high bits, sign-extend
    hist = value_histogram(arr, fix)
    if hist is None:
        full, voi = _intensities(ds, hdr, fix(arr), None, apply_voi)
        return MappedImage(full, lambda block: block), voi
    offset, counts = hist
    present = counts > 0
    table, voi = _intensities(ds, hdr, np.arange(offset, offset + counts.size, dtype=np.int64), present, apply_voi)
    return table_image(arr, table, offset, present, fix), voi


def dataset_to_pixels(ds, apply_voi: bool = True, limit: int | None = None) -> tuple[np.ndarray, str]:
    """As :func:`dataset_to_mapped`, with the whole image as one float32 ``(H, W)`` array."""
    image, voi = dataset_to_mapped(ds, apply_voi=apply_voi, limit=limit)
    return np.asarray(image), voi


class _Capture(logging.Handler):
    """Collects pydicom's log records (they may quote header values) so that they never reach a log as such."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            try:
                self.messages.append(record.getMessage())
            except Exception:
                self.messages.append("unformattable message")


@contextlib.contextmanager
def quiet_pydicom(path: str | os.PathLike) -> Iterator[None]:
    """Capture pydicom's warnings and log records while reading ``path``; log one value-free summary after."""
    plog = logging.getLogger("pydicom")
    handler = _Capture()
    saved = plog.handlers[:], plog.propagate, plog.level
    plog.handlers, plog.propagate = [handler], False
    plog.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        plog.handlers, plog.propagate = saved[0], saved[1]
        plog.setLevel(saved[2])
        messages = handler.messages + [str(w.message) for w in caught]
        if messages:
            kinds = sorted({header_problem(m) for m in messages})
            logger.warning(
                "%s: the DICOM reader reported %d header problem(s): %s",
                safe_name(path),
                len(messages),
                "; ".join(kinds[:5]),
            )


def safe_name(path: str | os.PathLike) -> str:
    """A file's name (no folders), printable in any encoding."""
    return printable(Path(os.fspath(path)).name)


def read_dicom(
    path: str | os.PathLike, apply_voi: bool = True, max_pixels: int | None = None, read_spacing: bool = True
) -> DicomImage:
    """Read one DICOM image file into :class:`DicomImage`; raise :class:`DicomReadError` with a clear reason.

    Header bounds (pixel pitch, magnification, rescale, window, decoded size) are checked before decoding;
    pydicom's own warnings are summarised without the values they quote. ``read_spacing=False`` (the caller gives
    the pitch) leaves the file's pitch attributes unread."""
    caught = None
    with quiet_pydicom(path):
        try:
            return _read_dicom(path, apply_voi, max_pixels, read_spacing)
        except DicomReadError as e:
            caught = e
    raise caught


DEFLATED = "1.2.840.10008.1.2.1.99"
_PEEK_BYTES = 4 << 20


def _after_file_meta(tag: int, vr: str | None, length: int) -> bool:
    """``read_dataset``'s stop condition: the first element after the file meta group (group 0002)."""
    return tag >> 16 != 2


def _check_deflated_size(path: str | os.PathLike, limit: int | None) -> None:
    """A deflated file is inflated whole by pydicom before any attribute can be read: inflate only its first
    4 MB here, read Rows/Columns from them, and refuse an image above the decode cap before pydicom sees it."""
    with open(path, "rb") as f:
        try:
            meta = read_file_meta_info(path)
        except Exception:
            return  # not a well-formed file meta group: dcmread reports it
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
            return
        try:  # the deflated data set starts right after the file meta group (explicit VR little endian)
            read_preamble(f, False)
            read_dataset(f, is_implicit_VR=False, is_little_endian=True, stop_when=_after_file_meta)
        except Exception:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        prefix = b""
        try:
            while len(prefix) < _PEEK_BYTES:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                prefix += inflater.decompress(chunk, _PEEK_BYTES - len(prefix))
        except zlib.error:
            raise DicomReadError("deflated DICOM data are corrupt (cannot be inflated)") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(prefix), force=True, stop_before_pixels=True)  # explicit VR LE stream
    except Exception:
        ds = None
    rows = cols = None
    if ds is not None:
        rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise DicomReadError("deflated DICOM: Rows/Columns not found in the first 4 MB of inflated data")
    frames = _int_attr(ds, "NumberOfFrames", 1) if "NumberOfFrames" in ds else 1
    try:
        check_size(int(rows), int(cols), "DICOM Rows x Columns", max(frames, 1), limit)
    except PrepareError as e:
        raise DicomReadError(str(e)) from None


def _read_dicom(path: str | os.PathLike, apply_voi: bool, limit: int | None, read_spacing: bool) -> DicomImage:
    try:
        _check_deflated_size(path, limit)
    except FileNotFoundError:
        raise DicomReadError("file not found") from None
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except FileNotFoundError:
        raise DicomReadError("file not found") from None
    except InvalidDicomError:
        raise DicomReadError("not a DICOM file (no DICM preamble/header)") from None
    except MemoryError:
        raise DicomReadError("corrupt DICOM header (an element length needs more memory than available)") from None
    except Exception as e:  # truncated header, bad element lengths ...
        raise DicomReadError(f"corrupt DICOM header ({type(e).__name__})") from None
    try:
        if "PixelData" not in ds:
            raise DicomReadError("DICOM file has no pixel data")
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if tsyntax is not None:
            try:
                hint = missing_decoder_message(tsyntax)
            except Exception:
                raise DicomReadError("TransferSyntaxUID is malformed (not a known UID)") from None
            if hint:
                raise DicomReadError(hint)
        spacing, source = spacing_from_dataset(ds) if read_spacing else (None, None)  # bounds before decoding
        try:
            mapped, voi = dataset_to_mapped(ds, apply_voi=apply_voi, limit=limit)
        except DicomReadError:
            raise
        except MemoryError:
            raise DicomReadError("pixel data cannot be decoded: not enough memory") from None
        except Exception as e:  # truncated pixel data, decoder failure, inconsistent attributes
            raise DicomReadError(f"pixel data cannot be decoded ({type(e).__name__}: {_safe(e)})") from None
        photometric = _photometric(ds)
    except DicomReadError:
        raise
    except Exception as e:  # an attribute that pydicom cannot convert, or a layout we did not foresee
        raise DicomReadError(f"malformed DICOM header ({type(e).__name__}: {_safe(e)})") from None
    return DicomImage(mapped, spacing, source, photometric, voi)


def _safe(e: Exception, limit: int = 200) -> str:
    """Exception text for a report, with any quoted header value removed (see :func:`scrub`)."""
    return scrub(str(e), limit)


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
