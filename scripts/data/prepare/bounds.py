"""Physical plausibility bounds checked on every input before any expensive work, and scrubbing of header text.

One set of rules for data preparation and inference (both read through :func:`scripts.data.prepare.loaders.load_image`):

=====================================  ===========================  ==============================================
quantity                               accepted                     why
=====================================  ===========================  ==============================================
pixel pitch (PixelSpacing,             0.01 mm to 1 mm              FFDM 0.05-0.1 mm, film scans 0.04-0.2 mm; a
ImagerPixelSpacing, spacing_mm,                                     pitch outside makes the anti-alias resampler
NIfTI pixdim, --source-pitch-mm)                                    cost unbounded (1e-7 mm) or the ROI meaningless
EstimatedRadiographicMagnification-    1 to 3                       contact views ~1.0-1.2, magnification views
Factor                                                              ~1.5-2.0
WindowCenter / WindowWidth             finite; width > 0            (width >= 1 for the LINEAR function)
RescaleSlope / RescaleIntercept        finite; slope != 0           slope 0 makes every pixel the same value
decoded size                           <= ``max_pixels`` (100 M)    checked from the header (Rows x Columns, PNG /
                                                                    NIfTI header) before decoding
=====================================  ===========================  ==============================================

A value outside gives a :class:`~scripts.data.prepare.errors.PrepareError` that names the field, the value (numbers
only) and the accepted range. Header *text* is never echoed: :func:`scrub` removes quoted values, byte strings and
anything after ``Value:`` from library messages before they reach a log, a report or a table.
"""

from __future__ import annotations

import math
import re

from pydicom.datadict import tag_for_keyword

from scripts.data.prepare.errors import PrepareError

PITCH_RANGE_MM = (0.01, 1.0)
MAGNIFICATION_RANGE = (1.0, 3.0)
DEFAULT_MAX_PIXELS = 100_000_000

_limits = {"max_pixels": DEFAULT_MAX_PIXELS}


def set_max_pixels(max_pixels: int | None) -> None:
    """Set the process-wide cap on decoded pixels (``None`` restores the default of 100 Mpixel)."""
    if max_pixels is not None and int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    _limits["max_pixels"] = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)


def max_pixels() -> int:
    """The cap on decoded pixels now in force."""
    return _limits["max_pixels"]


def _num(value: float) -> str:
    return f"{value:g}"


def check_pitch(values, field: str) -> tuple[float, float]:
    """``(row, col)`` pitch in mm from one or two numbers; :class:`PrepareError` outside :data:`PITCH_RANGE_MM`."""
    try:
        seq = [float(v) for v in (values if isinstance(values, (tuple, list)) else [values, values])]
    except (TypeError, ValueError):
        raise PrepareError(f"{field} is not numeric: a pixel pitch in mm is expected") from None
    if len(seq) != 2:
        raise PrepareError(f"{field} has {len(seq)} value(s): two (row, column) are expected")
    lo, hi = PITCH_RANGE_MM
    for v in seq:
        if not math.isfinite(v) or not lo <= v <= hi:
            shown = "\\".join(_num(x) for x in seq)
            raise PrepareError(
                f"{field} {shown} mm is outside the plausible pixel pitch range {_num(lo)}-{_num(hi)} mm"
            )
    return seq[0], seq[1]


def check_magnification(value: float, field: str = "EstimatedRadiographicMagnificationFactor") -> float:
    """A radiographic magnification factor within :data:`MAGNIFICATION_RANGE`."""
    lo, hi = MAGNIFICATION_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        raise PrepareError(f"{field} {_num(value)} is outside the plausible range {_num(lo)}-{_num(hi)}")
    return value


def check_finite(value: float, field: str) -> float:
    """A finite number, else :class:`PrepareError` naming ``field``."""
    if not math.isfinite(value):
        raise PrepareError(f"{field} {_num(value)} is not a finite number")
    return value


def check_size(rows: int, cols: int, what: str = "image", frames: int = 1, limit: int | None = None) -> None:
    """Refuse a decoded size above the cap (or a non-positive one) before decoding."""
    limit = max_pixels() if limit is None else int(limit)
    if rows < 1 or cols < 1 or frames < 1:
        raise PrepareError(f"{what} size {rows} x {cols} (x {frames} frames) is empty or negative")
    n = rows * cols * frames
    if n > limit:
        raise PrepareError(
            f"{what} size {rows} x {cols}{f' x {frames} frames' if frames > 1 else ''} = {n / 1e6:.3g} Mpixel "
            f"exceeds the decode limit of {limit / 1e6:g} Mpixel (raise it with --max-megapixels / max_megapixels)"
        )


# -- scrubbing of library text --------------------------------------------------------------------------------------

_BYTES = re.compile(r"""b(['"]).*?(?<!\\)\1""", re.S)
_QUOTED = re.compile(r"""(?<![A-Za-z])(['"])(.*?)(?<!\\)\1""", re.S)
_AFTER_VALUE = re.compile(r"(?i)\bvalues?\s*[:=].*$", re.S)
_LONG_TOKEN = re.compile(r"\S{41,}")
_OBJECT = re.compile(r"<[^<>]{0,80} at 0x[0-9a-fA-F]+>")
_AFTER_VR = re.compile(r"(\bVR [A-Z]{2})\s*:.*$", re.S)
_TAG = re.compile(r"\(\s*[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\s*\)")


def _keep_keywords(m: re.Match) -> str:
    """A quoted DICOM keyword (e.g. 'BitsStored') is kept: it names an attribute, not a value."""
    inner = m.group(2)
    if re.fullmatch(r"[A-Z][A-Za-z0-9]{1,63}", inner):
        if tag_for_keyword(inner) is not None:
            return f"{m.group(1)}{inner}{m.group(1)}"
    return "<value>"


def scrub(text: str, limit: int = 200) -> str:
    """Library message text without header values: quoted strings, byte strings, ``Value: ...`` and long tokens
    are replaced by ``<value>``; whitespace collapsed; trimmed to ``limit`` characters."""
    text = _OBJECT.sub("<object>", str(text))
    text = _AFTER_VALUE.sub("<value>", text)
    text = _AFTER_VR.sub(r"\1: <value>", text)
    text = _BYTES.sub("<value>", text)
    text = _QUOTED.sub(_keep_keywords, text)
    text = _LONG_TOKEN.sub("<value>", text)
    text = text.replace("^", " ")
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def header_problem(message: str) -> str:
    """A short, value-free description of a pydicom warning or log message: the tag(s) and the kind of problem."""
    tags = sorted(set(t.replace(" ", "") for t in _TAG.findall(message)))
    low = message.lower()
    vr = re.search(r"\bVR\s+([A-Z]{2})\b", message)
    if "length" in low:
        kind = "value length problem"
    elif "invalid value" in low or "invalid" in low:
        kind = "invalid value"
    elif "explicit" in low or "implicit" in low:
        kind = "VR/transfer syntax mismatch"
    elif "unknown" in low or "not found" in low:
        kind = "unknown element"
    elif "deflat" in low or "compress" in low:
        kind = "compression problem"
    else:
        kind = "header problem"
    where = f" in {', '.join(tags[:3])}" if tags else ""
    return f"{kind}{f' for VR {vr.group(1)}' if vr else ''}{where}"
