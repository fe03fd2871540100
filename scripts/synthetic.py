"""Synthetic mammographic ROIs: the bundle's embedded default data (never clinical evidence).

Three tasks share one background generator (parenchymal texture with power spectrum ``P(f) ∝ 1/f^β``,
fat/dense mixing and quantum-like noise):

* ``target``: microcalcification clusters, ``benign`` (0) vs ``malignant`` (1). Benign: a few (≈5-10)
  round/punctate calcifications of 0.3-1 mm and similar size, loosely spaced; malignant: many (≈10-50)
  fine pleomorphic calcifications of 0.1-0.5 mm of varied size and shape, dense, some fine-linear or
  branching. The mask is the union of the drawn calcifications.
* ``intermediate``: masses, ``circumscribed`` (0, round/oval, well-defined margin) vs ``spiculated``
  (1, irregular core with radiating spicules). The mask is the drawn mass (core and spicules).
* ``film``: the target task (same classes, labels and calcification morphology) in another acquisition domain,
  digitised screen-film, as the intermediate dataset of a double transfer (the same task in another domain, as
  in Samala et al., IEEE TMI 2019). The image passes through :func:`apply_film_domain`: screen/digitiser
  unsharpness (``film_blur_mm``), an H&D-like characteristic curve (``film_gamma``) and spatially correlated film
  grain (``film_grain_sigma`` over ``film_grain_mm``); ``film_tissue_contrast`` and ``film_calc_contrast`` scale
  the background's tissue contrast and the calcifications' contrast. The mask is the drawn calcifications.

Every ROI is seeded on its own from ``(seed, task, index)``, so output does not depend on the order or the
number of worker processes; the same seed gives byte-identical files. ROIs are grouped into synthetic
patients (1-3 ROIs each, sharing a background style) so that patient-grouped splitting matters.

Images are ``(H, W)`` float in [0, 1] (brighter = denser), square, ``image_size`` px at ``pixel_spacing_mm``;
by default every ROI covers the same ``FIELD_MM`` (12.8 mm: 128 px at 0.1 mm), so a smaller or larger network
input changes the pitch, not the anatomy (clusters of up to ~5 mm radius fit).
Difficulty knobs: ``cnr`` (calcification contrast-to-noise) and ``overlap`` (0 = class distributions fully
separated, 1 = identical), shared by ``target`` and ``film``; ``mass_cnr`` and ``mass_overlap`` for the
intermediate task; the ``film_*`` knobs for the film domain (stored only in ``film`` datalists' metadata, so the
film task left ``target`` and ``intermediate`` outputs byte-identical).

Command line::

    python -m scripts.synthetic --out data/synthetic --task target --n-train 200 --n-test 200 --seed 0
    python -m scripts.synthetic --out data/synthetic --task film --n-train 1200 --n-test 0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from scripts.imageio import write_mask_png, write_roi_png
from scripts.schema import (
    TARGET_CLASSES,
    DatalistError,
    assign_folds,
    make_datalist,
    make_item,
    read_datalist,
    split_by_patient,
    write_datalist,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
FIELD_MM = 12.8  # default side of a ROI in mm; pixel spacing = FIELD_MM / image_size unless given
INTERMEDIATE_CLASSES = ("circumscribed", "spiculated")
# task -> (numeric code used in seeds, case-id prefix, patient-id prefix, class names)
TASKS: dict[str, tuple[int, str, str, tuple[str, ...]]] = {
    "target": (1, "t", "synth-p", TARGET_CLASSES),
    "intermediate": (2, "i", "synth-ip", INTERMEDIATE_CLASSES),
    "film": (3, "f", "synth-fp", TARGET_CLASSES),
}
CALCIFICATION_TASKS = ("target", "film")  # tasks drawing calcification clusters (benign / malignant)
FILM_PREFIX = "film_"  # SynthParams fields of the film domain
FILM_NONNEGATIVE = ("film_blur_mm", "film_grain_sigma", "film_grain_mm", "film_tissue_contrast", "film_calc_contrast")
_STREAM_LAYOUT, _STREAM_PATIENT, _STREAM_ROI = 0, 1, 2


# ----------------------------------------------------------------------------------------------- parameters
@dataclass
class CalcMorphology:
    """Distribution of one class's calcification cluster (lengths in mm)."""

    count_min: float  # number of calcifications, drawn log-uniform in [count_min, count_max]
    count_max: float
    diam_min: float  # cluster's typical diameter drawn log-uniform in [diam_min, diam_max] (mm)
    diam_max: float
    size_cv: float  # within-cluster coefficient of variation of diameters (0 = all equal)
    irregularity: float  # amplitude of the outline's angular harmonics (0 = smooth ellipse)
    aspect_max: float  # largest length/width ratio of a calcification (1 = round)
    linear_fraction: float  # fraction of fine-linear / branching calcifications
    radius_min: float  # cluster radius (mm), uniform in [radius_min, radius_max], clipped to the ROI
    radius_max: float
    elongation_max: float  # cluster's largest length/width ratio (1 = round cluster)
    min_spacing: float  # smallest edge-to-edge gap between calcifications (mm)


@dataclass
class MassMorphology:
    """Distribution of one class's mass (lengths in mm)."""

    radius_min: float  # core radius, uniform in [radius_min, radius_max] (mm)
    radius_max: float
    aspect_max: float  # largest core length/width ratio
    lobulation: float  # amplitude of the outline's angular harmonics
    margin_mm: float  # width of the blurred margin (mm): small = well-defined, large = ill-defined
    spicules_min: float  # number of spicules, uniform integer in [spicules_min, spicules_max]
    spicules_max: float
    spicule_length: float  # spicule length as a multiple of the core radius (mean; +-40 %)


def _benign() -> CalcMorphology:
    return CalcMorphology(5, 10, 0.35, 0.9, 0.12, 0.06, 1.25, 0.0, 4.2, 5.8, 1.3, 1.0)


def _malignant() -> CalcMorphology:
    return CalcMorphology(10, 50, 0.15, 0.4, 0.45, 0.35, 2.5, 0.25, 1.5, 3.5, 2.5, 0.15)


def _circumscribed() -> MassMorphology:
    return MassMorphology(1.8, 3.5, 1.5, 0.04, 0.15, 0, 0, 0.0)


def _spiculated() -> MassMorphology:
    return MassMorphology(1.5, 3.0, 1.3, 0.22, 0.6, 6, 16, 1.6)


@dataclass
class SynthParams:
    """All generation parameters; stored in the datalist metadata (intensities are on the [0, 1] scale)."""

    # background: power-law texture, fat/dense mixing, quantum-like noise
    shared_style: bool = True  # a patient's ROIs share one background style (False: each ROI draws its own)
    beta_mean: float = 3.1  # spectral exponent of P(f) ∝ 1/f^β (mammography ≈ 3.1)
    beta_sd: float = 0.15  # per-patient spread of β, clipped to [beta_min, beta_max]
    beta_min: float = 2.8
    beta_max: float = 3.4
    density_min: float = 0.1  # dense (fibroglandular) area fraction, per patient
    density_max: float = 0.7
    fat_level: float = 0.32  # intensity of fat
    dense_contrast: float = 0.22  # dense minus fat intensity
    texture_std: float = 0.035  # std of the linear texture component
    noise_sigma: float = 0.015  # quantum-noise std at intensity 0.5 (std ∝ sqrt(intensity))
    psf_sigma_mm: float = 0.06  # Gaussian PSF applied to lesions (mm)
    # target task (microcalcifications)
    cnr: float = 12.0  # peak contrast (before PSF) of a 0.5 mm calcification / noise_sigma
    size_contrast_exponent: float = 0.5  # contrast ∝ (diameter / 0.5 mm) ** exponent
    overlap: float = 0.5  # 0 = classes' morphology fully separated, 1 = identical
    benign: CalcMorphology = field(default_factory=_benign)
    malignant: CalcMorphology = field(default_factory=_malignant)
    # intermediate task (masses)
    mass_cnr: float = 10.0  # peak core contrast / noise_sigma
    mass_overlap: float = 0.2
    circumscribed: MassMorphology = field(default_factory=_circumscribed)
    spiculated: MassMorphology = field(default_factory=_spiculated)
    # film task: the target task in a digitised screen-film domain (see apply_film_domain; stored in film datalists)
    film_blur_mm: float = 0.1  # extra Gaussian blur σ (mm) of the whole image: screen unsharpness + digitiser
    film_gamma: float = 0.7  # characteristic-curve stand-in: intensity -> intensity ** film_gamma
    film_grain_sigma: float = 0.02  # film-grain std (intensity units, additive, after the curve)
    film_grain_mm: float = 0.1  # grain correlation length: Gaussian σ (mm) of the filter applied to white noise
    film_tissue_contrast: float = 1.1  # multiplies dense_contrast and texture_std of the background
    film_calc_contrast: float = 2.5  # multiplies the calcifications' contrast (cnr · noise_sigma) before the blur
    # patients: probabilities of 1, 2, 3, ... ROIs per synthetic patient
    rois_per_patient: tuple[float, ...] = (0.3, 0.4, 0.3)

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary (nested dataclasses become dicts, tuples lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict | None) -> "SynthParams":
        """Build from a (possibly partial) dictionary; nested morphology entries may be partial too."""
        out = cls()
        if not d:
            return out
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown synthetic parameter(s): {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            cur = getattr(out, k)
            if isinstance(cur, (CalcMorphology, MassMorphology)):
                kw[k] = v if isinstance(v, type(cur)) else replace(cur, **dict(v))
            elif k == "rois_per_patient":
                kw[k] = tuple(float(x) for x in v)
            elif isinstance(cur, bool):
                kw[k] = bool(v)
            else:
                kw[k] = float(v)
        return replace(out, **kw)

    def validate(self) -> None:
        """Refuse out-of-range knobs."""
        for name in ("overlap", "mass_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("cnr", "mass_cnr", "noise_sigma", "psf_sigma_mm") + FILM_NONNEGATIVE:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.film_gamma <= 5.0:
            raise ValueError(f"film_gamma must be in (0, 5], got {self.film_gamma}")
        if not self.film_grain_mm <= 2.0:
            raise ValueError(f"film_grain_mm must be <= 2 mm (a grain, not a background), got {self.film_grain_mm}")
        if not self.beta_min <= self.beta_max:
            raise ValueError("beta_min must be <= beta_max")
        p = np.asarray(self.rois_per_patient, dtype=float)
        if p.size == 0 or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"rois_per_patient must be non-negative probabilities, got {self.rois_per_patient}")


def task_params_dict(params: SynthParams, task: str) -> dict:
    """``params.to_dict()`` as stored in ``task``'s datalist: the ``film_*`` knobs only for the ``film`` task."""
    d = params.to_dict()
    return d if task == "film" else {k: v for k, v in d.items() if not k.startswith(FILM_PREFIX)}


def _blend(own: Any, other: Any, overlap: float) -> Any:
    """Move each numeric field of ``own`` towards ``other`` by ``overlap / 2`` (overlap 1 = both at the midpoint)."""
    w = overlap / 2.0
    return type(own)(**{f.name: (1 - w) * getattr(own, f.name) + w * getattr(other, f.name) for f in fields(own)})


def class_morphology(params: SynthParams, task: str, label: int) -> CalcMorphology | MassMorphology:
    """The effective morphology distribution of one class after applying the task's ``overlap`` knob."""
    if task in CALCIFICATION_TASKS:
        a, b, ov = params.benign, params.malignant, params.overlap
    elif task == "intermediate":
        a, b, ov = params.circumscribed, params.spiculated, params.mass_overlap
    else:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return _blend(a, b, ov) if label == 0 else _blend(b, a, ov)


# ----------------------------------------------------------------------------------------------- background
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in key]]))


def power_law_field(rng: np.random.Generator, size: int, beta: float, pad: int = 2) -> np.ndarray:
    """Gaussian random field ``(size, size)`` with power spectrum ∝ 1/f^β, zero mean, unit std.

    Synthesised by FFT on a ``pad`` times larger periodic grid and cropped, so the ROI does not wrap around.
    """
    n = size * pad
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
    full = np.fft.irfft2(spec, s=(n, n))
    out = full[:size, :size]
    out = out - out.mean()
    return out / (out.std() + 1e-12)


def patient_style(rng: np.random.Generator, params: SynthParams) -> dict:
    """A synthetic patient's background style: β, dense fraction and intensity levels (shared by her ROIs)."""
    beta = float(np.clip(rng.normal(params.beta_mean, params.beta_sd), params.beta_min, params.beta_max))
    return {
        "beta": beta,
        "density": float(rng.uniform(params.density_min, params.density_max)),
        "fat_level": float(params.fat_level + rng.uniform(-0.04, 0.04)),
        "dense_contrast": float(params.dense_contrast * rng.uniform(0.8, 1.2)),
    }


def make_background(rng: np.random.Generator, size: int, style: dict, params: SynthParams) -> np.ndarray:
    """Noise-free parenchymal background ``(size, size)``: power-law texture with soft fat/dense mixing."""
    beta = float(np.clip(style["beta"] + rng.normal(0.0, 0.05), params.beta_min, params.beta_max))
    density = float(np.clip(style["density"] + rng.uniform(-0.1, 0.1), 0.02, 0.98))
    f = power_law_field(rng, size, beta)
    threshold = np.quantile(f, 1.0 - density)
    tissue = 1.0 / (1.0 + np.exp(-(f - threshold) / 0.5))
    return style["fat_level"] + style["dense_contrast"] * tissue + params.texture_std * f


def add_quantum_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Add Gaussian noise whose std is ``sigma * sqrt(image / 0.5)`` (Poisson-like), then clip to [0, 1]."""
    std = sigma * np.sqrt(np.clip(image, 0.0, None) / 0.5)
    return np.clip(image + std * rng.standard_normal(image.shape), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- rendering
# A primitive is a dict: {"kind": "blob", "x", "y" (px), "a", "b" (semi-axes, px), "angle", "harm" [(amp, phase)]}
# or {"kind": "segment", "x0", "y0", "x1", "y1" (px), "w0", "w1" (half widths at the ends, px)}; both with "amp".


def _profile(prim: dict, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Normalised projected thickness in [0, 1] of one primitive at points ``xs, ys`` (px)."""
    if prim["kind"] == "blob":
        dx, dy = xs - prim["x"], ys - prim["y"]
        c, s = math.cos(prim["angle"]), math.sin(prim["angle"])
        u, v = c * dx + s * dy, -s * dx + c * dy
        theta = np.arctan2(v, u)
        scale = np.ones_like(theta)
        for k, (amp, phase) in enumerate(prim.get("harm", ()), start=2):
            scale = scale + amp * np.cos(k * theta + phase)
        r2 = ((u / prim["a"]) ** 2 + (v / prim["b"]) ** 2) / np.maximum(scale, 0.2) ** 2
    else:
        x0, y0, x1, y1 = prim["x0"], prim["y0"], prim["x1"], prim["y1"]
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * ex + (ys - y0) * ey) / max(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
        d2 = (xs - x0 - t * ex) ** 2 + (ys - y0 - t * ey) ** 2
        hw = prim["w0"] + (prim["w1"] - prim["w0"]) * t
        r2 = d2 / np.maximum(hw, 1e-3) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _extent(prim: dict) -> tuple[float, float, float, float]:
    if prim["kind"] == "blob":
        r = max(prim["a"], prim["b"]) * (1.0 + sum(abs(a) for a, _ in prim.get("harm", ())))
        return prim["x"] - r, prim["x"] + r, prim["y"] - r, prim["y"] + r
    w = max(prim["w0"], prim["w1"])
    return (
        min(prim["x0"], prim["x1"]) - w,
        max(prim["x0"], prim["x1"]) + w,
        min(prim["y0"], prim["y1"]) - w,
        max(prim["y0"], prim["y1"]) + w,
    )


def render_primitives(
    prims: Sequence[dict], size: int, supersample: int = 4, mask_coverage: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw primitives on a ``(size, size)`` grid with ``supersample``² sub-pixels per pixel.

    Returns ``(layer, mask)``: ``layer`` is the sum of ``amp * mean thickness`` per pixel (float64); ``mask`` is
    True where a primitive covers at least ``mask_coverage`` of the pixel, and always at the pixel holding a
    primitive's centre (so that every drawn calcification, however fine, appears in the mask).
    """
    layer = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    s = supersample
    sub = (np.arange(s) + 0.5) / s - 0.5
    for p in prims:
        xa, xb, ya, yb = _extent(p)
        c0, c1 = max(int(math.floor(xa)) - 1, 0), min(int(math.ceil(xb)) + 2, size)
        r0, r1 = max(int(math.floor(ya)) - 1, 0), min(int(math.ceil(yb)) + 2, size)
        if c0 >= c1 or r0 >= r1:
            continue
        xs = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(-1)
        ys = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(-1)
        prof = _profile(p, xs[None, :], ys[:, None]).reshape(r1 - r0, s, c1 - c0, s)
        layer[r0:r1, c0:c1] += p["amp"] * prof.mean(axis=(1, 3))
        mask[r0:r1, c0:c1] |= (prof > 0).mean(axis=(1, 3)) >= mask_coverage
        cx, cy = (p["x"], p["y"]) if p["kind"] == "blob" else (0.5 * (p["x0"] + p["x1"]), 0.5 * (p["y0"] + p["y1"]))
        ix, iy = int(round(cx)), int(round(cy))
        if 0 <= ix < size and 0 <= iy < size:
            mask[iy, ix] = True
    return layer, mask


def _place(
    rng: np.random.Generator, n: int, centre: np.ndarray, radius: float, elong: float, radii: np.ndarray, gap: float
) -> np.ndarray:
    """Up to ``n`` positions uniform in an elliptical disc, keeping edge-to-edge gaps ≥ ``gap`` (same units)."""
    angle = rng.uniform(0, np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    ax = np.array([radius * math.sqrt(elong), radius / math.sqrt(elong)])
    cand_r = np.sqrt(rng.uniform(0, 1, 40 * n))
    cand_t = rng.uniform(0, 2 * np.pi, 40 * n)
    cand = np.stack([cand_r * np.cos(cand_t), cand_r * np.sin(cand_t)], 1) * ax
    cand = centre + cand @ rot.T
    pos: list[np.ndarray] = []
    for c in cand:
        k = len(pos)
        if k == n:
            break
        if k and np.any(np.hypot(*(np.asarray(pos) - c).T) < radii[k] + radii[:k] + gap):
            continue
        pos.append(c)
    return np.asarray(pos).reshape(-1, 2)


def draw_calcifications(
    rng: np.random.Generator, label: int, size: int, spacing_mm: float, params: SynthParams
) -> list[list[dict]]:
    """Random calcification cluster of class ``label`` (0 benign, 1 malignant): one list of primitives per calc.

    Positions and sizes are drawn in mm, then converted to px with ``spacing_mm``; the cluster is kept inside
    the ROI.
    """
    m = class_morphology(params, "target", label)
    lo, hi = max(m.count_min, 1.0), max(m.count_max, m.count_min, 1.0)
    n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    d_typ = math.exp(rng.uniform(math.log(m.diam_min), math.log(max(m.diam_max, m.diam_min))))
    sig = math.sqrt(math.log1p(m.size_cv**2))
    diam = np.clip(d_typ * np.exp(rng.normal(-0.5 * sig * sig, sig, n)), 0.08, 1.4)  # mm
    linear = rng.uniform(0, 1, n) < m.linear_fraction
    roi_mm = size * spacing_mm
    centre = roi_mm / 2 + rng.uniform(-0.06, 0.06, 2) * roi_mm
    radius = min(rng.uniform(m.radius_min, max(m.radius_max, m.radius_min)), 0.5 * roi_mm - 0.7)
    elong = rng.uniform(1.0, max(m.elongation_max, 1.0))
    foot = np.where(linear, 0.35 * diam + 0.3, 0.5 * diam)  # footprint radius for spacing (mm)
    pos = _place(rng, n, centre, max(radius, 0.3), elong, foot, m.min_spacing)
    ref = params.cnr * params.noise_sigma
    calcs: list[list[dict]] = []
    for k, (x, y) in enumerate(pos):
        d = float(diam[k])
        if linear[k]:
            width = min(d, 0.25) * rng.uniform(0.5, 0.8)  # fine-linear: thin
            amp = ref * (max(width, 0.1) / 0.5) ** params.size_contrast_exponent * rng.uniform(0.9, 1.3)
            calcs.append(_linear_calc(rng, x, y, width, 0.6 + 2.5 * d, amp, spacing_mm))
            continue
        aspect = rng.uniform(1.0, max(m.aspect_max, 1.0))
        harm = [(float(rng.uniform(0, m.irregularity)) / k2, float(rng.uniform(0, 2 * np.pi))) for k2 in (1, 2, 3)]
        amp = ref * (d / 0.5) ** params.size_contrast_exponent * rng.uniform(0.8, 1.2)
        a = 0.5 * d * math.sqrt(aspect) / spacing_mm
        b = 0.5 * d / math.sqrt(aspect) / spacing_mm
        calcs.append(
            [
                {
                    "kind": "blob",
                    "x": x / spacing_mm - 0.5,
                    "y": y / spacing_mm - 0.5,
                    "a": a,
                    "b": b,
                    "angle": float(rng.uniform(0, np.pi)),
                    "harm": harm,
                    "amp": float(amp),
                }
            ]
        )
    return calcs


def _linear_calc(
    rng: np.random.Generator, x: float, y: float, width: float, length: float, amp: float, spacing_mm: float
) -> list[dict]:
    """Fine-linear calcification: a bent polyline (2-3 segments), branching with probability 0.5 (mm in, px out)."""
    prims: list[dict] = []
    hw = 0.5 * width / spacing_mm
    nseg = int(rng.integers(2, 4))
    seg = length / nseg
    heading = rng.uniform(0, 2 * np.pi)
    pts = [(x - 0.5 * length * math.cos(heading), y - 0.5 * length * math.sin(heading))]
    for _ in range(nseg):
        heading += rng.normal(0, 0.35)
        px, py = pts[-1]
        pts.append((px + seg * math.cos(heading), py + seg * math.sin(heading)))
    branches = [(pts[i], pts[i + 1]) for i in range(nseg)]
    if rng.uniform() < 0.5:
        bx, by = pts[int(rng.integers(1, nseg))]
        bh = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        bl = seg * rng.uniform(0.5, 1.0)
        branches.append(((bx, by), (bx + bl * math.cos(bh), by + bl * math.sin(bh))))
    for (x0, y0), (x1, y1) in branches:
        prims.append(
            {
                "kind": "segment",
                "x0": x0 / spacing_mm - 0.5,
                "y0": y0 / spacing_mm - 0.5,
                "x1": x1 / spacing_mm - 0.5,
                "y1": y1 / spacing_mm - 0.5,
                "w0": hw * rng.uniform(0.8, 1.2),
                "w1": hw * rng.uniform(0.6, 1.0),
                "amp": float(amp),
            }
        )
    return prims


def draw_mass(rng: np.random.Generator, label: int, size: int, spacing_mm: float, params: SynthParams) -> list[dict]:
    """Random mass of class ``label`` (0 circumscribed, 1 spiculated) as primitives (core blob + spicules), px."""
    m = class_morphology(params, "intermediate", label)
    roi_mm = size * spacing_mm
    r = min(rng.uniform(m.radius_min, max(m.radius_max, m.radius_min)), 0.3 * roi_mm)
    aspect = rng.uniform(1.0, max(m.aspect_max, 1.0))
    cx, cy = roi_mm / 2 + rng.uniform(-0.05, 0.05, 2) * roi_mm
    amp = params.mass_cnr * params.noise_sigma * rng.uniform(0.85, 1.15)
    harm = [(float(rng.uniform(0, m.lobulation)) / k2, float(rng.uniform(0, 2 * np.pi))) for k2 in (1, 1.5, 2)]
    core = {
        "kind": "blob",
        "x": cx / spacing_mm - 0.5,
        "y": cy / spacing_mm - 0.5,
        "a": r * math.sqrt(aspect) / spacing_mm,
        "b": r / math.sqrt(aspect) / spacing_mm,
        "angle": float(rng.uniform(0, np.pi)),
        "harm": harm,
        "amp": float(amp),
        "margin_px": m.margin_mm / spacing_mm,
    }
    prims = [core]
    n_sp = int(np.floor(rng.uniform(m.spicules_min, m.spicules_max + 1.0 - 1e-9)))
    if n_sp > 0:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n_sp))
        for t in angles:
            length = r * m.spicule_length * rng.uniform(0.6, 1.4)
            start = 0.7 * r
            x0, y0 = cx + start * math.cos(t), cy + start * math.sin(t)
            t2 = t + rng.normal(0, 0.12)
            x1, y1 = x0 + length * math.cos(t2), y0 + length * math.sin(t2)
            prims.append(
                {
                    "kind": "segment",
                    "x0": x0 / spacing_mm - 0.5,
                    "y0": y0 / spacing_mm - 0.5,
                    "x1": x1 / spacing_mm - 0.5,
                    "y1": y1 / spacing_mm - 0.5,
                    "w0": rng.uniform(0.15, 0.3) / spacing_mm,
                    "w1": 0.03 / spacing_mm,
                    "amp": float(amp * rng.uniform(0.5, 0.8)),
                }
            )
    return prims


# ----------------------------------------------------------------------------------------------- ROIs
def render_target_roi(
    rng: np.random.Generator, label: int, style: dict, size: int, spacing_mm: float, params: SynthParams
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One calcification ROI: image ``(size, size)`` float in [0, 1], mask ``(size, size)`` bool, info dict."""
    clean, mask, info = calcification_scene(rng, label, style, size, spacing_mm, params)
    return add_quantum_noise(rng, clean, params.noise_sigma), mask, info


def calcification_scene(
    rng: np.random.Generator, label: int, style: dict, size: int, spacing_mm: float, params: SynthParams
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Noise-free calcification ROI: background plus PSF-blurred cluster ``(size, size)`` float (not clipped),
    mask ``(size, size)`` bool (drawn calcifications), info dict. Draws the background, then the cluster."""
    bg = make_background(rng, size, style, params)
    calcs = draw_calcifications(rng, label, size, spacing_mm, params)
    layer, mask = render_primitives([p for c in calcs for p in c], size)
    layer = ndimage.gaussian_filter(layer, params.psf_sigma_mm / spacing_mm) if params.psf_sigma_mm > 0 else layer
    n_linear = sum(1 for c in calcs if c[0]["kind"] == "segment")
    return bg + layer, mask, {"n_calcifications": len(calcs), "n_linear": n_linear}


def film_grain(rng: np.random.Generator, shape: tuple[int, int], corr_px: float) -> np.ndarray:
    """Film grain of ``shape`` ``(H, W)``: white noise low-passed by a Gaussian of σ ``corr_px`` (px), zero mean,
    unit std (periodic filtering, so the correlation is the same at the borders)."""
    white = rng.standard_normal(tuple(shape))
    g = ndimage.gaussian_filter(white, corr_px, mode="wrap") if corr_px > 0 else white
    g = g - g.mean()
    return g / (g.std() + 1e-12)


def apply_film_domain(
    rng: np.random.Generator, exposure: np.ndarray, spacing_mm: float, params: SynthParams
) -> np.ndarray:
    """Turn a noise-free ``(H, W)`` ROI (intensity, [0, 1] scale) into a digitised screen-film one, in [0, 1].

    In physical order: quantum noise at the screen (``noise_sigma``); screen and digitiser unsharpness (Gaussian,
    σ ``film_blur_mm``, which blurs the quantum noise too); the film's characteristic curve (``I ** film_gamma``);
    film grain (additive, std ``film_grain_sigma``, correlated over ``film_grain_mm``); clip to [0, 1].
    """
    image = add_quantum_noise(rng, exposure, params.noise_sigma)
    if params.film_blur_mm > 0:
        image = ndimage.gaussian_filter(image, params.film_blur_mm / spacing_mm, mode="reflect")
    image = np.clip(image, 0.0, 1.0) ** params.film_gamma
    if params.film_grain_sigma > 0:
        image = image + params.film_grain_sigma * film_grain(rng, image.shape, params.film_grain_mm / spacing_mm)
    return np.clip(image, 0.0, 1.0)


def render_film_roi(
    rng: np.random.Generator, label: int, style: dict, size: int, spacing_mm: float, params: SynthParams
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One calcification ROI in the screen-film domain: image ``(size, size)`` float in [0, 1], mask bool, info.

    The scene is the target's (:func:`calcification_scene`, same morphology) with the background's tissue contrast
    scaled by ``film_tissue_contrast`` and the calcifications' by ``film_calc_contrast``; then
    :func:`apply_film_domain`.
    """
    style = {**style, "dense_contrast": style["dense_contrast"] * params.film_tissue_contrast}
    scene = replace(
        params,
        texture_std=params.texture_std * params.film_tissue_contrast,
        cnr=params.cnr * params.film_calc_contrast,
    )
    clean, mask, info = calcification_scene(rng, label, style, size, spacing_mm, scene)
    return apply_film_domain(rng, clean, spacing_mm, params), mask, info


def render_intermediate_roi(
    rng: np.random.Generator, label: int, style: dict, size: int, spacing_mm: float, params: SynthParams
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One mass ROI: image ``(size, size)`` float in [0, 1], mask ``(size, size)`` bool, info dict."""
    bg = make_background(rng, size, style, params)
    prims = draw_mass(rng, label, size, spacing_mm, params)
    core, spicules = prims[0], prims[1:]
    core_layer, core_mask = render_primitives([core], size)
    # a blurred margin for ill-defined masses; the mask is the drawn core before blurring
    core_layer = ndimage.gaussian_filter(core_layer, max(core["margin_px"], 1e-3) / 2.0)
    sp_layer, sp_mask = render_primitives(spicules, size)
    layer = core_layer + sp_layer
    if params.psf_sigma_mm > 0:
        layer = ndimage.gaussian_filter(layer, params.psf_sigma_mm / spacing_mm)
    image = add_quantum_noise(rng, bg + layer, params.noise_sigma)
    return image, core_mask | sp_mask, {"n_spicules": len(spicules)}


def generate_roi(
    task: str,
    index: int,
    label: int,
    patient_index: int,
    seed: int = 0,
    image_size: int = 128,
    pixel_spacing_mm: float = 0.1,
    params: SynthParams | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """ROI number ``index`` of ``task``, seeded from ``(seed, task, index)`` alone; background style from the patient.

    Returns ``(image (H, W) float64 in [0, 1], mask (H, W) bool, info)``.
    """
    params = params or SynthParams()
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    code = TASKS[task][0]
    style_key = patient_index if params.shared_style else 1_000_000 + index
    style = patient_style(_rng(seed, code, _STREAM_PATIENT, style_key), params)
    rng = _rng(seed, code, _STREAM_ROI, index)
    render = {"target": render_target_roi, "intermediate": render_intermediate_roi, "film": render_film_roi}[task]
    return render(rng, int(label), style, int(image_size), float(pixel_spacing_mm), params)


def plan_patients(n: int, task: str, seed: int = 0, params: SynthParams | None = None) -> list[tuple[int, int]]:
    """``(patient_index, label)`` for ROIs 0..n-1: patients of 1-3 ROIs sharing a label, classes balanced.

    Drawn sequentially, so the plan of the first ROIs does not depend on ``n`` (except the last patient's size).
    """
    params = params or SynthParams()
    rng = _rng(seed, TASKS[task][0], _STREAM_LAYOUT)
    probs = np.asarray(params.rois_per_patient, dtype=float)
    probs = probs / probs.sum()
    plan: list[tuple[int, int]] = []
    counts = [0, 0]
    patient = 0
    while len(plan) < n:
        k = int(rng.choice(len(probs), p=probs)) + 1
        label = int(rng.integers(2)) if counts[0] == counts[1] else int(np.argmin(counts))
        k = min(k, n - len(plan))
        plan.extend([(patient, label)] * k)
        counts[label] += k
        patient += 1
    return plan


# ----------------------------------------------------------------------------------------------- dataset
def _write_one(job: tuple) -> dict:
    task, index, label, patient_index, seed, size, spacing, params, root = job
    image, mask, info = generate_roi(task, index, label, patient_index, seed, size, spacing, params)
    case = f"{TASKS[task][1]}-{index + 1:04d}"
    write_roi_png(Path(root, "images", f"{case}.png"), image)
    write_mask_png(Path(root, "masks", f"{case}.png"), mask)
    return info


def _resolve_params(task: str, params: SynthParams | dict | None, overlap: float | None, cnr: float | None):
    p = params if isinstance(params, SynthParams) else SynthParams.from_dict(params)
    calc = task in CALCIFICATION_TASKS
    if overlap is not None:
        p = replace(p, **{"overlap" if calc else "mass_overlap": float(overlap)})
    if cnr is not None:
        p = replace(p, **{"cnr" if calc else "mass_cnr": float(cnr)})
    p.validate()
    return p


def generate_dataset(
    out_dir: str | os.PathLike,
    task: str = "target",
    n_train: int = 200,
    n_test: int = 200,
    num_folds: int = 3,
    image_size: int = 128,
    pixel_spacing_mm: float | None = None,
    seed: int = 0,
    params: SynthParams | dict | None = None,
    workers: int = 1,
    overlap: float | None = None,
    cnr: float | None = None,
    force: bool = False,
) -> Path:
    """Write a synthetic dataset under ``out_dir/<task>/`` and return the path of its ``datalist.json``.

    ``images/<case>.png`` (16-bit ROI) and ``masks/<case>.png`` (8-bit lesion mask) are written beside the
    datalist. Patients are split whole into training (``n_train`` ROIs, with patient-grouped, label-stratified
    ``fold``) and test (``n_test`` ROIs; counts are matched to within a patient or two). ``params`` is a
    :class:`SynthParams` or a (partial) dict; ``overlap`` and ``cnr`` override the chosen task's knobs (``film``:
    the target's ``overlap`` and ``cnr``; the ``film_*`` knobs are stored in film datalists only). If the
    datalist exists with identical metadata and its files are present, nothing is regenerated ("up to date")
    unless ``force``. ``workers > 1`` uses processes; output does not depend on it. ``pixel_spacing_mm`` defaults
    to ``FIELD_MM / image_size`` (0.1 mm at 128 px).
    """
    if pixel_spacing_mm is None:
        pixel_spacing_mm = FIELD_MM / max(int(image_size), 1)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    n_train, n_test, num_folds, image_size, seed = int(n_train), int(n_test), int(num_folds), int(image_size), int(seed)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    if pixel_spacing_mm <= 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    p = _resolve_params(task, params, overlap, cnr)
    _, case_prefix, patient_prefix, classes = TASKS[task]
    root = Path(out_dir) / task
    path = root / "datalist.json"
    generator = {
        "name": "scripts.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_size": image_size,
        "params": task_params_dict(p, task),
    }
    metadata_extra = {
        "image_size": image_size,
        "synthetic": True,
        "note": "Synthetic ROIs for demonstration and testing; never clinical evidence.",
        "generator": generator,
    }
    meta_kw = dict(
        source="synthetic",
        task=task,
        class_names=classes,
        pixel_spacing_mm=float(pixel_spacing_mm),
        num_folds=num_folds,
        **metadata_extra,
    )
    wanted = json.loads(json.dumps(make_datalist([], [], **meta_kw)["metadata"]))
    if path.is_file() and not force:
        try:
            if read_datalist(path).get("metadata") == wanted:
                logger.info("synthetic %s data up to date: %s", task, path)
                return path
        except DatalistError:
            pass  # missing or broken files: regenerate
    if path.exists():
        path.unlink()  # a half-regenerated folder must never look up to date
    for sub in ("images", "masks"):
        for old_file in (root / sub).glob(f"{case_prefix}-*.png"):
            old_file.unlink()

    n = n_train + n_test
    plan = plan_patients(n, task, seed, p)
    jobs = [
        (task, i, lab, pat, seed, image_size, float(pixel_spacing_mm), p, str(root))
        for i, (pat, lab) in enumerate(plan)
    ]
    logger.info(
        "generating %d synthetic %s ROIs (%d px, %.3g mm/px) in %s", n, task, image_size, pixel_spacing_mm, root
    )
    t0 = time.perf_counter()
    infos: list[dict] = []
    step = max(n // 10, 1)
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as ex:
            for i, info in enumerate(ex.map(_write_one, jobs, chunksize=max(n // (8 * workers), 1))):
                infos.append(info)
                if (i + 1) % step == 0 or i + 1 == n:
                    logger.info("  %d/%d ROIs", i + 1, n)
    else:
        for i, job in enumerate(jobs):
            infos.append(_write_one(job))
            if (i + 1) % step == 0 or i + 1 == n:
                logger.info("  %d/%d ROIs", i + 1, n)
    logger.info("generated %d ROIs in %.1f s", n, time.perf_counter() - t0)

    items = []
    for i, ((pat, lab), info) in enumerate(zip(plan, infos)):
        case = f"{case_prefix}-{i + 1:04d}"
        items.append(
            make_item(
                image=f"images/{case}.png",
                label=lab,
                patient=f"{patient_prefix}{pat + 1:04d}",
                case=case,
                mask=f"masks/{case}.png",
                birads=None,
                **info,
            )
        )
    if n_test > 0:
        train, test = split_by_patient(items, n_test / n, seed=seed)
    else:
        train, test = items, []
    train = assign_folds(train, num_folds, seed=seed)
    test = sorted(test, key=lambda it: it["case"])
    datalist = make_datalist(train, test, **meta_kw)
    write_datalist(path, datalist)
    logger.info("datalist: %s (%d training, %d test ROIs)", path, len(train), len(test))
    return path


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point; returns the datalist path (also printed)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder; data go to OUT/<task>/")
    ap.add_argument("--task", choices=sorted(TASKS), default="target")
    ap.add_argument("--n-train", type=int, default=200, help="training ROIs (folds are assigned within them)")
    ap.add_argument("--n-test", type=int, default=200, help="held-out test ROIs")
    ap.add_argument("--folds", type=int, default=3, help="cross-validation folds (>= 2)")
    ap.add_argument("--size", type=int, default=128, help="ROI side in px")
    ap.add_argument("--spacing", type=float, default=None, help=f"pixel spacing in mm (default {FIELD_MM} mm / size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap", type=float, default=None, help="class overlap in [0, 1] (task's knob; film: target's)")
    ap.add_argument(
        "--cnr", type=float, default=None, help="lesion contrast-to-noise ratio (task's knob; film: target's)"
    )
    ap.add_argument("--noise", type=float, default=None, help="quantum-noise std at intensity 0.5")
    ap.add_argument("--params", default=None, help="JSON file or string with SynthParams fields to override")
    ap.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    params: dict = {}
    if args.params:
        text = Path(args.params).read_text() if Path(args.params).is_file() else args.params
        params = json.loads(text)
    if args.noise is not None:
        params["noise_sigma"] = args.noise
    path = generate_dataset(
        args.out,
        task=args.task,
        n_train=args.n_train,
        n_test=args.n_test,
        num_folds=args.folds,
        image_size=args.size,
        pixel_spacing_mm=args.spacing,
        seed=args.seed,
        params=params,
        workers=args.workers,
        overlap=args.overlap,
        cnr=args.cnr,
        force=args.force,
    )
    print(path)
    return path


if __name__ == "__main__":
    main()
