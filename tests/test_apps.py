"""The MONAI Label app and the MONAI Deploy application, run for real in their own environments.

Each app has its own virtualenv (``bash apps/monailabel/setup.sh``, ``bash apps/deploy/setup.sh``); without it the
app's tests are skipped with the command that creates it. Both serve a tiny trained bundle laid out like a fresh clone
after the main job (:func:`tests.app_bundle.make_app_bundle`: the apps' code, ``models/model.pt`` and the operating
point beside it, ``models/operating_point.json``), started with the commands README.md and docs/deployment.md give,
from the folder they name, and must return what the bundle's own ``configs/inference.json`` writes for the same files:
the calibrated probability and the members' disagreement to 1e-4, the call at the saved operating point and its
description. A copy of the bundle without the operating point file (as before the calibration) checks the apps'
uncalibrated fallback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.app_bundle import (
    NUM_MEMBERS,
    TINY_CALIBRATION,
    TINY_SETTINGS,
    make_app_bundle,
    run_inference_workflow,
    write_tiny_operating_point,
)
from tests.conftest import REPO, SHARED_DATA
from tests.orthanc import Orthanc, OrthancUnavailable
from tests.orthanc import find_binary as find_orthanc
from tests.orthanc import find_dicomweb_plugin, running_orthanc
from tests.servers import free_port, stop_process_group, wait_for_json

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

APPS = REPO / "apps"
LABEL_PY = APPS / "monailabel" / ".venv" / "bin" / "python"
DEPLOY_PY = APPS / "deploy" / ".venv" / "bin" / "python"
MODEL = "microcalcification_classification"
PATIENT = ("DOE^JANE", "PID123", "ACC98765")  # name, id, accession of the test DICOMs: in no JSON, log or file name
CBIS_DICOM = SHARED_DATA / "cbis-ddsm" / "Mass-Training_P_00004_LEFT_CC_1_cropped_000001.dcm"
CBIS_PATIENT = ("Mass-Training_P_00004", "P_00004")  # its PatientName/PatientID hold the case name
CBIS_PITCH_MM = 0.05  # CBIS-DDSM's scans: about 50 um; its DICOMs state no pixel spacing
NO_PITCH_MM = 0.05  # the pitch of the test's own DICOM that states none
TOL = 1e-4
SYNTHETIC = ("png", "mono2", "mono1", "nopitch")  # the test's own ROIs (two distinct ones, read four ways)
UNCALIBRATED = "uncalibrated, threshold 0.5 (no operating point saved with the model)"
VERSION = json.loads((REPO / "configs" / "metadata.json").read_text())["version"]


def need_env(python: Path, app: str) -> None:
    if not python.exists():
        pytest.skip(f"{python.relative_to(REPO)} absent: run `bash apps/{app}/setup.sh` to test the {app} app")


# -- the commands the docs give ------------------------------------------------------------------------------------


def documented_commands(doc: Path) -> dict[str, list[str]]:
    """The app commands in ``doc``'s bash blocks (continuation lines joined, ``[optional]`` parts dropped, comments
    after ``  #`` dropped): ``label_server`` (a studies folder), ``label_server_dicomweb`` (a DICOMweb server),
    ``label_curl`` (an upload, JSON), ``label_curl_saliency`` (an upload, the overlay), ``label_curl_id`` (an image
    id), ``deploy``, ``deploy_send`` (``--send-to``), ``storescu`` and ``label_learning`` (the block of the learning
    round, as one script)."""
    kinds = ("label_server", "label_server_dicomweb", "label_curl", "label_curl_saliency", "label_curl_id", "deploy",
             "deploy_send", "storescu", "label_learning")  # fmt: skip
    found: dict[str, list[str]] = {kind: [] for kind in kinds}
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        if "/activelearning/" in block:  # the learning round: one script
            lines = [" ".join(ln.split()) for ln in block.replace("\\\n", " ").splitlines()]
            found["label_learning"].append("\n".join(ln for ln in lines if ln and not ln.startswith("#")))
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s*\[[^\]]*\]", "", " ".join(line.split()))
            line = re.sub(r"\s+#\s.*$", "", line)
            if "monailabel.main start_server" in line:
                found["label_server_dicomweb" if "/dicom-web" in line else "label_server"].append(line)
            elif line.startswith("curl ") and "/infer/" in line:
                kind = "label_curl_id" if "?image=" in line else "label_curl"
                found[kind if "output=json" in line else "label_curl_saliency"].append(line)
            elif ".venv/bin/python app " in line:
                found["deploy_send" if "--send-to" in line else "deploy"].append(line)
            elif line.startswith("storescu "):
                found["storescu"].append(line)
    return found


DOCS = {name: documented_commands(REPO / name) for name in ("README.md", "docs/deployment.md")}


def commands(kind: str) -> list[str]:
    """Every distinct documented command of ``kind``, README's first."""
    return list(dict.fromkeys(c for doc in DOCS.values() for c in doc[kind]))


#: placeholders of the documented commands other than ``/path/to/KEY``: the Label server's port, the PACS's DICOMweb
#: root and DICOM port, a series instance UID
PLACEHOLDERS = {
    "port": "8000",
    "dicomweb": "http://127.0.0.1:8042/dicom-web",
    "dicom_port": "4242",
    "series": "SERIES_UID",
    "image_id": "IMAGE_ID",
}


def fill(command: str, **values: str) -> str:
    """``command`` with its placeholders (``/path/to/studies``, port ``8000``, ...) replaced by ``values``."""
    for key, value in values.items():
        placeholder = PLACEHOLDERS.get(key, f"/path/to/{key}")
        assert placeholder in command, (placeholder, command)
        command = command.replace(placeholder, shlex.quote(str(value)) if key not in PLACEHOLDERS else str(value))
    return command


def test_docs_give_each_app_command():
    for doc, found in DOCS.items():
        for kind, lines in found.items():
            assert lines, f"{doc}: no {kind} command found"
    assert any(c.startswith("cd apps/deploy && ") for c in commands("deploy")), commands("deploy")
    assert all(c.startswith("cd apps/deploy && ") for c in commands("deploy_send")), commands("deploy_send")
    servers = commands("label_server") + commands("label_server_dicomweb")
    assert all(c.startswith("apps/monailabel/.venv/bin/python ") for c in servers), servers
    assert all(PLACEHOLDERS["dicomweb"] in c for c in commands("label_server_dicomweb") + commands("deploy_send"))


# -- the tiny bundle and its inputs -----------------------------------------------------------------------------------


def link_app_environments(bundle: Path) -> Path:
    for app in ("monailabel", "deploy"):
        if (APPS / app / ".venv").is_dir():
            (bundle / "apps" / app / ".venv").symlink_to(APPS / app / ".venv")
    return bundle


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory) -> Path:
    """The tiny trained bundle (weights only: no operating point yet), in a folder whose name contains
    "classification"; the apps' environments are linked into it."""
    return link_app_environments(make_app_bundle(tmp_path_factory.mktemp("apps") / MODEL))


@pytest.fixture(scope="module")
def plain_bundle(trained_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle without ``models/operating_point.json``: a bundle trained before the calibration."""
    bundle = tmp_path_factory.mktemp("apps_uncalibrated") / MODEL
    shutil.copytree(trained_bundle, bundle, symlinks=True)
    return bundle


def read_reference(bundle: Path, inputs: dict[str, Path], work: Path) -> dict[str, dict]:
    """The bundle's own inference (its configs/inference.json, in this environment) on the readable inputs, as
    predictions.csv rows by input key; the DICOMs without a pixel pitch get it from the CSV's spacing_mm column."""
    folder = work / "inputs"
    folder.mkdir(parents=True)
    pitch = {"png": "", "mono2": "", "mono1": "", "nopitch": NO_PITCH_MM, "cbis": CBIS_PITCH_MM}
    rows = ["image,spacing_mm,case"]
    for key, spacing in pitch.items():
        if key in inputs:
            (folder / inputs[key].name).symlink_to(inputs[key])
            rows.append(f"{inputs[key].name},{spacing},{key}")
    (folder / "inputs.csv").write_text("\n".join(rows) + "\n")
    try:
        table = run_inference_workflow(
            bundle / "configs", work / "out", bundle_root=str(bundle), input_csv=str(folder / "inputs.csv")
        )
    finally:
        shutil.rmtree(folder)
    rows = {r["case"]: r for r in table}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    return rows


def splitting_threshold(p: dict[str, float]) -> float:
    """A threshold that calls the ROIs of ``mono2`` and ``mono1`` (two different ROIs) differently: the middle of the
    widest gap between the probabilities ``p`` (of every input) that lie between theirs."""
    lo, hi = sorted((p["mono2"], p["mono1"]))
    values = sorted(v for v in p.values() if lo <= v <= hi)
    gap, threshold = max((b - a, (a + b) / 2) for a, b in zip(values, values[1:]))
    assert gap > 10 * TOL, f"the tiny model's probabilities are too close to split: {p}"
    return threshold


@pytest.fixture(scope="module")
def app_bundle(trained_bundle, plain_bundle, inputs, tmp_path_factory) -> Path:
    """The tiny bundle as the main job leaves it: the weights and, beside them, an operating point
    (``models/operating_point.json``: :data:`TINY_CALIBRATION` and a threshold that splits the test's two ROIs, chosen
    on their calibrated probabilities)."""
    write_tiny_operating_point(trained_bundle, 0.5)
    calibrated = read_reference(trained_bundle, inputs, tmp_path_factory.mktemp("threshold"))
    write_tiny_operating_point(
        trained_bundle, splitting_threshold({k: float(r["prob_malignant"]) for k, r in calibrated.items()})
    )
    return trained_bundle


def test_app_bundle_is_what_the_main_job_leaves(app_bundle):
    assert sorted(p.name for p in (app_bundle / "models").iterdir()) == ["model.pt", "operating_point.json"]
    config = json.loads((app_bundle / "configs" / "inference.json").read_text())
    assert config["num_members"] == "$scripts.model.network.count_members(@model_file)"  # read from the weights
    assert config["bundle_root"] == "."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Two synthetic test ROIs as a 16-bit PNG, a MONOCHROME2 and a MONOCHROME1 DICOM, a truncated DICOM, a DICOM
    that states no pixel pitch (the first ROI at 4x the resolution), and the real CBIS-DDSM DICOM under a neutral name
    when ../shared/data has it."""
    from scripts.data.imageio import read_roi_png, write_roi_png
    from scripts.data.prepare.dicom_writer import write_dicom
    from scripts.data.schema import load_split
    from scripts.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("app_inputs")
    datalist = generate_dataset(root / "synthetic", "target", n_train=2, n_test=4, num_folds=2, image_size=64, seed=5)
    rois = [read_roi_png(it["image"]) for it in load_split(datalist, "test")[:2]]
    folder = root / "dicoms"
    folder.mkdir()
    stored = [np.round(r * 4095).astype(np.uint16) for r in rois]
    dicom = dict(bits_stored=12, window=(2048, 4096), patient_name=PATIENT[0], patient_id=PATIENT[1])
    pitch = {"pixel_spacing": (TINY_SETTINGS["roi_pitch_mm"],) * 2}  # the window maps stored 0..4095 to [0, 1]
    scale = round(TINY_SETTINGS["roi_pitch_mm"] / NO_PITCH_MM)
    files = {
        "png": write_roi_png(root / "roi_png.png", rois[0]),
        "mono2": write_dicom(folder / "roi_mono2.dcm", stored[0], **dicom, **pitch),
        "mono1": write_dicom(folder / "roi_mono1.dcm", 4095 - stored[1], photometric="MONOCHROME1", **dicom, **pitch),
        "nopitch": write_dicom(root / "roi_nopitch.dcm", np.kron(stored[1], np.ones((scale, scale), np.uint16)), **dicom),
    }  # fmt: skip
    files["nouid"] = write_dicom(root / "roi_nouid.dcm", stored[0], **dicom, **pitch)  # no study/series UIDs
    study = generate_uid()  # the test DICOMs form one study, as a PACS would send them
    for key in ("mono2", "mono1", "nopitch"):
        add_study(files[key], study)
    data = files["mono2"].read_bytes()
    files["corrupt"] = folder / "roi_corrupt.dcm"
    files["corrupt"].write_bytes(data[: len(data) - 3000])  # pixel data cut short
    if CBIS_DICOM.is_file():
        files["cbis"] = shutil.copyfile(CBIS_DICOM, root / "cbis_roi.dcm")  # its name holds the patient's case id
    yield files
    shutil.rmtree(root)  # DICOMs with patient attributes leave no copy behind (pytest keeps its temporary folders)


def add_study(path: Path, study_uid: str) -> None:
    """Give a DICOM written by the bundle's test writer the study and series attributes a PACS's DICOMs have."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "101500", "1", PATIENT[2], 1, 1
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "19600101", "F", ""
    ds.save_as(path)


def need_cbis(inputs) -> Path:
    if "cbis" not in inputs:
        pytest.skip(f"{CBIS_DICOM} absent (the real CBIS-DDSM DICOM of ../shared/data)")
    return inputs["cbis"]


@pytest.fixture(scope="module")
def reference_rows(app_bundle, inputs, tmp_path_factory) -> dict[str, dict]:
    """The calibrated bundle's own inference (configs/inference.json's predictions.csv rows) by input key."""
    return read_reference(app_bundle, inputs, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def reference(reference_rows) -> dict[str, np.ndarray]:
    """The calibrated bundle's own (benign, malignant) probabilities by input key."""
    return {k: np.array([float(r["prob_benign"]), float(r["prob_malignant"])]) for k, r in reference_rows.items()}


@pytest.fixture(scope="module")
def member_probabilities(trained_bundle, inputs) -> dict[str, np.ndarray]:
    """Each member's probability of malignancy on each synthetic input, computed here with the bundle's classes (the
    uncalibrated network of the weights file on the bundle's reader's ROI); the DICOM without a pitch at its pitch."""
    import torch

    from scripts.data.inputs import LoadInputd
    from scripts.model.network import Ensemble

    network = Ensemble(NUM_MEMBERS, TINY_SETTINGS["arch"]).eval()
    network.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    load = LoadInputd(image_size=64, pitch_mm=TINY_SETTINGS["roi_pitch_mm"], roi_size=64, on_error="raise")
    out = {}
    for key in SYNTHETIC:
        item = {"image": str(inputs[key]), **({"spacing_mm": NO_PITCH_MM} if key == "nopitch" else {})}
        with torch.no_grad():
            out[key] = network.member_probabilities(load(item)["image"][None])[:, 0, 1].double().numpy()
    return out


def test_reference_probabilities_are_not_degenerate(reference, reference_rows):
    """The comparisons below mean something only if the tiny model's outputs vary and are not saturated (on the
    synthetic inputs; the real CBIS-DDSM mass ROI is far from its training data), if its members disagree, and if the
    operating point calls the test's two ROIs differently."""
    p = np.array([reference[k][1] for k in SYNTHETIC])
    assert np.all((p > 0.01) & (p < 0.99)), p
    assert np.allclose([v.sum() for v in reference.values()], 1.0, atol=1e-5)
    assert all(float(reference_rows[k]["uncertainty"]) > 1e-3 for k in SYNTHETIC), reference_rows
    assert {reference_rows[k]["pred_class"] for k in ("mono2", "mono1")} == {"0", "1"}, reference_rows


def test_reference_probability_is_the_calibrated_one(reference_rows, member_probabilities):
    """configs/inference.json's probability is the calibration of the members' mean log-odds (sigmoid(0.7 z + 0.2)),
    not the mean of their probabilities; its uncertainty is the members' population standard deviation."""
    for key in SYNTHETIC:
        m = member_probabilities[key]
        z = np.mean(np.log(m) - np.log1p(-m))
        calibrated = 1 / (1 + np.exp(-(TINY_CALIBRATION["scale"] * z + TINY_CALIBRATION["bias"])))
        row = reference_rows[key]
        assert float(row["prob_malignant"]) == pytest.approx(calibrated, abs=TOL), key
        assert abs(float(row["prob_malignant"]) - m.mean()) > 10 * TOL, key
        assert float(row["uncertainty"]) == pytest.approx(m.std(), abs=TOL), key
        assert row["operating_point"].startswith("test; calibrated probability >= "), row


def no_identifiers(text: str, what: str) -> None:
    for s in (*PATIENT, *CBIS_PATIENT):
        assert s not in text, f"{what} holds the patient identifier {s!r}"


# -- the inference config's contract with both tools' stock operators (runs without the apps' environments) ---------


def test_inference_config_fits_the_stock_operators(tmp_path):
    """What MONAI Label's ``BundleInferTask`` and MONAI Deploy's ``MonaiBundleInferenceOperator`` rely on."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from scripts.data.imageio import write_roi_png

    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    assert fmt["outputs"]["pred"]["type"] == "probabilities"  # Deploy: a dict with the probabilities
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "benign", "1": "malignant"}  # Label: the labels
    assert "classification" in meta["name"].lower()  # Label infers the task type from such names
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    # MONAI Label passes the device as a string; fp32 (bf16 autocast rounds the probabilities to ~3 digits)
    from scripts.model.network import Ensemble

    torch.save(Ensemble(2, "resnet18").state_dict(), tmp_path / "model.pt")  # the member count is read from it
    parser.update({"arch": "resnet18", "device": "cpu", "on_input_error": "raise", "amp": False})
    parser.update({"model_file": str(tmp_path / "model.pt")})
    pre = parser.get_parsed_content("preprocessing")
    assert isinstance(pre, Compose)  # Deploy requires a Compose
    assert not [t for t in pre.transforms if type(t).__name__.startswith("LoadImage")]  # Deploy would strip them
    roi = np.random.default_rng(0).uniform(0.2, 0.8, (64, 64)).astype(np.float32)  # not blank: blank ROIs are errors
    write_roi_png(tmp_path / "a.png", roi)
    for image in (str(tmp_path / "a.png"), roi):  # a file (Label), an array (Deploy)
        out = pre({"image": image})
        assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, 128, 128)  # Deploy reads .meta
    # the apps apply no postprocessing (the network returns the final probabilities); saliency stays out of it
    assert "saliency" not in str(parser["postprocessing"]).lower()
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        probs = parser.get_parsed_content("inferer")(out["image"][None], net)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)  # already probabilities


# -- MONAI Label ---------------------------------------------------------------------------------------------------


def post(
    url: str,
    files: dict[str, tuple[str, bytes]] | None = None,
    fields: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, dict]:
    """POST a multipart form (``files``: field -> (file name, bytes); ``fields``: field -> text); return (HTTP
    status, JSON body)."""  # fmt: skip
    boundary = uuid.uuid4().hex
    parts = []
    for field, (name, data) in (files or {}).items():
        head = f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\nContent-Type: application/octet-stream'
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    for field, text in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{text}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"{}")
        except json.JSONDecodeError:
            return e.code, {"text": text.decode(errors="replace")}


def post_file(url: str, path: Path, **fields: str) -> tuple[int, dict]:
    return post(url, {"file": (path.name, path.read_bytes())}, fields)


def post_raw(url: str, path: Path | None = None, timeout: float = 120) -> tuple[int, str, bytes]:
    """POST ``path`` as the multipart field ``file`` (or an empty form); return (HTTP status, content type, body)."""
    boundary = uuid.uuid4().hex
    body = b""
    if path is not None:
        head = f'Content-Disposition: form-data; name="file"; filename="{path.name}"'
        body = f"--{boundary}\r\n{head}\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def multipart_parts(content_type: str, body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """The parts of a ``multipart/form-data`` answer, in order: field name -> (file name, content type, bytes)."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert content_type.startswith("multipart/form-data") and boundary, content_type
    parts = {}
    for chunk in body.split(b"--" + boundary.group(1).encode())[1:-1]:
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = head.decode()
        filename = re.search(r'filename="([^"]*)"', headers)
        kind = re.search(r"(?im)^content-type:\s*(\S+)", headers)
        parts[re.search(r'[;\s]name="([^"]*)"', headers).group(1)] = (
            filename.group(1) if filename else None,
            kind.group(1) if kind else "",
            data[:-2] if data.endswith(b"\r\n") else data,
        )
    return parts


def probabilities(body: dict) -> np.ndarray:
    return np.array([body["probabilities"]["benign"], body["probabilities"]["malignant"]])


@contextlib.contextmanager
def running_label_server(
    bundle: Path, inputs: dict[str, Path], work: Path, dicomweb: str | None = None, studies: Sequence[Path] = ()
) -> Iterator[tuple[str, dict, Path]]:
    """The documented ``start_server`` command, run from ``bundle`` (as documented) on a free port, with a fresh
    temporary folder (TMPDIR) and studies folder under ``work`` (holding the test's PNG ROI and the files
    ``studies``; or, with ``dicomweb``, the documented command for a DICOMweb server at that root URL); yields (base
    URL, /info/ answer, ``work``); stopped after."""
    need_env(LABEL_PY, "monailabel")
    (work / "studies").mkdir(parents=True)
    shutil.copyfile(inputs["png"], work / "studies" / "study_roi.png")  # a datastore image, inferred by its id
    for path in studies:
        shutil.copyfile(path, work / "studies" / path.name)
    (work / "tmp").mkdir()
    port = free_port()
    if dicomweb:
        cmd = fill(commands("label_server_dicomweb")[0], port=port, dicomweb=dicomweb)
    else:
        cmd = fill(commands("label_server")[0], studies=work / "studies", port=port)
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(work / "sessions"), "TMPDIR": str(work / "tmp")}
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd}"], cwd=bundle, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            info = wait_for_json(f"{base}/info/", proc, work / "server.log", 180, cmd)
        except RuntimeError as e:
            pytest.fail(str(e))
        yield base, info, work
    finally:
        stop_process_group(proc)
        log.close()
    with pytest.raises(OSError):  # stopped: nothing answers on the port any more
        urllib.request.urlopen(f"{base}/info/", timeout=5)


@pytest.fixture(scope="module")
def label_server(app_bundle, inputs, tmp_path_factory) -> Iterator[tuple[str, dict, Path]]:
    """The Label server on the tiny bundle with its operating point: (base URL, /info/ answer, work folder)."""
    with running_label_server(app_bundle, inputs, tmp_path_factory.mktemp("monailabel")) as server:
        yield server


def test_monailabel_lists_the_classification_model_with_the_bundle_version(label_server, app_bundle):
    _, info, _ = label_server
    model = info["models"][MODEL]
    assert model["type"] == "classification"
    assert model["labels"] == {"benign": 0, "malignant": 1}
    assert info["version"] == model["version"] == VERSION
    assert "bundle " + str(app_bundle) in (label_server[2] / "server.log").read_text()  # the clone, found from the app


def check_result(body: dict, row: dict, what: str) -> None:
    """An app's answer for one ROI says what the bundle's predictions.csv ``row`` says: the probabilities and the
    members' disagreement to 1e-4, the call, the threshold and the operating point's description."""
    np.testing.assert_allclose(
        probabilities(body), [float(row["prob_benign"]), float(row["prob_malignant"])], atol=TOL, err_msg=what
    )
    assert body["pred_class"] == int(row["pred_class"]), (what, body, row)
    assert body["pred_label"] == row["pred_label"] == ("benign", "malignant")[body["pred_class"]], what
    assert body["decision_threshold"] == pytest.approx(float(row["threshold"]), rel=1e-5), what
    assert body["operating_point"] == row["operating_point"], what
    assert body["uncertainty"] == pytest.approx(float(row["uncertainty"]), abs=TOL), (what, body, row)


@pytest.mark.parametrize("key", ["png", "mono2", "mono1"])
def test_monailabel_infer_matches_bundle_inference(label_server, inputs, reference_rows, key):
    base, _, _ = label_server
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", inputs[key])
    assert status == 200, body
    check_result(body, reference_rows[key], key)
    assert [p["label"] for p in body["prediction"]] == ["benign", "malignant"]
    assert body["model"]["version"] == VERSION
    no_identifiers(json.dumps(body), "the answer")


def test_monailabel_infers_a_datastore_image_by_its_id(label_server, reference):
    base, _, _ = label_server
    status, body = post(f"{base}/infer/{MODEL}?image=study_roi&output=json")
    assert status == 200, body
    np.testing.assert_allclose(probabilities(body), reference["png"], atol=TOL)


def test_monailabel_documented_curl_commands(label_server, app_bundle, inputs, reference):
    """Each documented ``curl`` command, run as written from the bundle folder, with ``roi.dcm`` there."""
    base, _, _ = label_server
    shutil.copyfile(inputs["mono2"], app_bundle / "roi.dcm")
    port = urllib.parse.urlsplit(base).port
    try:
        for cmd in commands("label_curl"):
            proc = subprocess.run(
                ["bash", "-c", fill(cmd, port=port)], cwd=app_bundle, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, (cmd, proc.stderr)
            body = json.loads(proc.stdout)
            np.testing.assert_allclose(probabilities(body), reference["mono2"], atol=TOL, err_msg=cmd)
        for cmd in commands("label_curl_saliency"):  # the overlay PNG, saved under the name -o gives
            saved = app_bundle / shlex.split(cmd)[shlex.split(cmd).index("-o") + 1]
            proc = subprocess.run(
                ["bash", "-c", fill(cmd, port=port)], cwd=app_bundle, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, (cmd, proc.stderr)
            try:
                assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (cmd, saved.read_bytes()[:2000])
            finally:
                saved.unlink()
    finally:
        (app_bundle / "roi.dcm").unlink()


def test_monailabel_takes_the_pitch_of_a_dicom_without_one_from_params(label_server, inputs, reference, reference_rows):
    base, _, _ = label_server
    url = f"{base}/infer/{MODEL}?output=json"
    status, body = post_file(url, inputs["nopitch"])
    assert status == 422, body
    assert body["detail"].startswith("roi_nopitch.dcm: ") and "params.spacing_mm" in body["detail"], body
    status, body = post_file(url, inputs["nopitch"], params=json.dumps({"spacing_mm": NO_PITCH_MM}))
    assert status == 200, body
    check_result(body, reference_rows["nopitch"], "nopitch")
    # a pitch the file states wins over the parameter
    status, body = post_file(url, inputs["mono2"], params=json.dumps({"spacing_mm": NO_PITCH_MM}))
    assert status == 200, body
    np.testing.assert_allclose(probabilities(body), reference["mono2"], atol=TOL)


def test_monailabel_classifies_the_real_cbis_ddsm_dicom_given_its_pitch(label_server, inputs, reference_rows):
    cbis = need_cbis(inputs)
    base, _, _ = label_server
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", cbis)
    assert status == 422 and "params.spacing_mm" in body["detail"], body
    status, body = post_file(
        f"{base}/infer/{MODEL}?output=json", cbis, params=json.dumps({"spacing_mm": CBIS_PITCH_MM})
    )
    assert status == 200, body
    check_result(body, reference_rows["cbis"], "cbis")
    no_identifiers(json.dumps(body), "the answer")


def bad_requests(inputs: dict[str, Path]) -> list[tuple[str, str, dict, dict, int, str]]:
    """(what, URL suffix, files, fields, expected status, text the reason must hold) for users' mistakes."""
    dcm = ("roi.dcm", inputs["mono2"].read_bytes())
    return [
        ("corrupt upload", f"/infer/{MODEL}", {"file": (inputs["corrupt"].name, inputs["corrupt"].read_bytes())}, {},
         422, "roi_corrupt.dcm: cannot use the image: pixel data"),
        ("empty upload", f"/infer/{MODEL}", {"file": ("empty.dcm", b"")}, {}, 422, "empty.dcm: the uploaded file is empty"),
        ("not an image", f"/infer/{MODEL}", {"file": ("notes.dcm", b"DOE^JANE PID123 " * 64)}, {}, 422, "notes.dcm:"),
        ("unknown model", "/infer/no_such_model", {"file": dcm}, {}, 404, "no model 'no_such_model'"),
        ("unknown image id", f"/infer/{MODEL}?image=no_such_image", {}, {}, 404, "no image 'no_such_image'"),
        ("no file, no image", f"/infer/{MODEL}", {}, {}, 400, "no image given"),
        ("output=dicom_seg", f"/infer/{MODEL}?output=dicom_seg", {"file": dcm}, {}, 400,
         "output=dicom_seg is not offered by this classification model: use output=json, image or all"),
        ("corrupt upload, output=image", f"/infer/{MODEL}?output=image",
         {"file": (inputs["corrupt"].name, inputs["corrupt"].read_bytes())}, {}, 422, "roi_corrupt.dcm: cannot use"),
        ("no pitch, output=all", f"/infer/{MODEL}?output=all",
         {"file": ("nopitch.dcm", inputs["nopitch"].read_bytes())}, {}, 422, "nopitch.dcm: cannot use the image"),
        ("output=bogus", f"/infer/{MODEL}?output=bogus", {"file": dcm}, {}, 422, "output"),
        ("params not JSON", f"/infer/{MODEL}", {"file": dcm}, {"params": "{spacing"}, 400, "params is not valid JSON"),
        ("pitch out of range", f"/infer/{MODEL}", {"file": dcm}, {"params": '{"spacing_mm": 7}'}, 400,
         "params.spacing_mm must be a pixel pitch in mm between 0.01 and 1, got 7"),
        ("label upload", f"/infer/{MODEL}", {"file": dcm, "label": ("label.nii.gz", b"x")}, {}, 400, "label upload"),
        ("no pitch", f"/infer/{MODEL}", {"file": ("nopitch.dcm", inputs["nopitch"].read_bytes())}, {}, 422,
         "nopitch.dcm: cannot use the image: pixel pitch unknown"),
    ]  # fmt: skip


def test_monailabel_answers_mistakes_with_a_4xx_and_leaves_no_upload_behind(
    label_server, app_bundle, inputs, reference
):
    """Every mistake gets its 4xx and reason (never a 500); afterwards the server's temporary folder holds no upload
    and no patient identifier, and the server still answers a good upload."""
    base, _, work = label_server

    def temporary_files() -> set[str]:
        return {str(p.relative_to(work / "tmp")) for p in (work / "tmp").rglob("*")}

    before = temporary_files()  # the server's own (its logging configuration)
    for what, suffix, files, fields, code, reason in bad_requests(inputs):
        status, body = post(base + suffix, files, fields)
        assert status == code, (what, status, body)
        assert reason in json.dumps(body), (what, body)
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", inputs["mono1"])
    assert status == 200, body
    np.testing.assert_allclose(probabilities(body), reference["mono1"], atol=TOL)
    for output in ("image", "all"):  # their overlay and map are written to the request's private folder
        status, _, data = post_raw(f"{base}/infer/{MODEL}?output={output}", inputs["mono1"])
        assert status == 200, data[:1000]
    time.sleep(1)  # background tasks run after the answer is sent
    left = sorted(temporary_files() - before)
    assert left == [], f"files left in the server's temporary folder: {left}"
    for path in [work / "server.log", *(work / "tmp").rglob("*"), *(app_bundle / "apps" / "monailabel").rglob("*.log")]:
        if path.is_file():
            no_identifiers(path.read_text(errors="replace"), str(path))


def test_bundle_dicom_reader_gives_the_same_hints_under_the_apps_pydicom_2():
    """The MONAI Label environment has pydicom 2: the reader's decoder check must answer as under pydicom 3."""
    need_env(LABEL_PY, "monailabel")
    from scripts.data.prepare.dicom_io import missing_decoder_message

    uids = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"]  # none, JPEG-LS, RLE
    code = (
        "import json, sys, pydicom; from scripts.data.prepare.dicom_io import missing_decoder_message as m; "
        "print(json.dumps([pydicom.__version__, [m(u) for u in sys.argv[1:]]]))"
    )
    proc = subprocess.run([str(LABEL_PY), "-c", code, *uids], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, hints = json.loads(proc.stdout.strip().splitlines()[-1])
    assert version.startswith("2.")
    assert hints == [missing_decoder_message(u) for u in uids]


# -- saliency in the viewer: output=image and output=all --------------------------------------------------------------


def nifti_map(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A saliency map written by ``scripts.saliency.render.save_map_nifti``: ``(H, W)`` and the voxel size in mm."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32).T, tuple(float(z) for z in image.header.get_zooms()[:2])


@pytest.fixture(scope="module")
def bundle_saliency(app_bundle, inputs, tmp_path_factory) -> dict:
    """The bundle's saliency workflow (``configs/inference.json`` + ``configs/saliency.json``, run id ``saliency``,
    as the main job runs it; no randomisation check) on a folder holding the test's PNG ROI: its NIfTI map and zooms,
    its row and its settings (``localisation.json``)."""
    from monai.bundle import ConfigWorkflow

    work = tmp_path_factory.mktemp("bundle_saliency")
    (work / "in").mkdir()
    shutil.copyfile(inputs["png"], work / "in" / inputs["png"].name)
    configs = app_bundle / "configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / "inference.json"), str(configs / "saliency.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        run_id="saliency",
        workflow_type=None,
        bundle_root=str(app_bundle),
        input_dir=str(work / "in"),
        output_dir=str(work / "out"),
        **{"saliency#randomisation": "none"},
    )
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    out = work / "out" / "saliency"
    summary = json.loads((out / "localisation.json").read_text())
    row = next(r for r in summary["cases"] if r["case"] == inputs["png"].stem)
    cam, zooms = nifti_map(out / row["map"])
    return {"map": cam, "zooms": zooms, "row": row, "settings": summary["settings"]}


TEXT_BAND = 3 * 18 + 6  # render_overlay's text band for three lines


def overlay_below_text(png: bytes) -> np.ndarray:
    """The image part of a rendered overlay PNG (below ``render_overlay``'s three-line text band), as RGB uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[TEXT_BAND:]


def test_monailabel_output_all_is_the_bundles_saliency_map_with_its_overlay_and_json(
    label_server, app_bundle, inputs, reference_rows, bundle_saliency, tmp_path
):
    """``output=all``: as MONAI Label's stock ``all``, a multipart answer with the JSON (``params``) and the image
    (``image``: the overlay PNG), plus the map itself (``map``, NIfTI); the map is the bundle's saliency workflow's
    for the same ROI (same method, layer and target: max |difference| <= 1e-4, correlation >= 0.9999) and the
    overlay is the bundle's rendering of the ROI with that map."""
    from scripts.data.inputs import LoadInputd
    from scripts.saliency.render import render_overlay

    base, _, _ = label_server
    status, content_type, body = post_raw(f"{base}/infer/{MODEL}?output=all", inputs["png"])
    assert status == 200 and content_type.startswith("multipart/form-data"), (status, content_type, body[:500])
    parts = multipart_parts(content_type, body)
    assert list(parts) == ["params", "image", "map"], list(parts)
    params = json.loads(parts["params"][2])
    check_result(params, reference_rows["png"], "png")
    configured = json.loads((app_bundle / "configs" / "saliency.json").read_text())["saliency"]
    record = params["saliency"]
    assert record["method"] == configured["method"] == bundle_saliency["settings"]["method"] == "hirescam"
    assert record["target"] == configured["target"] == "malignant"
    assert record["layer"] == bundle_saliency["settings"]["layer"]
    assert (record["overlay"], record["map"]) == ("overlay.png", "saliency_map.nii.gz")
    assert parts["image"][:2] == ("overlay.png", "image/png") and parts["map"][0] == "saliency_map.nii.gz"
    (tmp_path / "map.nii.gz").write_bytes(parts["map"][2])
    cam, zooms = nifti_map(tmp_path / "map.nii.gz")
    expected = bundle_saliency["map"]
    assert cam.shape == expected.shape == tuple(record["shape"]) == (64, 64)
    assert zooms == bundle_saliency["zooms"] and zooms == pytest.approx((record["spacing_mm"],) * 2)  # NIfTI: float32
    difference = float(np.abs(cam - expected).max())
    correlation = float(np.corrcoef(cam.ravel(), expected.ravel())[0, 1])
    assert difference <= 1e-4 and correlation >= 0.9999, (difference, correlation)
    assert cam.max() == pytest.approx(1.0) and cam.std() > 0.05  # a map, not a blank
    assert float(bundle_saliency["row"]["prob_malignant"]) == pytest.approx(
        params["probabilities"]["malignant"], abs=TOL
    )
    load = LoadInputd(image_size=64, pitch_mm=TINY_SETTINGS["roi_pitch_mm"], roi_size=64, on_error="raise")
    roi = load({"image": str(inputs["png"])})["image"][0].numpy()
    shown = overlay_below_text(parts["image"][2])
    drawn = render_overlay(roi, expected, ["", "", ""])[TEXT_BAND:]
    assert shown.shape == drawn.shape
    off = np.abs(shown.astype(int) - drawn.astype(int))
    # the same grey ROI; the blended half within 3 of 255 grey levels (measured: 4 % of its values differ, the maps
    # by at most 4.4e-6; the Label environment has other numpy and matplotlib builds)
    assert off[:, :256].max() == 0 and off.max() <= 3 and off.mean() < 0.05, (off.max(), off.mean())
    no_identifiers(json.dumps(params), "the answer")


def test_monailabel_output_image_is_the_saliency_overlay(label_server, inputs, reference_rows, tmp_path):
    """``output=image`` answers the overlay PNG alone, the same image ``output=all`` carries; for a DICOM too."""
    base, _, _ = label_server
    status, content_type, png = post_raw(f"{base}/infer/{MODEL}?output=image", inputs["png"])
    assert status == 200 and content_type == "image/png", (status, content_type, png[:300])
    status, content_type, body = post_raw(f"{base}/infer/{MODEL}?output=all", inputs["png"])
    assert status == 200
    assert png == multipart_parts(content_type, body)["image"][2]
    status, content_type, png = post_raw(f"{base}/infer/{MODEL}?output=image", inputs["mono1"])
    assert status == 200 and content_type == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = overlay_below_text(png)
    assert rgb.shape == (256, 2 * 256 + 4, 3)  # the 64-px ROI enlarged 4x, beside its overlay
    assert np.abs(rgb[:, 256 + 4 :].astype(int) - rgb[:, :256].astype(int)).mean() > 5  # a map is drawn


# -- MONAI Deploy --------------------------------------------------------------------------------------------------


# -- learning from the radiologist: labels, fine-tuning into a new model version, uncertainty sampling ------------

#: the labelled images of the learning round: enough of each class for the tiny bundle's two folds
N_LABELLED_PER_CLASS = 3


@pytest.fixture(scope="module")
def learning_round(app_bundle, inputs, tmp_path_factory) -> Iterator[tuple[dict, dict, Path, str]]:
    """A round of active learning on a copy of the tiny bundle deployed with a sensitivity rule, through MONAI Label's
    client (``tests.label_learning_client``) against the documented server: ten more synthetic ROIs in the studies,
    three labelled per class, one fine-tuning run of one epoch, then a label that names no class and a second run.
    Yields (what the client saw, the labels given, the bundle, the server's work folder)."""
    from scripts.data.schema import TARGET_CLASSES, load_split
    from scripts.data.synthetic import generate_dataset
    from scripts.model.calibration import write_operating_point

    root = tmp_path_factory.mktemp("learning")
    bundle = root / MODEL
    shutil.copytree(app_bundle, bundle, symlinks=True)
    rule = {"rule": "sensitivity", "value": 0.9, "rule_description": "test: sensitivity 0.9 on validation"}
    write_operating_point(bundle / "models" / "model.pt", {"threshold": 0.5, **rule, "calibration": TINY_CALIBRATION})
    datalist = generate_dataset(root / "synthetic", "target", n_train=10, n_test=0, num_folds=2, image_size=64, seed=11)
    rois, labels, per_class = [], {}, {c: 0 for c in TARGET_CLASSES}
    for i, item in enumerate(load_split(datalist, "training")):
        rois.append(shutil.copyfile(item["image"], root / f"roi{i:02d}.png"))
        name = TARGET_CLASSES[int(item["label"])]
        if per_class[name] < N_LABELLED_PER_CLASS:
            labels[f"roi{i:02d}"], per_class[name] = name, per_class[name] + 1
    assert all(n == N_LABELLED_PER_CLASS for n in per_class.values()), per_class
    (root / "labels.json").write_text(json.dumps(labels))
    with running_label_server(bundle, inputs, root / "server", studies=rois) as (base, _, work):
        client = [str(LABEL_PY), "-m", "tests.label_learning_client", base, MODEL, str(root / "labels.json")]
        done = subprocess.run(
            client + ["--bad-label", "study_roi"], cwd=REPO, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-3000:] + (work / "server.log").read_text()[-3000:]
        yield json.loads(done.stdout), labels, bundle, work, base


def most_uncertain(predictions: dict, images: Sequence[str]) -> str:
    return max(images, key=lambda image: predictions[image]["u"])


def test_monailabel_offers_a_train_task_and_the_uncertainty_strategy(learning_round):
    seen = learning_round[0]
    assert seen["trainers"] == [MODEL]
    assert {"random", "uncertainty"} <= set(seen["strategies"])


def test_monailabel_uncertainty_strategy_picks_the_unlabelled_image_the_members_disagree_on_most(learning_round):
    seen, labels = learning_round[:2]
    images, before, after = seen["images"], seen["before"], seen["after"]
    assert len({round(p["u"], 6) for p in before.values()}) > 1, "the members agree equally on every image"
    assert seen["first_pick"]["id"] == most_uncertain(before, images)
    unlabelled = [i for i in images if i not in labels]
    assert seen["next_pick"]["id"] == most_uncertain(before, unlabelled)
    assert seen["pick_after"]["id"] == most_uncertain(after, unlabelled)  # scored again by the new version
    assert seen["pick_after"]["model_version"] == seen["after"][images[0]]["version"]["version"]
    assert seen["random_pick"]["id"] in unlabelled


def test_monailabel_training_publishes_a_new_version_that_infer_then_uses(learning_round, app_bundle):
    seen, labels, bundle, work, _ = learning_round
    version = json.loads((app_bundle / "configs" / "metadata.json").read_text())["version"]
    assert seen["training"]["status"] == "DONE", seen["training"]
    assert {p["version"]["version"] for p in seen["before"].values()} == {version}
    assert {p["version"]["version"] for p in seen["after"].values()} == {f"{version}+ft1"}
    change = max(abs(seen["after"][i]["p"] - seen["before"][i]["p"]) for i in seen["images"])
    assert change > 1e-4, f"no prediction changed after fine-tuning (largest change {change:.2e})"
    stats = seen["train_stats"]
    assert stats["current_version"] == f"{version}+ft1"
    published = stats["versions"][0]
    assert published["from_version"] == version
    assert published["labels"] == {"benign": N_LABELLED_PER_CLASS, "malignant": N_LABELLED_PER_CLASS}
    assert "sensitivity" in published["operating_point"]  # the deployed rule, chosen again on the new model
    folder = bundle / "models" / "finetuned" / MODEL / "v1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "operating_point.json", "version.json"]
    assert not list((work / "tmp").glob("finetune-*")), "the training's work folder was left behind"


def test_monailabel_training_with_a_label_naming_no_class_fails_clearly_and_keeps_the_version(
    learning_round, app_bundle
):
    seen, _, bundle, work, _ = learning_round
    version = json.loads((app_bundle / "configs" / "metadata.json").read_text())["version"]
    bad = seen["bad_training"]
    assert bad["status"] == "ERROR", bad
    assert any("label of image 'study_roi'" in line and "must be one of" in line for line in bad["details"]), "\n".join(
        bad["details"]
    )
    assert {p["version"]["version"] for p in seen["after_bad"].values()} == {f"{version}+ft1"}
    assert seen["stats_after_bad"]["current_version"] == f"{version}+ft1"
    sync = seen["bad_training_sync"]  # POST /train/...?run_sync=true: a 4xx with the reason, not a 500
    assert sync["status"] == 422 and "label of image 'study_roi'" in sync["body"]["detail"], sync
    assert len(seen["stats_after_bad"]["versions"]) == 1
    assert not list((work / "tmp").glob("finetune-*"))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_monailabel_documented_learning_commands(learning_round, app_bundle):
    """README's and this page's learning round, run as written from the bundle folder (after the client's round):
    it labels ``study_roi`` malignant (replacing the label that named no class), trains, and the next version
    answers."""
    _, _, bundle, _, base = learning_round
    version = json.loads((app_bundle / "configs" / "metadata.json").read_text())["version"]
    port = base.rsplit(":", 1)[1]
    for number, script in enumerate(commands("label_learning"), start=2):
        done = subprocess.run(
            ["bash", "-ec", fill(script, port=port, image_id="study_roi")], cwd=bundle, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        first = json.JSONDecoder().raw_decode(done.stdout)[0]  # the uncertainty pick
        assert "id" in first and "uncertainty" in first, done.stdout
        t0 = time.time()
        while get_json(f"{base}/train/").get("status") in ("SUBMITTED", "RUNNING") and time.time() - t0 < 300:
            time.sleep(1)
        assert get_json(f"{base}/train/")["status"] == "DONE", get_json(f"{base}/train/")
        with urllib.request.urlopen(f"{base}/datastore/label?label=study_roi&tag=final", timeout=60) as r:
            assert json.loads(r.read()) == {"label": "malignant"}
        status, body = post(f"{base}/infer/{MODEL}?image=study_roi&output=json")
        assert status == 200 and body["model"]["version"] == f"{version}+ft{number}", body


def run_deploy(bundle: Path, dicoms: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """The documented Deploy command, run from the bundle folder, on ``dicoms`` into ``out``, plus ``options``."""
    need_env(DEPLOY_PY, "deploy")
    cmd = " ".join([fill(commands("deploy")[0], dicoms=dicoms, output=out), *map(shlex.quote, options)])
    return subprocess.run(["bash", "-c", cmd], cwd=bundle, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def deploy_run(app_bundle, inputs, tmp_path_factory) -> Iterator[tuple[subprocess.CompletedProcess, Path]]:
    """The documented command (no ``-m``: the bundle is the clone the app lives in) on a folder with a MONOCHROME2,
    a MONOCHROME1, a corrupt DICOM and one without a pixel pitch."""
    folder = inputs["mono1"].parent
    shutil.copyfile(inputs["nopitch"], folder / inputs["nopitch"].name)
    out = tmp_path_factory.mktemp("deploy_out")
    yield run_deploy(app_bundle, folder, out), out
    shutil.rmtree(out)  # its SRs and captures carry the test DICOMs' patient attributes


def test_deploy_writes_one_json_per_image_matching_bundle_inference(deploy_run, inputs, reference_rows):
    proc, out = deploy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "roi_corrupt.json", "roi_mono1.json", "roi_mono1.sc.dcm", "roi_mono1.sr.dcm", "roi_mono2.json",
        "roi_mono2.sc.dcm", "roi_mono2.sr.dcm", "roi_nopitch.json",
    ]  # fmt: skip
    for key in ("mono2", "mono1"):
        rec = json.loads((out / f"{inputs[key].stem}.json").read_text())
        assert rec["status"] == "ok" and rec["file"] == inputs[key].name, rec
        check_result(rec, reference_rows[key], key)
        assert rec["model"]["version"] == VERSION
    assert "decision rule: test; calibrated probability >= " in proc.stderr


def test_both_apps_give_the_calibrated_probability_call_and_uncertainty_of_bundle_inference(
    label_server, deploy_run, inputs, reference_rows, member_probabilities, app_bundle
):
    """For the same ROI the Label app, the Deploy app and configs/inference.json give one calibrated probability and
    one members' disagreement (to 1e-4) and one call at the saved operating point, which they name alike; the test's
    two ROIs fall on either side of it, and the probability is not the mean of the members' probabilities."""
    base, _, _ = label_server
    _, out = deploy_run
    saved = json.loads((app_bundle / "models" / "operating_point.json").read_text())
    calls = set()
    for key in ("mono2", "mono1"):
        status, label = post_file(f"{base}/infer/{MODEL}?output=json", inputs[key])
        assert status == 200, label
        deploy = json.loads((out / f"{inputs[key].stem}.json").read_text())
        for body in (label, deploy):
            check_result(body, reference_rows[key], key)
            assert body["decision_threshold"] == saved["threshold"]
            assert body["operating_point"] == f"test; calibrated probability >= {saved['threshold']:.4g}"
            p = body["probabilities"]["malignant"]
            assert abs(p - member_probabilities[key].mean()) > 10 * TOL, (key, p, member_probabilities[key])
            assert body["pred_class"] == int(p >= saved["threshold"])
        assert abs(label["probabilities"]["malignant"] - deploy["probabilities"]["malignant"]) <= TOL
        assert abs(label["uncertainty"] - deploy["uncertainty"]) <= TOL
        assert label["pred_class"] == deploy["pred_class"]
        calls.add(label["pred_label"])
    assert calls == {"benign", "malignant"}


def test_deploy_reports_bad_files_and_writes_no_patient_identifiers(deploy_run):
    proc, out = deploy_run
    rec = json.loads((out / "roi_corrupt.json").read_text())
    assert rec["status"] == "error" and "probabilities" not in rec
    assert "pixel data" in rec["error"], rec
    assert f"roi_corrupt.dcm: {rec['error']}" in proc.stderr
    rec = json.loads((out / "roi_nopitch.json").read_text())
    assert rec["status"] == "error" and "pixel pitch unknown" in rec["error"] and "--spacing-mm" in rec["error"], rec
    assert "2 classified, 2 error(s)" in proc.stderr
    for p in out.glob("*.json"):  # the DICOM results alone carry the patient module (checked below)
        no_identifiers(p.read_text(), p.name)
    no_identifiers(proc.stderr + proc.stdout, "the log")


def sr_values(sr: pydicom.Dataset) -> dict[str, object]:
    """What an SR's content tree says, by concept name: numbers, coded values' meanings, texts."""
    out: dict[str, object] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "NUM":
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE":
                out.setdefault(name, item.ConceptCodeSequence[0].CodeMeaning)
            elif item.ValueType in ("TEXT", "UIDREF"):
                out.setdefault(name, str(item.get("TextValue", item.get("UID", ""))))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path`` (dicom3tools; skips when the validator is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy absent: `apt-get install dicom3tools` (.ci/run installs it)")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def check_dicom_results(out: Path, case: str, source_path: Path) -> None:
    """``case``'s SR and saliency Secondary Capture: valid (dciodvfy: no errors), filed in the source's study with
    its patient module and new UIDs, and saying what the JSON says."""
    rec = json.loads((out / f"{case}.json").read_text())
    assert rec["dicom"] == {"sr": f"{case}.sr.dcm", "sc": f"{case}.sc.dcm"}, rec
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr, sc = (pydicom.dcmread(out / rec["dicom"][k]) for k in ("sr", "sc"))
    for ds in (sr, sc):
        assert dciodvfy_errors(out / rec["dicom"]["sr" if ds is sr else "sc"]) == []
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate"):
            assert ds.get(keyword) == source.get(keyword), keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (IHE AI Results)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == source.StudyInstanceUID
    values = sr_values(sr)
    assert values["Probability of malignancy"] == pytest.approx(rec["probabilities"]["malignant"], abs=1e-6)
    assert values["Decision threshold on probability of malignancy"] == pytest.approx(rec["decision_threshold"])
    assert values["Classification at the decision threshold"] == rec["pred_label"].capitalize()
    assert values["Algorithm Parameters"] == f"Operating point: {rec['operating_point']}"
    disagreement = values["Ensemble members' disagreement on probability of malignancy"]
    assert disagreement == pytest.approx(rec["uncertainty"], abs=1e-6)
    assert values["Intended use"] == "Research use only, not for clinical use"
    assert rec["model"]["name"].startswith(values["Algorithm Name"]) and len(values["Algorithm Name"]) >= 30
    assert values["Algorithm Version"] == VERSION
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_deploy_writes_a_valid_sr_and_saliency_capture_in_the_source_study(deploy_run, inputs):
    _, out = deploy_run
    for key in ("mono2", "mono1"):
        check_dicom_results(out, inputs[key].stem, inputs[key])
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in out.glob("*.dcm")}) == 4  # a new series for each


def test_deploy_saliency_capture_shows_the_bundles_saliency_map(deploy_run, app_bundle, inputs):
    """The Secondary Capture's image is the bundle's own HiResCAM overlay of the ROI (below its text band)."""
    import torch
    from monai.bundle import ConfigParser

    from scripts.data.inputs import LoadInputd
    from scripts.saliency.cam import EnsembleCAM
    from scripts.saliency.render import render_overlay

    _, out = deploy_run
    parser = ConfigParser()
    parser.read_config([str(app_bundle / "configs" / n) for n in ("inference.json", "saliency.json")])
    parser.update({"bundle_root": str(app_bundle), "device": "cpu"})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(app_bundle / "models" / "model.pt", weights_only=True))
    load = LoadInputd(image_size=64, pitch_mm=TINY_SETTINGS["roi_pitch_mm"], roi_size=64, on_error="raise")
    roi = load({"image": str(inputs["mono2"])})["image"]
    cam = EnsembleCAM(network.eval(), method=parser["saliency"]["method"], target=parser["saliency"]["target"])
    expected = render_overlay(roi[0].numpy(), cam(roi[None]).maps[0], ["", "", ""])
    shown = pydicom.dcmread(out / "roi_mono2.sc.dcm").pixel_array
    assert shown.shape == expected.shape
    band = 3 * 18 + 6  # render_overlay's text band for three lines
    diff = np.abs(shown[band:].astype(int) - expected[band:].astype(int))
    assert diff.max() <= 2, diff.max()
    assert np.abs(shown[band:, 256 + 4 :].astype(int) - shown[band:, :256].astype(int)).mean() > 5  # a map is drawn


def test_deploy_spacing_option_gives_the_pitch_of_dicoms_without_one(app_bundle, inputs, reference_rows, tmp_path):
    """``--spacing-mm`` on the test's DICOM without a pitch, the real CBIS-DDSM DICOM (when present; both 0.05 mm)
    and a DICOM that states its own pitch (0.2 mm, kept); and a DICOM without study/series UIDs (classified, no DICOM
    result)."""
    try:
        check_spacing_option(app_bundle, inputs, reference_rows, tmp_path)
    finally:
        shutil.rmtree(tmp_path)  # copies of the real DICOM and results with its patient attributes
    if "cbis" not in inputs:
        need_cbis(inputs)  # reported as a skip: the real DICOM was not tested


def check_spacing_option(app_bundle: Path, inputs: dict[str, Path], reference_rows: dict, tmp_path: Path) -> None:
    assert NO_PITCH_MM == CBIS_PITCH_MM
    (tmp_path / "in").mkdir()
    keys = [k for k in ("nopitch", "cbis", "mono1") if k in inputs]
    shutil.copyfile(inputs["nouid"], tmp_path / "in" / inputs["nouid"].name)
    for key in keys:
        shutil.copyfile(inputs[key], tmp_path / "in" / inputs[key].name)
    proc = run_deploy(app_bundle, tmp_path / "in", tmp_path / "out", "--spacing-mm", str(NO_PITCH_MM))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in keys:
        rec = json.loads((tmp_path / "out" / f"{inputs[key].stem}.json").read_text())
        assert rec["status"] == "ok", rec
        check_result(rec, reference_rows[key], key)
        assert ("spacing_mm" in rec) == (key != "mono1"), rec  # recorded where the option gave the pitch
        no_identifiers(json.dumps(rec), rec["file"])
        check_dicom_results(tmp_path / "out", inputs[key].stem, inputs[key])
    rec = json.loads((tmp_path / "out" / "roi_nouid.json").read_text())  # classified; no DICOM result can be filed
    check_result(rec, reference_rows["mono2"], "nouid")
    assert "StudyInstanceUID" in rec["dicom"]["error"] and "roi_nouid.dcm: no DICOM result" in proc.stderr, rec
    assert not list((tmp_path / "out").glob("roi_nouid.s*.dcm"))
    no_identifiers(proc.stderr + proc.stdout, "the log")


def test_deploy_exits_1_when_no_file_can_be_classified(app_bundle, inputs, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "only.dcm").write_bytes(inputs["corrupt"].read_bytes())
    try:
        proc = run_deploy(app_bundle, tmp_path / "in", tmp_path / "out", "-m", str(app_bundle))
    finally:
        shutil.rmtree(tmp_path / "in")  # a copy with the test's patient attributes
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "0 classified, 1 error(s)" in proc.stderr
    assert json.loads((tmp_path / "out" / "only.json").read_text())["status"] == "error"


def test_deploy_refuses_a_spacing_option_out_of_range(app_bundle, inputs, tmp_path):
    proc = run_deploy(app_bundle, inputs["mono1"].parent, tmp_path / "out", "--spacing-mm", "7")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--spacing-mm must be a pixel pitch in mm between 0.01 and 1, got 7" in proc.stderr, proc.stderr[-1000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- a bundle without an operating point ---------------------------------------------------------------------------


def test_apps_without_an_operating_point_give_the_members_mean_and_call_at_one_half(
    plain_bundle, inputs, member_probabilities, tmp_path
):
    """A bundle trained before the calibration (no models/operating_point.json) still works: both apps and
    configs/inference.json give the mean of the members' probabilities, the call at 0.5 and the same uncertainty, and
    name the rule as uncalibrated."""
    try:
        rows = read_reference(plain_bundle, inputs, tmp_path / "reference")
        for key in SYNTHETIC:
            row = rows[key]
            assert float(row["prob_malignant"]) == pytest.approx(member_probabilities[key].mean(), abs=TOL), key
            assert row["operating_point"] == UNCALIBRATED and float(row["threshold"]) == 0.5, row
            assert int(row["pred_class"]) == int(float(row["prob_malignant"]) >= 0.5), row
        (tmp_path / "in").mkdir()
        for key in ("mono2", "mono1"):
            shutil.copyfile(inputs[key], tmp_path / "in" / inputs[key].name)
        proc = run_deploy(plain_bundle, tmp_path / "in", tmp_path / "out")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"decision rule: {UNCALIBRATED}" in proc.stderr
        with running_label_server(plain_bundle, inputs, tmp_path / "label") as (base, _, _):
            for key in ("mono2", "mono1", "png"):
                status, label = post_file(f"{base}/infer/{MODEL}?output=json", inputs[key])
                assert status == 200, label
                check_result(label, rows[key], key)
                assert label["decision_threshold"] == 0.5 and label["operating_point"] == UNCALIBRATED
                if key != "png":
                    deploy = json.loads((tmp_path / "out" / f"{inputs[key].stem}.json").read_text())
                    check_result(deploy, rows[key], key)
                    assert deploy["decision_threshold"] == 0.5 and deploy["operating_point"] == UNCALIBRATED
                    assert (
                        sr_values(pydicom.dcmread(tmp_path / "out" / deploy["dicom"]["sr"]))[
                            "Decision threshold on probability of malignancy"
                        ]
                        == 0.5
                    )
    finally:
        shutil.rmtree(tmp_path)  # copies of the test DICOMs and results with their patient attributes


# -- a real PACS in the loop: Orthanc ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    """A throwaway Orthanc on 127.0.0.1 (``tests/orthanc.py``: free HTTP and DICOM ports, a temporary storage folder,
    the DICOMweb plugin, local access only, no authentication); stopped and its storage deleted after the module."""
    try:
        find_orthanc(), find_dicomweb_plugin()
    except OrthancUnavailable as e:
        pytest.skip(str(e))
    with running_orthanc() as pacs:
        yield pacs


@pytest.fixture(scope="module")
def orthanc_sources(orthanc, inputs, tmp_path_factory) -> dict[str, str]:
    """The test's MONOCHROME2 and MONOCHROME1 DICOMs (one study) stored on Orthanc with the documented ``storescu``
    command, run as written from a folder holding the file as ``roi.dcm``; their series instance UIDs by key."""
    if shutil.which("storescu") is None:
        pytest.skip("storescu absent: apt-get install dcmtk (.ci/run installs it)")
    work = tmp_path_factory.mktemp("storescu")
    try:
        for key in ("mono2", "mono1"):
            shutil.copyfile(inputs[key], work / "roi.dcm")
            for cmd in commands("storescu"):
                proc = subprocess.run(
                    ["bash", "-c", fill(cmd, dicom_port=orthanc.dicom_port)],
                    cwd=work, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    finally:
        shutil.rmtree(work)  # copies of the test DICOMs
    series = {
        key: str(pydicom.dcmread(inputs[key], stop_before_pixels=True).SeriesInstanceUID) for key in ("mono2", "mono1")
    }
    study = str(pydicom.dcmread(inputs["mono2"], stop_before_pixels=True).StudyInstanceUID)
    stored = orthanc.get(f"/dicom-web/studies/{study}/series")
    assert sorted(s["0020000E"]["Value"][0] for s in stored) == sorted(series.values()), stored
    return series


def test_monailabel_serves_orthanc_studies_over_dicomweb(
    app_bundle, inputs, reference_rows, orthanc, orthanc_sources, tmp_path
):
    """The documented Label command with ``--studies`` Orthanc's DICOMweb root: the datastore lists Orthanc's
    mammography series; ``/infer`` by image id (a series instance UID) gives the bundle's probability, uncertainty and
    call for that ROI (the documented ``curl`` too) and, with ``output=all``, its saliency map; an unknown series is a
    404, a series of two images a 422; no train task is offered (a 404 for ``/train``); nothing fetched from the PACS (nor the datastore's cache) is left in the temporary folder after the server
    stops, and no log holds a patient identifier."""
    with running_label_server(app_bundle, inputs, tmp_path / "label", dicomweb=orthanc.dicomweb) as (base, info, work):
        assert info["trainers"] == {}  # class labels need a --studies folder (a DICOMweb datastore stores DICOM SEG)
        request = urllib.request.Request(
            f"{base}/train/{MODEL}?run_sync=true", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 404 and "no model" in json.loads(answer.value.read())["detail"]
        before = {p.name for p in (work / "tmp").iterdir()}
        assert any(name.startswith("dicomweb-cache-") for name in before), before  # the private cache
        with urllib.request.urlopen(f"{base}/datastore/?output=stats", timeout=60) as r:
            assert json.loads(r.read())["total"] == 2  # the two MG series (not the apps' SR/OT results)
        for key, series in orthanc_sources.items():
            status, body = post(f"{base}/infer/{MODEL}?image={series}&output=json")
            assert status == 200, body
            check_result(body, reference_rows[key], key)
            no_identifiers(json.dumps(body), "the answer")
        port = urllib.parse.urlsplit(base).port
        for cmd in commands("label_curl_id"):
            proc = subprocess.run(
                ["bash", "-c", fill(cmd, port=port, series=orthanc_sources["mono2"])],
                cwd=app_bundle, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, (cmd, proc.stderr)
            check_result(json.loads(proc.stdout), reference_rows["mono2"], cmd)
        status, content_type, body = post_raw(f"{base}/infer/{MODEL}?image={orthanc_sources['mono1']}&output=all")
        assert status == 200, body[:500]
        parts = multipart_parts(content_type, body)
        check_result(json.loads(parts["params"][2]), reference_rows["mono1"], "mono1, output=all")
        assert parts["image"][2][:8] == b"\x89PNG\r\n\x1a\n" and parts["map"][0] == "saliency_map.nii.gz"
        for image, reason in (("1.2.3.4.5.6.7", "no such series on the DICOMweb server"),
                              ("../etc/passwd", "image ids are series instance UIDs")):  # fmt: skip
            status, body = post(f"{base}/infer/{MODEL}?image={urllib.parse.quote(image)}&output=json")
            assert status == 404 and reason in body["detail"], (image, status, body)
        # a series of two images (another study, removed after): one ROI image per series is what the model takes
        study, series = generate_uid(), generate_uid()
        for _ in range(2):
            ds = pydicom.dcmread(inputs["mono2"])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buffer = io.BytesIO()
            ds.save_as(buffer)
            request = urllib.request.Request(f"{orthanc.url}/instances", data=buffer.getvalue(), method="POST")
            with urllib.request.urlopen(request, timeout=60) as r:
                stored = json.loads(r.read())
        status, body = post(f"{base}/infer/{MODEL}?image={series}&output=json")
        assert status == 422 and "the series holds 2 images" in body["detail"], (status, body)
        urllib.request.urlopen(
            urllib.request.Request(f"{orthanc.url}/studies/{stored['ParentStudy']}", method="DELETE"), timeout=60
        ).close()
        time.sleep(1)
        during = {p.name for p in (work / "tmp").iterdir()}
        assert during == before, sorted(during - before)  # each request's fetched DICOM is gone
    left = sorted(p.name for p in (work / "tmp").iterdir() if p.name not in before or p.name.startswith("dicomweb"))
    assert left == [], f"left in the server's temporary folder after it stopped: {left}"
    for path in [work / "server.log", *(work / "tmp").rglob("*")]:
        if path.is_file():
            no_identifiers(path.read_text(errors="replace"), str(path))


def test_deploy_sends_its_results_to_orthanc_filed_under_the_source_study(
    app_bundle, inputs, orthanc, orthanc_sources, tmp_path
):
    """The documented Deploy command with ``--send-to`` Orthanc's DICOMweb root (STOW-RS): each ROI's SR and
    Secondary Capture are on Orthanc, found back by QIDO-RS among the series of the source's study, as new series
    whose patient and study attributes (as Orthanc read them) are the source's; the JSON records the SOP instances
    stored; no patient identifier in the JSON or the log."""
    (tmp_path / "in").mkdir()
    for key in ("mono2", "mono1"):
        shutil.copyfile(inputs[key], tmp_path / "in" / inputs[key].name)
    need_env(DEPLOY_PY, "deploy")
    cmd = fill(commands("deploy_send")[0], dicoms=tmp_path / "in", output=tmp_path / "out", dicomweb=orthanc.dicomweb)
    try:
        proc = subprocess.run(["bash", "-c", cmd], cwd=app_bundle, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"4 DICOM result(s) stored on {orthanc.dicomweb}, 0 ROI(s) not sent" in proc.stderr
        study = str(pydicom.dcmread(inputs["mono2"], stop_before_pixels=True).StudyInstanceUID)
        listed = {s["0020000E"]["Value"][0]: s for s in orthanc.get(f"/dicom-web/studies/{study}/series")}
        results = set()
        for key in ("mono2", "mono1"):
            source = pydicom.dcmread(inputs[key], stop_before_pixels=True)
            rec = json.loads((tmp_path / "out" / f"{inputs[key].stem}.json").read_text())
            objects = [pydicom.dcmread(tmp_path / "out" / rec["dicom"][kind]) for kind in ("sr", "sc")]
            assert sorted(rec["dicom"]["sent"]) == sorted(ds.SOPInstanceUID for ds in objects), rec["dicom"]
            for ds, modality in zip(objects, ("SR", "OT")):
                assert listed[ds.SeriesInstanceUID]["00080060"]["Value"] == [modality]  # QIDO-RS: in the study
                assert ds.SeriesInstanceUID != source.SeriesInstanceUID
                found = orthanc.post(
                    "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": ds.SOPInstanceUID}}
                )
                assert len(found) == 1, found
                tags = orthanc.get(f"/instances/{found[0]}/simplified-tags")
                for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                                "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):  # fmt: skip
                    assert tags.get(keyword, "") == str(source.get(keyword, "")), (keyword, tags.get(keyword))
                results.add(ds.SeriesInstanceUID)
            no_identifiers(json.dumps(rec), rec["file"])
        assert len(results) == 4 and set(listed) == results | set(orthanc_sources.values())
        assert len(orthanc.get("/patients")) == 1 and len(orthanc.get("/studies")) == 1  # filed with the sources
        no_identifiers(proc.stderr + proc.stdout, "the log")
    finally:
        shutil.rmtree(tmp_path)  # copies of the test DICOMs and results with their patient attributes


def test_deploy_reports_results_it_cannot_send(app_bundle, inputs, tmp_path):
    """A PACS that does not answer: the ROI is classified and its results written, the JSON says why they were not
    sent, and the exit status is 3; a ``--send-to`` that is not a DICOMweb URL is refused (2) before any work."""
    (tmp_path / "in").mkdir()
    shutil.copyfile(inputs["mono2"], tmp_path / "in" / inputs["mono2"].name)
    try:
        proc = run_deploy(
            app_bundle, tmp_path / "in", tmp_path / "out", "--send-to", f"http://127.0.0.1:{free_port()}/dicom-web"
        )
        assert proc.returncode == 3, proc.stderr[-3000:]
        rec = json.loads((tmp_path / "out" / "roi_mono2.json").read_text())
        assert rec["status"] == "ok" and "cannot reach the server" in rec["dicom"]["send_error"], rec
        assert (tmp_path / "out" / "roi_mono2.sr.dcm").is_file() and "sent" not in rec["dicom"]
        assert "roi_mono2.dcm: results not sent: STOW-RS to http://127.0.0.1:" in proc.stderr
        proc = run_deploy(app_bundle, tmp_path / "in", tmp_path / "out2", "--send-to", "ORTHANC@127.0.0.1:4242")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "--send-to needs the DICOMweb root URL of the PACS" in proc.stderr
        assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
    finally:
        shutil.rmtree(tmp_path)


# -- one version -------------------------------------------------------------------------------------------------


def test_app_manifest_and_docs_state_the_bundle_version():
    manifest = yaml.safe_load((APPS / "deploy" / "app.yaml").read_text())
    assert str(manifest["application"]["version"]) == VERSION
    shown = re.findall(r'"version":\s*"([^"]+)"', (REPO / "docs" / "deployment.md").read_text())
    assert shown and set(shown) == {VERSION}, shown
