"""Rendering of synthetic ROIs (:mod:`scripts.data.synthetic`): parenchymal background, calcification clusters and
masses drawn as primitives, the film domain, the per-ROI seeding and patient plan, and the simulated reader's draw."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from scripts.data.synthetic_params import (
    _STREAM_LAYOUT,
    _STREAM_PATIENT,
    _STREAM_READER,
    _STREAM_ROI,
    READER_TASKS,
    TASKS,
    SynthParams,
    class_morphology,
    reader_birads_distribution,
)


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


def _segment(p0_mm: tuple, p1_mm: tuple, spacing_mm: float, w0: float, w1: float, amp: float) -> dict:
    """A segment primitive from ``p0_mm`` to ``p1_mm`` (mm, ROI corner origin) in pixel coordinates (pixel centres
    at +0.5); half widths ``w0``/``w1`` in px."""
    (x0, y0), (x1, y1) = p0_mm, p1_mm
    return {
        "kind": "segment",
        "x0": x0 / spacing_mm - 0.5,
        "y0": y0 / spacing_mm - 0.5,
        "x1": x1 / spacing_mm - 0.5,
        "y1": y1 / spacing_mm - 0.5,
        "w0": w0,
        "w1": w1,
        "amp": float(amp),
    }


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
            _segment((x0, y0), (x1, y1), spacing_mm, hw * rng.uniform(0.8, 1.2), hw * rng.uniform(0.6, 1.0), amp)
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
            w0 = rng.uniform(0.15, 0.3) / spacing_mm
            prims.append(_segment((x0, y0), (x1, y1), spacing_mm, w0, 0.03 / spacing_mm, amp * rng.uniform(0.5, 0.8)))
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


def simulated_birads(task: str, index: int, label: int, seed: int = 0) -> int | None:
    """The simulated reader's BI-RADS category of ROI number ``index`` of ``task`` (``None`` for tasks without one).

    Drawn by pathology from the CBIS-DDSM calcification frequencies (:func:`reader_birads_distribution`) with a
    random stream of its own, ``(seed, task, reader stream, index)``: no image, mask or other draw of the generator
    uses it, so adding the reader left every ROI unchanged, and the category depends on ``label`` alone, never on
    the image (the reader's errors are independent of the model's given the pathology).

    Args:
        task: one of :data:`TASKS`; only :data:`READER_TASKS` (benign / malignant calcifications) get a category.
        index: the ROI's index in the task (0-based, as for :func:`generate_roi`).
        label: 0 (benign) or 1 (malignant).
        seed: the dataset seed.

    Returns:
        A BI-RADS category (0, 2, 3, 4 or 5), or ``None`` when ``task`` has no reader.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if task not in READER_TASKS:
        return None
    categories, probs = reader_birads_distribution(label)
    rng = _rng(seed, TASKS[task][0], _STREAM_READER, index)
    return int(rng.choice(categories, p=probs))


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
