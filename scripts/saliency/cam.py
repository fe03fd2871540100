"""Saliency maps for the ensemble (pytorch-grad-cam), localisation metrics against lesion masks, a weight
randomisation sanity check, and the saliency workflow that writes overlays, NIfTI maps and a gallery.

Shapes and units:

- network input ``x``: ``(B, 1, H, W)`` float in [0, 1] (the ROI, possibly resized to the network's input size);
- maps: ``(B, H, W)`` float32 in [0, 1] (min-max normalised per image, a flat map is all zeros);
- masks: ``(H, W)`` bool, True = lesion; distances and tolerances are in pixels of the array they refer to.

The target layer of every member is ``member.target_layer`` (``backbone.layer4[-1]``, stride 32, for ResNets;
``backbone.blocks[4]``, stride 16, for EfficientNet-Lite) unless a module name is given. The pointing game's
default tolerance is one cell of the target layer's feature map, measured from its shape during the call.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.atomic import atomic_path, write_json
from scripts.imageio import read_mask_png, read_roi_png
from scripts.schema import unique_case

logger = logging.getLogger(__name__)

METHODS = {
    "hirescam": "HiResCAM",
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
TARGETS = ("malignant", "predicted")
CLASS_NAMES = ("benign", "malignant")
MALIGNANT = 1
FEATURE_STRIDE = 32  # default tolerance (px) of the pure pointing_game function: one cell of a stride-32 map
BOOTSTRAP_RESAMPLES = 2000  # percentile-bootstrap CIs of the localisation table
RANDOMISATION_MODES = ("cascading", "full")
_EPS = 1e-8
AMP_DTYPE = torch.bfloat16  # as scripts.inferers.AutocastInferer's default, on CPU and CUDA


# ---------------------------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------------------------


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each map of ``(..., H, W)`` to [0, 1]; NaN/inf become 0 and a flat map becomes all zeros."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    maps = np.maximum(maps, 0.0)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    rng = maps.max(axis=(-2, -1), keepdims=True) - lo
    out = np.where(rng > _EPS, (maps - lo) / np.maximum(rng, _EPS), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class CAMResult(NamedTuple):
    """Output of :class:`EnsembleCAM`: ``maps`` (B, H, W), ``member_maps`` (K, B, H, W), ``probs`` (B, C)."""

    maps: np.ndarray
    member_maps: np.ndarray
    probs: np.ndarray


def ensemble_members(ensemble: nn.Module) -> list[nn.Module]:
    """The member networks of an :class:`~scripts.network.Ensemble` (DDP-wrapped or not), or ``[model]``."""
    ensemble = getattr(ensemble, "module", ensemble)
    members = getattr(ensemble, "members", None)
    return list(members) if members is not None else [ensemble]


def _target_layer(member: nn.Module, name: str | None = None) -> nn.Module:
    member = getattr(member, "module", member)
    if name:
        modules = dict(member.named_modules())
        if name not in modules:
            raise ValueError(
                f"no module {name!r} in {type(member).__name__} (e.g. 'backbone.blocks.4', 'backbone.bn2')"
            )
        return modules[name]
    layer = getattr(member, "target_layer", None)
    if layer is None:
        raise TypeError(f"{type(member).__name__} has no 'target_layer' (expected a scripts.network.GrayClassifier)")
    return layer


class EnsembleCAM:
    """Grad-CAM family maps for an ensemble: one pytorch-grad-cam object per member, built once and reused.

    Args:
        ensemble: an :class:`~scripts.network.Ensemble` (or a single member network).
        method: ``"hirescam"`` (gradient x activation per cell, Draelos & Carin 2020; identical to Grad-CAM at a
            last layer followed by global pooling and a linear head), ``"gradcam"``, ``"gradcam++"``,
            ``"eigencam"`` (class-agnostic: ignores ``target``) or ``"layercam"``.
        layer: the target layer's module name inside a member (e.g. ``"backbone.bn2"``); ``None``: the member's
            ``target_layer``.
        target: ``"malignant"`` (class 1's logit) or ``"predicted"`` (the ensemble's predicted class, with
            P(malignant) >= ``threshold`` meaning malignant); every member explains the same class.
        freeze: during a call no parameter requires gradients and the backward pass stops at the target layer's
            output (a detached leaf): identical maps for far less time and memory. ``False`` lets every parameter
            require gradients and backpropagates through the whole network (the library's plain path).
            The original ``requires_grad`` flags and train/eval modes are restored after every call.
        threshold: decision threshold on P(malignant) for ``target="predicted"``.
        amp: run the forward pass under bfloat16 autocast (as ``AutocastInferer``) with a channels_last input;
            the target layer's activations and gradients are cast to float32 before the map is computed. 1.3x
            (224 px, 5 members) to 3x (512 px, 1 member) faster on CPU; maps correlate > 0.99 with float32 ones for
            ResNets, 0.94-0.99 for EfficientNet-Lite (its bf16 activations at ``bn2`` are 3-8 % off).

    Calling it with ``x`` ``(B, 1, H, W)`` returns a :class:`CAMResult`: the ensemble map (mean of the members'
    maps, renormalised to [0, 1]), the members' maps and the ensemble's probabilities. It works inside
    ``torch.no_grad()`` / ``torch.inference_mode()`` and under an outer autocast (ignored: ``amp`` decides). Hooks
    are attached only during a call, so the networks run hook-free in between (inference, export). Call
    :meth:`close` (or use it as a context manager) when done.
    """

    def __init__(
        self,
        ensemble: nn.Module,
        method: str = "hirescam",
        target: str = "malignant",
        freeze: bool = True,
        threshold: float = 0.5,
        amp: bool = False,
        layer: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        import pytorch_grad_cam

        self.method, self.target, self.freeze, self.threshold = method, target, bool(freeze), float(threshold)
        self.amp = bool(amp)
        self.members = ensemble_members(ensemble)
        self.layers = [_target_layer(m, layer) for m in self.members]
        names = {mod: name for name, mod in getattr(self.members[0], "module", self.members[0]).named_modules()}
        self.layer_name: str = layer or names.get(self.layers[0], type(self.layers[0]).__name__)
        self.cell_px: tuple[float, float] | None = None
        self._feature_hw: tuple[int, int] | None = None
        cam_cls = getattr(pytorch_grad_cam, METHODS[method])
        modes = [m.training for m in self.members]
        self.cams = [cam_cls(model=m, target_layers=[layer]) for m, layer in zip(self.members, self.layers)]
        for m, mode in zip(self.members, modes):  # BaseCAM's constructor switches to eval; give the mode back
            m.train(mode)
        self._detach_hooks()

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    # hooks live only during a call: inference between calls runs without storing activations
    def _attach_hooks(self) -> None:
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

        for cam, layer in zip(self.cams, self.layers):
            if not cam.activations_and_grads.handles:
                cam.activations_and_grads = ActivationsAndGradients(cam.model, [layer], cam.reshape_transform, True)

    def _detach_hooks(self) -> None:
        for cam in self.cams:
            cam.activations_and_grads.release()
            cam.outputs = None

    def _set_flags(self) -> list[tuple[nn.Parameter, bool]]:
        saved = []
        for member in self.members:
            for p in member.parameters():
                saved.append((p, p.requires_grad))
                p.requires_grad_(not self.freeze)
        return saved

    def _cut(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        """Forward hook on the target layer, registered before the library's: float32 output, and with ``freeze``
        a detached leaf, so that gradients are computed for the head only."""
        self._feature_hw = (int(out.shape[-2]), int(out.shape[-1]))
        return out.detach().float().requires_grad_(True) if self.freeze else out.float()

    def __call__(self, x: torch.Tensor, classes: Sequence[int] | None = None) -> CAMResult:
        """Maps for ``x`` ``(B, 1, H, W)`` in [0, 1]; ``classes`` (one per image) overrides ``target``."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self.cams is None:
            raise RuntimeError("EnsembleCAM is closed")
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected x of shape (B, 1, H, W), got {tuple(x.shape)}")
        device = self.device
        modes = [m.training for m in self.members]
        flags = self._set_flags()
        cuts = [layer.register_forward_hook(self._cut) for layer in self.layers]
        fmt = torch.channels_last if self.amp else torch.contiguous_format
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, AMP_DTYPE, self.amp):
                x = x.detach().to(device=device, dtype=torch.float32).clone(memory_format=fmt)  # not an inference one
                for m in self.members:
                    m.eval()
                probs = None
                if classes is not None:
                    classes = [int(c) for c in classes]
                    if len(classes) != x.shape[0]:
                        raise ValueError(f"{len(classes)} classes for a batch of {x.shape[0]}")
                elif self.target == "predicted":
                    with torch.no_grad():
                        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
                    classes = (probs[:, MALIGNANT] >= self.threshold).long().tolist()
                else:
                    classes = [MALIGNANT] * x.shape[0]
                targets = [ClassifierOutputTarget(int(c)) for c in classes]
                self._attach_hooks()
                member_maps, member_probs = [], []
                for cam in self.cams:
                    maps = cam(input_tensor=x, targets=targets)
                    member_maps.append(normalise_maps(maps))
                    member_probs.append(torch.softmax(cam.outputs.detach().float(), dim=1))
                    cam.outputs = None  # drop the graph now, not at the next call
                    cam.activations_and_grads.clear()
                    cam.model.zero_grad(set_to_none=True)
                if probs is None:
                    probs = torch.stack(member_probs).mean(0)
        finally:
            self._detach_hooks()
            for h in cuts:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in zip(self.members, modes):
                m.train(mode)
        if self._feature_hw is not None:
            self.cell_px = (x.shape[-2] / self._feature_hw[0], x.shape[-1] / self._feature_hw[1])
        stacked = np.stack(member_maps)  # (K, B, H, W)
        return CAMResult(normalise_maps(stacked.mean(0)), stacked, probs.cpu().numpy().astype(np.float32))

    def close(self) -> None:
        """Release the hooks and the CAM objects (flags and modes are already restored after each call)."""
        if self.cams is not None:
            self._detach_hooks()
            self.cams = None

    def __enter__(self) -> "EnsembleCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# localisation metrics (pure numpy)
# ---------------------------------------------------------------------------------------------------------------


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
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("mask is empty")
    return distance_transform_edt(~mask)


def pointing_game(cam: np.ndarray, mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE) -> bool:
    """Pointing game (Zhang et al., ECCV 2016): a hit if the map's maximum lies within ``tolerance_px`` pixels
    (Euclidean) of the mask. Default tolerance: one feature-map cell, 32 px at the network input. A flat map
    points nowhere and is a miss; ties take the first maximum in row-major order."""
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
    """IoU of the binarised map ``cam >= threshold`` (maps are normalised so this is relative to the peak) with
    the mask (Saporta et al., 2022)."""
    cam, mask = _check_pair(cam, mask)
    pred = cam >= threshold
    return float(np.logical_and(pred, mask).sum() / np.logical_or(pred, mask).sum())


def chance_levels(mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE) -> dict[str, float]:
    """What uninformative maps score: ``area_fraction`` (energy-in-mask of a uniform map, and IoU of a map
    selecting every pixel), ``pointing`` (hit probability of a uniformly random point: the fraction of pixels
    within ``tolerance_px`` of the mask) and ``centre`` (1.0 if a map peaking at the ROI's centre is a hit: a
    location prior, since ROIs are usually cropped around the lesion)."""
    mask = np.asarray(mask) > 0
    dist = distance_to_mask(mask)
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    centre = float(np.sqrt(((rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2).min()) <= tolerance_px)
    return {"area_fraction": float(mask.mean()), "pointing": float((dist <= tolerance_px).mean()), "centre": centre}


def localisation_metrics(
    cam: np.ndarray, mask: np.ndarray, tolerance_px: float = FEATURE_STRIDE, iou_threshold: float = 0.5
) -> dict[str, float]:
    """All metrics of one map against its mask, with chance levels: ``hit``, ``energy``, ``iou``,
    ``chance_area``, ``chance_pointing``, ``centre_hit`` (the centre prior's hit), ``tolerance_px``."""
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


def localisation_table(records: Sequence[dict], class_names: Sequence[str] = CLASS_NAMES) -> dict[str, dict]:
    """Aggregate per-ROI records (keys ``label``, ``correct`` and those of :func:`localisation_metrics`).

    Groups: ``all``, ``correct``, ``misclassified``, each class name, and ``<class>/correct``,
    ``<class>/misclassified``. Each group gives ``n``, the mean of each metric with its 95 % bootstrap CI and its
    chance level, whether it is above chance (see :func:`_summarise`) and the centre prior's pointing game
    (``None`` for an empty group). Records without a label count only in ``all``.
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


# ---------------------------------------------------------------------------------------------------------------
# randomisation sanity check (Adebayo et al., NeurIPS 2018)
# ---------------------------------------------------------------------------------------------------------------


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a.ravel())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > _EPS else 0.0


def _ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al., 2004) of two maps in [0, 1], Gaussian window of ``sigma`` pixels."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    var_a = gaussian_filter(a * a, sigma) - mu_a**2
    var_b = gaussian_filter(b * b, sigma) - mu_b**2
    cov = gaussian_filter(a * b, sigma) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Similarity of two ``(H, W)`` maps: Spearman rank correlation, Pearson correlation and mean SSIM.
    Correlations with a flat map are 0 (1 if both maps are identical)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if np.array_equal(a, b):
        return {"spearman": 1.0, "pearson": 1.0, "ssim": 1.0}
    return {"spearman": _pearson(_ranks(a), _ranks(b)), "pearson": _pearson(a, b), "ssim": _ssim(a, b)}


def _blocks_top_down(member: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    member = getattr(member, "module", member)
    if hasattr(member, "stages"):  # scripts.network.GrayClassifier: head first, stem last
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
    import copy

    if mode not in RANDOMISATION_MODES:
        raise ValueError(f"mode must be one of {RANDOMISATION_MODES}, got {mode!r}")
    if target == "predicted":  # the randomised copies explain the class the trained ensemble predicted
        members = ensemble_members(ensemble)
        with torch.no_grad():
            x = images.to(next(members[0].parameters()).device).float()
            probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in members]).mean(0)
        classes = (probs[:, MALIGNANT] >= threshold).long().tolist()
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


# ---------------------------------------------------------------------------------------------------------------
# outputs: NIfTI, overlays, gallery
# ---------------------------------------------------------------------------------------------------------------


def _spacing_xy(spacing_mm: float | Sequence[float] | None) -> tuple[float, float]:
    """(x = column pitch, y = row pitch) in mm from a scalar or a (row, column) pair, as DICOM PixelSpacing."""
    if spacing_mm is None:
        return 1.0, 1.0
    if isinstance(spacing_mm, (int, float)):
        return float(spacing_mm), float(spacing_mm)
    row, col = (float(v) for v in spacing_mm)
    return col, row


def save_map_nifti(path: str | Path, cam: np.ndarray, spacing_mm: float | Sequence[float] | None) -> Path:
    """Write an ``(H, W)`` map as gzipped NIfTI, atomically.

    NIfTI's first axis is x (columns), so the array is stored as ``(W, H)`` with the affine
    ``diag(col_pitch, row_pitch, 1, 1)`` in mm; ``np.asarray(nib.load(path).dataobj).T`` gives the ``(H, W)`` map.
    """
    import nibabel as nib

    sx, sy = _spacing_xy(spacing_mm)
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(cam, dtype=np.float32).T), np.diag([sx, sy, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"saliency map, [0,1]"
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(img.to_bytes(), compresslevel=6))
    return Path(path)


def _heat_rgb(cam: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3].astype(np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def render_overlay(
    roi: np.ndarray, cam: np.ndarray, lines: Sequence[str], mask: np.ndarray | None = None, min_size: int = 256
) -> np.ndarray:
    """RGB uint8 image: a text band over [ROI in gray | ROI with the heat map (and the mask's outline)].

    Small ROIs are enlarged by an integer factor (nearest neighbour) to at least ``min_size`` pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, math.ceil(min_size / max(roi.shape)))
    if scale > 1:
        roi = np.kron(roi, np.ones((scale, scale), dtype=np.float32))
        cam = np.kron(cam, np.ones((scale, scale), dtype=np.float32))
        mask = None if mask is None else np.kron(mask, np.ones((scale, scale), dtype=bool))
    gray = np.repeat(np.clip(roi, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    alpha = 0.6 * np.clip(cam, 0, 1)[..., None]
    over = (1 - alpha) * gray + alpha * _heat_rgb(cam)
    if mask is not None:
        over[_outline(mask)] = (0.0, 1.0, 0.0)
    h, w = roi.shape
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    line_h, gap = 18, 4
    band = line_h * len(lines) + 6
    canvas = np.zeros((band + h, 2 * w + gap, 3), dtype=np.float32)
    canvas[band:, :w] = gray
    canvas[band:, w + gap :] = over
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i, text in enumerate(lines):
        draw.text((4, 3 + i * line_h), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


OUTCOMES = (
    ("malignant, correct (TP)", 1, True),
    ("benign, correct (TN)", 0, True),
    ("malignant, misclassified (FN)", 1, False),
    ("benign, misclassified (FP)", 0, False),
)


def _thumb(a: np.ndarray, size: int = 128) -> np.ndarray:
    from PIL import Image

    h, w = a.shape
    s = size / max(h, w)
    if s >= 1:
        return a.astype(np.float32)
    return np.asarray(
        Image.fromarray(a.astype(np.float32), mode="F").resize((max(1, round(w * s)), max(1, round(h * s))))
    )


def save_gallery(path: str | Path, groups: dict[str, list[dict]], per_group: int, title: str = "") -> Path:
    """Figure with one row per non-empty outcome group (``{name: [{"roi", "cam", "mask" or None, "case", "prob"},
    ...]}``); groups without cases get no row but are named under the title. The mask's outline is drawn in green.
    Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    empty = [name for name, exs in groups.items() if not exs]
    names = [name for name, exs in groups.items() if exs] or ["no ROIs"]
    if empty:
        title = (title + "\n" if title else "") + "no cases: " + ", ".join(empty)
    cols = max(1, per_group)
    fig = Figure(figsize=(2.2 * cols + 1.2, 2.4 * len(names) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), cols, squeeze=False)
    for r, name in enumerate(names):
        exs = groups.get(name, [])
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(exs):
                ex = exs[c]
                ax.imshow(ex["roi"], cmap="gray", vmin=0, vmax=1)
                ax.imshow(ex["cam"], cmap="jet", vmin=0, vmax=1, alpha=0.45)
                if ex.get("mask") is not None:
                    ax.contour(ex["mask"], levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(f"{ex['case']}\nP(malig.)={ex['prob']:.2f}", fontsize=8)
            elif c == 0 and not exs:
                ax.text(0.5, 0.5, "no ROIs", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# workflow
# ---------------------------------------------------------------------------------------------------------------


def load_weights(network: nn.Module, path: str | Path | None) -> nn.Module:
    """Load a state-dict file (e.g. the bundle's ``models/model.pt``) strictly into ``network`` and return it;
    ``path=None`` returns ``network`` unchanged (weights already loaded by the merged config)."""
    if path is None or str(path).lower() in ("", "none"):
        return network
    from scripts.network import WeightsError, load_state_dict_file

    target = getattr(network, "module", network)
    try:
        target.load_state_dict(load_state_dict_file(path))
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not match the network ({type(target).__name__}): {e}") from None
    logger.info("saliency: weights loaded from %s", path)
    return network


def _safe_name(case: str, used: set[str]) -> str:
    """A unique file-name stem for ``case`` (characters other than ``A-Za-z0-9._-`` become ``_``)."""
    return unique_case(re.sub(r"[^A-Za-z0-9._-]", "_", str(case)).strip(".") or "case", used)


def _input_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return int(image_size), int(image_size)
    h, w = (int(v) for v in image_size)
    return h, w


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, 1, H, W)`` to the network input with ``area`` interpolation, as the inference preprocessing
    (``scripts.transforms.LoadROId``) does, so that probabilities match the inference workflow's."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="area")


def _batches(items: Sequence[dict], batch_size: int, size: tuple[int, int] | None):
    """Yield lists of ``(item, roi (H, W))`` whose network inputs share one shape, at most ``batch_size`` long."""
    batch: list[tuple[dict, np.ndarray]] = []
    shape = None
    for item in items:
        roi = read_roi_png(item["image"])
        s = size or roi.shape
        if batch and (len(batch) >= batch_size or s != shape):
            yield batch
            batch = []
        batch.append((item, roi))
        shape = s
    if batch:
        yield batch


def run_saliency(
    items: Sequence[dict],
    ensemble: nn.Module,
    out_dir: str | Path,
    method: str = "hirescam",
    target: str = "malignant",
    threshold: float = 0.5,
    batch_size: int = 4,
    image_size: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    iou_threshold: float = 0.5,
    tolerance_cells: float = 1.0,
    class_names: Sequence[str] = CLASS_NAMES,
    gallery_per_group: int = 4,
    randomisation: str | None = "cascading",
    randomisation_images: int = 4,
    default_spacing_mm: float | None = None,
    freeze: bool = True,
    amp: bool = False,
    log_every: int = 20,
    seed: int = 0,
    layer: str | None = None,
) -> dict[str, Any]:
    """Saliency workflow over datalist items (absolute paths, as :func:`scripts.schema.load_split` returns).

    For each ROI: ``overlays/<case>.png`` (ROI, heat map, P(malignant), prediction, true label, case id) and
    ``maps/<case>.nii.gz`` (the map at the ROI's shape and pixel spacing); localisation metrics when the item has
    a non-empty mask of the ROI's shape. Then ``gallery.png`` (outcome groups) and ``localisation.json``
    (settings, table, per-ROI rows, randomisation check). Filenames use the anonymous case id only.

    Args:
        threshold: decision threshold on P(malignant): predicted class, correct/misclassified, and the class
            explained when ``target="predicted"``.
        image_size: network input size (int or (H, W)); ROIs are resized to it (``area``, as in inference) and
            maps resized back to the ROI (bilinear).
            ``None`` feeds ROIs at their own size (consecutive ROIs of one size are batched together).
        iou_threshold: map threshold for the IoU.
        tolerance_cells: pointing-game tolerance in cells of the target layer's feature map (1 cell = 16 px of
            network input for EfficientNet-Lite's default layer, 32 px for ResNets', converted to ROI pixels).
        randomisation: ``"cascading"``, ``"full"`` or ``None`` / ``"none"`` (skip) for :func:`randomisation_check`
            on the first ``randomisation_images`` ROIs (those of the first input shape).
        default_spacing_mm: pitch for items without ``spacing_mm`` (1.0 with a warning when both are missing).
        freeze, amp, layer: passed to :class:`EnsembleCAM` (``amp``: autocast forward, float32 maps; ``layer``: the
            target layer's module name, ``None`` for the members' ``target_layer``).

    Returns a summary: counts, tolerance, the localisation table, the randomisation result and output paths.
    """
    if randomisation is not None and str(randomisation).lower() in ("", "none", "false", "off"):
        randomisation = None  # "none" from a command line
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    size = _input_size(image_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ensemble = ensemble.to(device).eval()
    t0 = time.time()
    rows: list[dict] = []
    records: list[dict] = []
    used: set[str] = set()
    gallery: dict[str, list[dict]] = {name: [] for name, _, _ in OUTCOMES}
    gallery_unlabelled: list[dict] = []
    rand_inputs: list[torch.Tensor] = []
    rand_maps: list[np.ndarray] = []
    warned_spacing = False
    n_total = len(items)
    logger.info("saliency: %d ROIs, method=%s target=%s, output %s", n_total, method, target, out_dir)
    cell_px: tuple[float, float] | None = None
    cam_args = {"method": method, "target": target, "threshold": threshold, "amp": amp, "layer": layer}
    with EnsembleCAM(ensemble, freeze=freeze, **cam_args) as cam:
        layer_name = cam.layer_name
        for batch in _batches(items, batch_size, size):
            x = torch.cat([_resize(torch.from_numpy(roi)[None, None], size or roi.shape) for _, roi in batch])
            res = cam(x)
            cell_px = cell_px or cam.cell_px
            if (
                randomisation
                and len(rand_inputs) < randomisation_images
                and (not rand_inputs or rand_inputs[0].shape[-2:] == x.shape[-2:])
            ):
                k = randomisation_images - len(rand_inputs)
                rand_inputs.extend(x[:k])
                rand_maps.extend(res.maps[:k])
            for i, (item, roi) in enumerate(batch):
                cam_map = res.maps[i]
                if cam_map.shape != roi.shape:
                    t = torch.from_numpy(cam_map)[None, None]
                    cam_map = F.interpolate(t, size=roi.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
                    cam_map = np.clip(cam_map, 0.0, 1.0)
                prob = float(res.probs[i, MALIGNANT])
                pred = int(prob >= threshold)
                label = item.get("label")
                label = None if label is None else int(label)
                correct = None if label is None else bool(pred == label)
                case = str(item["case"])
                name = _safe_name(case, used)
                spacing = item.get("spacing_mm", default_spacing_mm)
                if spacing is None and not warned_spacing:
                    logger.warning("saliency: items without spacing_mm: NIfTI maps written with 1.0 mm pitch")
                    warned_spacing = True
                mask = None
                loc = None
                if item.get("mask"):
                    mask = read_mask_png(item["mask"])
                    if mask.shape != roi.shape:
                        logger.warning("saliency: case %s: mask %s != ROI %s, skipped", case, mask.shape, roi.shape)
                        mask = None
                    elif not mask.any():
                        logger.warning("saliency: case %s: empty mask, no localisation metrics", case)
                        mask = None
                if mask is not None:
                    in_h, in_w = x.shape[-2:]
                    scale = math.sqrt((roi.shape[0] / in_h) * (roi.shape[1] / in_w))
                    tol = tolerance_cells * math.sqrt(cam.cell_px[0] * cam.cell_px[1]) * scale
                    loc = localisation_metrics(cam_map, mask, tol, iou_threshold)
                    records.append({"case": case, "label": label, "correct": correct, **loc})
                save_map_nifti(out_dir / "maps" / f"{name}.nii.gz", cam_map, spacing)
                lines = [
                    f"case {case}   {method} ({'class-agnostic' if method == 'eigencam' else target})",
                    f"P(malignant) = {prob:.3f}   predicted: {class_names[pred]}",
                    f"true: {class_names[label] if label is not None else 'unknown'}"
                    + ("" if correct is None else ("   correct" if correct else "   MISCLASSIFIED")),
                ]
                _save_png(out_dir / "overlays" / f"{name}.png", render_overlay(roi, cam_map, lines, mask))
                row = {
                    "case": case,
                    "label": label,
                    "prob_malignant": prob,
                    "pred": pred,
                    "correct": correct,
                    "overlay": f"overlays/{name}.png",
                    "map": f"maps/{name}.nii.gz",
                }
                if loc is not None:
                    row.update(loc)
                rows.append(row)
                ex = None
                if label is None:
                    if len(gallery_unlabelled) < gallery_per_group:
                        ex = gallery_unlabelled
                else:
                    for gname, glabel, gcorrect in OUTCOMES:
                        if glabel == label and gcorrect == correct and len(gallery[gname]) < gallery_per_group:
                            ex = gallery[gname]
                if ex is not None:
                    thumb_mask = None if mask is None else _thumb(mask.astype(np.float32))
                    ex.append(
                        {"roi": _thumb(roi), "cam": _thumb(cam_map), "mask": thumb_mask, "case": case, "prob": prob}
                    )
            done = len(rows)
            if done == n_total or done % max(1, log_every) < len(batch):
                rate = done / max(time.time() - t0, 1e-6)
                logger.info(
                    "saliency: %d/%d ROIs (%.2f ROI/s, ~%.0f s left)", done, n_total, rate, (n_total - done) / rate
                )
    if gallery_unlabelled:
        if not any(gallery.values()):  # no labels at all: one row
            gallery = {}
        gallery["label unknown"] = gallery_unlabelled
    save_gallery(
        out_dir / "gallery.png",
        gallery,
        gallery_per_group,
        title=f"{method} ({'class-agnostic' if method == 'eigencam' else 'target: ' + target}), "
        f"threshold {threshold:.3f}",
    )
    rand = None
    if randomisation and rand_inputs:
        rand = randomisation_check(
            ensemble,
            torch.stack(rand_inputs),
            mode=randomisation,
            seed=seed,
            original_maps=np.stack(rand_maps),
            **cam_args,
        )
    counts = {"n": len(rows), "with_mask": len(records)}
    for gname, glabel, gcorrect in OUTCOMES:
        counts[gname] = sum(1 for r in rows if r["label"] == glabel and r["correct"] == gcorrect)
    counts["label unknown"] = sum(1 for r in rows if r["label"] is None)
    in_size = list(size) if size is not None else None
    settings = {
        "method": method,
        "target": "class-agnostic" if method == "eigencam" else target,
        "threshold": threshold,
        "iou_threshold": iou_threshold,
        "layer": layer_name,
        "cell_px": None if cell_px is None else list(cell_px),
        "tolerance": f"{tolerance_cells:g} feature-map cell(s)"
        + (
            ""
            if cell_px is None
            else f" = {tolerance_cells * math.sqrt(cell_px[0] * cell_px[1]):g} px of network input"
        )
        + ", converted to ROI pixels",
        "image_size": in_size,
        "freeze": freeze,
        "amp": amp,
        "chance": "uniform map: energy and IoU = mask area fraction; random point: pointing = fraction of pixels "
        "within tolerance of the mask; centre prior: a map peaking at the ROI centre",
        "ci": f"95 % percentile bootstrap over ROIs ({BOOTSTRAP_RESAMPLES} resamples)",
    }
    table = localisation_table(records, class_names)
    write_json(
        out_dir / "localisation.json",
        {"settings": settings, "counts": counts, "table": table, "randomisation": rand, "cases": rows},
    )
    elapsed = time.time() - t0
    logger.info("saliency: done, %d ROIs in %.1f s; outputs in %s", len(rows), elapsed, out_dir)
    return {
        "settings": settings,
        "counts": counts,
        "localisation": table,
        "randomisation": rand,
        "seconds": elapsed,
        "outputs": {
            "dir": str(out_dir),
            "gallery": str(out_dir / "gallery.png"),
            "localisation": str(out_dir / "localisation.json"),
            "overlays": str(out_dir / "overlays"),
            "maps": str(out_dir / "maps"),
        },
    }
