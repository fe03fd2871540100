"""Inference config: datalist split, folder of ROI PNGs and DICOMs, CSV of DICOMs + ROI centres (cropped at the
training scale), per-case error rows, decision threshold; tiny resnet18 ensemble at 64 px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from scripts.data.imageio import write_roi_png
from scripts.data.inputs import InferenceInputError, LoadInputd, items_from_csv, select_inputs
from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.schema import load_split
from scripts.data.transforms import LoadROId
from scripts.model.inferers import FlipRotateInferer, dihedral_views
from scripts.model.network import Ensemble
from tests.app_bundle import read_predictions, run_inference_workflow
from tests.conftest import REPO

CONFIGS = REPO / "configs"
SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle root whose models/model.pt is a seeded 2-member resnet18 ensemble."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    ens = Ensemble(2, "resnet18").eval()
    (root / "models").mkdir()
    torch.save(ens.state_dict(), root / "models" / "model.pt")
    return root


def _ensemble(bundle: Path) -> Ensemble:
    ens = Ensemble(2, "resnet18").eval()
    ens.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return ens


def run_inference(bundle: Path, out: Path, **overrides) -> list[dict]:
    """Run configs/inference.json in this process; return the rows of the predictions table."""
    settings = dict(
        bundle_root=str(bundle),
        arch="resnet18",
        num_members=2,
        image_size=SIZE,
        roi_size=SIZE,
        amp=False,
        batch_size=4,
    )
    settings.update(overrides)
    return run_inference_workflow(CONFIGS, out, **settings)


def _roi(seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.4 + 0.15 * rng.standard_normal((size, size)), 0, 1).astype(np.float32)


@pytest.mark.slow
def test_datalist_split_matches_the_eager_ensemble(bundle, tiny_data, tmp_path):
    rows = run_inference(bundle, tmp_path, dataset_dir=str(tiny_data))
    items = load_split(tiny_data / "target" / "datalist.json", "test")
    assert [r["case"] for r in rows] == [it["case"] for it in items]
    assert list(rows[0]) == [
        "case", "status", "prob_benign", "prob_malignant", "pred_class", "pred_label", "uncertainty", "threshold",
        "operating_point", "error",
    ]  # fmt: skip
    assert {r["operating_point"] for r in rows} == {
        "uncalibrated, threshold 0.5 (no operating point saved with the model)"
    }
    load = LoadROId("image", image_size=SIZE)
    x = torch.stack([load({"image": it["image"]})["image"].as_tensor() for it in items])
    with torch.no_grad():
        expected = _ensemble(bundle)(x).numpy()
    got = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    assert [int(r["pred_class"]) for r in rows] == expected.argmax(1).tolist()
    assert {r["pred_label"] for r in rows} <= {"benign", "malignant"}


def test_tta_averages_each_members_logits_over_the_eight_flips_and_rotations(bundle, tiny_data, tmp_path):
    plain = run_inference(bundle, tmp_path / "plain", dataset_dir=str(tiny_data))
    rows = run_inference(bundle, tmp_path / "tta", dataset_dir=str(tiny_data), tta=True)
    items = load_split(tiny_data / "target" / "datalist.json", "test")
    load = LoadROId("image", image_size=SIZE)
    x = torch.stack([load({"image": it["image"]})["image"].as_tensor() for it in items])
    ens = _ensemble(bundle)
    with torch.no_grad():
        logits = [torch.stack([m(view) for view in dihedral_views(x)]).mean(0) for m in ens.members]
        expected = ens.combine(torch.stack([torch.softmax(z, dim=1) for z in logits])).numpy()
    got = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.abs(got[:, 1] - np.array([float(r["prob_malignant"]) for r in plain])).max() > 1e-3


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dihedral_views(x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[0], x)
    corners = torch.stack([v[0, 0, 0, 0] for v in views])  # each corner lands top-left twice
    assert sorted(corners.tolist()) == [0.0, 0.0, 2.0, 2.0, 6.0, 6.0, 8.0, 8.0]
    net = lambda t: t[:, :, 0, 0]  # noqa: E731
    assert FlipRotateInferer(SimpleInferer())(x, net).item() == 4.0
    assert FlipRotateInferer(SimpleInferer(), enabled=False)(x, net).item() == 0.0


def test_png_loader_equals_training_loader(tmp_path):
    write_roi_png(tmp_path / "a.png", _roi(0, 48))
    ours = LoadInputd("image", image_size=SIZE)({"image": str(tmp_path / "a.png"), "case": "a"})
    theirs = LoadROId("image", image_size=SIZE)({"image": str(tmp_path / "a.png")})["image"]
    assert ours["error"] == "" and ours["image"].shape == (1, SIZE, SIZE)
    torch.testing.assert_close(ours["image"], theirs.as_tensor(), atol=1e-6, rtol=0)


def test_folder_with_a_corrupt_file_keeps_the_other_results(bundle, tmp_path):
    folder = tmp_path / "in" / "Patient Name Folder"
    folder.mkdir(parents=True)
    for i in range(3):
        write_roi_png(folder / f"roi{i}.png", _roi(i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notdicom.dcm").write_bytes(b"hello" * 100)
    stored = np.round(_roi(7, 96) * 4000).astype(np.uint16)
    write_dicom(folder / "spot.dcm", stored, pixel_spacing=(0.1, 0.1), patient_name="DOE^JANE", patient_id="PID123")
    (folder / "readme.txt").write_text("not an input")
    rows = run_inference(bundle, tmp_path / "out", input_dir=str(folder))
    by_case = {r["case"]: r for r in rows}
    assert sorted(by_case) == ["broken", "empty", "notdicom", "roi0", "roi1", "roi2", "spot"]
    for case in ("roi0", "roi1", "roi2", "spot"):
        r = by_case[case]
        assert r["status"] == "ok" and r["error"] == ""
        assert float(r["prob_benign"]) + float(r["prob_malignant"]) == pytest.approx(1.0, abs=1e-5)
    for case in ("broken", "empty", "notdicom"):
        r = by_case[case]
        assert r["status"] == "error" and r["error"] and r["prob_benign"] == "" and r["pred_class"] == ""
    assert "empty" in by_case["empty"]["error"] and "DICOM" in by_case["notdicom"]["error"]
    text = (tmp_path / "out" / "predictions.csv").read_text()
    for secret in ("Patient Name Folder", "DOE", "JANE", "PID123", str(tmp_path)):
        assert secret not in text


def test_dicom_csv_is_cropped_at_the_training_scale(bundle, tmp_path):
    """A ROI embedded at 0.05 mm pitch in a larger DICOM comes back at 0.1 mm pitch, centred on (x, y)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(_roi(3, SIZE), 3.0)
    roi = (0.2 + 0.6 * (smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.float32)
    fine = np.kron(roi, np.ones((2, 2), dtype=np.float32))  # 0.05 mm pitch, same field of view
    full = np.full((300, 400), 0.2, dtype=np.float32)
    r0, c0 = 70, 150
    full[r0 : r0 + 2 * SIZE, c0 : c0 + 2 * SIZE] = fine
    stored = np.round(full * 4095).astype(np.uint16)
    for name, photometric, values in (("m2", "MONOCHROME2", stored), ("m1", "MONOCHROME1", 4095 - stored)):
        write_dicom(
            tmp_path / f"{name}.dcm",
            values,
            photometric=photometric,
            bits_stored=12,
            window=(2048, 4096),  # stored value / 4095 -> [0, 1]
            pixel_spacing=(0.05, 0.05),
        )
    write_dicom(tmp_path / "nospacing.dcm", stored, bits_stored=12)
    cy, cx = r0 + SIZE - 0.5, c0 + SIZE - 0.5  # centre of the embedded ROI, in pixels
    lines = [
        "image,x,y,unit,case",
        f"m2.dcm,{cx},{cy},px,case_px",
        f"m1.dcm,{(cx + 0.5) * 0.05},{(cy + 0.5) * 0.05},mm,case_mm",
        f"nospacing.dcm,{cx},{cy},px,case_nospacing",
        f"m2.dcm,{cx},,px,case_bad_cell",
        "m2.dcm,5000,5000,px,case_off_image",
        f"missing.dcm,{cx},{cy},px,case_missing",
    ]
    (tmp_path / "rois.csv").write_text("\n".join(lines) + "\n")
    load = LoadInputd("image", image_size=SIZE, pitch_mm=0.1, roi_size=SIZE)
    items = items_from_csv(tmp_path / "rois.csv")
    got = {it["case"]: load(it) for it in items}
    for case in ("case_px", "case_mm"):
        assert got[case]["error"] == ""
        img = got[case]["image"][0].numpy()
        assert np.abs(img - roi).mean() < 0.01, case  # the same ROI, back at the training pitch
        shifted = np.abs(img[:, 4:] - roi[:, :-4]).mean()
        assert shifted > 3 * np.abs(img - roi).mean(), case  # and centred where it was
    assert "pixel pitch unknown" in got["case_nospacing"]["error"]
    assert "x and y" in got["case_bad_cell"]["error"]
    assert "outside the image" in got["case_off_image"]["error"]
    assert "file not found" in got["case_missing"]["error"]
    rows = run_inference(bundle, tmp_path / "out", input_csv=str(tmp_path / "rois.csv"))
    status = {r["case"]: r["status"] for r in rows}
    assert status == {
        "case_px": "ok",
        "case_mm": "ok",
        "case_nospacing": "error",
        "case_bad_cell": "error",
        "case_off_image": "error",
        "case_missing": "error",
    }


def test_decision_threshold_and_error_rows():
    from scripts.evaluation.handlers import PredictionTableHandler

    probs = torch.tensor([0.7, 0.3])
    assert PredictionTableHandler("x.csv").row("a", probs)["pred_label"] == "benign"
    row = PredictionTableHandler("x.csv", threshold=0.25).row("a", probs)
    assert (row["pred_class"], row["pred_label"], row["prob_malignant"]) == (1, "malignant", "0.300000")
    row = PredictionTableHandler("x.csv").row("b", None, error="file not found")
    assert row["status"] == "error" and row["prob_benign"] == "" and row["error"] == "file not found"


def test_all_inputs_failing_is_an_error_after_the_table_is_written(bundle, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError) as raised:
        run_inference(bundle, tmp_path / "out", input_dir=str(bad))
    chain, e = [], raised.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("none of the 1 inputs could be used" in m for m in chain)
    assert (tmp_path / "out" / "predictions.csv").read_text().count("error") >= 1


def test_clear_errors_for_bad_input_options(tmp_path):
    with pytest.raises(InferenceInputError, match="no input images"):
        select_inputs(input_dir=str(tmp_path))
    with pytest.raises(InferenceInputError, match="not both"):
        select_inputs(input_dir=str(tmp_path), input_csv=str(tmp_path / "c.csv"))
    (tmp_path / "c.csv").write_text("path,x\nfoo,1\n")
    with pytest.raises(InferenceInputError, match=r"input_csv c.csv: missing column\(s\) image in the header"):
        items_from_csv(tmp_path / "c.csv")
    strict = LoadInputd("image", image_size=SIZE, on_error="raise")
    with pytest.raises(InferenceInputError, match="case z: file not found"):
        strict({"image": str(tmp_path / "z.png"), "case": "z"})
    # arrays (as MONAI Deploy / Label hand them over) are ROIs in [0, 1]; integers are scaled by their maximum
    roi = _roi(5)
    out = LoadInputd("image", image_size=SIZE)({"image": np.round(roi * 65535).astype(np.uint16)})
    assert out["error"] == "" and out["case"] == "case"
    np.testing.assert_allclose(out["image"][0].numpy(), roi, atol=1e-4)


def test_saliency_merge_keeps_its_ids():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "saliency.json")])
    for key in ("bundle_root", "device", "datalist", "split", "network_def", "network", "output_dir", "image_size"):
        assert key in parser, key
    assert "saliency" not in str(parser["postprocessing"])


def test_csv_rows_with_bad_numbers_carry_their_error(tmp_path):
    csv_file = tmp_path / "rois.csv"
    csv_file.write_text("image,x,y,spacing_mm\na.png,10,12,\nb.png,ten,12,\nc.png,1,2,inf\na.png,,,\n")
    items = items_from_csv(csv_file)
    assert [it["case"] for it in items] == ["a", "b", "c", "a_2"]
    assert "error" not in items[0] and items[0]["x"] == 10.0 and items[0]["y"] == 12.0
    assert items[1]["error"] == "rois.csv line 3: column x: 'ten' is not a number"
    assert items[2]["error"] == "rois.csv line 4: column spacing_mm: 'inf' is not finite"
    assert "error" not in items[3] and "x" not in items[3]


def test_odd_file_names_and_left_out_entries(bundle, tmp_path, caplog):
    """Non-UTF-8 names are written as backslash escapes (never a crash); what the scan leaves out is logged."""
    import logging
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    write_roi_png(folder / os.fsdecode(b"latin1_\xe9.png"), _roi(1))
    write_roi_png(folder / "plain.png", _roi(2))
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    with caplog.at_level(logging.INFO, logger="scripts.data.inputs"):
        rows = run_inference(bundle, tmp_path / "out", input_dir=str(folder))
    assert [(r["case"], r["status"]) for r in rows] == [("latin1_\\xe9", "ok"), ("plain", "ok")]
    assert "dangling.png left out: dangling symbolic link" in caplog.text
    assert "scan.jpg left out: unsupported suffix .jpg" in caplog.text


def test_a_failing_run_still_writes_the_rows_it_has(bundle, tmp_path, monkeypatch):
    from scripts.model.network import GrayClassifier

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        write_roi_png(folder / f"roi{i}.png", _roi(i))
    calls = []
    real = GrayClassifier.forward

    def failing_forward(self, x):
        calls.append(1)
        if len(calls) == 3:  # the first member on the second batch (the evaluator runs each of the 2 members)
            raise RuntimeError("device lost")
        return real(self, x)

    monkeypatch.setattr(GrayClassifier, "forward", failing_forward)
    with pytest.raises(Exception):
        run_inference(bundle, tmp_path / "out", input_dir=str(folder), batch_size=3)
    rows = read_predictions(tmp_path / "out")
    assert [r["case"] for r in rows] == ["roi0", "roi1", "roi2"] and all(r["status"] == "ok" for r in rows)


def test_degenerate_inputs_are_error_rows_as_in_prepare(tmp_path):
    """One rule in prepare and inference: blank or non-finite images and out-of-range headers are errors."""
    from PIL import Image

    from scripts.data.prepare.errors import PrepareError
    from scripts.data.prepare.loaders import load_image

    write_dicom(tmp_path / "nanwin.dcm", np.arange(96 * 96).reshape(96, 96) % 4000, pixel_spacing=(0.1, 0.1))
    import pydicom

    ds = pydicom.dcmread(tmp_path / "nanwin.dcm")
    ds.WindowCenter, ds.WindowWidth = "NaN", "NaN"
    with pydicom.config.disable_value_validation():
        ds.save_as(tmp_path / "nanwin.dcm")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(tmp_path / "black.png")
    gray = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    load = LoadInputd("image", image_size=SIZE)
    for name, needle in (("nanwin.dcm", "finite"), ("black.png", "blank")):
        out = load({"image": str(tmp_path / name), "case": name})
        assert needle in out["error"], (name, out["error"])
        with pytest.raises(PrepareError, match=needle):
            load_image(tmp_path / name, spacing_mm=0.1)
    # a palette PNG with a gray palette is read as its gray levels by both
    out = load({"image": str(tmp_path / "palette.png"), "case": "p"})
    assert out["error"] == ""
    np.testing.assert_allclose(load_image(tmp_path / "palette.png").pixels, gray / 255.0, atol=1e-6)
    items = items_from_csv(_csv(tmp_path, "image,spacing_mm\nblack.png,0\nblack.png,1e-7\n"))
    assert [it["error"] for it in items] == [
        "c.csv line 2: spacing_mm 0\\0 mm is outside the plausible pixel pitch range 0.01-1 mm",
        "c.csv line 3: spacing_mm 1e-07\\1e-07 mm is outside the plausible pixel pitch range 0.01-1 mm",
    ]


def _csv(folder: Path, text: str) -> Path:
    (folder / "c.csv").write_text(text)
    return folder / "c.csv"


def test_whole_file_csv_error_is_one_message(bundle, tmp_path):
    (tmp_path / "c.csv").write_text("\n\npath,x\nfoo,1\n")  # leading blank lines are skipped; no image column
    with pytest.raises(
        SystemExit, match=r"^error: input_csv c.csv: missing column\(s\) image in the header line \(found: path, x\)$"
    ):
        run_inference(bundle, tmp_path / "out", input_csv=str(tmp_path / "c.csv"))
