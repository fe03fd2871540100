"""MONAI Deploy application: classify each mammography DICOM ROI in a folder as benign or malignant.

    python app -i INPUT -o OUTPUT [-m BUNDLE] [--spacing-mm MM] [--send-to URL]

``INPUT`` is a DICOM file or a folder of them (``*.dcm``, ``*.dicom``, files without a suffix, or files with the
DICM preamble; not recursive), one ROI per file, MONOCHROME1 or MONOCHROME2. ``BUNDLE`` is the bundle folder
(``configs/``, ``scripts/``, ``models/model.pt`` or ``models/model.ts``); by default the repository this app lives in,
found from this file's location (never from the current folder). Paths in the bundle's configs (``bundle_root``)
resolve against that folder. ``--spacing-mm MM`` is the pixel pitch, in mm, of the DICOMs that state none (no
``PixelSpacing`` or ``ImagerPixelSpacing``); a pitch the file states is always used as stated. ``--send-to URL``
also stores each ROI's SR and Secondary Capture on a PACS with STOW-RS, ``URL`` being its DICOMweb root (e.g.
``http://127.0.0.1:8042/dicom-web`` for Orthanc; :mod:`dicom_send`); the JSON records the outcome under
``dicom.sent`` (the SOP Instance UIDs the PACS stored) or ``dicom.send_error``.
``OUTPUT`` receives, per input file (case = file stem):

- ``<case>.json``: ``{"status": "ok", "probabilities": {"benign": 1 - p, "malignant": p}, "pred_class": k,
  "pred_label": name, "decision_threshold": t, "operating_point": description, "uncertainty": u,
  "dicom": {"sr": ..., "sc": ...}, ...}``, or ``{"status": "error", "error": reason, ...}`` for a file that cannot be
  read (the others are still classified). ``p`` is the ensemble's calibrated probability of malignancy (the bundle's
  network, calibrated by ``models/operating_point.json``); the call is malignant when ``p >= t``, ``t`` being the
  bundle's ``threshold`` (the operating point saved beside the weights; 0.5, uncalibrated, without one), which
  ``operating_point`` describes; ``u`` is the members' disagreement (the population standard deviation of their
  probabilities of malignancy, as ``configs/inference.json``'s ``uncertainty`` column), ``null`` with an
  ``uncertainty_reason`` for a network that does not expose its members;
- ``<case>.sr.dcm``: the result as a DICOM Comprehensive 3D SR (probability, call, operating point and its
  description, the members' disagreement, model name and version, "research use only, not for clinical use") and
  ``<case>.sc.dcm``: the bundle's saliency overlay (HiResCAM by default, ``configs/saliency.json``) as a DICOM
  Secondary Capture, both in the source's study (:mod:`dicom_results`).

Operators: :class:`DicomRoiLoaderOperator` (one file per tick, read and cropped at the training scale by the
bundle's own reader: photometric interpretation, rescale, VOI, pixel pitch) → the SDK's stock
``MonaiBundleInferenceOperator`` (the bundle's ``preprocessing``, ``inferer`` and network, unmodified; no
postprocessing: the network returns the final probabilities) → :class:`ClassificationWriterOperator`. The JSON and
the log hold no DICOM attributes (no patient identifiers); the DICOM results carry the source's patient and study
modules, as DICOM requires to file them in its study. The case id is the file stem, so do not name files after
patients. Exit status: 0 when at least one file was classified (and, with ``--send-to``, every result written was
stored on the PACS), 1 when none could be, 2 for a bad input or bundle path or a bad ``--spacing-mm`` or ``--send-to``,
3 when files were classified but some results could not be sent (they stay in ``OUTPUT``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict

import dicom_results
import dicom_send
import numpy as np
import pydicom
import torch
from monai.bundle import ConfigParser
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Model, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.errors import InvalidDicomError

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE = APP_DIR.parents[2]  # the repository root is the bundle
DICOM_SUFFIXES = (".dcm", ".dicom")
SPACING_OPTION = "--spacing-mm"
MODEL_NAME = "microcalcification_classification"
MALIGNANT = 1  # the class index of "malignant" (the bundle's channel_def)
SALIENCY_DEFAULTS = {"method": "hirescam", "target": "malignant", "layer": None, "freeze": True}
#: The config item the stock operator takes its postprocessing from: one the bundle does not define, so that it applies
#: none. The bundle's network returns the ensemble's final (calibrated) probabilities; the bundle's ``postprocessing``
#: combines the member outputs of its own ensemble evaluator (``member_<k>`` keys), which the operator does not make,
#: and parsing it reads the weights file relative to ``bundle_root`` (which the operator resolves against the current
#: folder).
NO_POSTPROCESSING = "deploy_app_postprocessing"
logger = logging.getLogger("microcalcification_app")


class AppInputError(ValueError):
    """A bad input folder, bundle folder or option (not a per-file error)."""


def find_bundle(path: str | os.PathLike | None) -> Path:
    """The bundle folder: ``path`` itself, or its single subfolder holding ``configs/inference.json``."""
    root = Path(path) if path else DEFAULT_BUNDLE
    if (root / "configs" / "inference.json").is_file():
        return root.resolve()
    subs = [p for p in sorted(root.iterdir()) if (p / "configs" / "inference.json").is_file()] if root.is_dir() else []
    if len(subs) == 1:
        return subs[0].resolve()
    raise AppInputError(f"{root} is not a bundle folder (no configs/inference.json in it or in one subfolder)")


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """DICOM files in ``path`` (a file, or a folder: ``.dcm``/``.dicom``, no suffix, or a DICM preamble), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise AppInputError(f"input {path} is neither a file nor a folder")

    def is_candidate(p: Path) -> bool:
        if not p.is_file() or p.name.startswith("."):
            return False
        if p.suffix.lower() in DICOM_SUFFIXES or p.suffix == "":
            return True
        with open(p, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"

    files = [p for p in sorted(path.iterdir()) if is_candidate(p)]
    if not files:
        raise AppInputError(f"input folder {path} holds no DICOM files (*.dcm, *.dicom, no suffix, DICM preamble)")
    return files


def bundle_parser(bundle: Path) -> ConfigParser:
    """The bundle's ``configs/inference.json`` (with ``saliency.json``'s settings) and ``metadata.json``, with
    ``bundle_root`` set to ``bundle``.

    The configs say ``"bundle_root": "."`` (the model-zoo convention: commands run from the bundle folder); the app
    runs from its own folder, so every path the configs derive from it (``model_file``, ...) is anchored here.
    """
    parser = ConfigParser()
    configs = [bundle / "configs" / name for name in ("inference.json", "saliency.json")]
    parser.read_config([str(c) for c in configs if c.is_file()])
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    return parser


def load_network(bundle: Path, parser: ConfigParser) -> torch.nn.Module:
    """The bundle's network in eval mode: ``network`` with the weights of ``model_file`` (``models/model.pt``,
    loaded strictly), or ``models/model.ts`` when the bundle has no ``model.pt``."""
    from scripts.model.network import WeightsError, load_state_dict_file

    weights = Path(parser.get_parsed_content("model_file"))
    torchscript = bundle / "models" / "model.ts"
    device = torch.device(parser.get_parsed_content("device"))
    try:
        if weights.is_file():
            network = parser.get_parsed_content("network")
            network.load_state_dict(load_state_dict_file(weights))
        elif torchscript.is_file():
            network = torch.jit.load(str(torchscript), map_location=device)
        else:
            raise AppInputError(f"bundle {bundle}: neither {weights} nor {torchscript} exists (train or export first)")
    except (WeightsError, RuntimeError) as e:
        raise AppInputError(f"bundle {bundle}: cannot load its network: {e}") from None
    return network.eval()


def read_bundle_settings(bundle: Path, parser: ConfigParser | None = None) -> dict[str, Any]:
    """The ROI geometry, class names, model name/version and decision rule the bundle's configs state.

    The decision rule is ``configs/inference.json``'s: ``threshold`` (its ``decision_threshold`` when set, else the
    operating point saved beside the weights, ``models/operating_point.json``, else 0.5) and ``operating_point_name``
    (its description); an unreadable operating point file is an :class:`AppInputError` naming it.
    """
    parser = parser or bundle_parser(bundle)
    meta = parser["_meta_"]
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    try:
        threshold = float(parser.get_parsed_content("threshold"))
        operating_point = str(parser.get_parsed_content("operating_point_name"))
    except (ValueError, RuntimeError) as e:  # the config parser wraps the bundle's ValueError in a RuntimeError
        raise AppInputError(f"bundle {bundle}: cannot read its operating point: {root_cause(e)}") from None
    saliency = {k: parser.get(f"saliency#{k}", v) for k, v in SALIENCY_DEFAULTS.items()}
    return {
        "threshold": threshold,
        "operating_point": operating_point,
        "saliency": saliency,
        "image_size": int(parser["image_size"]),
        "roi_pitch_mm": float(parser["roi_pitch_mm"]),
        "roi_size": int(parser["roi_size"]),
        "class_names": [channel_def[str(i)] for i in range(len(channel_def))],
        "model": {"name": meta.get("name", ""), "version": meta.get("version", "")},
    }


def root_cause(error: BaseException) -> str:
    """The innermost error's message (the config parser wraps errors in "Failed to evaluate ..." errors)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)


class MemberDisagreement:
    """The ensemble members' disagreement on one ROI, as ``configs/inference.json`` computes it for its
    ``uncertainty`` column: the population standard deviation of the members' probabilities of malignancy
    (:class:`scripts.model.calibration.CalibratedEnsembled`).

    The members' softmax probabilities come from the network's ``member_probabilities`` (the eager
    :class:`scripts.model.network.Ensemble`, and a scripted export of it), run by the bundle's ``inferer`` on the ROI
    after the bundle's ``preprocessing``: the input the stock operator gives the network. A network without that method
    gets ``None`` and :attr:`reason` says why.
    """

    def __init__(self, network: torch.nn.Module, parser: ConfigParser) -> None:
        self.members = getattr(network, "member_probabilities", None)
        self.reason = None
        if not callable(self.members):
            kind = "TorchScript (models/model.ts)" if isinstance(network, torch.jit.ScriptModule) else "network"
            self.reason = f"the bundle's {kind} does not expose its members' probabilities (member_probabilities)"
            logger.warning("no uncertainty: %s", self.reason)
            return
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.device = torch.device(parser.get_parsed_content("device"))

    def __call__(self, roi: np.ndarray) -> float | None:
        from scripts.model.calibration import CalibratedEnsembled

        if self.reason is not None:
            return None
        x = self.preprocessing({"image": roi})["image"][None].to(self.device)
        with torch.no_grad():
            probs = self.inferer(x, self.members)[:, 0]  # (K, num_classes): the members' probabilities of this ROI
        keys = [f"member_{k}" for k in range(len(probs))]
        combine = CalibratedEnsembled(keys, output_key="pred", calibration=None, uncertainty_key="uncertainty")
        return float(combine(dict(zip(keys, probs)))["uncertainty"])


def saliency_engine(network: torch.nn.Module, parser: ConfigParser, saliency: dict) -> Any:
    """The bundle's saliency engine (``configs/saliency.json``'s method, target, layer; its ``amp`` rule) for the
    eager ensemble; ``None`` for a TorchScript network (Grad-CAM cannot hook it)."""
    from scripts.model.inferers import saliency_amp
    from scripts.model.network import Ensemble
    from scripts.saliency.cam import EnsembleCAM

    if not isinstance(network, Ensemble):
        logger.warning("no saliency overlays: the bundle's network is TorchScript (models/model.ts), not model.pt")
        return None
    amp = saliency_amp(parser["arch"], parser.get_parsed_content("amp"))
    return EnsembleCAM(network, method=saliency["method"], target=saliency["target"], layer=saliency["layer"],
                       freeze=saliency["freeze"], amp=amp)  # fmt: skip


def check_spacing(value: float | None) -> float | None:
    """``--spacing-mm``: a pixel pitch in mm within the bundle's plausible range (the bundle must be importable)."""
    from scripts.data.prepare.bounds import PITCH_RANGE_MM, check_pitch
    from scripts.data.prepare.errors import PrepareError

    if value is None:
        return None
    try:
        return check_pitch([value, value], SPACING_OPTION)[0]
    except PrepareError:
        lo, hi = PITCH_RANGE_MM
        raise AppInputError(f"{SPACING_OPTION} must be a pixel pitch in mm between {lo:g} and {hi:g}, got {value:g}")


def stated_pitch(path: Path) -> bool | None:
    """Whether the DICOM at ``path`` states a pixel pitch (``PixelSpacing``/``ImagerPixelSpacing``); ``None`` when
    its header cannot be read or its pitch is invalid (the bundle's reader then reports why)."""
    from scripts.data.prepare.dicom_io import spacing_from_dataset
    from scripts.data.prepare.errors import PrepareError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return spacing_from_dataset(ds)[0] is not None
    except (InvalidDicomError, PrepareError, OSError, EOFError, ValueError, TypeError, KeyError):
        return None


def missing_pitch_reason() -> str:
    """Why a DICOM without a pixel pitch cannot be cropped, naming this app's option."""
    return f"pixel pitch unknown (the DICOM states no PixelSpacing or ImagerPixelSpacing): give it with {SPACING_OPTION} MM"


def write_json(out_dir: Path, case: str, record: dict) -> Path:
    """Write ``out_dir/<case>.json`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{case}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class DicomRoiLoaderOperator(Operator):
    """Read one DICOM ROI per tick with the bundle's reader and emit it as an ``Image`` (``(S, S)`` in [0, 1]).

    Output ``image``: the ROI; output ``case``: ``{"case", "file"}`` for the writer. A file that cannot be read
    gets its error record written here (the downstream operators never see it) and nothing is emitted that tick.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        files: list[Path],
        output_folder: Path,
        settings: dict,
        tally: Counter,
        spacing_mm: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.files = list(files)
        self.output_folder = Path(output_folder)
        self.settings = settings
        self.tally = tally
        self.spacing_mm = spacing_mm
        self._next = 0
        self._used: set[str] = set()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("case")

    def start(self) -> None:
        from scripts.data.inputs import LoadInputd

        s = self.settings
        self.loader = LoadInputd(
            keys="image",
            image_size=s["image_size"],
            pitch_mm=s["roi_pitch_mm"],
            roi_size=s["roi_size"],
            on_error="raise",
        )

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from scripts.data.inputs import InferenceInputError
        from scripts.data.schema import unique_case

        path = self.files[self._next]
        self._next += 1
        case = unique_case(path.stem, self._used)
        info = {"case": case, "file": path.name}
        item = {"image": str(path), "case": case}
        stated = stated_pitch(path)
        if stated is False and self.spacing_mm is not None:
            item["spacing_mm"] = self.spacing_mm
            info["spacing_mm"] = {"value": self.spacing_mm, "source": SPACING_OPTION}
        try:
            if stated is False and self.spacing_mm is None:
                raise InferenceInputError(missing_pitch_reason())
            roi = self.loader(item)["image"]
        except InferenceInputError as e:
            reason = str(e).removeprefix(f"case {case}: ")
            logger.error("%s: %s", path.name, reason)
            write_json(
                self.output_folder, case, {**info, "status": "error", "error": reason, "model": self.settings["model"]}
            )
            self.tally["error"] += 1
            return
        op_output.emit(Image(roi[0].numpy()), "image")
        op_output.emit({**info, "path": path, "roi": roi[0].numpy()}, "case")  # path, roi: for the writer only


class ClassificationWriterOperator(Operator):
    """Write the bundle operator's ``pred`` (``{"probabilities": ...}``) as ``<case>.json``, and, for a source that
    can be filed, ``<case>.sr.dcm`` (the result as a DICOM SR) and ``<case>.sc.dcm`` (the saliency overlay as a
    Secondary Capture), both in the source's study (:mod:`dicom_results`).

    The call is the bundle's (``PredictionTableHandler`` of ``configs/inference.json``): malignant when P(malignant)
    is at least the bundle's ``threshold``, the operating point (the stock operator's own ``result`` field truncates
    each probability with ``int()`` and is not used). ``disagreement`` gives the members' disagreement on the ROI. A
    DICOM result that cannot be made is logged and recorded under ``dicom.error``; the JSON is written.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: Path,
        settings: dict,
        tally: Counter,
        disagreement: MemberDisagreement,
        cam: Any = None,
        send_to: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.settings = settings
        self.tally = tally
        self.disagreement = disagreement
        self.cam = cam
        self.send_to = send_to
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("case")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        pred = op_input.receive("pred")
        info = dict(op_input.receive("case"))
        path, roi = info.pop("path"), info.pop("roi")
        probs = np.asarray(pred["probabilities"], dtype=np.float64).reshape(-1)
        names = self.settings["class_names"]
        if probs.shape != (len(names),) or not np.isfinite(probs).all():
            raise RuntimeError(f"{info['file']}: expected {len(names)} finite probabilities, got {probs.tolist()}")
        threshold = self.settings["threshold"]
        # float32, as the bundle's prediction table decides (PredictionTableHandler)
        k = MALIGNANT if float(np.float32(probs[MALIGNANT])) >= threshold else 1 - MALIGNANT
        uncertainty = self.disagreement(roi)
        record = {
            **info,
            "status": "ok",
            "probabilities": {n: float(p) for n, p in zip(names, probs)},
            "pred_class": k,
            "pred_label": names[k],
            "decision_threshold": threshold,
            "operating_point": self.settings["operating_point"],
            "uncertainty": uncertainty,
        }
        if uncertainty is None:
            record["uncertainty_reason"] = self.disagreement.reason
        record["model"] = self.settings["model"]
        record["dicom"] = self.write_dicom_results(
            path, roi, info["case"], float(probs[MALIGNANT]), names[k], uncertainty
        )
        if self.send_to:
            record["dicom"].update(self.send(info))
        write_json(self.output_folder, info["case"], record)
        self.tally["ok"] += 1
        shown = "n/a" if uncertainty is None else f"{uncertainty:.4f}"
        logger.info(
            "%s: %s (p_malignant %.4f, threshold %.4g, members' SD %s)",
            info["file"], names[k], probs[MALIGNANT], threshold, shown,
        )  # fmt: skip

    def send(self, info: dict) -> dict:
        """Store the ROI's SR and Secondary Capture on the PACS (``--send-to``, STOW-RS); return what the JSON records
        of it: ``sent`` (the SOP Instance UIDs stored) or ``send_error``."""
        case = info["case"]
        files = [self.output_folder / f"{case}.{kind}.dcm" for kind in ("sr", "sc")]
        files = [f for f in files if f.is_file()]
        if not files:
            return {}
        try:
            stored = dicom_send.stow_rs(self.send_to, files)
        except dicom_send.SendError as e:
            logger.error("%s: results not sent: %s", info["file"], e)
            self.tally["send_error"] += 1
            return {"send_error": str(e)}
        logger.info("%s: %d DICOM result(s) stored on %s", info["file"], len(files), dicom_send.shown_url(self.send_to))
        self.tally["sent"] += len(files)
        return {"sent": stored}

    def write_dicom_results(
        self, path: Path, roi: np.ndarray, case: str, p_malignant: float, call: str, uncertainty: float | None
    ) -> dict:
        """Write the SR and the saliency Secondary Capture of one ROI; return what the JSON records of them."""
        from scripts.saliency.render import render_overlay

        model = self.settings["model"]
        operating_point = self.settings["threshold"]
        out: dict[str, Any] = {}
        try:
            source = dicom_results.read_source(path)
            sr = dicom_results.build_sr(
                source, p_malignant, call, operating_point, model, case, self.settings["operating_point"], uncertainty
            )
            out["sr"] = dicom_results.save(sr, self.output_folder / f"{case}.sr.dcm").name
            if self.cam is None:
                out["sc"] = None
                out["sc_reason"] = "no saliency map: the bundle's network is TorchScript (models/model.ts)"
                return out
            cam_map = self.cam(torch.from_numpy(roi)[None, None]).maps[0]
            method = self.settings["saliency"]
            spread = "" if uncertainty is None else f"; members' SD {uncertainty:.3f}"
            lines = [
                f"P(malignant) {p_malignant:.3f}: {call} (operating point {operating_point:.3f}{spread})",
                f"{method['method']} map (target: {method['target']}), model {model['version']}",
                dicom_results.NOT_FOR_CLINICAL_USE,
            ]
            rgb = render_overlay(roi, cam_map, lines)
            description = f"{method['method']} saliency map of the ensemble (target {method['target']}) over the ROI"
            sc = dicom_results.build_overlay_sc(source, rgb, model, description)
            out["sc"] = dicom_results.save(sc, self.output_folder / f"{case}.sc.dcm").name
        except (dicom_results.ResultDicomError, InvalidDicomError, OSError, ValueError, AttributeError) as e:
            reason = str(e) if isinstance(e, dicom_results.ResultDicomError) else f"{type(e).__name__}"
            logger.error("%s: no DICOM result: %s", path.name, reason)
            out["error"] = reason
        return out


class MicrocalcificationClassificationApp(Application):
    """DICOM ROIs → bundle inference → one JSON per image; ``tally`` counts the results written."""

    def __init__(self, *args: Any, spacing_mm: float | None = None, send_to: str | None = None, **kwargs: Any) -> None:
        self.tally: Counter = Counter()
        self.spacing_mm = spacing_mm
        self.send_to = send_to
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        files = list_inputs(app_context.input_path)
        output = Path(app_context.output_path)
        bundle = find_bundle(app_context.model_path if app_context.args.get("model") else None)
        if str(bundle) not in sys.path:
            sys.path.insert(0, str(bundle))  # the bundle's scripts package (its readers, transforms, network)
        spacing_mm = check_spacing(self.spacing_mm)
        parser = bundle_parser(bundle)
        settings = read_bundle_settings(bundle, parser)
        logger.info("bundle %s (%s %s), %d input file(s)", bundle, *settings["model"].values(), len(files))
        # The network is loaded here, once, from the bundle's own configs with bundle_root anchored at the bundle,
        # and handed to the stock operator as the context's model (the SDK's documented way to give a loaded model:
        # set its predictor). Left to itself the operator would resolve the configs' bundle_root "." against the
        # current folder, and reload the weights for every image.
        model = Model(str(bundle), name=MODEL_NAME)
        model.predictor = load_network(bundle, parser)
        app_context.models = model
        cam = saliency_engine(model.predictor, parser, settings["saliency"])
        disagreement = MemberDisagreement(model.predictor, parser)
        logger.info("decision rule: %s", settings["operating_point"])

        loader = DicomRoiLoaderOperator(
            self,
            CountCondition(self, len(files)),
            files=files,
            output_folder=output,
            settings=settings,
            tally=self.tally,
            spacing_mm=spacing_mm,
            name="loader",
        )
        infer = MonaiBundleInferenceOperator(
            self,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Dict[str, Any], IOType.IN_MEMORY)],
            bundle_path=bundle,
            bundle_config_names=BundleConfigNames(postproc_name=NO_POSTPROCESSING),
            name="bundle_inference",
        )
        writer = ClassificationWriterOperator(
            self,
            output_folder=output,
            settings=settings,
            tally=self.tally,
            disagreement=disagreement,
            cam=cam,
            send_to=self.send_to,
            name="writer",
        )
        self.add_flow(loader, infer, {("image", "image")})
        self.add_flow(infer, writer, {("pred", "pred")})
        self.add_flow(loader, writer, {("case", "case")})


def parse_app_options(argv: list[str]) -> tuple[float | None, str | None, list[str]]:
    """This app's own options, ``--spacing-mm MM`` and ``--send-to URL`` (or ``--option=VALUE``), and the rest of
    ``argv`` (program name first, order kept) for the SDK's parser; :class:`AppInputError` when a value is missing or
    not a pitch in mm / a DICOMweb URL."""
    rest, spacing, send_to = [argv[0]], None, None
    args = iter(argv[1:])
    for arg in args:
        option = next(
            (o for o in (SPACING_OPTION, dicom_send.SEND_OPTION) if arg == o or arg.startswith(o + "=")), None
        )
        if option is None:
            rest.append(arg)
            continue
        value = arg.partition("=")[2] if "=" in arg else next(args, None)
        if option == SPACING_OPTION:
            try:
                spacing = float(value)
            except (TypeError, ValueError):
                raise AppInputError(f"{SPACING_OPTION} needs a pixel pitch in mm, got {value!r}") from None
        else:
            try:
                send_to = dicom_send.check_url(value or "")
            except ValueError as e:
                raise AppInputError(str(e)) from None
    return spacing, send_to, rest


def main(argv: list[str] | None = None) -> int:
    """Run the application (``argv``: program arguments, without the program name; default ``sys.argv[1:]``);
    return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if {"-h", "--help"} & set(args[1:]):
        print(__doc__)
    try:
        spacing_mm, send_to, sdk_args = parse_app_options(args)
        # Holoscan keeps sys.argv as the application's argv (program name first) when given none, and drops the
        # first item of an argv it is given: hand the SDK its arguments as the process's own command line
        sys.argv = sdk_args
        app = MicrocalcificationClassificationApp(spacing_mm=spacing_mm, send_to=send_to)
        app.run()
    except AppInputError as e:
        logger.error("%s", e)
        return 2
    ok, errors = app.tally["ok"], app.tally["error"]
    logger.info(
        "%d classified, %d error(s); results in %s", ok, errors, Application.init_app_context(app.argv).output_path
    )
    if send_to:
        sent, failed = app.tally["sent"], app.tally["send_error"]
        logger.info("%d DICOM result(s) stored on %s, %d ROI(s) not sent", sent, dicom_send.shown_url(send_to), failed)
        if ok and failed:
            return 3
    return 0 if ok else 1
