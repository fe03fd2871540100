"""Tests of scripts.evaluation.birads: the CBIS-DDSM BI-RADS baseline from the case-description tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from scripts.evaluation import birads as B

SHARED_CBIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cbis-ddsm"
HAVE_TABLES = all(B.table_path(SHARED_CBIS, "calc", s).is_file() for s in B.SPLITS)

HEADER = [
    "patient_id",
    "breast density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "calc type",
    "calc distribution",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
]


def _write_table(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for patient, side, view, abn, assessment, pathology in rows:
            w.writerow(
                [patient, 3, side, view, abn, "calcification", "", "", assessment, pathology, 3, "a", "b\n", "c"]
            )


@pytest.fixture()
def tiny_tables(tmp_path: Path) -> Path:
    train = [
        ("P_1", "LEFT", "CC", 1, 4, "MALIGNANT"),
        ("P_1", "LEFT", "MLO", 1, 5, "MALIGNANT"),  # views disagree on BI-RADS: lesion takes 5
        ("P_2", "RIGHT", "CC", 1, 2, "BENIGN_WITHOUT_CALLBACK"),
        ("P_2", "RIGHT", "MLO", 1, 2, "BENIGN_WITHOUT_CALLBACK"),
        ("P_3", "LEFT", "CC", 1, 4, "BENIGN"),
        ("P_3", "LEFT", "CC", 2, 3, "MALIGNANT"),
        ("P_4", "RIGHT", "MLO", 1, 0, "BENIGN"),
    ]
    test = [
        ("P_5", "LEFT", "CC", 1, 5, "MALIGNANT"),
        ("P_5", "LEFT", "MLO", 1, 5, "MALIGNANT"),
        ("P_6", "LEFT", "CC", 1, 3, "BENIGN"),
    ]
    _write_table(tmp_path / "calc_case_description_train_set.csv", train)
    _write_table(tmp_path / "calc_case_description_test_set.csv", test)
    return tmp_path


def test_labels_and_lesion_merging(tiny_tables: Path):
    rows = B.load_case_table(tiny_tables / "calc_case_description_train_set.csv", "train")
    assert [r["label"] for r in rows] == [1, 1, 0, 0, 0, 1, 0]
    lesions, disagree = B.lesion_rows(rows)
    assert len(lesions) == 5
    assert disagree == {"birads": 1, "pathology": 0, "multi_view": 2}
    p1 = next(x for x in lesions if x["patient"] == "P_1")
    assert p1["birads"] == 5 and p1["views"] == "CC+MLO" and p1["label"] == 1


def test_baseline_numbers_on_tiny_tables(tiny_tables: Path):
    res = B.cbis_birads_baseline(tiny_tables, cut=4, n_boot=50)
    train_row = res["results"]["train"]["row"]
    assert (train_row["n"], train_row["patients"], train_row["malignant"], train_row["benign"]) == (7, 4, 3, 4)
    m = train_row["at_cut"]
    # BI-RADS >= 4: malignant rows 4, 5, 3 -> 2/3 detected; benign rows 2, 2, 4, 0 -> 3/4 negative
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert m["specificity"]["value"] == pytest.approx(3 / 4)
    lesion = res["results"]["all"]["lesion"]
    assert lesion["n"] == 7 and lesion["malignant"] == 3
    excluded = B.cbis_birads_baseline(tiny_tables, n_boot=20, birads0="exclude")
    assert excluded["results"]["train"]["row"]["n"] == 6
    assert "train" in B.format_table(res)
    worked_up = B.cbis_birads_baseline(tiny_tables, n_boot=20, without_callback="exclude")
    assert worked_up["results"]["train"]["row"]["n"] == 5 and worked_up["without_callback_rows"]["train"] == 2


def test_missing_tables_give_clear_error(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        B.cbis_birads_baseline(tmp_path)
    assert B.main(["--data-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_default_data_dir_is_beside_the_repository():
    assert B.DEFAULT_DATA_DIR == SHARED_CBIS


@pytest.mark.skipif(not HAVE_TABLES, reason=f"CBIS-DDSM case tables not found in {SHARED_CBIS}")
def test_cli_on_shared_cbis_tables(tmp_path: Path, capsys):
    out = tmp_path / "baseline.json"
    assert B.main(["--data-dir", str(SHARED_CBIS), "--n-boot", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BI-RADS >= 4" in printed and "lesion" in printed
    res = json.loads(out.read_text())
    for split in ("train", "test", "all"):
        for level in ("row", "lesion"):
            r = res["results"][split][level]
            assert 0.5 < r["auc"]["auc"] < 1.0
            assert r["auc"]["ci_low"] < r["auc"]["auc"] < r["auc"]["ci_high"]
            assert r["malignant"] > 0 and r["benign"] > 0
    all_ = res["results"]["all"]
    assert all_["row"]["n"] == res["results"]["train"]["row"]["n"] + res["results"]["test"]["row"]["n"]
    assert all_["lesion"]["n"] < all_["row"]["n"]  # both views of a lesion count once
