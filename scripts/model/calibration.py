"""The ensemble's calibrated malignancy probability and the operating point saved beside ``models/model.pt``.

The deployed score is ``sigmoid(scale * mean_k logit(p_k) + bias)``: the members' malignant probabilities ``p_k``
are averaged on the log-odds scale (clamped to ``[EPS, 1 - EPS]``), then mapped by a Platt (logistic) calibration
fitted on the members' out-of-fold predictions (``scripts/evaluation/operating_point.py``; docs/evaluation.md says why).
This module holds the one definition of that score, used by the network (:class:`scripts.model.network.Ensemble`,
so TorchScript/ONNX exports, ``configs/inference.json`` and the apps return it) and by the evaluation (case tables),
and reads/writes ``models/operating_point.json``: the calibration, the decision threshold, the rule that chose it
and the validation data it was chosen on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.engine.atomic import write_json

logger = logging.getLogger(__name__)

EPS = 1e-6  # probabilities are clamped to [EPS, 1 - EPS] before the log-odds (|logit| <= 13.8)
OPERATING_POINT_FILE = "operating_point.json"  # beside the ensemble's weights (models/model.pt)


def member_logits(probs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Log-odds of malignant probabilities (any shape), clamped to ``[eps, 1 - eps]`` first."""
    p = probs.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def calibrated_probability(member_probs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sigmoid(scale * mean logit + bias)``, in float64.

    Args:
        member_probs: the members' malignant probabilities ``(K, ...)``; the mean is over ``K``.
        scale: the Platt slope (a scalar tensor).
        bias: the Platt intercept (a scalar tensor).
    """
    z = member_logits(member_probs.double()).mean(0)
    return torch.sigmoid(scale * z + bias)


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(scale * mean member logit + bias)``; ``scale=1, bias=0`` is the uncalibrated logit mean.

    Args:
        scale: the Platt slope.
        bias: the Platt intercept.
        method: how it was fitted (recorded, shown in outputs).
    """

    scale: float = 1.0
    bias: float = 0.0
    method: str = "none"

    def probability(self, member_probs: torch.Tensor) -> torch.Tensor:
        """The calibrated ensemble probability from the members' malignant probabilities ``(K, ...)``."""
        return calibrated_probability(member_probs, torch.tensor(self.scale), torch.tensor(self.bias))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        d = d or {}
        return cls(float(d.get("scale", 1.0)), float(d.get("bias", 0.0)), str(d.get("method", "none")))


def operating_point_path(model_file: str | os.PathLike) -> Path:
    """``models/operating_point.json`` for ``models/model.pt`` (the file beside the weights)."""
    return Path(model_file).with_name(OPERATING_POINT_FILE)


def read_operating_point(model_file: str | os.PathLike, required: bool = False) -> dict | None:
    """The operating point saved beside ``model_file``, or ``None`` (logged) when there is none.

    Args:
        model_file: the ensemble's weights (``models/model.pt``); the operating point is the file beside it.
        required: raise instead of returning ``None`` when there is no operating point.

    Raises:
        FileNotFoundError: ``required`` and no file.
        ValueError: the file is not a valid operating point (names the file).
    """
    path = operating_point_path(model_file)
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"{path} not found: run the operating point step first (configs/summarize.json, run id operating_point)"
            )
        logger.warning(
            "no operating point beside %s (%s missing): uncalibrated mean of the members' probabilities, call at 0.5",
            model_file,
            path.name,
        )
        return None
    try:
        op = json.loads(path.read_text())
        float(op["threshold"])
        Calibration.from_dict(op["calibration"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid operating point file ({e!r})") from None
    return op


def threshold_of(operating_point: dict | None, override: Any = None) -> float:
    """The decision threshold.

    Args:
        operating_point: as :func:`read_operating_point` returns it (``None``: none saved).
        override: a threshold given at run time (``None``: none).

    Returns:
        ``override`` when given, else the operating point's threshold, else 0.5.
    """
    if override is not None:
        return float(override)
    return 0.5 if operating_point is None else float(operating_point["threshold"])


def operating_point_name(operating_point: dict | None, override: Any = None) -> str:
    """A short description of the decision rule in use, for output tables and app answers.

    Args:
        operating_point: as :func:`read_operating_point` returns it (``None``: none saved).
        override: a threshold given at run time, which takes precedence (``None``: none).
    """
    if override is not None:
        return f"fixed threshold {float(override):g} (given at run time)"
    if operating_point is None:
        return "uncalibrated, threshold 0.5 (no operating point saved with the model)"
    return f"{operating_point['rule_description']}; calibrated probability >= {float(operating_point['threshold']):.4g}"


def write_operating_point(model_file: str | os.PathLike, operating_point: dict) -> Path:
    """Write ``operating_point`` beside ``model_file`` (atomically)."""
    return write_json(operating_point_path(model_file), operating_point)


class CalibratedEnsembled(MapTransform):
    """The ensemble's probabilities and the members' disagreement, from each member's class probabilities.

    ``output_key`` gets ``[1 - p, p]``: with ``calibration`` the calibrated probability (as
    :class:`scripts.model.network.Ensemble` returns it), without it the mean of the members' probabilities (as
    MONAI's ``MeanEnsembled``). ``uncertainty_key`` gets the standard deviation of the members' malignant
    probabilities (0 for one member): how much the members disagree on the case.

    Args:
        keys: the members' ``(2,)`` softmax probabilities (decollated, one case per dict).
        output_key: where the ensemble's ``(2,)`` probabilities go.
        calibration: ``{"scale", "bias", ...}`` (``models/operating_point.json``'s ``calibration``) or ``None``.
        uncertainty_key: where the members' disagreement goes (``None``: not computed).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str = "pred",
        calibration: dict | None = None,
        uncertainty_key: str | None = "uncertainty",
    ) -> None:
        super().__init__(keys)
        self.output_key = output_key
        self.calibration = None if calibration is None else Calibration.from_dict(calibration)
        self.uncertainty_key = uncertainty_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        probs = torch.stack([torch.as_tensor(d[k]).as_subclass(torch.Tensor).float() for k in self.key_iterator(d)])
        malignant = probs[:, 1]
        p = probs.mean(0)[1] if self.calibration is None else self.calibration.probability(malignant).float()
        d[self.output_key] = torch.stack([1.0 - p, p])
        if self.uncertainty_key:
            d[self.uncertainty_key] = malignant.double().std(unbiased=False).float()
        return d
