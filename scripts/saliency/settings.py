"""Saliency settings (one dataclass that ``configs/saliency.json`` builds), the operating threshold read from the
evaluation's metrics file, and the "off" values of the command line (``"none"`` = off)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scripts.data.schema import TARGET_CLASSES
from scripts.engine.config_values import parse_bool
from scripts.saliency.cam import METHODS, TARGETS
from scripts.saliency.sanity import RANDOMISATION_MODES

_OFF = ("", "none", "null", "off", "false")


def none_if_off(value: Any) -> Any:
    """``None`` for ``None`` or an "off" string (``""``, ``"none"``, ``"null"``, ``"off"``, ``"false"``, any case,
    as a command line gives them), else ``value`` unchanged."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    return value


@dataclass
class SaliencySettings:
    """What the saliency workflow computes and writes.

    Attributes:
        method: a key of :data:`scripts.saliency.cam.METHODS` (``"hirescam"`` by default).
        target: ``"malignant"`` or ``"predicted"`` (see :class:`~scripts.saliency.cam.EnsembleCAM`).
        threshold: decision threshold on P(malignant): predicted class, correct/misclassified groups (TP/FP/TN/FN)
            and the class explained when ``target="predicted"``.
        layer: the target layer's module name in a member; ``None`` (or ``"none"``): the member's ``target_layer``.
        freeze, amp: as for :class:`~scripts.saliency.cam.EnsembleCAM`.
        batch_size: ROIs per CAM call (>= 1).
        iou_threshold: map threshold for the IoU.
        tolerance_cells: pointing-game tolerance in cells of the target layer's feature map (16 px of network
            input for EfficientNet-Lite's default layer, 32 px for ResNets').
        spacing_mm: pixel pitch (mm) of the maps, i.e. of the network input; ``None``: 1.0 mm with a warning.
        gallery_per_group: examples per outcome group in ``gallery.png``.
        randomisation: ``"cascading"``, ``"full"`` or ``None`` / ``"none"`` (skip) for the randomisation check on
            the first ``randomisation_images`` inputs.
        class_names: class names, index = class.
        seed: seed of the randomisation check.
    """

    method: str = "hirescam"
    target: str = "malignant"
    threshold: float = 0.5
    layer: str | None = None
    freeze: bool = True
    amp: bool = False
    batch_size: int = 4
    iou_threshold: float = 0.5
    tolerance_cells: float = 1.0
    spacing_mm: float | None = None
    gallery_per_group: int = 4
    randomisation: str | None = "cascading"
    randomisation_images: int = 4
    class_names: Sequence[str] = TARGET_CLASSES
    seed: int = 0

    def __post_init__(self) -> None:
        self.layer = none_if_off(self.layer)
        self.randomisation = none_if_off(self.randomisation)
        self.freeze, self.amp = parse_bool(self.freeze, "saliency#freeze"), parse_bool(self.amp, "saliency#amp")
        self.threshold = float(self.threshold)
        self.spacing_mm = None if none_if_off(self.spacing_mm) is None else float(self.spacing_mm)
        self.batch_size, self.class_names = int(self.batch_size), tuple(self.class_names)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.randomisation is not None and self.randomisation not in RANDOMISATION_MODES:
            raise ValueError(f"randomisation must be one of {RANDOMISATION_MODES} or none, got {self.randomisation!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def target_label(self) -> str:
        """The target as reported: ``"class-agnostic"`` for EigenCAM."""
        return "class-agnostic" if self.method == "eigencam" else self.target
