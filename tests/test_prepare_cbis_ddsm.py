"""CBIS-DDSM preparation on a small DICOM tree built from real case-table rows, in both TCIA layouts."""

import csv
import zlib
from pathlib import Path

import numpy as np
import pytest

from scripts.imageio import read_roi_png
from scripts.prepare.cbis_ddsm import prepare_cbis_ddsm
from scripts.prepare.dicom_writer import write_dicom
from scripts.schema import read_datalist

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
    """A few real rows: benign and malignant calcifications (train/test), masses incl. a calc-test patient."""
    picked = {}
    _, calc_test = _read("calc_case_description_test_set.csv")
    test_patients = {r["patient_id"] for r in calc_test}
    _, mass_train = _read("mass_case_description_train_set.csv")
    shared = sorted({r["patient_id"] for r in mass_train} & test_patients)[0]
    ct = [r for r in calc_test if r["patient_id"] == shared][:1]
    ct += [r for r in calc_test if r["patient_id"] != shared and r["pathology"] == "MALIGNANT"][:1]
    picked["calc_case_description_test_set.csv"] = ct
    _, calc_train = _read("calc_case_description_train_set.csv")
    rows, seen = [], set()
    for path in ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"):
        r = next(r for r in calc_train if r["pathology"] == path and r["patient_id"] not in seen)
        seen.add(r["patient_id"])
        rows.append(r)
    picked["calc_case_description_train_set.csv"] = rows
    picked["mass_case_description_train_set.csv"] = [r for r in mass_train if r["patient_id"] == shared][:1] + [
        r for r in mass_train if r["patient_id"] not in test_patients
    ][:2]
    picked["mass_case_description_test_set.csv"] = _read("mass_case_description_test_set.csv")[1][:1]
    return picked, shared


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


@pytest.mark.parametrize("layout", ["tables", "nbia"])
def test_cbis_ddsm_tree(tmp_path, layout):
    root, tables, centres, shared = _build(tmp_path, layout)
    out = tmp_path / "out"
    res = prepare_cbis_ddsm(root, out, tables=tables, num_folds=2)
    assert res["errors"] == []
    target = read_datalist(out / "datalist_target.json")
    assert len(target["training"]) == 4 and len(target["test"]) == 2  # official split kept
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
    assert shared not in {it["patient"] for s in ("training", "test") for it in inter[s]}  # calc-test patient dropped
    assert inter["metadata"]["dropped_items_of_target_test_patients"] == 1
    assert len(inter["training"]) == 2 and len(inter["test"]) == 1


def test_layouts_agree(tmp_path):
    outs = []
    for layout in ("tables", "nbia"):
        root, tables, _, _ = _build(tmp_path, layout)
        prepare_cbis_ddsm(root, tmp_path / f"out_{layout}", tables=tables, num_folds=2, mass=False)
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
    res = prepare_cbis_ddsm(root, tmp_path / "out", tables=tables, num_folds=2, on_error="skip", mass=False)
    assert len(res["errors"]) == 1 and "ROI mask not found" in res["errors"][0]["reason"]
