"""Networks: a torchvision ResNeXt for grayscale ROIs, its initialisation, and the ensemble of fold members.

Shapes: inputs are ``(B, 1, H, W)`` float ROIs scaled to [0, 1] (any H, W >= 32); a member returns logits
``(B, num_classes)``; the :class:`Ensemble` returns the mean of its members' softmax probabilities.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torchvision

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_CHOICES = ("scratch", "imagenet", "checkpoint")
OFFLINE_REMEDIES = (
    "Either (1) download the torchvision ImageNet weights file on a machine with network access and pass its "
    "path (init='imagenet', weights='/path/to/resnext50_32x4d-....pth'), or (2) run on a machine with network "
    "access so that torchvision can download them, or choose init='scratch' explicitly."
)


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or matched to the network."""


class GrayResNeXt(nn.Module):
    """torchvision ResNet-family classifier for one-channel ROIs.

    The grayscale input (``(B, 1, H, W)`` in [0, 1]) is repeated to three channels and normalised with the
    ImageNet mean and std, as the ImageNet weights expect. The Grad-CAM target layer is ``backbone.layer4[-1]``
    (stride 32).

    Args:
        arch: a torchvision ResNet-family constructor name (``resnext50_32x4d``, ``resnext101_32x8d``,
            ``resnet18``, ...).
        num_classes: classifier outputs.
    """

    __jit_unused_properties__ = ["target_layer"]

    def __init__(self, arch: str = "resnext50_32x4d", num_classes: int = 2) -> None:
        super().__init__()
        if not hasattr(torchvision.models, arch):
            raise ValueError(f"unknown torchvision architecture {arch!r}")
        self.arch = arch
        backbone = getattr(torchvision.models, arch)(weights=None)
        if not isinstance(getattr(backbone, "fc", None), nn.Linear) or not hasattr(backbone, "layer4"):
            raise ValueError(f"{arch!r} is not a ResNet-family network (needs .layer4 and .fc)")
        backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def target_layer(self) -> nn.Module:
        """The last bottleneck block: Grad-CAM's usual target layer."""
        return self.backbone.layer4[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return self.backbone(x)


class Ensemble(nn.Module):
    """K members of one architecture; ``forward`` returns the mean softmax probabilities ``(B, num_classes)``."""

    def __init__(self, num_members: int = 3, arch: str = "resnext50_32x4d", num_classes: int = 2) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.members = nn.ModuleList([GrayResNeXt(arch, num_classes) for _ in range(num_members)])

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's softmax probabilities, ``(K, B, num_classes)``."""
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_probabilities(x).mean(0)


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a state dict (or a MONAI checkpoint holding one under ``network``/``model``) with ``weights_only``.

    Raises :class:`WeightsError` naming the file when it is missing, truncated or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, ...
        raise WeightsError(f"cannot read weights file {path} (truncated, corrupt or not a PyTorch file): {e}")
    if isinstance(obj, dict):
        for key in ("network", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def transfer_weights(model: nn.Module, state: dict, source: str, prefix: str = "") -> list[str]:
    """Copy matching tensors from ``state`` into ``model``; return (and log) the keys left untouched.

    Keys are matched after adding ``prefix`` (e.g. ``"backbone."`` for plain torchvision state dicts). Tensors
    whose shape differs (a classifier head with another class count) are skipped and logged; a state dict that
    matches fewer than half of the model's tensors is refused as foreign.
    """
    own = model.state_dict()
    mapped = {prefix + k: v for k, v in state.items()}
    loaded, skipped_shape = {}, []
    for k, v in mapped.items():
        if k in own:
            if own[k].shape == v.shape:
                loaded[k] = v
            else:
                skipped_shape.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
    if len(loaded) < len(own) / 2:
        raise WeightsError(
            f"{source}: only {len(loaded)} of {len(own)} tensors match this {type(model).__name__}; "
            "wrong architecture or not a network state dict"
        )
    own.update(loaded)
    model.load_state_dict(own)
    not_loaded = sorted(set(own) - set(loaded))
    if skipped_shape:
        logger.info("%s: shape mismatch, kept freshly initialised: %s", source, "; ".join(skipped_shape))
    logger.info("%s: loaded %d tensors, %d left as initialised", source, len(loaded), len(not_loaded))
    return not_loaded


def _imagenet_state(arch: str, weights: str | None) -> tuple[dict, str]:
    """ImageNet state dict: from a local file, or through torchvision's weights API (needs network)."""
    if weights and weights not in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        return load_state_dict_file(weights), str(weights)
    enum = torchvision.models.get_model_weights(arch)
    w = enum[weights] if weights else enum.DEFAULT
    try:
        state = w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, socket timeout, proxy refusal ...
        raise WeightsError(f"ImageNet weights for {arch} ({w}) could not be downloaded: {e}. {OFFLINE_REMEDIES}")
    return state, f"torchvision {w}"


def build_network(
    arch: str = "resnext50_32x4d",
    num_classes: int = 2,
    init: str = "scratch",
    weights: str | None = None,
    trainable_from: str | None = None,
) -> GrayResNeXt:
    """Build a :class:`GrayResNeXt` and initialise it by an explicit choice.

    Args:
        arch: torchvision architecture name.
        num_classes: classifier outputs.
        init: ``"scratch"`` (random), ``"imagenet"`` (torchvision weights: ``weights`` is a local ``.pth``
            file, or a torchvision weights name / ``None`` for the default download), or ``"checkpoint"``
            (``weights`` is a previous stage's state dict; a head of another size is re-initialised and logged).
        weights: see ``init``.
        trainable_from: freeze every backbone stage before this one (``"layer3"`` trains layer3, layer4 and
            the head); ``None`` trains everything.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    model = GrayResNeXt(arch, num_classes)
    if init == "imagenet":
        state, source = _imagenet_state(arch, weights)
        transfer_weights(model, state, source, prefix="backbone.")
    elif init == "checkpoint":
        if not weights:
            raise WeightsError("init='checkpoint' needs weights=<path of the previous stage's model file>")
        transfer_weights(model, load_state_dict_file(weights), str(weights))
    else:
        logger.info("%s: initialised from scratch (random weights), as configured", arch)
    if trainable_from:
        freeze_before(model, trainable_from)
    return model


def freeze_before(model: GrayResNeXt, stage: str) -> list[str]:
    """Freeze the backbone modules that come before ``stage`` (one of conv1, layer1..layer4, fc)."""
    order = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    if stage not in order:
        raise ValueError(f"trainable_from must be one of {order}, got {stage!r}")
    frozen = order[: order.index(stage)]
    for name in frozen:
        for p in getattr(model.backbone, name).parameters():
            p.requires_grad_(False)
    logger.info("frozen backbone modules: %s", frozen or "none")
    return frozen


def param_groups(model: nn.Module, lr: float, backbone_lr_factor: float = 1.0) -> list[dict]:
    """Optimiser parameter groups: the head at ``lr``, the rest of the trainable backbone at ``lr * factor``."""
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if ".fc." in f".{name}" else body).append(p)
    groups = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_factor})
    return groups


def build_ensemble(
    member_weights: Sequence[str | os.PathLike], arch: str = "resnext50_32x4d", num_classes: int = 2
) -> Ensemble:
    """An :class:`Ensemble` whose members are loaded (strictly) from per-fold state-dict files."""
    return load_members(Ensemble(len(member_weights), arch, num_classes), member_weights)


def load_members(ensemble: Ensemble, member_weights: Sequence[str | os.PathLike]) -> Ensemble:
    """Load each member of ``ensemble`` strictly from its state-dict file; returns ``ensemble``."""
    if len(member_weights) != len(ensemble.members):
        raise WeightsError(f"{len(member_weights)} weight files for {len(ensemble.members)} ensemble members")
    for member, path in zip(ensemble.members, member_weights):
        state = load_state_dict_file(path)
        try:
            member.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"{path}: does not match the ensemble's {member.arch} member: {e}") from None
    return ensemble


def save_ensemble(
    member_weights: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    arch: str = "resnext50_32x4d",
    num_classes: int = 2,
) -> Path:
    """Load the fold members and write the :class:`Ensemble`'s state dict to ``out_path`` (atomically)."""
    from scripts.atomic import torch_save

    ens = build_ensemble(member_weights, arch, num_classes)
    return torch_save(ens.state_dict(), out_path)
