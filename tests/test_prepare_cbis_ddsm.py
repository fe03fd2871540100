"""CBIS-DDSM preparation on a small DICOM tree built from real case-table rows, in both TCIA layouts."""

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from scripts.data.imageio import read_roi_png
from scripts.data.prepare.__main__ import main
from scripts.data.prepare.cbis_ddsm import prepare_cbis_ddsm
from scripts.data.prepare.cbis_tables import resolve_selection
from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.prepare.errors import PrepareError
from scripts.data.schema import read_datalist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CBIS = DATA / "cbis-ddsm"
pytestmark = pytest.mark.skipif(
    not (CBIS / "calc_case_description_train_set.csv").is_file(), reason=f"CBIS-DDSM case tables not found at {CBIS}"
)
TABLES = {
    "calc_case_description_train_set.csv": "calc_train",
    "calc_case_description_test_set.csv": "calc_test",
    "mass_case_description_train_set.csv": "mass_train",
    "mass_case_description_test_set.csv": "mass_test",
}
SHAPE = (400, 320)


def _read(name):
    with open(CBIS / name, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _pick_rows():
    """A few real rows (14): calcifications, benign and malignant, train (6) and test (2); masses, train (4) and
    test (2). Patients: A (calc-test + mass-train), B (calc-train + mass-train), C (calc-train + mass-test), the
    others in one table only."""
    t = {key: _read(name)[1] for name, key in TABLES.items()}
    pts = {key: {r["patient_id"] for r in rows} for key, rows in t.items()}
    calc_pts, mass_pts = pts["calc_train"] | pts["calc_test"], pts["mass_train"] | pts["mass_test"]
    a = sorted(pts["mass_train"] & pts["calc_test"])[0]
    b = sorted(pts["mass_train"] & pts["calc_train"])[0]
    c = sorted((pts["mass_test"] & pts["calc_train"]) - pts["mass_train"])[0]

    def first(key, patient):
        return next(r for r in t[key] if r["patient_id"] == patient)

    ct = [first("calc_test", a)]
    ct += [r for r in t["calc_test"] if r["patient_id"] not in mass_pts and r["pathology"] == "MALIGNANT"][:1]
    rows, seen = [], set()
    for path in ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"):
        r = next(r for r in t["calc_train"] if r["pathology"] == path and r["patient_id"] not in seen | mass_pts)
        seen.add(r["patient_id"])
        rows.append(r)
    rows += [first("calc_train", b), first("calc_train", c)]
    only_mass = [r for r in t["mass_train"] if r["patient_id"] not in calc_pts]
    picked = {
        "calc_case_description_test_set.csv": ct,
        "calc_case_description_train_set.csv": rows,
        "mass_case_description_train_set.csv": [first("mass_train", a), first("mass_train", b)] + only_mass[:2],
        "mass_case_description_test_set.csv": [first("mass_test", c)]
        + [r for r in t["mass_test"] if r["patient_id"] not in calc_pts][:1],
    }
    assert [len(v) for v in picked.values()] == [2, 6, 4, 2]
    return picked, {"A": a, "B": b, "C": c}


def _synthetic(row):
    """Full image with a bright blob, its binary mask and a crop, placed by a hash of the row."""
    h = zlib.crc32((row["roi_mask_file_path"] if "roi_mask_file_path" in row else row["ROI mask file path"]).encode())
    cr, cc = 150 + h % 100, 120 + (h // 100) % 80
    rng = np.random.default_rng(h)
    full = rng.integers(8000, 12000, SHAPE).astype(np.uint16)
    rr, c = np.mgrid[: SHAPE[0], : SHAPE[1]]
    blob = (rr - cr) ** 2 + (c - cc) ** 2 <= 15**2
    full[blob] = 60000
    mask = np.zeros(SHAPE, np.uint8)
    mask[cr - 15 : cr + 16, cc - 15 : cc + 16] = 255
    crop = full[cr - 30 : cr + 30, cc - 30 : cc + 30]
    return full, mask, crop, (cr, cc)


def _clean(p):
    return p.strip().strip('"').strip()


def _build(tmp_path, layout):
    picked, shared = _pick_rows()
    root = tmp_path / layout
    tables = tmp_path / f"tables_{layout}"
    tables.mkdir()
    centres = {}
    for name, rows in picked.items():
        fields, _ = _read(name)
        with open(tables / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        for i, row in enumerate(rows):
            full, mask, crop, centre = _synthetic({"roi_mask_file_path": _clean(row["ROI mask file path"])})
            key = f"{row['patient_id']}_{row['left or right breast']}_{row['image view']}_{row['abnormality id']}"
            centres[key] = centre
            full_p, crop_p, mask_p = (
                _clean(row[k]) for k in ("image file path", "cropped image file path", "ROI mask file path")
            )
            if layout == "tables":
                swap = i == 0  # the tables' known quirk: crop and mask paths exchanged
                write_dicom(root / full_p, full)
                write_dicom(root / (mask_p if swap else crop_p), crop)
                write_dicom(root / (crop_p if swap else mask_p), mask)
            else:  # NBIA Data Retriever: CBIS-DDSM/<series>/<date-study>/<n-description>/1-1.dcm
                base = root / "CBIS-DDSM"
                write_dicom(
                    base / full_p.split("/")[0] / "07-20-2016-DDSM-1" / "1.000000-full mammogram images-2" / "1-1.dcm",
                    full,
                )
                roi_dir = base / mask_p.split("/")[0] / "08-29-2017-DDSM-3" / "1.000000-ROI mask images-4"
                write_dicom(roi_dir / "1-1.dcm", crop)
                write_dicom(roi_dir / "1-2.dcm", mask)
    return root, tables, centres, shared


def _items(datalist, split=None):
    return [it for s in ([split] if split else ("training", "test")) for it in datalist[s]]


def _patients(datalist, split=None):
    return {it["patient"] for it in _items(datalist, split)}


def _kind(item):
    """calc or mass, from the item's own descriptive keys (not from the code under test)."""
    assert ("calc_type" in item) != ("mass_shape" in item), item["case"]
    return "calc" if "calc_type" in item else "mass"


@pytest.mark.parametrize("layout", ["tables", "nbia"])
def test_cbis_ddsm_tree(tmp_path, layout):
    root, tables, centres, shared = _build(tmp_path, layout)
    out = tmp_path / "out"
    res = prepare_cbis_ddsm(root, out, tables=tables, num_folds=2)
    assert res["errors"] == []
    assert "intermediate" not in res["settings"]  # the default keeps the fingerprint of earlier versions
    target = read_datalist(out / "datalist_target.json")
    assert len(target["training"]) == 6 and len(target["test"]) == 2  # official split kept
    for it in target["training"] + target["test"]:
        assert it["label"] == (1 if it["pathology"] == "MALIGNANT" else 0)
        assert it["birads"] in range(0, 6) and it["calc_type"] and it["subtlety"] in range(1, 6)
        assert it["patient"].startswith("P_") and it["spacing_mm"] == 0.1
        assert it["source_spacing_mm"] == [0.05, 0.05]  # CBIS-DDSM states no pitch: 50 um assumed
        roi = read_roi_png(out / it["image"])
        rr, cc = np.nonzero(roi > 0.9)
        assert abs(rr.mean() - 63.5) < 1.0 and abs(cc.mean() - 63.5) < 1.0  # blob (0.75 mm radius) at the centre
        assert 130 < rr.size < 220  # radius 15 px at 0.05 mm = 7.5 px at 0.1 mm: pi * 7.5^2 ~ 177 px
    swapped = [it for it in target["training"] + target["test"] if it["paths_swapped"]]
    assert len(swapped) == (2 if layout == "tables" else 0)  # first row of each calc table
    inter = read_datalist(out / "datalist_intermediate.json")
    assert shared["A"] not in _patients(inter)  # calc-test patient dropped
    assert {shared["B"], shared["C"]} <= _patients(inter)  # calc-train patients stay with mass rows only
    assert inter["metadata"]["row_kinds"] == ["mass"] and inter["metadata"]["items_by_kind"] == {"mass": 5}
    assert inter["metadata"]["exclusion"]["rows"] == 1 and inter["metadata"]["exclusion"]["patients"] == 1
    assert "target test set" in inter["metadata"]["exclusion"]["rule"]
    assert len(inter["training"]) == 3 and len(inter["test"]) == 2
    rendered = [p.name for p in (out / "roi" / "intermediate").iterdir()]
    assert rendered and not [n for n in rendered if f"_{shared['A'].lower()}_" in n]  # excluded rows not even read


@pytest.fixture(scope="module")
def nbia_tree(tmp_path_factory):
    root, tables, _, shared = _build(tmp_path_factory.mktemp("cbis"), "nbia")
    return root, tables, shared


# (target, intermediate) -> (kinds in the intermediate set, its training / test sizes, excluded rows / patients)
OPTIONS = {
    ("calc", "mass"): ({"mass"}, 3, 2, 1, 1),  # A's mass row out (A is a target test patient)
    ("calc", "both"): ({"mass"}, 2, 1, 11, 8),  # every calc row and the masses of A, B, C out
    ("calc", "none"): (None, 0, 0, 0, 0),
    ("none", "calc"): ({"calc"}, 6, 2, 0, 0),
    ("none", "mass"): ({"mass"}, 4, 2, 0, 0),
    ("none", "both"): ({"calc", "mass"}, 8, 6, 0, 0),  # A's mass-train and C's calc-train rows move to test
}


@pytest.mark.parametrize("target,intermediate", list(OPTIONS))
def test_intermediate_options(tmp_path, nbia_tree, target, intermediate):
    root, tables, shared = nbia_tree
    kinds, n_train, n_test, n_excluded, n_excluded_patients = OPTIONS[(target, intermediate)]
    out = tmp_path / "out"
    res = prepare_cbis_ddsm(root, out, tables=tables, num_folds=2, target=target, intermediate=intermediate)
    assert res["errors"] == []
    written = sorted(p.name for p in out.glob("datalist_*.json"))
    expected = (["datalist_intermediate.json"] if kinds else []) + (
        ["datalist_target.json"] if target == "calc" else []
    )
    assert written == expected and sorted(Path(p).name for p in res["datalists"].values()) == expected
    if target == "none":
        assert not (out / "roi" / "target").exists()  # no target ROI rendered either
        target_pts, target_test_pts = set(), set()
    else:
        dl = read_datalist(out / "datalist_target.json")
        assert {_kind(it) for it in _items(dl)} == {"calc"} and dl["metadata"]["row_kinds"] == ["calc"]
        assert (len(dl["training"]), len(dl["test"])) == (6, 2)
        target_pts, target_test_pts = _patients(dl), _patients(dl, "test")
    sel = res["row_selection"]["intermediate"]
    assert (sel["exclusion"]["rows"], sel["exclusion"]["patients"]) == (n_excluded, n_excluded_patients)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["row_selection"] == res["row_selection"] and report["status"] == "ok"
    if kinds is None:
        return
    inter = read_datalist(out / "datalist_intermediate.json")
    items = _items(inter)
    assert {_kind(it) for it in items} == kinds
    assert (len(inter["training"]), len(inter["test"])) == (n_train, n_test)
    for it in items:
        assert it["label"] == (1 if it["pathology"] == "MALIGNANT" else 0)
        assert it["image"].startswith("roi/intermediate/")
    assert not _patients(inter, "training") & _patients(inter, "test")  # patient-level split
    if intermediate in ("calc", "both"):
        assert not _patients(inter) & target_pts  # calc rows shared: no target patient at all
    else:
        assert not _patients(inter) & target_test_pts
    meta = inter["metadata"]
    assert meta["row_kinds"] == {"mass": ["mass"], "calc": ["calc"], "both": ["calc", "mass"]}[intermediate]
    assert sum(meta["items_by_kind"].values()) == len(items) and set(meta["items_by_kind"]) == kinds
    assert meta["exclusion"]["rows"] == n_excluded
    if (target, intermediate) == ("none", "both"):
        moved = {it["patient"]: it for it in items if "table_split" in it}
        assert set(moved) == {shared["A"], shared["C"]} and all(
            it["table_split"] == "training" for it in moved.values()
        )
        assert {shared["A"], shared["C"]} <= _patients(inter, "test") and meta["moved_to_test"]["patients"] == 2
    else:
        assert meta["moved_to_test"]["rows"] == 0 and not any("table_split" in it for it in items)


def test_resolve_selection():
    assert resolve_selection() == ("calc", ("mass",))
    assert resolve_selection("none", "both") == ("none", ("calc", "mass"))
    with pytest.raises(ValueError, match="empty intermediate set"):
        resolve_selection("calc", "calc")
    with pytest.raises(ValueError, match="nothing to prepare"):
        resolve_selection("none", "none")
    with pytest.raises(ValueError, match="intermediate must be one of"):
        resolve_selection("calc", "masses")


def test_cli_intermediate_only(tmp_path, nbia_tree, capsys):
    root, tables, _ = nbia_tree
    out = tmp_path / "out"
    argv = ["cbis-ddsm", "--in", str(root), "--tables", str(tables), "--folds", "2"]
    assert main(argv + ["--out", str(out), "--target", "none", "--intermediate", "both"]) == 0
    stdout = capsys.readouterr().out
    assert (
        "target set: none" in stdout
        and "moved to test" in stdout
        and "nothing excluded (there is no target set)" in stdout
    )
    assert sorted(p.name for p in out.glob("datalist_*.json")) == ["datalist_intermediate.json"]
    assert main(argv + ["--out", str(tmp_path / "default")]) == 0
    stdout = capsys.readouterr().out
    assert "excluded 1 row(s) (mass 1) of 1 patient(s): patients of the target test set" in stdout


def test_cli_no_mass_alias_and_bad_combinations(tmp_path, nbia_tree, capsys):
    root, tables, _ = nbia_tree
    argv = ["cbis-ddsm", "--in", str(root), "--tables", str(tables), "--folds", "2"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--no-mass"]) == 0
    assert "--no-mass is deprecated" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "a").glob("datalist_*.json")) == ["datalist_target.json"]
    for extra, message in (
        (["--no-mass", "--intermediate", "both"], "--no-mass contradicts --intermediate both"),
        (["--intermediate", "calc"], "empty intermediate set"),
        (["--target", "none", "--intermediate", "none"], "nothing to prepare"),
    ):
        assert main(argv + ["--out", str(tmp_path / "b")] + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_tables_of_the_chosen_kinds_required(tmp_path, nbia_tree):
    root, tables, _ = nbia_tree
    only_mass = tmp_path / "only_mass"
    only_mass.mkdir()
    for p in tables.glob("mass_*.csv"):
        (only_mass / p.name).write_bytes(p.read_bytes())
    with pytest.raises(PrepareError, match="no calcification case table"):
        prepare_cbis_ddsm(root, tmp_path / "a", tables=only_mass, num_folds=2)
    res = prepare_cbis_ddsm(root, tmp_path / "b", tables=only_mass, num_folds=2, target="none", intermediate="both")
    assert res["row_selection"]["missing_tables"] == [
        "calc_case_description_test_set.csv",
        "calc_case_description_train_set.csv",
    ]
    assert read_datalist(tmp_path / "b" / "datalist_intermediate.json")["metadata"]["items_by_kind"] == {"mass": 6}


def test_mass_false_still_means_no_intermediate(tmp_path, nbia_tree):
    root, tables, _ = nbia_tree
    with pytest.warns(DeprecationWarning, match="intermediate="):
        res = prepare_cbis_ddsm(root, tmp_path / "out", tables=tables, num_folds=2, mass=False)
    assert list(res["datalists"]) == ["target"] and res["row_selection"]["intermediate"]["kinds"] == []


def test_layouts_agree(tmp_path):
    outs = []
    for layout in ("tables", "nbia"):
        root, tables, _, _ = _build(tmp_path, layout)
        prepare_cbis_ddsm(root, tmp_path / f"out_{layout}", tables=tables, num_folds=2, intermediate="none")
        outs.append(tmp_path / f"out_{layout}")
    a = sorted(p.name for p in (outs[0] / "roi" / "target").glob("*.png"))
    assert a == sorted(p.name for p in (outs[1] / "roi" / "target").glob("*.png")) and a
    for name in a:
        np.testing.assert_array_equal(
            read_roi_png(outs[0] / "roi" / "target" / name), read_roi_png(outs[1] / "roi" / "target" / name)
        )


def test_missing_files_reported(tmp_path):
    root, tables, _, _ = _build(tmp_path, "nbia")
    victim = next((root / "CBIS-DDSM").glob("Calc-Training_*_1"))
    for f in victim.rglob("*.dcm"):
        f.unlink()
    res = prepare_cbis_ddsm(root, tmp_path / "out", tables=tables, num_folds=2, on_error="skip", intermediate="none")
    assert len(res["errors"]) == 1 and "ROI mask not found" in res["errors"][0]["reason"]
