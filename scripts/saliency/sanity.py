"""Model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018): re-initialise a copy of the
ensemble, top down, and measure how much its maps change.

Shapes: network inputs ``(N, 1, H, W)`` in [0, 1]; maps ``(N, H, W)`` in [0, 1].
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

from scripts.saliency.cam import MALIGNANT, EnsembleCAM, ensemble_members, predicted_classes

logger = logging.getLogger(__name__)

RANDOMISATION_MODES = ("cascading", "full")
_EPS = 1e-8


def _ranks(a: np.ndarray) -> np.ndarray:
    return rankdata(a.ravel())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > _EPS else 0.0


def _ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al., 2004) of two maps in [0, 1], Gaussian window of ``sigma`` pixels."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    var_a = gaussian_filter(a * a, sigma) - mu_a**2
    var_b = gaussian_filter(b * b, sigma) - mu_b**2
    cov = gaussian_filter(a * b, sigma) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Similarity of two ``(H, W)`` maps.

    Returns:
        ``spearman`` (rank correlation), ``pearson`` and ``ssim`` (mean SSIM). Correlations with a flat map are 0
        (all three are 1 if both maps are identical).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if np.array_equal(a, b):
        return {"spearman": 1.0, "pearson": 1.0, "ssim": 1.0}
    return {"spearman": _pearson(_ranks(a), _ranks(b)), "pearson": _pearson(a, b), "ssim": _ssim(a, b)}


def _blocks_top_down(member: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    member = getattr(member, "module", member)
    if hasattr(member, "stages"):  # scripts.model.network.GrayClassifier: head first, stem last
        return list(reversed(member.stages()))
    return [(name, [mod]) for name, mod in reversed(list(member.named_children()))]


def _reinitialise(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def randomisation_check(
    ensemble: nn.Module,
    images: torch.Tensor,
    method: str = "hirescam",
    target: str = "malignant",
    mode: str = "cascading",
    seed: int = 0,
    original_maps: np.ndarray | None = None,
    threshold: float = 0.5,
    amp: bool = False,
    layer: str | None = None,
) -> dict[str, Any]:
    """Model-parameter randomisation test: re-initialise weights of a copy of the ensemble and compare maps.

    Args:
        ensemble: the trained ensemble (left untouched: a deep copy is randomised).
        images: ``(N, 1, H, W)`` network inputs in [0, 1].
        mode: ``"cascading"`` (re-initialise from the top: fc, layer4, ..., stem, cumulatively, in every member)
            or ``"full"`` (every layer at once).
        original_maps: the ensemble's maps for ``images`` ``(N, H, W)``, when already computed (with the same ``amp``).
        amp, layer: as for :class:`EnsembleCAM`.

    Returns ``{"mode", "n_images", "steps": [{"randomised", "spearman", "pearson", "ssim"}, ...], "final"}``:
    mean similarities between original and randomised maps (1 = unchanged). Maps that barely change when the
    weights are randomised do not explain the model.
    """
    if mode not in RANDOMISATION_MODES:
        raise ValueError(f"mode must be one of {RANDOMISATION_MODES}, got {mode!r}")
    if target == "predicted":  # the randomised copies explain the class the trained ensemble predicted
        classes = predicted_classes(ensemble_members(ensemble), images, threshold)
    else:
        classes = [MALIGNANT] * len(images)
    if original_maps is None:
        with EnsembleCAM(ensemble, method, target, threshold=threshold, amp=amp, layer=layer) as cam:
            original_maps = cam(images, classes).maps
    clone = copy.deepcopy(getattr(ensemble, "module", ensemble)).eval()
    members = ensemble_members(clone)
    per_member = [_blocks_top_down(m) for m in members]
    if mode == "cascading":
        plan = [
            (per_member[0][i][0], [mods for blocks in per_member for mods in blocks[i][1]])
            for i in range(len(per_member[0]))
        ]
    else:
        plan = [("all", [m for m in members])]
    device = next(clone.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    steps = []
    with EnsembleCAM(clone, method, target, threshold=threshold, amp=amp, layer=layer) as cam:
        for i, (name, modules) in enumerate(plan):
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed + i)
                with torch.no_grad():
                    _reinitialise(modules)
            maps = cam(images, classes).maps
            sims = [map_similarity(a, b) for a, b in zip(original_maps, maps)]
            step = {"randomised": name if mode == "full" else f"top..{name}"}
            step.update({k: float(np.mean([s[k] for s in sims])) for k in ("spearman", "pearson", "ssim")})
            steps.append(step)
            logger.info(
                "randomisation %s: %s",
                step["randomised"],
                {k: round(v, 3) for k, v in step.items() if k != "randomised"},
            )
    del clone
    return {"mode": mode, "method": method, "n_images": int(len(original_maps)), "steps": steps, "final": steps[-1]}
