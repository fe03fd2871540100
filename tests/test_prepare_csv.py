"""Generic CSV source: every image format and ROI form, pseudonymous keys, bad input, leakage, atomic resume, CLI."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import scripts.data.prepare.csv_source as csv_source
import scripts.data.prepare.loaders as loaders
from scripts.data.imageio import read_mask_png, read_roi_png
from scripts.data.prepare.__main__ import main
from scripts.data.prepare.csv_source import prepare_csv
from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.prepare.errors import PreparationFailed, PrepareError
from scripts.data.prepare.staging import OutputFolder
from scripts.data.schema import read_datalist

SECRET_NAMES = ("DOE^JANE", "99887766", "hospital-patient")


def _dot_image(n: int, centre: tuple, radius_px: float, dtype=np.uint16) -> np.ndarray:
    rr, cc = np.mgrid[:n, :n]
    img = np.full((n, n), 0.2)
    img[(rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius_px**2] = 0.9
    top = 65535 if dtype == np.uint16 else 255
    return (img * top).astype(dtype)


@pytest.fixture()
def dataset(tmp_path):
    """Six patients, four formats, four ROI forms; every lesion is a bright disc of 1 mm radius."""
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    # DICOM, 0.07 mm, identifiers in the header that must never come out
    write_dicom(
        src / "a.dcm",
        _dot_image(300, (120, 160), 1 / 0.07),
        pixel_spacing=(0.07, 0.07),
        patient_name="DOE^JANE",
        patient_id="99887766",
    )
    rows.append(
        dict(
            image="a.dcm",
            label="malignant",
            patient="hospital-patient-1",
            x=11.235,
            y=8.435,
            size=2,
            unit="mm",
            birads="4a",
        )
    )
    # 16-bit PNG at 0.05 mm (pitch from the CSV), ROI as a box in px
    Image.fromarray(_dot_image(400, (200, 150), 20)).save(src / "b.png")
    rows.append(
        dict(image="b.png", label="0", patient="hospital-patient-2", x0=130, y0=180, x1=170, y1=220, spacing_mm=0.05)
    )
    # 8-bit TIFF at 0.1 mm, centre in mm
    Image.fromarray(_dot_image(200, (80, 90), 10, np.uint8)).save(src / "c.tif")
    rows.append(dict(image="c.tif", label="B", patient="hospital-patient-3", x=9.05, y=8.05, unit="mm", spacing_mm=0.1))
    # NIfTI (axis 0 = x), pitch 0.1 from the header, ROI from a mask file
    import nibabel as nib

    arr = _dot_image(200, (60, 110), 10).astype(np.float32)
    nib.save(nib.Nifti1Image(arr.T[:, :, None], np.diag([0.1, 0.1, 1.0, 1.0])), str(src / "d.nii.gz"))
    Image.fromarray(((arr > 0.5 * arr.max()) * 255).astype(np.uint8)).save(src / "d_mask.png")
    rows.append(dict(image="d.nii.gz", label="M", patient="hospital-patient-4", mask="d_mask.png"))
    for k in (5, 6):
        Image.fromarray(_dot_image(200, (100, 100), 10)).save(src / f"e{k}.png")
        rows.append(
            dict(image=f"e{k}.png", label=k % 2, patient=f"hospital-patient-{k}", x=100, y=100, size=20, spacing_mm=0.1)
        )
    return src, rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    cols = [
        "image",
        "label",
        "patient",
        "x",
        "y",
        "size",
        "unit",
        "x0",
        "y0",
        "x1",
        "y1",
        "mask",
        "birads",
        "spacing_mm",
        "split",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def test_all_formats_and_roi_forms(dataset, tmp_path):
    src, rows = dataset
    out = tmp_path / "out"
    res = prepare_csv(_write_csv(src / "rois.csv", rows), out, num_folds=2, test_fraction=0.3)
    assert res["errors"] == [] and res["n_ok"] == 6
    dl = read_datalist(out / "datalist_target.json")
    items = dl["training"] + dl["test"]
    assert len(items) == 6 and dl["test"]
    for it in items:
        roi = read_roi_png(out / it["image"])
        # the 1 mm-radius disc sits at the ROI centre, at 0.1 mm/px: ~10 px radius
        bright = roi > 0.5 * (roi.max() + roi.min())
        rr, cc = np.nonzero(bright)
        assert abs(rr.mean() - 63.5) < 1.5 and abs(cc.mean() - 63.5) < 1.5, it["csv_line"]
        assert 250 < bright.sum() < 380, it["csv_line"]
        if it["mask"]:
            assert read_mask_png(out / it["mask"])[60:68, 60:68].all()
    by_line = {it["csv_line"]: it for it in items}
    assert by_line[2]["birads"] == 4 and by_line[2]["source_spacing_mm"] == [0.07, 0.07]
    assert by_line[3]["label"] == 0 and by_line[5]["label"] == 1
    # pseudonymous keys only: no name, id or hospital patient label anywhere in the output
    assert all(it["patient"].startswith("pt_") and it["case"].startswith("case_") for it in items)
    for f in out.rglob("*"):
        if f.is_file() and f.name != ".pseudonym_salt":
            data = f.read_bytes()
            assert not any(s.encode() in data for s in SECRET_NAMES), f


def test_bad_input_stop_and_skip(dataset, tmp_path):
    src, rows = dataset
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (src / "photo.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)
    (src / "trunc.dcm").write_bytes(write_dicom(src / "t.dcm", np.zeros((64, 64), np.uint16)).read_bytes()[:-500])
    bad = [
        dict(image="corrupt.png", label=0, patient="p7", x=5, y=5, spacing_mm=0.1),
        dict(image="photo.jpg", label=0, patient="p8", x=5, y=5, spacing_mm=0.1),
        dict(image="trunc.dcm", label=1, patient="p9", x=5, y=5, spacing_mm=0.1),
        dict(image="e5.png", label=1, patient="p10", x=500, y=5, spacing_mm=0.1),  # centre outside the image
        dict(image="e6.png", label="maybe", patient="p11", x=5, y=5, spacing_mm=0.1),
    ]
    table = _write_csv(src / "bad.csv", rows + bad)
    with pytest.raises(PreparationFailed, match="--on-error skip"):
        prepare_csv(table, tmp_path / "stop", num_folds=2)
    assert not (tmp_path / "stop" / "datalist_target.json").exists()
    res = prepare_csv(table, tmp_path / "skip", num_folds=2, on_error="skip")
    assert res["n_ok"] == 6 and len(res["errors"]) == 5
    reasons = " | ".join(f"{e['file']}: {e['reason']}" for e in res["errors"])
    for needle in ("corrupt.png", "unsupported image format '.jpg'", "trunc.dcm", "outside the image", "maybe"):
        assert needle in reasons
    assert len(read_datalist(tmp_path / "skip" / "datalist_target.json")["training"]) > 0


def test_patient_leakage_refused(dataset, tmp_path):
    src, rows = dataset
    for r in rows:
        r["split"] = "train"
    rows[1]["patient"] = rows[0]["patient"]
    rows[1]["split"] = "test"
    with pytest.raises(PreparationFailed, match=r"in training \(CSV line 2\) and in test \(CSV line 3\)") as e:
        prepare_csv(_write_csv(src / "leak.csv", rows), tmp_path / "leak", num_folds=2)
    assert "hospital-patient" not in str(e.value)
    assert not (tmp_path / "leak" / "datalist_target.json").exists()


def test_interrupted_run_leaves_no_datalist_and_resumes(dataset, tmp_path, monkeypatch):
    src, rows = dataset
    table = _write_csv(src / "rois.csv", rows)
    out = tmp_path / "out"
    real_write, calls = OutputFolder.write, []

    def crashing_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. the user presses Ctrl-C, or the machine goes down
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(OutputFolder, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_csv(table, out, num_folds=2)
    assert not list(out.glob("datalist_*.json")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(OutputFolder, "write", real_write)
    res = prepare_csv(table, out, num_folds=2)
    assert res["n_reused"] == 2 and res["n_ok"] == 6
    # other settings in the same folder are refused unless --overwrite
    with pytest.raises(PreparationFailed, match="other settings"):
        prepare_csv(table, out, num_folds=3)


def test_cli(dataset, tmp_path, capsys):
    src, rows = dataset
    table = _write_csv(src / "rois.csv", rows)
    out = tmp_path / "cli"
    assert main(["csv", "--in", str(table), "--out", str(out), "--folds", "2", "--fov-mm", "12.8", "--size", "64"]) == 0
    dl = read_datalist(out / "datalist_target.json")
    assert dl["metadata"]["pixel_spacing_mm"] == pytest.approx(0.2)
    assert read_roi_png(out / dl["training"][0]["image"]).shape == (64, 64)
    assert (
        main(["csv", "--in", str(table), "--out", str(out), "--pitch-mm", "0.1", "--fov-mm", "10", "--size", "64"]) == 2
    )
    assert main(["csv", "--in", str(src / "nope.csv"), "--out", str(tmp_path / "x")]) == 2  # checked before decoding


def test_one_bad_case_never_costs_the_run(dataset, tmp_path, monkeypatch):
    """A MemoryError or an unforeseen exception in one case is that case's error; the report and datalists follow."""
    import scripts.data.prepare.csv_source as cs

    src, rows = dataset
    table = _write_csv(src / "rois.csv", rows)
    real = cs.load_image

    def flaky(path, *args, **kwargs):
        if path.name == "e5.png":
            raise MemoryError
        if path.name == "c.tif":
            raise TypeError("object of type 'DSfloat' has no len() 'DOE^JANE'")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cs, "load_image", flaky)
    res = prepare_csv(table, tmp_path / "out", num_folds=2, on_error="skip")
    assert res["status"] == "ok" and res["n_ok"] == 4 and len(res["errors"]) == 2
    reasons = {e["file"].split(":")[0]: e["reason"] for e in res["errors"]}
    assert reasons["rois.csv line 6"] == "not enough memory to read or resample this image"
    assert "TypeError" in reasons["rois.csv line 4"] and "DOE" not in reasons["rois.csv line 4"]
    assert (tmp_path / "out" / "datalist_target.json").is_file()
    assert json.loads((tmp_path / "out" / "prepare_report.json").read_text())["n_ok"] == 4


def test_interrupted_run_still_writes_its_report(dataset, tmp_path, monkeypatch):
    import scripts.data.prepare.csv_source as cs

    src, rows = dataset
    monkeypatch.setattr(cs, "load_image", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_csv(_write_csv(src / "rois.csv", rows), tmp_path / "out", num_folds=2, on_error="skip")
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["status"] == "failed: interrupted (KeyboardInterrupt)"


def test_overwrite_keeps_the_old_preparation_until_the_new_one_succeeds(dataset, tmp_path):
    src, rows = dataset
    table = _write_csv(src / "rois.csv", rows)
    out = tmp_path / "out"
    prepare_csv(table, out, num_folds=2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "prepare_report.json"}
    broken = src / "broken.csv"
    broken.write_text("image,label\nnope.png,0\n")  # a whole-file error: no patient column
    with pytest.raises(PreparationFailed, match="missing column"):
        prepare_csv(broken, out, num_folds=3, overwrite=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent.name != ".prepare-new"}
    assert all(after.get(p) == data for p, data in before.items()), "an old output was changed or deleted"
    assert (out / "prepare_report_failed.json").is_file() and not (out / ".prepare-new").exists()
    res = prepare_csv(table, out, num_folds=2)  # the original command still works and reuses everything
    assert res["n_reused"] == 6
    # a successful --overwrite replaces the old run's files
    res = prepare_csv(table, out, num_folds=3, overwrite=True, test_fraction=0.3)
    assert res["status"] == "ok" and res["n_reused"] == 0
    assert read_datalist(out / "datalist_target.json")["metadata"]["num_folds"] == 3
    assert not (out / ".prepare-new").exists() and not (out / "prepare_report_failed.json").exists()
    for it in read_datalist(out / "datalist_target.json")["training"]:
        assert (out / it["image"]).is_file()


def test_csv_quirks_blank_lines_zero_spacing_and_one_clear_message(dataset, tmp_path, capsys):
    src, rows = dataset
    table = _write_csv(src / "rois.csv", rows)
    (src / "blank_first.csv").write_text("\n\n" + table.read_text())
    res = prepare_csv(src / "blank_first.csv", tmp_path / "blank", num_folds=2)
    assert res["n_ok"] == 6
    lines = {it["csv_line"] for it in read_datalist(tmp_path / "blank" / "datalist_target.json")["training"]}
    assert lines <= set(range(4, 10))  # line numbers are the file's (header on line 3)
    rows[1]["spacing_mm"] = 0  # not "no value": an error, never replaced by the file's pitch
    rows[0]["spacing_mm"] = 1e-7  # the hang of the issue: refused at once
    res = prepare_csv(_write_csv(src / "zero.csv", rows), tmp_path / "zero", num_folds=2, on_error="skip")
    reasons = sorted(e["reason"] for e in res["errors"])
    assert reasons == [
        "spacing_mm 0\\0 mm is outside the plausible pixel pitch range 0.01-1 mm",
        "spacing_mm 1e-07\\1e-07 mm is outside the plausible pixel pitch range 0.01-1 mm",
    ]
    (src / "latin1.csv").write_bytes("image,label,patient\nb.png,0,Jos\xe9\n".encode("latin-1"))
    assert main(["csv", "--in", str(src / "latin1.csv"), "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "error: argument --in: " in err and "latin1.csv: not a UTF-8 text file" in err and "Traceback" not in err


def test_the_shared_csv_reader_checks_columns_units_and_resolves_paths_from_the_csv_folder(tmp_path):
    from scripts.data.inputs import InferenceInputError, items_from_csv
    from scripts.data.prepare.csv_source import csv_cell_path, read_csv_rows

    sub = tmp_path / "tables"
    sub.mkdir()
    table = sub / "t.csv"
    table.write_text("\nImage , UNIT,x,y\nimg/a.png,cm,1,2\n")
    rows = read_csv_rows(table)
    assert rows == [(3, {"image": "img/a.png", "unit": "cm", "x": "1", "y": "2"})]  # line numbers of the file
    assert csv_cell_path(table, " img/a.png ") == sub / "img" / "a.png"
    with pytest.raises(PrepareError, match=r"^t.csv: missing column\(s\) label, patient in the header line"):
        read_csv_rows(table, required=("image", "label", "patient"))
    # inference: same reader, its own error type and name; a bad unit is that row's error
    (item,) = items_from_csv(table)
    assert item["image"] == str(sub / "img" / "a.png")
    assert item["error"] == "t.csv line 3: unit 'cm' must be px or mm"
    with pytest.raises(InferenceInputError, match=r"^input_csv empty.csv: no rows"):
        (sub / "empty.csv").write_text("image\n")
        items_from_csv(sub / "empty.csv")


def _canonical(text: str) -> str:
    """Datalist text with every pseudonym (pt_, case_, lesion_ + hex) replaced by its order of first appearance."""
    names: dict[str, str] = {}
    return re.sub(
        r"\b(pt|case|lesion)_[0-9a-f]{10,12}\b", lambda m: names.setdefault(m.group(0), f"<{len(names)}>"), text
    )


def test_split_and_folds_do_not_depend_on_the_output_folder_or_the_salt(tmp_path):
    """Same CSV + seed -> the same test set, folds and item order in two folders with different salts."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        noise = np.random.default_rng(k).integers(1000, 60000, (300, 300))
        Image.fromarray(noise.astype(np.uint16)).save(src / f"img{k}.png")
    rows = []
    for p in range(40):  # 40 patients, one or two ROIs each, both labels
        for r in range(1 + p % 2):
            rows.append(dict(image=f"img{p % 3}.png", label=(p // 2) % 2, patient=f"MRN{p:05d}", x=70 + 4 * p,
                             y=100 + 60 * r, spacing_mm=0.1))  # fmt: skip
    table = _write_csv(src / "rois.csv", rows)
    outs = [tmp_path / "A", tmp_path / "B", tmp_path / "C"]
    assert main(["csv", "--in", str(table), "--out", str(outs[0]), "--seed", "3"]) == 0  # random salt in A
    assert main(["csv", "--in", str(table), "--out", str(outs[1]), "--seed", "3", "--salt", "another secret"]) == 0
    assert main(["csv", "--in", str(table), "--out", str(outs[2]), "--seed", "4", "--salt", "another secret"]) == 0
    salts = [(o / ".pseudonym_salt").read_text() if (o / ".pseudonym_salt").exists() else "--salt" for o in outs[:2]]
    assert salts[0] != salts[1]
    lists = [read_datalist(o / "datalist_target.json") for o in outs]
    pseudonyms = [{it["patient"] for s in ("training", "test") for it in dl[s]} for dl in lists[:2]]
    assert pseudonyms[0].isdisjoint(pseudonyms[1]), "the pseudonyms should differ with the salt"

    def by_line(dl):
        return {it["csv_line"]: ("test" if s == "test" else it["fold"]) for s in ("training", "test") for it in dl[s]}

    assert by_line(lists[0]) == by_line(lists[1])  # same test cases, same fold per case
    assert len(lists[0]["test"]) >= 8 and {it["fold"] for it in lists[0]["training"]} == {0, 1, 2}
    texts = [_canonical((o / "datalist_target.json").read_text()) for o in outs]
    assert texts[0] == texts[1], "the datalists differ in more than the pseudonyms"
    assert by_line(lists[2]) != by_line(lists[0]), "another seed should give another split"
    manifest = json.loads((outs[0] / "prepare.json").read_text())
    assert manifest["split"]["depends_on"] == {
        "input_digest": manifest["settings"]["input_digest"], "seed": 3, "test_fraction": 0.25, "num_folds": 3
    }  # fmt: skip
    assert "the pseudonym salt" in manifest["split"]["independent_of"]
    assert "MRN" not in json.dumps(manifest)


@pytest.mark.parametrize(
    "extra, flag, message",
    [
        (["--folds", "1"], "--folds", "must be an integer >= 2 (patient-grouped cross-validation), got 1"),
        (["--folds", "two"], "--folds", "'two' is not an integer"),
        (["--seed", "-1"], "--seed", "must be an integer >= 0, got -1"),
        (["--size", "-64"], "--size", "must be an integer between 8 and 4096, got -64"),
        (["--size", "0"], "--size", "must be an integer between 8 and 4096, got 0"),
        (["--pitch-mm", "-0.1"], "--pitch-mm", "-0.1 mm is outside the plausible pixel pitch range 0.01-1 mm"),
        (["--fov-mm", "-5"], "--fov-mm", "must be a positive number, got -5"),
        (["--fov-mm", "nan"], "--fov-mm", "nan is not a finite number"),
        (["--fov-mm", "0.4"], "--pitch-mm/--fov-mm/--size", "invalid ROI geometry: pitch 0.1 mm, size 4 px"),
        (["--fov-mm", "640", "--size", "64"], "--pitch-mm/--fov-mm/--size", "pitch (--fov-mm / --size) 10\\10 mm"),
        (["--pitch-mm", "0.1", "--fov-mm", "10", "--size", "64"], "--pitch-mm/--fov-mm/--size", "!= --fov-mm 10"),
        (["--test-fraction", "1"], "--test-fraction", "must be >= 0 and < 1 (a share of the ROIs), got 1"),
        (["--test-fraction", "-0.2"], "--test-fraction", "must be >= 0 and < 1 (a share of the ROIs), got -0.2"),
        (["--max-megapixels", "0"], "--max-megapixels", "must be a positive number, got 0"),
        (["--source-pitch-mm", "0"], "--source-pitch-mm", "0 mm is outside the plausible pixel pitch range"),
        (["--salt", "  "], "--salt", "is empty"),
        (["--pad", "mirror"], "--pad", "invalid choice: 'mirror'"),
        (["--in", "{src}/nope.csv"], "--in", "nope.csv: CSV file not found"),
        (["--in", "{src}"], "--in", "is a folder, not a CSV file"),
        (["--in", "{src}/no_patient.csv"], "--in", "no_patient.csv: missing column(s) patient in the header line"),
        (["--out", "{src}/rois.csv"], "--out", "rois.csv exists and is not a folder"),
        (["--out", "{src}/rois.csv/sub"], "--out", "cannot be created:"),
    ],
)
def test_every_argument_is_checked_before_any_image_is_decoded(dataset, tmp_path, capsys, monkeypatch, extra, flag,
                                                                 message):  # fmt: skip
    """One argparse-style line naming the argument, exit status 2, no traceback, nothing decoded or written."""
    src, rows = dataset
    _write_csv(src / "rois.csv", rows)
    (src / "no_patient.csv").write_text("image,label\na.dcm,0\n")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded before the arguments were checked")

    monkeypatch.setattr(csv_source, "load_image", no_decoding)
    monkeypatch.setattr(loaders, "load_image", no_decoding)
    argv = {"--in": str(src / "rois.csv"), "--out": str(tmp_path / "out")}
    extra = [a.replace("{src}", str(src)) for a in extra]
    for i in range(0, len(extra), 2):
        argv[extra[i]] = extra[i + 1]
    assert main(["csv", *[a for kv in argv.items() for a in kv]]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m scripts.data.prepare csv: error: argument ") and "Traceback" not in err
    assert f"error: argument {flag}: " in last and message in last, last
    assert not (tmp_path / "out").exists()
