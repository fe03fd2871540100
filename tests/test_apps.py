"""The MONAI Label app and the MONAI Deploy application, run for real in their own environments.

Each app has its own virtualenv (``bash apps/monailabel/setup.sh``, ``bash apps/deploy/setup.sh``); without it the
app's tests are skipped with the command that creates it. Both serve a tiny trained bundle
(:func:`tests.app_bundle.make_app_bundle`) and must return the probabilities of the bundle's own
``configs/inference.json`` on the same files to 1e-4.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.app_bundle import TINY_SETTINGS, make_app_bundle, run_inference_workflow
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

APPS = REPO / "apps"
LABEL_PY = APPS / "monailabel" / ".venv" / "bin" / "python"
DEPLOY_PY = APPS / "deploy" / ".venv" / "bin" / "python"
MODEL = "microcalcification_classification"
PATIENT = ("DOE^JANE", "PID123")  # written into the test DICOMs; must never reach an output
TOL = 1e-4


def need_env(python: Path, app: str) -> None:
    if not python.exists():
        pytest.skip(f"{python.relative_to(REPO)} absent: run `bash apps/{app}/setup.sh` to test the {app} app")


@pytest.fixture(scope="module")
def app_bundle(tmp_path_factory) -> Path:
    """The tiny trained bundle, in a folder whose name contains "classification"."""
    return make_app_bundle(tmp_path_factory.mktemp("apps") / MODEL)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two synthetic test ROIs as a 16-bit PNG, a MONOCHROME2 and a MONOCHROME1 DICOM, and a truncated DICOM."""
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
    dicom = dict(
        bits_stored=12,
        window=(2048, 4096),
        pixel_spacing=(TINY_SETTINGS["roi_pitch_mm"],) * 2,
        patient_name=PATIENT[0],
        patient_id=PATIENT[1],
    )  # the window maps stored 0..4095 to [0, 1]
    files = {
        "png": write_roi_png(root / "roi_png.png", rois[0]),
        "mono2": write_dicom(folder / "roi_mono2.dcm", stored[0], **dicom),
        "mono1": write_dicom(folder / "roi_mono1.dcm", 4095 - stored[1], photometric="MONOCHROME1", **dicom),
    }  # fmt: skip
    data = files["mono2"].read_bytes()
    files["corrupt"] = folder / "roi_corrupt.dcm"
    files["corrupt"].write_bytes(data[: len(data) - 3000])  # pixel data cut short
    return files


@pytest.fixture(scope="module")
def reference(app_bundle, inputs, tmp_path_factory) -> dict[str, np.ndarray]:
    """The bundle's own inference (its configs/inference.json, in this environment) on the readable inputs."""
    folder = tmp_path_factory.mktemp("reference_inputs")
    for key in ("png", "mono2", "mono1"):
        (folder / inputs[key].name).symlink_to(inputs[key])
    out = tmp_path_factory.mktemp("reference_out")
    table = run_inference_workflow(app_bundle / "configs", out, bundle_root=str(app_bundle), input_dir=str(folder))
    rows = {r["case"]: r for r in table}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    return {
        key: np.array([float(rows[inputs[key].stem]["prob_benign"]), float(rows[inputs[key].stem]["prob_malignant"])])
        for key in ("png", "mono2", "mono1")
    }


def test_reference_probabilities_are_not_degenerate(reference):
    """The comparisons below mean something only if the tiny model's outputs vary and are not saturated."""
    p = np.array([v[1] for v in reference.values()])
    assert np.all((p > 0.01) & (p < 0.99)), p
    assert np.allclose([v.sum() for v in reference.values()], 1.0, atol=1e-5)


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
    post = parser.get_parsed_content("postprocessing")
    assert isinstance(post, Compose) and "saliency" not in str(parser["postprocessing"]).lower()
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        probs = parser.get_parsed_content("inferer")(out["image"][None], net)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)  # already probabilities


# -- MONAI Label ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_file(url: str, path: Path, timeout: float = 120) -> tuple[int, dict]:
    """POST ``path`` as the multipart form field ``file``; return (HTTP status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def label_server(app_bundle, tmp_path_factory):
    """``monailabel start_server`` on 127.0.0.1 at a free port, serving the tiny bundle; stopped afterwards."""
    need_env(LABEL_PY, "monailabel")
    work = tmp_path_factory.mktemp("monailabel")
    (work / "studies").mkdir()
    port = free_port()
    cmd = [
        str(LABEL_PY), "-m", "monailabel.main", "start_server", "--app", str(APPS / "monailabel"),
        "--studies", str(work / "studies"), "--host", "127.0.0.1", "--port", str(port),
        "--conf", "bundle", str(app_bundle), "--conf", "model", MODEL,
    ]  # fmt: skip
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(work / "sessions")}
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode}:\n{(work / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/info/", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"monailabel did not answer in 180 s:\n{(work / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield base, info
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    with pytest.raises(OSError):  # stopped: nothing answers on the port any more
        urllib.request.urlopen(f"{base}/info/", timeout=5)


def test_monailabel_lists_the_classification_model(label_server):
    _, info = label_server
    model = info["models"][MODEL]
    assert model["type"] == "classification"
    assert model["labels"] == {"benign": 0, "malignant": 1}


@pytest.mark.parametrize("key", ["png", "mono2", "mono1"])
def test_monailabel_infer_matches_bundle_inference(label_server, inputs, reference, key):
    base, _ = label_server
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", inputs[key])
    assert status == 200, body
    probs = np.array([body["probabilities"]["benign"], body["probabilities"]["malignant"]])
    np.testing.assert_allclose(probs, reference[key], atol=TOL)
    assert body["pred_class"] == int(np.argmax(reference[key]))
    assert body["pred_label"] == ("benign", "malignant")[body["pred_class"]]
    assert [p["label"] for p in body["prediction"]] == ["benign", "malignant"]
    assert not any(s in json.dumps(body) for s in PATIENT)


def test_monailabel_rejects_a_corrupt_upload_and_keeps_serving(label_server, inputs, reference):
    base, _ = label_server
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", inputs["corrupt"])
    assert status == 422, body
    assert "cannot use the uploaded image" in body["detail"] and "pixel data" in body["detail"], body
    status, body = post_file(f"{base}/infer/{MODEL}?output=json", inputs["png"])
    assert status == 200, body
    np.testing.assert_allclose(list(body["probabilities"].values()), reference["png"], atol=TOL)


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


# -- MONAI Deploy --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deploy_run(app_bundle, inputs, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python app -i DICOMS -o OUT -m BUNDLE`` on a folder with a MONOCHROME2, a MONOCHROME1 and a corrupt DICOM."""
    need_env(DEPLOY_PY, "deploy")
    out = tmp_path_factory.mktemp("deploy_out")
    cmd = f'ulimit -s 32768 && exec "{DEPLOY_PY}" app -i "{inputs["mono1"].parent}" -o "{out}" -m "{app_bundle}"'
    proc = subprocess.run(["bash", "-c", cmd], cwd=APPS / "deploy", capture_output=True, text=True, timeout=600)
    return proc, out


def test_deploy_writes_one_json_per_image_matching_bundle_inference(deploy_run, inputs, reference):
    proc, out = deploy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["roi_corrupt.json", "roi_mono1.json", "roi_mono2.json"]
    for key in ("mono2", "mono1"):
        rec = json.loads((out / f"{inputs[key].stem}.json").read_text())
        assert rec["status"] == "ok" and rec["file"] == inputs[key].name, rec
        probs = np.array([rec["probabilities"]["benign"], rec["probabilities"]["malignant"]])
        np.testing.assert_allclose(probs, reference[key], atol=TOL)
        assert rec["pred_class"] == int(np.argmax(reference[key]))
        assert rec["pred_label"] == ("benign", "malignant")[rec["pred_class"]]
        assert rec["model"]["version"] == json.loads((REPO / "configs" / "metadata.json").read_text())["version"]


def test_deploy_reports_the_corrupt_file_and_writes_no_patient_identifiers(deploy_run):
    proc, out = deploy_run
    rec = json.loads((out / "roi_corrupt.json").read_text())
    assert rec["status"] == "error" and "probabilities" not in rec
    assert "pixel data" in rec["error"], rec
    assert f"roi_corrupt.dcm: {rec['error']}" in proc.stderr
    assert "2 classified, 1 error(s)" in proc.stderr
    for p in out.iterdir():
        assert not any(s in p.read_text() for s in PATIENT), p.name


def test_deploy_exits_1_when_no_file_can_be_classified(app_bundle, inputs, tmp_path):
    need_env(DEPLOY_PY, "deploy")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "only.dcm").write_bytes(inputs["corrupt"].read_bytes())
    cmd = f'ulimit -s 32768 && exec "{DEPLOY_PY}" app -i "{tmp_path / "in"}" -o "{tmp_path / "out"}" -m "{app_bundle}"'
    proc = subprocess.run(["bash", "-c", cmd], cwd=APPS / "deploy", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "0 classified, 1 error(s)" in proc.stderr
    assert json.loads((tmp_path / "out" / "only.json").read_text())["status"] == "error"
