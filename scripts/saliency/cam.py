"""The ensemble CAM engine: Grad-CAM family maps (pytorch-grad-cam) for every member of an ensemble.

Shapes and units:

- network input ``x``: ``(B, 1, H, W)`` float in [0, 1] (the ROI, resized to the network's input size);
- maps: ``(B, H, W)`` float32 in [0, 1] (min-max normalised per image, a flat map is all zeros).

The target layer of every member is ``member.target_layer`` (``backbone.layer4[-1]``, stride 32, for ResNets;
``backbone.blocks[4]``, stride 16, for EfficientNet-Lite) unless a module name is given.

pytorch-grad-cam is used through its public API only: one context-managed CAM object per member, created for each
call and closed at its end (so hooks exist only during a call). The frozen path's backward cut is our own forward
hook on the target layer (:class:`TargetLayerCut`), registered before the library's.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

METHODS = {
    "hirescam": "HiResCAM",
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
TARGETS = ("malignant", "predicted")
MALIGNANT = 1
AMP_DTYPE = torch.bfloat16  # as scripts.model.inferers.AutocastInferer's default, on CPU and CUDA
_EPS = 1e-8


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
    """The member networks of an :class:`~scripts.model.network.Ensemble` (DDP-wrapped or not), or ``[model]``."""
    ensemble = getattr(ensemble, "module", ensemble)
    members = getattr(ensemble, "members", None)
    return list(members) if members is not None else [ensemble]


def target_layer(member: nn.Module, name: str | None = None) -> nn.Module:
    """The saliency target layer of one ensemble member.

    Args:
        member: a :class:`~scripts.model.network.GrayClassifier` (DDP-wrapped or not).
        name: a module name in ``member`` (e.g. ``"backbone.blocks.4"``); ``None`` or empty: its ``target_layer``.

    Raises:
        ValueError: ``member`` has no module ``name``.
        TypeError: no ``name`` and ``member`` has no ``target_layer``.
    """
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
        raise TypeError(
            f"{type(member).__name__} has no 'target_layer' (expected a scripts.model.network.GrayClassifier)"
        )
    return layer


def ensemble_probabilities(ensemble: nn.Module, member_probs: torch.Tensor) -> torch.Tensor:
    """The ensemble's ``(B, C)`` probabilities from its members' ``(K, B, C)``: ``ensemble.combine`` (an
    :class:`~scripts.model.network.Ensemble`, calibrated when it was built with a calibration), else their mean."""
    combine = getattr(ensemble, "combine", None)
    return combine(member_probs) if callable(combine) else member_probs.mean(0)


def predicted_classes(
    members: Sequence[nn.Module], x: torch.Tensor, threshold: float, ensemble: nn.Module | None = None
) -> list[int]:
    """The ensemble's predicted class per image, without gradients.

    Args:
        members: the member networks (:func:`ensemble_members`).
        x: the images ``(B, 1, H, W)``, moved to the members' device.
        threshold: malignant when the ensemble's P(malignant) (:func:`ensemble_probabilities`) is at least this.
        ensemble: combines the members' probabilities (``None``: their mean).

    Returns:
        One class index per image (1: malignant).
    """
    with torch.no_grad():
        x = x.to(next(members[0].parameters()).device).float()
        member_probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in members])
        probs = ensemble_probabilities(ensemble, member_probs)
    return (probs[:, MALIGNANT] >= threshold).long().tolist()


class TargetLayerCut:
    """Forward hooks on the target layers that give the CAM a float32 output and, with ``freeze``, a detached leaf.

    Why it exists: with ``freeze`` the backward pass then stops at the target layer, so gradients are computed for
    the head only; the maps are identical to the plain path's (tests/test_saliency.py), for a fraction of its time
    and memory (docs/saliency.md). pytorch-grad-cam has no public option for this, so the cut is a plain
    ``torch`` forward hook, registered before the CAM objects' own hooks (hooks run in registration order, so the
    library stores the cut tensor and its gradient). Use as a context manager around the CAM objects' lifetime;
    ``feature_hw`` is the target layer's last output ``(h, w)`` in cells.

    Args:
        layers: the target layer of each member.
        freeze: detach the target layers' outputs, so that the backward pass computes the head's gradients only.
    """

    def __init__(self, layers: Sequence[nn.Module], freeze: bool) -> None:
        self.layers, self.freeze = list(layers), bool(freeze)
        self.feature_hw: tuple[int, int] | None = None
        self._handles: list[Any] = []

    def _hook(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        self.feature_hw = (int(out.shape[-2]), int(out.shape[-1]))
        return out.detach().float().requires_grad_(True) if self.freeze else out.float()

    def __enter__(self) -> "TargetLayerCut":
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class EnsembleCAM:
    """Grad-CAM family maps for an ensemble: one pytorch-grad-cam object per member and call.

    Args:
        ensemble: an :class:`~scripts.model.network.Ensemble` (or a single member network).
        method: ``"hirescam"`` (gradient x activation per cell, Draelos & Carin 2020; identical to Grad-CAM at a
            last layer followed by global pooling and a linear head), ``"gradcam"``, ``"gradcam++"``,
            ``"eigencam"`` (class-agnostic: ignores ``target``) or ``"layercam"``.
        target: ``"malignant"`` (class 1's logit) or ``"predicted"`` (the ensemble's predicted class, with
            P(malignant) >= ``threshold`` meaning malignant); every member explains the same class.
        freeze: during a call no parameter requires gradients and the backward pass stops at the target layer's
            output (:class:`TargetLayerCut`): identical maps for far less time and memory. ``False`` lets every
            parameter require gradients and backpropagates through the whole network (the library's plain path).
            The original ``requires_grad`` flags and train/eval modes are restored after every call.
        threshold: decision threshold on P(malignant) for ``target="predicted"``.
        amp: run the forward pass under bfloat16 autocast (as ``AutocastInferer``) with a channels_last input;
            the target layer's activations and gradients are cast to float32 before the map is computed. Never
            for EfficientNet-Lite in the bundle (:func:`scripts.model.inferers.saliency_amp`).
        layer: the target layer's module name inside a member (e.g. ``"backbone.bn2"``); ``None``: the member's
            ``target_layer``.

    Calling it with ``x`` ``(B, 1, H, W)`` returns a :class:`CAMResult`: the ensemble map (mean of the members'
    maps, renormalised to [0, 1]), the members' maps and the ensemble's probabilities. It works inside
    ``torch.no_grad()`` / ``torch.inference_mode()`` and under an outer autocast (ignored: ``amp`` decides). No
    hook outlives a call, so the networks run hook-free in between (inference, export). ``cell_px`` is the
    target layer's cell in input pixels ``(rows, cols)`` after the first call.
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
        import pytorch_grad_cam  # optional heavy dependency (grad-cam): loaded only when maps are computed

        self.method, self.target, self.freeze, self.threshold = method, target, bool(freeze), float(threshold)
        self.amp = bool(amp)
        self.ensemble = ensemble
        self.members = ensemble_members(ensemble)
        self.layers = [target_layer(m, layer) for m in self.members]
        names = {mod: name for name, mod in getattr(self.members[0], "module", self.members[0]).named_modules()}
        self.layer_name: str = layer or names.get(self.layers[0], type(self.layers[0]).__name__)
        self.cell_px: tuple[float, float] | None = None
        self._cam_cls = getattr(pytorch_grad_cam, METHODS[method])
        self._closed = False

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    def _member_map(self, member: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list) -> tuple:
        """One member's maps ``(B, H, W)`` and probabilities ``(B, C)`` from a CAM object living for this call."""
        with self._cam_cls(model=member, target_layers=[layer]) as cam:
            maps = normalise_maps(cam(input_tensor=x, targets=targets))
            probs = torch.softmax(cam.outputs.detach().float(), dim=1)
        member.zero_grad(set_to_none=True)
        return maps, probs

    def __call__(self, x: torch.Tensor, classes: Sequence[int] | None = None) -> CAMResult:
        """Maps for ``x`` ``(B, 1, H, W)`` in [0, 1]; ``classes`` (one per image) overrides ``target``."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # optional heavy dependency (grad-cam)

        if self._closed:
            raise RuntimeError("EnsembleCAM is closed")
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected x of shape (B, 1, H, W), got {tuple(x.shape)}")
        device = self.device
        modes = [m.training for m in self.members]
        flags = [(p, p.requires_grad) for m in self.members for p in m.parameters()]
        fmt = torch.channels_last if self.amp else torch.contiguous_format
        cut = TargetLayerCut(self.layers, self.freeze)
        try:
            for p, _ in flags:
                p.requires_grad_(not self.freeze)
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, AMP_DTYPE, self.amp):
                x = x.detach().to(device=device, dtype=torch.float32).clone(memory_format=fmt)  # not an inference one
                for m in self.members:
                    m.eval()
                if classes is not None:
                    classes = [int(c) for c in classes]
                    if len(classes) != x.shape[0]:
                        raise ValueError(f"{len(classes)} classes for a batch of {x.shape[0]}")
                elif self.target == "predicted":
                    classes = predicted_classes(self.members, x, self.threshold, self.ensemble)
                else:
                    classes = [MALIGNANT] * x.shape[0]
                targets = [ClassifierOutputTarget(int(c)) for c in classes]
                with cut:
                    results = [self._member_map(m, layer, x, targets) for m, layer in zip(self.members, self.layers)]
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in zip(self.members, modes):
                m.train(mode)
        if cut.feature_hw is not None:
            self.cell_px = (x.shape[-2] / cut.feature_hw[0], x.shape[-1] / cut.feature_hw[1])
        stacked = np.stack([maps for maps, _ in results])  # (K, B, H, W)
        probs = ensemble_probabilities(self.ensemble, torch.stack([p for _, p in results]))
        return CAMResult(normalise_maps(stacked.mean(0)), stacked, probs.cpu().numpy().astype(np.float32))

    def close(self) -> None:
        """Mark the engine closed (no hook or CAM object outlives a call; flags and modes are already restored)."""
        self._closed = True

    def __enter__(self) -> "EnsembleCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
