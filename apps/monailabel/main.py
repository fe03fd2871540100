"""MONAI Label app that serves the microcalcification bundle as a classification model.

    monailabel start_server --app apps/monailabel --studies STUDIES [--conf bundle PATH] [--conf model NAME]

``--conf bundle`` is the bundle folder (``configs/``, ``scripts/``, ``models/model.pt`` or ``models/model.ts``);
by default the repository this app lives in. ``--conf model`` names the model in the REST API
(default ``microcalcification_classification``). Inference:

    curl -F "file=@roi.dcm" "http://127.0.0.1:8000/infer/microcalcification_classification?output=json"

answers ``{"prediction": [{"idx", "label", "score"}, ...], "probabilities": {"benign": p0, "malignant": p1},
"pred_class": k, "pred_label": name, "model": {...}}`` for a ROI PNG or a DICOM (cropped at the training scale
by the bundle's own reader). An upload the bundle cannot read gets HTTP 422 with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE = APP_DIR.parents[1]  # the repository root is the bundle
DEFAULT_MODEL = "microcalcification_classification"


def _input_error(e: BaseException) -> BaseException | None:
    """The bundle's ``InferenceInputError`` in ``e``'s cause/context chain (transform wrappers re-raise), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "InferenceInputError":
            return e
        e = e.__cause__ or e.__context__
    return None


class MicrocalcificationInferTask(BundleInferTask):
    """``BundleInferTask`` for the bundle's ``configs/inference.json`` as a classification task.

    - type classification and no ``Restored`` post-transform (it expects an image-shaped prediction);
    - strict weight loading; the bundle's ``on_input_error`` set to ``raise`` so that an unreadable upload is an
      HTTP 422 with the reason, not a prediction on a blank image;
    - the result JSON adds ``probabilities``, ``pred_class`` (argmax) and ``pred_label`` to the stock
      ``prediction`` list.
    """

    def __init__(self, path: str, conf: Dict[str, str]) -> None:
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, load_strict=True)
        if not self.is_valid():
            raise RuntimeError(f"{path}: not a usable bundle (configs/inference.json and models/model.pt needed)")
        self.bundle_config["on_input_error"] = "raise"
        meta = json.loads((Path(path) / "configs" / "metadata.json").read_text())
        self.model_info = {"name": meta.get("name", ""), "version": meta.get("version", "")}
        self.class_names = [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def __call__(self, request: Dict[str, Any], callbacks: Any = None) -> Any:
        # The stock task puts the bundle on sys.path only while it builds transforms; the bundle's transforms import
        # their helpers (scripts.data.prepare...) when they run, so keep it there for the whole request.
        sys.path.insert(0, self.bundle_path)
        try:
            return super().__call__(request, callbacks)
        except Exception as e:
            err = _input_error(e)
            if err is None:
                raise
            reason = str(err).split(": ", 1)[-1] if str(err).startswith("case ") else str(err)
            raise HTTPException(status_code=422, detail=f"cannot use the uploaded image: {reason}") from None
        finally:
            sys.path.remove(self.bundle_path)

    def run_pre_transforms(self, data: Dict[str, Any], transforms: Any) -> Dict[str, Any]:
        # the bundle's loader returns only image/case/error; keep the request's keys (model_filename, device, ...)
        out = super().run_pre_transforms(data, transforms)
        return {**{k: v for k, v in data.items() if k not in out}, **out}

    def writer(self, data: Dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[None, Dict[str, Any]]:
        pred = data[self.output_label_key]
        probs = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred, dtype=np.float64).reshape(-1)
        if probs.shape != (len(self.class_names),):
            raise RuntimeError(f"expected {len(self.class_names)} probabilities, got shape {probs.shape}")
        k = int(np.argmax(probs))
        return None, {
            "prediction": [
                {"idx": i, "label": n, "score": float(p)} for i, (n, p) in enumerate(zip(self.class_names, probs))
            ],
            "probabilities": {n: float(p) for n, p in zip(self.class_names, probs)},
            "pred_class": k,
            "pred_label": self.class_names[k],
            "model": self.model_info,
        }


class MicrocalcificationApp(MONAILabelApp):
    """One classification model: the bundle at ``--conf bundle`` (default: this repository)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle = Path(conf.get("bundle") or DEFAULT_BUNDLE).resolve()
        self.model_name = conf.get("model") or DEFAULT_MODEL
        if not (self.bundle / "configs" / "inference.json").is_file():
            raise RuntimeError(f"--conf bundle {self.bundle}: no configs/inference.json there")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Mammographic microcalcification classification",
            description="Benign/malignant probabilities for a microcalcification ROI (PNG or DICOM)",
            version=json.loads((self.bundle / "configs" / "metadata.json").read_text()).get("version", ""),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        logger.info("model %s: bundle %s", self.model_name, self.bundle)
        return {self.model_name: MicrocalcificationInferTask(os.fspath(self.bundle), self.conf)}

    def init_trainers(self) -> Dict[str, Any]:
        return {}
