"""MONAI Label app that serves the microcalcification bundle as a classification model.

    monailabel start_server --app apps/monailabel --studies STUDIES [--conf bundle PATH] [--conf model NAME]

``--conf bundle`` is the bundle folder (``configs/``, ``scripts/``, ``models/model.pt`` or ``models/model.ts``);
by default the repository this app lives in (found from this file's location, never from the current folder).
``--conf model`` names the model in the REST API (default ``microcalcification_classification``). Inference:

    curl -F "file=@roi.dcm" "http://127.0.0.1:8000/infer/microcalcification_classification?output=json"

answers ``{"prediction": [{"idx", "label", "score"}, ...], "probabilities": {"benign": 1 - p, "malignant": p},
"pred_class": k, "pred_label": name, "decision_threshold": t, "operating_point": description, "uncertainty": u,
"model": {...}}`` for a ROI PNG or a DICOM (cropped at the training scale by the bundle's own reader): ``p`` is the
ensemble's calibrated probability of malignancy, the call is malignant when ``p >= t`` (the bundle's ``threshold``:
the operating point saved beside its weights, 0.5 uncalibrated without one), ``operating_point`` describes that rule
and ``u`` is the members' disagreement (the population standard deviation of their probabilities of malignancy;
``null`` with an ``uncertainty_reason`` for a network that does not expose its members). ``params`` (a JSON form
field) may give ``spacing_mm``, the pixel pitch of an image that states none (a DICOM without
``PixelSpacing``/``ImagerPixelSpacing``): ``-F 'params={"spacing_mm": 0.05}'``.

The app answers its own ``POST /infer/{model}`` and ``POST /train/{model}`` (in place of the stock endpoints, same
parameters): an upload is
written to a private temporary folder that is deleted whatever the outcome, and a user's mistake is a 4xx naming the
file and what is wrong (400 bad request, 404 unknown model or image, 422 unusable image), never a 500.

Saliency: ``output=image`` answers the bundle's saliency overlay of the ROI (PNG: the ROI beside the ROI with the map,
under a text band with the probability, the call and the operating point); ``output=all`` answers, as MONAI Label's
stock endpoint does for ``all``, a ``multipart/form-data`` body with the JSON (field ``params``) and the overlay (field
``image``, ``overlay.png``), plus the map itself (field ``map``, ``saliency_map.nii.gz``: float32 in [0, 1] at the
network input's geometry, as the bundle's saliency workflow writes it). The map is ``configs/saliency.json``'s method,
layer and target (HiResCAM of P(malignant) by default), computed by the bundle's own engine (``scripts.saliency``).

Learning from the radiologist (:mod:`lib.learning`): a class label saved with ``PUT /datastore/label`` (tag
``final``; a JSON file ``{"label": "malignant"}``) is used by ``POST /train/{model}``, which fine-tunes the model in use
on every labelled image (``python -m scripts.finetune``, the bundle's target-stage recipe) and publishes the next
version under ``<bundle>/models/finetuned/<model>/`` (``--conf versions DIR`` elsewhere); ``/infer`` uses the newest
version from its next request and names it in ``model.version``. ``POST /activelearning/uncertainty`` answers the
unlabelled image with the highest members' disagreement under the model in use (``random`` stays beside it).

Studies: ``--studies`` is a folder of ROI images, or a DICOMweb server (``--studies http://HOST:PORT/dicom-web``, e.g.
Orthanc with its DICOMweb plugin), whose image ids are series instance UIDs (one ROI image per series). An image of a
DICOMweb server is fetched into the request's private temporary folder and deleted with it; the stock datastore's
cache (used by the stock endpoints that fetch a series) is a private temporary folder removed when the server stops,
unless ``MONAI_LABEL_DICOMWEB_CACHE_PATH`` names one. The series listed are those of
``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, whose stock default (CT) is replaced by ``{"Modality": "MG"}`` (mammography).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import pydicom
import requests
import torch
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from fastapi.routing import APIRoute
from monai.inferers import Inferer
from monailabel.app import app as server
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.train import run_model as stock_train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.utils.app import app_instance
from monailabel.tasks.infer.bundle import BundleInferTask
from pydicom.errors import InvalidDicomError
from requests_toolbelt import MultipartEncoder

from lib.learning import (  # MONAI Label puts the app folder on the path
    FineTuneTask,
    LabelledSetError,
    ModelVersions,
    Uncertainty,
)

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE = APP_DIR.parents[1]  # the repository root is the bundle
DEFAULT_MODEL = "microcalcification_classification"
SPACING_PARAM = "params.spacing_mm"
MALIGNANT = 1  # the class index of "malignant" (the bundle's channel_def)
#: suffixes an upload keeps (the bundle's reader picks the format by suffix or DICM preamble); others are dropped
UPLOAD_SUFFIXES = (".dcm", ".dicom", ".png", ".nii", ".nii.gz", ".tif", ".tiff", ".pgm")
OUTPUTS = ("json", "image", "all")
SALIENCY_OUTPUTS = ("image", "all")
SALIENCY_DEFAULTS = {"method": "hirescam", "target": "malignant", "layer": None, "freeze": True}
NOT_FOR_CLINICAL_USE = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
OVERLAY_NAME = "overlay.png"
MAP_NAME = "saliency_map.nii.gz"
#: the series the DICOMweb datastore lists when MONAI_LABEL_DICOMWEB_SEARCH_FILTER is the stock default (CT)
DICOMWEB_FILTER = {"Modality": "MG"}
STOCK_DICOMWEB_FILTER = {"Modality": "CT"}
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def read_version(bundle: Path) -> str:
    """The bundle's version, from ``configs/metadata.json`` (the one place it is kept)."""
    return str(json.loads((bundle / "configs" / "metadata.json").read_text())["version"])


def stated_pitch(path: str) -> bool | None:
    """Whether the DICOM at ``path`` states a pixel pitch (``PixelSpacing``/``ImagerPixelSpacing``); ``None`` when it
    is not a DICOM, its header cannot be read or its pitch is invalid (the bundle's reader then says why)."""
    from scripts.data.prepare.dicom_io import is_dicom, quiet_pydicom, spacing_from_dataset
    from scripts.data.prepare.errors import PrepareError

    if not is_dicom(path):
        return None
    try:
        with quiet_pydicom(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        return spacing_from_dataset(ds)[0] is not None
    except (InvalidDicomError, PrepareError, OSError, EOFError, ValueError, TypeError, KeyError):
        return None


def member_disagreement(inferer: Any, inputs: Any, network: Any) -> tuple[list[float] | None, str | None]:
    """The members' disagreement on each case of ``inputs`` (a batch), as ``configs/inference.json`` computes it for
    its ``uncertainty`` column: the population standard deviation of the members' probabilities of malignancy
    (:class:`scripts.model.calibration.CalibratedEnsembled`), from the network's ``member_probabilities`` (the eager
    :class:`scripts.model.network.Ensemble`, and a scripted export of it) run by ``inferer``; ``(None, reason)`` for a
    network without that method."""
    from scripts.model.calibration import CalibratedEnsembled

    members = getattr(network, "member_probabilities", None)
    if not callable(members):
        kind = "TorchScript (models/model.ts)" if isinstance(network, torch.jit.ScriptModule) else "network"
        return None, f"the bundle's {kind} does not expose its members' probabilities (member_probabilities)"
    probs = inferer(inputs, members)  # (K, B, num_classes)
    keys = [f"member_{k}" for k in range(probs.shape[0])]
    combine = CalibratedEnsembled(keys, output_key="pred", calibration=None, uncertainty_key="uncertainty")
    return [float(combine(dict(zip(keys, probs[:, b])))["uncertainty"]) for b in range(probs.shape[1])], None


class MemberDisagreementInferer(Inferer):
    """The bundle's inferer, which also hands the members' disagreement on the case to ``record`` (the request data's
    ``update``: ``uncertainty``, and ``uncertainty_reason`` when there is none): :func:`member_disagreement` on the
    same preprocessed, batched input the stock task gives the network; with ``saliency`` (a callable of the input and
    the network, :func:`saliency_map`) also what it returns. The network's output is returned unchanged.
    (The stock task logs the inferer's attributes: they hold no image data.)"""

    def __init__(
        self, inferer: Any, record: Callable[[Dict[str, Any]], None], saliency: Callable[..., Dict] | None = None
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.record = record
        self.saliency = saliency

    def __call__(self, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = self.inferer(inputs, network, *args, **kwargs)
        values, reason = member_disagreement(self.inferer, inputs, network)
        update = {"uncertainty": None if values is None else values[0], "uncertainty_reason": reason}
        if self.saliency is not None:  # the request asked for the saliency map (output=image or all)
            update.update(self.saliency(inputs, network))
        self.record(update)
        return outputs


def saliency_settings(bundle: Path, config: Any) -> Dict[str, Any]:
    """``configs/saliency.json``'s method, target, layer and ``freeze`` (the values the bundle's saliency workflow and
    the Deploy app use), its ``amp`` rule (:func:`scripts.model.inferers.saliency_amp`) and the map's pixel pitch in
    mm (``saliency#spacing_mm``: the ROI's pitch at the network input); ``config`` is the bundle's parsed
    ``configs/inference.json`` (the bundle must be importable)."""
    from scripts.model.inferers import saliency_amp

    path = bundle / "configs" / "saliency.json"
    conf = json.loads(path.read_text()).get("saliency", {}) if path.is_file() else {}
    out: Dict[str, Any] = {k: conf.get(k, v) for k, v in SALIENCY_DEFAULTS.items()}
    out["amp"] = saliency_amp(config.get_parsed_content("arch"), config.get_parsed_content("amp"))
    image_size = int(config.get_parsed_content("image_size"))
    roi_size = config.get_parsed_content("roi_size") or image_size
    out["spacing_mm"] = float(config.get_parsed_content("roi_pitch_mm")) * int(roi_size) / image_size
    return out


def saliency_map(inputs: Any, network: Any, settings: Dict[str, Any], threshold: float) -> Dict[str, Any]:
    """The bundle's saliency map of the one ROI in ``inputs`` (the batched, preprocessed network input, ``(1, 1, H,
    W)``): :class:`scripts.saliency.cam.EnsembleCAM` with ``settings`` (:func:`saliency_settings`), as the bundle's
    saliency workflow computes it. Returns ``saliency_map`` (``(H, W)`` float32 in [0, 1]), ``saliency_roi`` (the
    ROI, ``(H, W)``) and ``saliency_layer``; or ``saliency_reason`` for a network Grad-CAM cannot hook
    (TorchScript)."""
    from scripts.saliency.cam import EnsembleCAM

    # not isinstance(network, Ensemble): the stock task unloads and re-imports the bundle's modules on each request
    if isinstance(network, torch.jit.ScriptModule) or not hasattr(network, "members"):
        return {
            "saliency_reason": "no saliency map: the bundle's network is TorchScript (models/model.ts), not model.pt"
        }
    x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
    x = x.float()
    cam_args = {k: settings[k] for k in ("method", "target", "layer", "freeze", "amp")}
    with EnsembleCAM(network, threshold=threshold, **cam_args) as cam:
        result = cam(x)
        layer = cam.layer_name
    return {"saliency_map": result.maps[0], "saliency_roi": x[0, 0].detach().cpu().numpy(), "saliency_layer": layer}


def missing_pitch_reason(kind: str = "the DICOM states no PixelSpacing or ImagerPixelSpacing") -> str:
    """Why an image without a pixel pitch cannot be cropped, naming this app's option."""
    return f"pixel pitch unknown ({kind}): give it as {SPACING_PARAM} in mm, e.g. -F 'params={{\"spacing_mm\": 0.05}}'"


class MicrocalcificationInferTask(BundleInferTask):
    """``BundleInferTask`` for the bundle's ``configs/inference.json`` as a classification task.

    - type classification and no ``Restored`` post-transform (it expects an image-shaped prediction);
    - strict weight loading; an image the bundle's loader cannot use (it records the reason under ``error`` and
      passes a blank image on) is an HTTP 422 with that reason, never a prediction on the blank image;
    - ``spacing_mm`` (request parameter): the pixel pitch of an image that states none; a DICOM's own pitch wins;
    - no post-transforms: the network returns the ensemble's final (calibrated) probabilities; the bundle's
      ``postprocessing`` combines the member outputs of its own ensemble evaluator (``member_<k>`` keys), which
      this task does not make;
    - the result JSON adds ``probabilities``, ``pred_class`` and ``pred_label`` (the call at the bundle's
      ``threshold``, as its ``configs/inference.json`` decides), ``decision_threshold``, ``operating_point`` (the
      rule's description) and ``uncertainty`` (:class:`MemberDisagreementInferer`) to the stock ``prediction`` list.
    """

    def __init__(self, path: str, conf: Dict[str, str], model_file: str | None = None, version: str | None = None):
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, load_strict=True)
        if not self.is_valid():
            raise RuntimeError(f"{path}: not a usable bundle (configs/inference.json and models/model.pt needed)")
        self.bundle_config["on_input_error"] = "record"  # the loader's reason is under "error": see run_pre_transforms
        meta = json.loads((Path(path) / "configs" / "metadata.json").read_text())
        self.model_info = {"name": meta.get("name", ""), "version": version or read_version(Path(path))}
        if model_file is not None:  # a fine-tuned version: its weights, and the calibration saved beside them
            self.bundle_config["model_file"] = model_file
            self.path = [model_file]
            self.network = self.bundle_config.get_parsed_content("network_def", instantiate=True)
        self.class_names = [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]
        # the decision rule of configs/inference.json: its decision_threshold when set, else the operating point saved
        # beside the weights (models/operating_point.json, whose calibration the network applies), else 0.5
        self.threshold = float(self.bundle_config.get_parsed_content("threshold"))
        self.operating_point = str(self.bundle_config.get_parsed_content("operating_point_name"))
        self.saliency = saliency_settings(Path(path), self.bundle_config)
        logger.info("decision rule: %s", self.operating_point)

    def check_pitch(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """``request`` with ``spacing_mm`` checked, and dropped for a DICOM that states its own pitch; a DICOM
        without one and without ``spacing_mm`` is an HTTP 422 naming the parameter."""
        from scripts.data.prepare.bounds import PITCH_RANGE_MM, check_pitch
        from scripts.data.prepare.errors import PrepareError

        request = dict(request)
        spacing = request.pop("spacing_mm", None)
        if spacing is not None:
            try:
                spacing = check_pitch([spacing, spacing], SPACING_PARAM)[0]
            except PrepareError:
                lo, hi = PITCH_RANGE_MM
                raise HTTPException(
                    status_code=400,
                    detail=f"{SPACING_PARAM} must be a pixel pitch in mm between {lo:g} and {hi:g}, got {spacing!r}",
                ) from None
        image = request.get("image")
        stated = stated_pitch(image) if isinstance(image, str) else None
        if stated is False and spacing is None:
            raise HTTPException(status_code=422, detail=f"cannot use the image: {missing_pitch_reason()}")
        if spacing is not None and not stated:
            request["spacing_mm"] = spacing
        return request

    def __call__(self, request: Dict[str, Any], callbacks: Any = None) -> Any:
        return super().__call__(self.check_pitch(request), callbacks)

    def inferer(self, data: Optional[Dict[str, Any]] = None) -> Inferer:
        """The bundle's inferer; for a request, wrapped to record the members' disagreement in its data (and, when the
        request asks for it, the saliency map: ``data["saliency"]``)."""
        stock = super().inferer(data)
        if data is None:
            return stock
        saliency = None
        if data.get("saliency"):

            def saliency(inputs: Any, network: Any) -> Dict[str, Any]:
                return saliency_map(inputs, network, self.saliency, self.threshold)

        return MemberDisagreementInferer(stock, data.update, saliency)

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> list[Callable]:
        """None: the network returns the final probabilities (the bundle's ``postprocessing`` is its evaluator's)."""
        return []

    def run_pre_transforms(self, data: Dict[str, Any], transforms: Any) -> Dict[str, Any]:
        # the bundle's loader returns only image/case/error; keep the request's keys (model_filename, device, ...)
        out = super().run_pre_transforms(data, transforms)
        reason = out.get("error")
        if reason:  # an image the loader could not use (it passes a blank image on): no prediction, an HTTP 422
            # the bundle's own advice names its CSV column; here the pitch is a request parameter
            reason = str(reason).replace("give spacing_mm for it in an input CSV", f"give it as {SPACING_PARAM} in mm")
            raise HTTPException(status_code=422, detail=f"cannot use the image: {reason}")
        return {**{k: v for k, v in data.items() if k not in out}, **out}

    def writer(
        self, data: Dict[str, Any], extension: Any = None, dtype: Any = None
    ) -> tuple[str | None, Dict[str, Any]]:
        pred = data[self.output_label_key]
        probs = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred, dtype=np.float64).reshape(-1)
        if probs.shape != (len(self.class_names),):
            raise RuntimeError(f"expected {len(self.class_names)} probabilities, got shape {probs.shape}")
        # float32, as the bundle's prediction table decides (PredictionTableHandler)
        k = MALIGNANT if float(np.float32(probs[MALIGNANT])) >= self.threshold else 1 - MALIGNANT
        result = {
            "prediction": [
                {"idx": i, "label": n, "score": float(p)} for i, (n, p) in enumerate(zip(self.class_names, probs))
            ],
            "probabilities": {n: float(p) for n, p in zip(self.class_names, probs)},
            "pred_class": k,
            "pred_label": self.class_names[k],
            "decision_threshold": self.threshold,
            "operating_point": self.operating_point,
            "uncertainty": data.get("uncertainty"),
        }
        if result["uncertainty"] is None:
            result["uncertainty_reason"] = data.get("uncertainty_reason") or "not computed"
        result["model"] = self.model_info
        overlay = None
        if data.get("saliency"):
            overlay = self.write_saliency(data, result)
        return overlay, result

    def write_saliency(self, data: Dict[str, Any], result: Dict[str, Any]) -> str | None:
        """Write the overlay PNG and the NIfTI map of a request that asked for them into its private folder
        (``data["saliency_dir"]``), describe them under ``result["saliency"]``; return the overlay's path (``None``,
        with the reason under ``saliency.error``, when there is no map)."""
        from scripts.saliency.render import render_overlay, save_map_nifti, save_png

        s = self.saliency
        record: Dict[str, Any] = {"method": s["method"], "target": s["target"]}
        result["saliency"] = record
        cam = data.get("saliency_map")
        if cam is None:
            record["error"] = data.get("saliency_reason") or "no saliency map"
            return None
        p, k, u = result["probabilities"][self.class_names[MALIGNANT]], result["pred_class"], result["uncertainty"]
        spread = "" if u is None else f"; members' SD {u:.3f}"
        lines = [
            f"P(malignant) {p:.3f}: {self.class_names[k]} (operating point {self.threshold:.3f}{spread})",
            f"{s['method']} map (target: {s['target']}), model {self.model_info['version']}",
            NOT_FOR_CLINICAL_USE,
        ]
        folder = Path(data["saliency_dir"])
        overlay = folder / OVERLAY_NAME
        save_png(overlay, render_overlay(np.asarray(data["saliency_roi"]), cam, lines))
        save_map_nifti(folder / MAP_NAME, cam, s["spacing_mm"])
        record.update(
            layer=data.get("saliency_layer"),
            overlay=OVERLAY_NAME,
            map=MAP_NAME,
            shape=list(np.shape(cam)),
            spacing_mm=s["spacing_mm"],
        )
        return str(overlay)


class MicrocalcificationApp(MONAILabelApp):
    """One classification model: the bundle at ``--conf bundle`` (default: this repository)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle = Path(conf.get("bundle") or DEFAULT_BUNDLE).resolve()
        self.model_name = conf.get("model") or DEFAULT_MODEL
        self.infer_tasks: Dict[str, InferTask] = {}
        self.dicomweb: DICOMwebClient | None = None  # the client of a DICOMweb --studies
        self.infer_lock = threading.Lock()  # one inference at a time (the bundle's config parser is not thread-safe)
        if not (self.bundle / "configs" / "inference.json").is_file():
            raise RuntimeError(f"--conf bundle {self.bundle}: no configs/inference.json there")
        # The bundle's ``scripts`` package (its readers, transforms, network) is imported by the stock task while it
        # builds them, and by the bundle's transforms while they run: it stays importable for the server's life (the
        # stock task puts the bundle on the path only while it builds, then removes its own entry).
        sys.path.insert(0, os.fspath(self.bundle))
        versions = conf.get("versions") or self.bundle / "models" / "finetuned" / self.model_name
        self.versions = ModelVersions(versions, self.bundle / "models" / "model.pt", read_version(self.bundle))
        self.scores: Dict[tuple[str, str], float | None] = {}  # (model version, image id) -> members' disagreement
        self._infer_defaults: Dict[str, Any] | None = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Mammographic microcalcification classification",
            description="Benign/malignant probabilities for a microcalcification ROI (PNG or DICOM)",
            version=read_version(self.bundle),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        logger.info("model %s: bundle %s", self.model_name, self.bundle)
        self.infer_tasks = {self.model_name: self.load_task()}
        return dict(self.infer_tasks)

    def load_task(self) -> MicrocalcificationInferTask:
        """The inference task of the model version in use (:class:`lib.learning.ModelVersions`)."""
        version, model = self.versions.current()
        if model == self.versions.base_model:
            return MicrocalcificationInferTask(os.fspath(self.bundle), self.conf)
        logger.info("model %s: fine-tuned version %s", self.model_name, version)
        return MicrocalcificationInferTask(os.fspath(self.bundle), self.conf, os.fspath(model), version)

    def model_task(self, model: str) -> MicrocalcificationInferTask:
        """``model``'s task, reloaded when a newer version has been published (call with ``infer_lock`` held)."""
        task = self.infer_tasks[model]
        if task.model_info["version"] != self.versions.current()[0]:
            task = self.infer_tasks[model] = self.load_task()
        return task

    def infer_defaults(self) -> Dict[str, Any]:
        """The inference tasks' request defaults as ``/info`` lists them (``device``, ``model_filename``, ...), read
        once: they do not change while the server runs."""
        if self._infer_defaults is None:
            self._infer_defaults = dict(self.info().get("config", {}).get("infer", {}))
        return self._infer_defaults

    def init_trainers(self) -> Dict[str, Any]:
        if self.dicomweb is not None:  # its datastore stores labels as DICOM SEG objects, not classes
            logger.info("no train task: training needs a --studies folder (class labels saved as JSON files)")
            return {}
        class_names = self.infer_tasks[self.model_name].class_names
        return {self.model_name: FineTuneTask(self.bundle, self.versions, class_names, self.local_image)}

    def init_strategies(self) -> Dict[str, Any]:
        return {**super().init_strategies(), "uncertainty": Uncertainty(self.uncertainty)}

    def local_image(self, datastore: Datastore, image_id: str, folder: str) -> str:
        """The datastore image ``image_id`` as a local file: its path in a folder datastore, or (DICOMweb) fetched
        into ``folder``. An unknown id is an HTTP 404."""
        if self.dicomweb is not None:
            return fetch_dicomweb_image(self.dicomweb, image_id, folder)
        path = datastore.get_image_uri(image_id)
        if not path or not os.path.isfile(path):
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        return path

    def uncertainty(self, image_id: str, datastore: Datastore) -> tuple[str, float | None]:
        """``(model version, members' disagreement on image_id)`` with the model in use, computed once per version
        (``None`` for an image the model cannot read, e.g. a DICOM without a pixel pitch)."""
        with self.infer_lock:
            task = self.model_task(self.model_name)
            version = task.model_info["version"]
            if (version, image_id) not in self.scores:
                work = tempfile.mkdtemp(prefix="score-")
                try:
                    request = {**self.infer_defaults(), "model": self.model_name}
                    request["image"] = self.local_image(datastore, image_id, work)
                    request["description"] = task.description
                    self.scores[(version, image_id)] = task(request)[1].get("uncertainty")
                except (HTTPException, MONAILabelException) as e:
                    logger.warning("image %s not scored: %s", image_id, getattr(e, "detail", e))
                    self.scores[(version, image_id)] = None
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            return version, self.scores[(version, image_id)]

    def init_remote_datastore(self) -> Datastore:
        """A DICOMweb ``--studies`` (e.g. Orthanc's ``/dicom-web``): the stock datastore, without the stock start-up's
        download of dcmqi (a DICOM SEG converter this classification model does not use; it needs the internet), with
        a private cache folder removed at exit unless one is configured, and listing mammograms by default."""
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        self.dicomweb = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
        if not cache:
            cache = tempfile.mkdtemp(prefix="dicomweb-cache-")
            remove_at_exit(cache)
        # the stock default lists CT series; any other filter is used as given (the launcher exports every setting to
        # the environment, so the filter's value, not its presence there, tells whether it was set)
        search_filter = settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
        if search_filter == STOCK_DICOMWEB_FILTER:
            search_filter = dict(DICOMWEB_FILTER)
        logger.info("DICOMweb studies; series listed: %s", search_filter)
        return DICOMWebDatastore(
            client=self.dicomweb,
            search_filter=search_filter,
            cache_path=cache,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def on_init_complete(self) -> None:
        super().on_init_complete()
        install_endpoints()


def remove_at_exit(path: str) -> None:
    """Delete the folder ``path`` when the server ends: at exit (Ctrl-C), and on SIGTERM, on which uvicorn, after its
    graceful shutdown, re-raises the signal with the default handler, ending the process without running atexit
    hooks (the removal then happens as the signal arrives, before uvicorn's own handler starts the shutdown)."""
    atexit.register(shutil.rmtree, path, True)
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: atexit only
        logger.warning("the DICOMweb cache folder is removed at exit, not on SIGTERM")


# -- POST /infer/{model}: the stock endpoint's parameters, with uploads that never outlive the request --------------


def upload_suffix(filename: str | None) -> str:
    """The suffix an upload is stored with: its own when the bundle reads that format, else none (DICOM preamble)."""
    name = (filename or "").lower()
    return next((s for s in sorted(UPLOAD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def shown_name(filename: str | None) -> str:
    """The uploaded file's name as an error message shows it (no folders, printable, at most 80 characters)."""
    name = Path((filename or "").replace("\\", "/")).name
    name = "".join(c if c.isprintable() else "?" for c in name)[:80]
    return name or "the upload"


def infer_request(
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """Run ``model`` on an uploaded ``file``, a datastore ``image`` id or a session's image; answer its JSON, or for
    ``output=image``/``all`` its saliency overlay (:func:`saliency_response`)."""
    instance = app_instance()
    if not isinstance(instance, MicrocalcificationApp) or model not in instance.infer_tasks:
        known = ", ".join(getattr(instance, "infer_tasks", {})) or "none"
        raise HTTPException(status_code=404, detail=f"no model {model!r} on this server (models: {known})")
    if output is not None and output.value not in OUTPUTS:
        raise HTTPException(
            status_code=400,
            detail=f"output={output.value} is not offered by this classification model: use output=json, image or all",
        )
    if label is not None and label.filename:
        raise HTTPException(status_code=400, detail="a label upload is not used by this classification model")
    try:
        extra = json.loads(params) if params else {}
    except json.JSONDecodeError as e:
        raise HTTPException(status_code=400, detail=f"params is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(extra, dict):
        raise HTTPException(status_code=400, detail='params must be a JSON object, e.g. {"spacing_mm": 0.05}')
    uploaded = file is not None and bool(file.filename)
    if not uploaded and not image and not session_id:
        raise HTTPException(
            status_code=400,
            detail="no image given: upload one as the multipart field 'file', or name a datastore image with ?image=ID",
        )
    saliency = output is not None and output.value in SALIENCY_OUTPUTS
    remote = not uploaded and not session_id and instance.dicomweb is not None
    work = tempfile.mkdtemp(prefix="upload-") if uploaded or saliency or remote else None
    try:
        if uploaded:
            name = shown_name(file.filename)
            path = os.path.join(work, "image" + upload_suffix(file.filename))
            with open(path, "wb") as f:
                shutil.copyfileobj(file.file, f)
            if os.path.getsize(path) == 0:
                raise HTTPException(status_code=422, detail=f"{name}: the uploaded file is empty")
        elif session_id:
            session = instance.sessions().get_session(session_id) if instance.sessions() else None
            if session is None:
                raise HTTPException(status_code=404, detail=f"no session {session_id!r} on this server")
            name, path = f"session {session_id!r}", session.image
        else:  # a DICOMweb image is fetched into the private folder, never into the datastore's cache
            name, path = f"image {image!r}", instance.local_image(instance.datastore(), image, work)
        request = {**instance.infer_defaults(), **extra, "model": model, "image": path}
        if saliency:
            request.update(saliency=True, saliency_dir=work)
        try:
            with instance.infer_lock:
                task = instance.model_task(model)
                overlay, params = task({**request, "description": task.description})
                result = {"file": overlay, "params": params}
        except HTTPException as e:
            raise HTTPException(status_code=e.status_code, detail=f"{name}: {e.detail}") from None
        except MONAILabelException as e:
            raise HTTPException(status_code=400, detail=f"{name}: {e.msg}") from None
        if saliency:
            try:
                return saliency_response(output.value, result)
            except HTTPException as e:
                raise HTTPException(status_code=e.status_code, detail=f"{name}: {e.detail}") from None
        return result["params"]
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def fetch_dicomweb_image(client: DICOMwebClient, image_id: str, folder: str) -> str:
    """Download the one image of series ``image_id`` from the DICOMweb server into ``folder`` (as ``image.dcm``);
    return its path. A series unknown to the server is an HTTP 404, a series of several images a 422, a server that
    does not answer a 502."""
    if len(image_id) > 64 or not UID.match(image_id):
        raise HTTPException(status_code=404, detail=f"no image {image_id!r}: image ids are series instance UIDs here")
    try:
        found = client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        found = [s for s in found if s.get("0020000E", {}).get("Value") == [image_id]]
        if not found:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r}: no such series on the DICOMweb server")
        study = found[0]["0020000D"]["Value"][0]
        instances = client.retrieve_series(study, image_id)
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else "no answer"
        raise HTTPException(
            status_code=502, detail=f"image {image_id!r}: the DICOMweb server answered {code}"
        ) from None
    except requests.exceptions.RequestException as e:
        raise HTTPException(
            status_code=502, detail=f"image {image_id!r}: the DICOMweb server cannot be reached ({type(e).__name__})"
        ) from None
    if len(instances) != 1:
        raise HTTPException(
            status_code=422,
            detail=f"image {image_id!r}: the series holds {len(instances)} images; this model classifies one ROI image "
            "per series",
        )
    path = os.path.join(folder, "image.dcm")
    instances[0].save_as(path)
    return path


def saliency_response(output: str, result: Dict[str, Any]) -> Any:
    """The answer for ``output=image`` (the overlay PNG) or ``output=all`` (multipart: ``params``, the JSON; ``image``,
    the overlay; ``map``, the NIfTI map: the stock ``all`` with the map added) from the task's ``result`` (``file``: the overlay, ``params``: the JSON);
    the files are read now, as their folder is deleted when the request ends."""
    params = result["params"]
    overlay = result.get("file")
    if not overlay or not os.path.isfile(overlay):
        reason = params.get("saliency", {}).get("error", "no saliency map")
        if output == "image":
            raise HTTPException(status_code=422, detail=reason)
        return params  # as the stock endpoint: the JSON alone when there is no image
    png = Path(overlay).read_bytes()
    if output == "image":
        headers = {"Content-Disposition": f'attachment; filename="{OVERLAY_NAME}"'}
        return Response(content=png, media_type="image/png", headers=headers)
    nifti = (Path(overlay).parent / MAP_NAME).read_bytes()
    body = MultipartEncoder(
        fields=[
            ("params", (None, json.dumps(params), "application/json")),
            ("image", (OVERLAY_NAME, io.BytesIO(png), "image/png")),
            ("map", (MAP_NAME, io.BytesIO(nifti), "application/gzip")),
        ]
    )
    return Response(content=body.to_string(), media_type=body.content_type)


def train_request(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
) -> Any:
    """The stock ``POST /train/{model}`` (same parameters and answer), with a user's mistake as a 4xx: an unknown
    model is a 404, and a synchronous run (``run_sync=true``) on labels it cannot use a 422 with the reason
    (:class:`lib.learning.LabelledSetError`; a background run's status says the same)."""
    instance = app_instance()
    trainers = instance.info().get("trainers", {})
    if model not in trainers:
        raise HTTPException(status_code=404, detail=f"no model {model!r} to train (models: {', '.join(trainers)})")
    try:
        return stock_train(model, params, run_sync, enqueue)
    except LabelledSetError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None


def install_endpoints() -> None:
    """Put :func:`infer_request` and :func:`train_request` in place of the stock ``POST /infer/{model}`` and ``POST
    /train/{model}`` of the running server."""
    ours = {
        "/infer/{model}": (infer_request, "Run Inference for a model"),
        "/train/{model}": (train_request, "Run Training Task for specific model"),
    }
    router = APIRouter(prefix=settings.MONAI_LABEL_API_STR)
    for path, (endpoint, summary) in ours.items():
        router.add_api_route(path, endpoint, methods=["POST"], summary=summary, response_model=None)
    for route in router.routes:
        stock = [
            i
            for i, r in enumerate(server.router.routes)
            if isinstance(r, APIRoute) and r.path == route.path and "POST" in r.methods
        ]
        if stock:
            server.router.routes[stock[0]] = route
        else:
            server.router.routes.insert(0, route)
