"""mini-MIAS preparation on the real films: Info.txt parsing, pairs as patients, ROIs centred on the calcifications."""

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.data.imageio import read_mask_png, read_roi_png
from scripts.data.prepare.loaders import load_image
from scripts.data.prepare.mini_mias import parse_info, patient_key, prepare_mini_mias
from scripts.data.prepare.roi import RoiGeometry, crop_roi
from scripts.data.schema import read_datalist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIAS = DATA / "mini-mias"
pytestmark = [
    pytest.mark.slow,  # prepares the real mini-MIAS films
    pytest.mark.skipif(not (MIAS / "Info.txt").is_file(), reason=f"mini-MIAS not found at {MIAS}"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("mias")
    result = prepare_mini_mias(MIAS, out, num_folds=3, seed=0)
    return out, result


def test_parse_info_notes():
    rows = parse_info(MIAS / "Info.txt")
    calc = [r for r in rows if r.cls == "CALC"]
    assert len(calc) == 30 and sum(r.severity == "B" for r in calc) == 15
    assert len({r.ref for r in calc}) == 25
    assert sorted(r.ref for r in calc if r.x is None) == ["mdb216", "mdb233", "mdb245"]
    assert sum(r.cls == "NORM" for r in rows) == 207
    assert [(r.x, r.y, r.radius) for r in rows if r.ref == "mdb223"] == [(523, 482, 29), (591, 529, 6)]


def test_film_pairs_are_patients():
    assert patient_key("mdb001") == patient_key("mdb002") == "mias_p001"
    assert patient_key("mdb003") != patient_key("mdb002")
    assert patient_key("mdb322") == "mias_p161"


def test_datalists(prepared):
    out, result = prepared
    assert result["errors"] == []
    target = read_datalist(out / "datalist_target.json")  # validates: files, labels, patients in one split
    items = target["training"] + target["test"]
    assert len(items) == 27 and {it["label"] for it in items} == {0, 1}
    assert target["metadata"]["pixel_spacing_mm"] == 0.1 and target["metadata"]["source"] == "mini-mias"
    assert all("fold" in it for it in target["training"]) and target["test"]
    # films of one woman share a patient key: mdb239 has two calcification ROIs, both in one split
    splits = {it["case"]: s for s in ("training", "test") for it in target[s]}
    assert splits["mias_mdb239_1"] == splits["mias_mdb239_2"]
    inter = read_datalist(out / "datalist_intermediate.json")
    test_patients = {it["patient"] for it in target["test"]}
    assert inter["training"] and not test_patients & {it["patient"] for it in inter["training"]}
    assert {it["abnormality"] for it in inter["training"]} <= {"CIRC", "SPIC", "MISC", "ARCH", "ASYM"}
    roi = read_roi_png(out / items[0]["image"])
    assert roi.shape == (128, 128) and read_mask_png(out / items[0]["mask"]).shape == (128, 128)
    report = json.loads((out / "prepare_report.json").read_text())
    assert sum("without coordinates" in w["message"] for w in report["warnings"]) == 4  # 3 CALC + 1 CIRC


def _calc_energy(roi: np.ndarray, mask: np.ndarray) -> float:
    from scipy import ndimage

    return float(ndimage.white_tophat(roi, size=9)[mask].mean())  # bright specks (~0.2-0.8 mm) inside the circle


@pytest.mark.parametrize("case", ["mias_mdb219_1", "mias_mdb223_2", "mias_mdb227_1", "mias_mdb248_1", "mias_mdb252_1"])
def test_known_calcifications_are_centred(prepared, case):
    out, _ = prepared
    film, k = case.split("_")[1], int(case.split("_")[2])
    row = [r for r in parse_info(MIAS / "Info.txt") if r.ref == film][k - 1]
    roi = read_roi_png(out / "roi" / "target" / f"{case}.png")
    mask = read_mask_png(out / "roi" / "target" / f"{case}_mask.png")
    assert mask[64, 64] and abs(mask.sum() - np.pi * (row.radius * 2) ** 2) < 0.2 * np.pi * (row.radius * 2) ** 2 + 20
    centred = _calc_energy(roi, mask)
    film_px = load_image(MIAS / "png" / f"{film}.png").pixels
    geom = RoiGeometry()
    elsewhere = []
    for dr, dc in [(40, 0), (-40, 0), (0, 40), (0, -40)]:  # 8 mm away
        r, c = 1024 - row.y + dr, row.x + dc
        if 0 <= r < 1024 and 0 <= c < 1024:
            elsewhere.append(_calc_energy(crop_roi(film_px, (0.2, 0.2), (r, c), geom)[0], mask))
    unflipped = _calc_energy(crop_roi(film_px, (0.2, 0.2), (row.y, row.x), geom)[0], mask)
    assert centred > max(elsewhere) and centred > unflipped


def test_pgm_films_and_resume(prepared, tmp_path):
    from PIL import Image

    out, _ = prepared
    src = tmp_path / "mias_pgm"
    src.mkdir()
    Image.open(MIAS / "png" / "mdb219.png").save(src / "mdb219.pgm")  # binary PGM, as MIAS distributes
    assert (src / "mdb219.pgm").read_bytes()[:2] == b"P5"
    (src / "Info.txt").write_text("header\nmdb219 G CALC B 546 756 29\nmdb220 G NORM\n")
    res = prepare_mini_mias(src, tmp_path / "o", num_folds=2, test_fraction=0.0)
    assert res["n_ok"] == 1
    a = read_roi_png(tmp_path / "o" / "roi" / "target" / "mias_mdb219_1.png")
    b = read_roi_png(out / "roi" / "target" / "mias_mdb219_1.png")
    np.testing.assert_array_equal(a, b)
    again = prepare_mini_mias(src, tmp_path / "o", num_folds=2, test_fraction=0.0)
    assert again["n_reused"] == 1
