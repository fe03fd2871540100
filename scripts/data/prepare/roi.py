"""Physical-scale ROI extraction: crop a field of view in mm around a centre and resample it to one pitch.

Pixel convention: pixel ``(i, j)`` of an image with pitch ``(sr, sc)`` mm covers ``[i*sr, (i+1)*sr) x
[j*sc, (j+1)*sc)``; a continuous pixel coordinate ``r`` therefore sits at ``(r + 0.5) * sr`` mm. Output ROIs are
``(size, size)`` float32 with pitch ``pitch_mm``, centred on the requested centre (even sizes: the centre lies on
the corner shared by the four middle pixels). Regions outside the image are padded (edge replication or zeros),
never shifted, and the padded fraction is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scripts.data.prepare.bounds import check_pitch
from scripts.data.prepare.errors import PrepareError
from scripts.data.prepare.pixels import MappedImage

PAD_CHOICES = ("edge", "zero")
MAX_SIGMA_PX = 64.0  # anti-alias Gaussian: beyond this the output pitch is > 100x the input pitch
MAX_WINDOW_PIXELS = 64_000_000  # the input window the resampler filters (float32: 256 MB)


@dataclass(frozen=True)
class RoiGeometry:
    """Output ROI grid: ``size`` x ``size`` pixels of ``pitch_mm`` (field of view ``fov_mm = size * pitch_mm``)."""

    pitch_mm: float = 0.1
    size: int = 128
    pad: str = "edge"

    def __post_init__(self) -> None:
        if self.pitch_mm <= 0 or self.size < 8:
            raise ValueError(f"invalid ROI geometry: pitch {self.pitch_mm} mm, size {self.size} px")
        if self.pad not in PAD_CHOICES:
            raise ValueError(f"pad must be one of {PAD_CHOICES}, got {self.pad!r}")

    @property
    def fov_mm(self) -> float:
        """Field of view edge in mm."""
        return self.pitch_mm * self.size

    @classmethod
    def resolve(
        cls, pitch_mm: float | None = None, fov_mm: float | None = None, size: int | None = None, pad: str = "edge"
    ) -> "RoiGeometry":
        """Geometry from any two of pitch, field of view and size (defaults 0.1 mm, 128 px); all three must agree."""
        if pitch_mm is not None and fov_mm is not None and size is not None:
            if not math.isclose(pitch_mm * size, fov_mm, rel_tol=1e-6):
                raise ValueError(f"--pitch-mm {pitch_mm} x --size {size} = {pitch_mm * size} mm != --fov-mm {fov_mm}")
        elif fov_mm is not None and size is not None:
            pitch_mm = fov_mm / size
        elif fov_mm is not None:
            pitch_mm = 0.1 if pitch_mm is None else pitch_mm
            n = fov_mm / pitch_mm
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"--fov-mm {fov_mm} is not a whole number of --pitch-mm {pitch_mm} pixels")
            size = int(round(n))
        pitch_mm = 0.1 if pitch_mm is None else pitch_mm
        size = 128 if size is None else size
        return cls(float(pitch_mm), int(size), pad)

    def as_dict(self) -> dict:
        """JSON-ready description."""
        return {"pitch_mm": self.pitch_mm, "size": self.size, "fov_mm": self.fov_mm, "pad": self.pad}


def _grid(geom: RoiGeometry, centre: tuple[float, float], spacing: tuple[float, float]) -> tuple:
    """Input pixel coordinates (rows, cols) of the output grid's pixel centres."""
    offsets = (np.arange(geom.size, dtype=np.float64) - (geom.size - 1) / 2.0) * geom.pitch_mm
    rows = centre[0] + offsets / spacing[0]
    cols = centre[1] + offsets / spacing[1]
    return rows, cols


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float]:
    if spacing is None:
        raise PrepareError("pixel pitch unknown: the file states none; give the source pitch (e.g. --source-pitch-mm)")
    return check_pitch([float(spacing[0]), float(spacing[1])], "pixel pitch")


def _sample(
    image: np.ndarray | MappedImage,
    rows: np.ndarray,
    cols: np.ndarray,
    sigma: tuple[float, float],
    mode: str,
    order: int = 1,
) -> np.ndarray:
    """Sample ``image`` at the outer product of ``rows`` x ``cols`` after an anti-alias Gaussian (local window)."""
    h, w = image.shape
    if max(sigma) > MAX_SIGMA_PX:
        raise PrepareError(
            f"resampling needs an anti-alias Gaussian of sigma {max(sigma):.0f} px (limit {MAX_SIGMA_PX:g}): the "
            "output pitch is more than 100 times the input pitch"
        )
    margin = [int(math.ceil(4 * s)) + 2 for s in sigma]
    r0 = max(int(math.floor(rows.min())) - margin[0], 0)
    r1 = min(int(math.ceil(rows.max())) + margin[0] + 1, h)
    c0 = max(int(math.floor(cols.min())) - margin[1], 0)
    c1 = min(int(math.ceil(cols.max())) + margin[1] + 1, w)
    if r1 <= r0 or c1 <= c0:
        raise PrepareError("the ROI's field of view does not overlap the image")
    if (r1 - r0) * (c1 - c0) > MAX_WINDOW_PIXELS:
        raise PrepareError(
            f"the ROI's field of view covers {(r1 - r0) * (c1 - c0) / 1e6:.0f} Mpixel of the input (limit "
            f"{MAX_WINDOW_PIXELS / 1e6:g}): check the pixel pitch"
        )
    window = np.asarray(image[r0:r1, c0:c1], dtype=np.float32)
    if max(sigma) > 0:
        window = ndimage.gaussian_filter(window, sigma=sigma, mode="nearest")
    rr, cc = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    kwargs = {"mode": "nearest"} if mode == "edge" else {"mode": "constant", "cval": 0.0}
    return ndimage.map_coordinates(window, [rr, cc], order=order, **kwargs).astype(np.float32)


def outside_fraction(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> float:
    """Fraction of the output grid whose sample points fall outside the image."""
    rin = (rows >= -0.5) & (rows <= shape[0] - 0.5)
    cin = (cols >= -0.5) & (cols <= shape[1] - 0.5)
    return float(1.0 - rin.mean() * cin.mean())


def crop_roi(
    image: np.ndarray | MappedImage,
    spacing_mm: tuple[float, float] | None,
    centre_px: tuple[float, float],
    geom: RoiGeometry,
) -> tuple[np.ndarray, float]:
    """Crop ``geom.fov_mm`` around ``centre_px`` (row, col; continuous pixel coordinates) and resample.

    ``image``: ``(H, W)`` float in [0, 1] with pitch ``spacing_mm`` (row, col), an array or a
    :class:`~scripts.data.prepare.pixels.MappedImage` (only the window around the ROI is then mapped to float, so a
    crop of a 100-Mpixel image costs megabytes, not a full-size copy). Returns the ``(size, size)``
    float32 ROI and the fraction of it that lies outside the image (padded). Raises :class:`PrepareError` when the
    centre lies outside the image, the image is empty, or the ROI is blank (one value everywhere).
    """
    spacing = _check_spacing(spacing_mm)
    if not isinstance(image, MappedImage):
        image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise PrepareError(f"image must be 2-D and non-empty, got shape {image.shape}")
    r, c = float(centre_px[0]), float(centre_px[1])
    if not (np.isfinite(r) and np.isfinite(c)):
        raise PrepareError(f"ROI centre ({r}, {c}) is not a finite position")
    if not (-0.5 <= r <= image.shape[0] - 0.5 and -0.5 <= c <= image.shape[1] - 0.5):
        raise PrepareError(
            f"ROI centre (row {r:.1f}, col {c:.1f}) lies outside the image of shape {image.shape[0]}x{image.shape[1]}"
        )
    rows, cols = _grid(geom, (r, c), spacing)
    sigma = tuple(max(0.0, (geom.pitch_mm / s - 1.0) / 2.0) for s in spacing)
    roi = np.clip(_sample(image, rows, cols, sigma, geom.pad), 0.0, 1.0)
    if not np.isfinite(roi).all():
        raise PrepareError("the cropped ROI holds NaN or infinite values")
    if float(roi.max()) <= float(roi.min()):
        raise PrepareError(
            f"the cropped ROI holds one value everywhere ({float(roi.flat[0]):g}, blank): no image content at this centre"
        )
    return roi, outside_fraction(image.shape, rows, cols)


def crop_mask(
    mask: np.ndarray, spacing_mm: tuple[float, float] | None, centre_px: tuple[float, float], geom: RoiGeometry
) -> np.ndarray:
    """Resample a boolean ``(H, W)`` mask onto the ROI grid (area-weighted, threshold 0.5; outside = background)."""
    spacing = _check_spacing(spacing_mm)
    rows, cols = _grid(geom, (float(centre_px[0]), float(centre_px[1])), spacing)
    sigma = tuple(max(0.0, (geom.pitch_mm / s - 1.0) / 2.0) for s in spacing)
    return _sample(np.asarray(mask), rows, cols, sigma, "zero") >= 0.5  # the window alone becomes float32


def disc_mask(geom: RoiGeometry, radius_mm: float, offset_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Boolean ``(size, size)`` disc of ``radius_mm`` centred ``offset_mm`` (row, col) from the ROI centre.

    A disc smaller than one output pixel still marks the pixel(s) nearest its centre.
    """
    offsets = (np.arange(geom.size) - (geom.size - 1) / 2.0) * geom.pitch_mm
    rr, cc = np.meshgrid(offsets - offset_mm[0], offsets - offset_mm[1], indexing="ij")
    d2 = rr**2 + cc**2
    mask = d2 <= radius_mm**2
    if not mask.any():
        mask = d2 <= d2.min() + 1e-9
    return mask


def box_mask(geom: RoiGeometry, half_extent_mm: tuple[float, float], offset_mm: tuple[float, float] = (0.0, 0.0)):
    """Boolean ``(size, size)`` axis-aligned box of half-extent ``(row, col)`` mm, centred ``offset_mm`` away."""
    offsets = (np.arange(geom.size) - (geom.size - 1) / 2.0) * geom.pitch_mm
    rin = np.abs(offsets - offset_mm[0]) <= max(half_extent_mm[0], geom.pitch_mm / 2)
    cin = np.abs(offsets - offset_mm[1]) <= max(half_extent_mm[1], geom.pitch_mm / 2)
    return rin[:, None] & cin[None, :]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(row0, col0, row1, col1)`` (inclusive) of a boolean mask; :class:`PrepareError` if empty."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise PrepareError("ROI mask is empty (no lesion pixel)")
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def box_centre(box: tuple[int, int, int, int]) -> tuple[float, float]:
    """Centre (row, col) in continuous pixel coordinates of an inclusive box."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
