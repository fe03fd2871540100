"""Localisation metrics of saliency maps against lesion masks (pure numpy): pointing game, energy in mask, IoU,
their chance levels, and the per-group table with percentile-bootstrap CIs.

Shapes and units: maps ``(H, W)`` float in [0, 1]; masks ``(H, W)`` bool, True = lesion, of the map's shape;
distances and tolerances are in pixels of the array they refer to.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt

from scripts.data.schema import TARGET_CLASSES

FEATURE_STRIDE = 32  # default tolerance (px) of the pure pointing_game function: one cell of a stride-32 map
BOOTSTRAP_RESAMPLES = 2000  # percentile-bootstrap CIs of the localisation table
_EPS = 1e-8


def _check_pair(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float64), nan=0.0)
    mask = np.asarray(mask) > 0
    if cam.ndim != 2 or cam.shape != mask.shape:
        raise ValueError(f"cam and mask must be 2-D of the same shape, got {cam.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: localisation metrics are undefined")
    return cam, mask


def distance_to_mask(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) from every pixel to the nearest mask pixel; 0 inside the mask. ``(H, W)``."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("mask is empty")
    return distance_transform_edt(~mask)


def pointing_game(cam: np.ndarray, mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE) -> bool:
    """Pointing game (Zhang et al., ECCV 2016): a hit if the map's maximum lies within ``tolerance_px`` pixels
    (Euclidean) of the mask. A flat map points nowhere and is a miss; ties take the first maximum in row-major order.

    Args:
        cam: the map ``(H, W)``.
        mask: the lesion mask ``(H, W)``, not empty.
        tolerance_px: the largest distance of a hit; default one cell of a stride-32 feature map.

    Raises:
        ValueError: ``cam`` and ``mask`` differ in shape or are not 2-D, or the mask is empty.
    """
    cam, mask = _check_pair(cam, mask)
    if cam.max() - cam.min() <= _EPS:
        return False
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    rows, cols = np.nonzero(mask)
    return bool(np.sqrt(((rows - r) ** 2 + (cols - c) ** 2).min()) <= tolerance_px)


def energy_in_mask(cam: np.ndarray, mask: np.ndarray) -> float:
    """Energy-based pointing game (Wang et al., Score-CAM, 2020): ``sum(cam * mask) / sum(cam)`` of the
    non-negative map; 0 for an all-zero map."""
    cam, mask = _check_pair(cam, mask)
    cam = np.maximum(cam, 0.0)
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else 0.0


def iou_at(cam: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the binarised map ``cam >= threshold`` with the mask (Saporta et al., 2022).

    Args:
        cam: the map ``(H, W)``, normalised to [0, 1] (so ``threshold`` is relative to the peak).
        mask: the lesion mask ``(H, W)``, not empty.
        threshold: the binarisation threshold.
    """
    cam, mask = _check_pair(cam, mask)
    pred = cam >= threshold
    return float(np.logical_and(pred, mask).sum() / np.logical_or(pred, mask).sum())


def chance_levels(mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE) -> dict[str, float]:
    """What uninformative maps score against ``mask``.

    Args:
        mask: the lesion mask ``(H, W)``, not empty.
        tolerance_px: the pointing game's tolerance (:func:`pointing_game`).

    Returns:
        ``area_fraction`` (energy-in-mask of a uniform map, and IoU of a map selecting every pixel), ``pointing``
        (hit probability of a uniformly random point: the fraction of pixels within ``tolerance_px`` of the mask)
        and ``centre`` (1.0 if a map peaking at the ROI's centre is a hit: a location prior, since ROIs are usually
        cropped around the lesion).
    """
    mask = np.asarray(mask) > 0
    dist = distance_to_mask(mask)
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    centre = float(np.sqrt(((rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2).min()) <= tolerance_px)
    return {"area_fraction": float(mask.mean()), "pointing": float((dist <= tolerance_px).mean()), "centre": centre}


def localisation_metrics(
    cam: np.ndarray, mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE, iou_threshold: float = 0.5
) -> dict[str, float]:
    """All metrics of one map against its mask, with chance levels.

    Args:
        cam: the map ``(H, W)`` in [0, 1].
        mask: the lesion mask ``(H, W)``, not empty.
        tolerance_px: the pointing game's tolerance (:func:`pointing_game`).
        iou_threshold: the map's binarisation threshold for the IoU (:func:`iou_at`).

    Returns:
        ``hit``, ``energy``, ``iou``, ``chance_area``, ``chance_pointing``, ``centre_hit`` (the centre prior's hit)
        and ``tolerance_px``.
    """
    chance = chance_levels(mask, tolerance_px)
    return {
        "hit": pointing_game(cam, mask, tolerance_px),
        "energy": energy_in_mask(cam, mask),
        "iou": iou_at(cam, mask, iou_threshold),
        "chance_area": chance["area_fraction"],
        "chance_pointing": chance["pointing"],
        "centre_hit": chance["centre"],
        "tolerance_px": float(tolerance_px),
    }


_METRIC_CHANCE = (("pointing_game", "hit", "chance_pointing"), ("energy_in_mask", "energy", "chance_area"))


def _bootstrap_means(values: np.ndarray, rng: np.random.Generator, alpha: float = 0.05) -> list[float]:
    """Percentile-bootstrap ``[low, high]`` of the mean of ``values`` ``(N,)``, resampling its entries."""
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    return np.quantile(means, [alpha / 2, 1 - alpha / 2]).tolist()


def _summarise(records: Sequence[dict], seed: int = 0) -> dict[str, Any]:
    """Means of one group with 95 % percentile-bootstrap CIs (resampling ROIs). For the pointing game and energy in
    mask, ``<metric>_excess_ci`` is the CI of the mean paired difference ``metric - chance`` and
    ``<metric>_above_chance`` is True when its lower end is above 0."""
    n = len(records)
    out: dict[str, Any] = {"n": n}
    if not n:
        for metric, _, _ in _METRIC_CHANCE:
            out.update({metric: None, f"{metric}_chance": None, f"{metric}_ci": None})
            out.update({f"{metric}_excess_ci": None, f"{metric}_above_chance": None})
        out.update({"pointing_game_centre": None, "iou": None, "iou_chance": None, "iou_ci": None})
        return out
    rng = np.random.default_rng(seed)

    def col(key: str) -> np.ndarray:
        return np.array([float(r[key]) for r in records])

    for metric, key, chance_key in _METRIC_CHANCE:
        value, chance = col(key), col(chance_key)
        excess = _bootstrap_means(value - chance, rng)
        out.update(
            {
                metric: float(value.mean()),
                f"{metric}_ci": _bootstrap_means(value, rng),
                f"{metric}_chance": float(chance.mean()),
                f"{metric}_excess_ci": excess,
                f"{metric}_above_chance": bool(excess[0] > 0),
            }
        )
    if all("centre_hit" in r for r in records):
        out["pointing_game_centre"] = float(col("centre_hit").mean())
    else:
        out["pointing_game_centre"] = None
    iou = col("iou")
    out.update(
        {"iou": float(iou.mean()), "iou_ci": _bootstrap_means(iou, rng), "iou_chance": out["energy_in_mask_chance"]}
    )
    return out


def localisation_table(records: Sequence[dict], class_names: Sequence[str] = TARGET_CLASSES) -> dict[str, dict]:
    """Aggregate per-ROI records into groups.

    Args:
        records: one per ROI, with ``label`` (a class index or ``None``), ``correct`` and the keys of
            :func:`localisation_metrics`. Records without a label or ``correct`` count only in ``all``.
        class_names: the names of the class indices.

    Returns:
        Per group (``all``, ``correct``, ``misclassified``, each class name, ``<class>/correct`` and
        ``<class>/misclassified``): ``n``, the mean of each metric with its 95 % bootstrap CI and its chance
        level, whether it is above chance (see :func:`_summarise`) and the centre prior's pointing game (``None``
        for an empty group).
    """
    groups: dict[str, list[dict]] = {"all": list(records), "correct": [], "misclassified": []}
    for name in class_names:
        groups[name] = []
        groups[f"{name}/correct"] = []
        groups[f"{name}/misclassified"] = []
    for r in records:
        if r.get("label") is None or r.get("correct") is None:
            continue
        outcome = "correct" if r["correct"] else "misclassified"
        name = class_names[int(r["label"])]
        for key in (outcome, name, f"{name}/{outcome}"):
            groups[key].append(r)
    return {key: _summarise(rs) for key, rs in groups.items()}
