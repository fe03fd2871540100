"""Synthetic ROI generator: determinism, masks that match the drawn lesions, class differences, datalists, CLI,
the film (digitised screen-film) domain and the simulated reader's BI-RADS."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from scripts.data.imageio import read_mask_png, read_raster, read_roi_png
from scripts.data.schema import read_datalist, validate_datalist
from scripts.data.synthetic import (
    CBIS_DDSM_CALC_BIRADS_COUNTS,
    FIELD_MM,
    READER_TASKS,
    TASKS,
    SynthParams,
    apply_film_domain,
    class_morphology,
    expected_reader_performance,
    film_grain,
    generate_dataset,
    generate_roi,
    plan_patients,
    power_law_field,
    reader_metadata,
    render_film_roi,
    render_target_roi,
    simulated_birads,
)
from scripts.evaluation.birads import PATHOLOGY_LABELS, load_case_table, table_path

ROOT = Path(__file__).resolve().parents[1]
CBIS_TABLES = ROOT.parent / "shared" / "data" / "cbis-ddsm"  # the CBIS-DDSM case-description CSVs, when present
SIZE = 64
SPACING = 0.1  # mm; the default would be FIELD_MM / SIZE = 0.2 mm, too coarse for the mask-contrast checks


def _all_items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist.get("validation", []) + datalist["test"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(
        out, "target", n_train=24, n_test=12, num_folds=3, image_size=SIZE, pixel_spacing_mm=SPACING, seed=3
    )
    return out


def test_same_seed_identical_bytes_different_seed_differs(tmp_path, target_dir):
    generate_dataset(
        tmp_path / "a",
        "target",
        n_train=24,
        n_test=12,
        num_folds=3,
        image_size=SIZE,
        pixel_spacing_mm=SPACING,
        seed=3,
        workers=2,
    )
    first, second = _files(target_dir / "target"), _files(tmp_path / "a" / "target")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), "same seed (1 vs 2 workers) must give identical files"
    generate_dataset(
        tmp_path / "b", "target", n_train=24, n_test=12, num_folds=3, image_size=SIZE, pixel_spacing_mm=SPACING, seed=4
    )
    third = _files(tmp_path / "b" / "target")
    changed = [k for k in first if k.startswith("images/") and third.get(k) != first[k]]
    assert len(changed) == sum(k.startswith("images/") for k in first), "another seed must change every image"


def test_roi_is_order_independent():
    a, ma, _ = generate_roi("target", 5, 1, 2, seed=7, image_size=SIZE)
    generate_roi("target", 4, 0, 2, seed=7, image_size=SIZE)  # other draws in between change nothing
    b, mb, _ = generate_roi("target", 5, 1, 2, seed=7, image_size=SIZE)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert a.shape == (SIZE, SIZE) and a.dtype == np.float64 and 0.0 <= a.min() and a.max() <= 1.0


def test_datalist_schema_and_patient_split(target_dir):
    path = target_dir / "target" / "datalist.json"
    dl = read_datalist(path)  # validates schema and files
    validate_datalist(dl, base_dir=path.parent)
    meta = dl["metadata"]
    assert meta["source"] == "synthetic" and meta["task"] == "target" and meta["synthetic"] is True
    assert meta["class_names"] == ["benign", "malignant"] and meta["num_folds"] == 3
    assert meta["generator"]["seed"] == 3 and meta["generator"]["params"]["overlap"] == SynthParams().overlap
    items = _all_items(dl)
    assert len(items) == 36 and abs(len(dl["test"]) - 12) <= 3
    assert all(it["case"].startswith("t-") and it["patient"].startswith("synth-p") for it in items)
    assert all(it["birads"] in (0, 2, 3, 4, 5) for it in items)  # the simulated reader's category
    assert meta["reader"]["kind"] == "simulated" and meta["reader"]["label"] == "simulated reader"
    assert {it["fold"] for it in dl["training"]} == {0, 1, 2}
    train_patients = {it["patient"] for it in dl["training"]}
    test_patients = {it["patient"] for it in dl["test"]}
    assert not train_patients & test_patients
    folds_of: dict[str, set] = {}
    for it in dl["training"]:
        folds_of.setdefault(it["patient"], set()).add(it["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    # patients hold 1-3 ROIs with one label, and some hold several (so grouping matters)
    per_patient: dict[str, list[int]] = {}
    for it in items:
        per_patient.setdefault(it["patient"], []).append(it["label"])
    assert all(1 <= len(v) <= 3 and len(set(v)) == 1 for v in per_patient.values())
    assert any(len(v) > 1 for v in per_patient.values())
    labels = [it["label"] for it in items]
    assert abs(labels.count(0) - labels.count(1)) <= 3


def test_masks_match_calcifications(target_dir):
    root = target_dir / "target"
    dl = read_datalist(root / "datalist.json")
    contrasts = []
    for it in _all_items(dl):
        image, mask = read_roi_png(root / it["image"]), read_mask_png(root / it["mask"])
        assert mask.shape == image.shape == (SIZE, SIZE)
        assert mask.any(), f"{it['case']}: empty mask"
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        contrasts.append(image[mask].mean() - image[ring].mean())
        n_comp = ndimage.label(mask)[1]
        assert 1 <= n_comp <= it["n_calcifications"] + it.get("n_linear", 0) * 3
    assert np.mean(contrasts) > 0.05 and np.mean(np.asarray(contrasts) > 0) > 0.9


def test_mask_components_are_bright_at_high_cnr():
    """At a high CNR, every mask component is brighter than its own surroundings."""
    params = SynthParams(noise_sigma=0.015, cnr=30.0)
    for index, label in [(0, 0), (1, 1), (2, 1)]:
        image, mask, info = generate_roi("target", index, label, index, seed=1, image_size=SIZE, params=params)
        lab, n = ndimage.label(mask)
        assert n >= 1
        for k in range(1, n + 1):
            comp = lab == k
            ring = ndimage.binary_dilation(comp, iterations=2) & ~ndimage.binary_dilation(mask, iterations=1)
            if ring.sum() >= 4:
                assert image[comp].max() > image[ring].mean()


def test_class_morphology_differs():
    n = {0: [], 1: []}
    area = {0: [], 1: []}
    for i in range(40):
        label = i % 2
        _, mask, info = generate_roi("target", i, label, i, seed=0, image_size=96)
        n[label].append(info["n_calcifications"])
        lab, k = ndimage.label(mask)
        area[label].append(mask.sum() / max(k, 1))
    assert np.mean(n[1]) > 1.5 * np.mean(n[0])
    assert np.mean(area[0]) > np.mean(area[1])  # benign: larger calcifications
    assert 4 <= min(n[0]) and max(n[0]) <= 20


def test_overlap_knob_blends_classes():
    sep = SynthParams(overlap=0.0)
    same = SynthParams(overlap=1.0, mass_overlap=1.0)
    assert class_morphology(sep, "target", 0) == sep.benign
    assert class_morphology(sep, "target", 1) == sep.malignant
    assert class_morphology(same, "target", 0) == class_morphology(same, "target", 1)
    assert class_morphology(same, "intermediate", 0) == class_morphology(same, "intermediate", 1)
    with pytest.raises(ValueError):
        SynthParams(overlap=1.5).validate()


def test_power_law_background_slope():
    rng = np.random.default_rng(0)
    size = 128
    spectra = []
    for _ in range(8):
        f = power_law_field(rng, size, beta=3.0)
        spectra.append(np.abs(np.fft.fft2(f * np.hanning(size)[:, None] * np.hanning(size)[None, :])) ** 2)
    ps = np.mean(spectra, 0)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    fr = np.hypot(fx, fy)
    sel = (fr > 0.03) & (fr < 0.25)
    slope = np.polyfit(np.log(fr[sel]), np.log(ps[sel]), 1)[0]
    assert 2.6 < -slope < 3.4


def test_plan_patients_is_prefix_stable_and_balanced():
    a = plan_patients(50, "target", seed=2)
    b = plan_patients(80, "target", seed=2)
    assert a[:47] == b[:47]
    labels = [lab for _, lab in b]
    assert abs(labels.count(0) - labels.count(1)) <= 3


def test_intermediate_task(tmp_path):
    kw = dict(n_train=8, n_test=4, num_folds=2, image_size=SIZE, seed=0, overlap=0.0)  # overlap 0: no stray spicules
    path = generate_dataset(tmp_path, "intermediate", **kw)
    dl = read_datalist(path)
    assert path == tmp_path / "intermediate" / "datalist.json"
    assert dl["metadata"]["class_names"] == ["circumscribed", "spiculated"]
    items = _all_items(dl)
    assert all(it["case"].startswith("i-") and it["patient"].startswith("synth-ip") for it in items)
    assert all(it["birads"] is None for it in items) and "reader" not in dl["metadata"]  # masses: no reader
    for it in items:
        mask = read_mask_png(path.parent / it["mask"])
        assert mask.mean() > 0.01
        assert (it["n_spicules"] > 0) == (it["label"] == 1)


def test_default_pitch_keeps_the_field_of_view(tmp_path):
    for size in (32, 128):
        path = generate_dataset(tmp_path / str(size), "target", n_train=2, n_test=0, num_folds=2, image_size=size)
        assert json.loads(path.read_text())["metadata"]["pixel_spacing_mm"] == pytest.approx(FIELD_MM / size)
    assert FIELD_MM / 128 == pytest.approx(0.1)


def test_up_to_date_skip_and_regeneration(tmp_path, caplog):
    kw = dict(n_train=6, n_test=3, num_folds=2, image_size=32, seed=0)
    path = generate_dataset(tmp_path, "target", **kw)
    stamp = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="scripts.data.synthetic"):
        assert generate_dataset(tmp_path, "target", **kw) == path
    assert "up to date" in caplog.text and path.stat().st_mtime_ns == stamp
    # changed knob -> regenerated, with the new value in the metadata and no stale images
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scripts.data.synthetic"):
        path2 = generate_dataset(tmp_path, "target", **{**kw, "n_train": 4}, cnr=20.0)
    assert "regenerated: setting generator.n_train 6 -> 4" in caplog.text  # the log names what changed
    meta = json.loads(path2.read_text())["metadata"]["generator"]
    assert meta["params"]["cnr"] == 20.0 and meta["n_train"] == 4
    assert len(list((tmp_path / "target" / "images").glob("*.png"))) == 7
    # another pixel spacing -> regenerated too
    path3 = generate_dataset(tmp_path, "target", **{**kw, "n_train": 4}, cnr=20.0, pixel_spacing_mm=0.2)
    assert json.loads(path3.read_text())["metadata"]["pixel_spacing_mm"] == 0.2
    # a missing image forces regeneration
    (tmp_path / "target" / "images" / "t-0001.png").unlink()
    generate_dataset(tmp_path, "target", **{**kw, "n_train": 4}, cnr=20.0, pixel_spacing_mm=0.2)
    assert (tmp_path / "target" / "images" / "t-0001.png").is_file()


def test_params_from_dict():
    p = SynthParams.from_dict({"cnr": 5, "benign": {"count_max": 8}})
    assert p.cnr == 5.0 and p.benign.count_max == 8 and p.benign.count_min == SynthParams().benign.count_min
    assert SynthParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown"):
        SynthParams.from_dict({"not_a_knob": 1})


@pytest.mark.slow
def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "scripts.data.synthetic", "--out", str(tmp_path), "--task", "target"]
    cmd += ["--n-train", "6", "--n-test", "4", "--folds", "2", "--size", "32", "--seed", "1", "--overlap", "0.3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "target" / "datalist.json" and path.is_file()
    dl = read_datalist(path)
    assert dl["metadata"]["generator"]["params"]["overlap"] == 0.3
    assert "10/10 ROIs" in res.stdout
    res2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res2.returncode == 0 and "up to date" in res2.stdout


def test_shared_style_knob_controls_whether_a_patients_rois_share_their_background(monkeypatch):
    import scripts.data.synthetic_render as synth  # generate_roi looks patient_style up here

    styles = []
    original = synth.patient_style
    monkeypatch.setattr(synth, "patient_style", lambda rng, params: styles.append(original(rng, params)) or styles[-1])
    for shared in (True, False):
        p = SynthParams.from_dict({"shared_style": shared})
        assert p.shared_style is shared
        generate_roi("target", 0, 1, patient_index=7, params=p)
        generate_roi("target", 1, 1, patient_index=7, params=p)
    assert styles[0] == styles[1]  # shared: both ROIs of patient 7 get one style
    assert styles[2] != styles[3]  # per ROI: each draws its own


# ----------------------------------------------------------------------------------------------- film task
FILM_NEUTRAL = dict(
    film_blur_mm=0.0, film_gamma=1.0, film_grain_sigma=0.0, film_tissue_contrast=1.0, film_calc_contrast=1.0
)


def _hf_power_fraction(image: np.ndarray, cutoff: float = 0.3) -> float:
    """Fraction of an ``(H, W)`` image's power above ``cutoff`` cycles/px (of the power above 0.02 cycles/px)."""
    ps = np.abs(np.fft.fft2(image - image.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(image.shape[0]), np.fft.fftfreq(image.shape[1]), indexing="ij"))
    return float(ps[f > cutoff].sum() / ps[f > 0.02].sum())


def _residual_lag1(image: np.ndarray) -> float:
    """Lag-1 autocorrelation (along x) of the image minus its Gaussian (σ 3 px) low-pass: ~0 for white noise."""
    r = image - ndimage.gaussian_filter(image, 3)
    return float(np.corrcoef(r[:, 1:].ravel(), r[:, :-1].ravel())[0, 1])


def test_target_and_mass_rois_match_values_recorded_before_the_film_task():
    """Values recorded with the generator before the film task was added (numpy 2.4, scipy 1.17): unchanged."""
    recorded = {
        "target": (3, 334, 0.42910094565684975, 0.11121236388271927, 0.44127120725740815),
        "intermediate": (2, 1475, 0.465329918040704, 0.11749870447330693, 0.6685785075021657),
    }
    for task, (index, mask_sum, mean, std, pixel) in recorded.items():
        image, mask, _ = generate_roi(task, index, 1, 1, seed=5, image_size=SIZE, pixel_spacing_mm=SPACING)
        assert int(mask.sum()) == mask_sum, task
        assert image.mean() == pytest.approx(mean, abs=1e-9) and image.std() == pytest.approx(std, abs=1e-9), task
        assert image[20, 40] == pytest.approx(pixel, abs=1e-9), task


def test_film_knobs_do_not_touch_the_target_or_mass_path_and_film_rois_differ(target_dir):
    odd = SynthParams(
        film_blur_mm=0.3,
        film_gamma=2.0,
        film_grain_sigma=0.1,
        film_grain_mm=0.5,
        film_tissue_contrast=0.5,
        film_calc_contrast=3.0,
    )
    for task in ("target", "intermediate"):
        a, ma, ia = generate_roi(task, 3, 1, 1, seed=2, image_size=SIZE, pixel_spacing_mm=SPACING)
        b, mb, ib = generate_roi(task, 3, 1, 1, seed=2, image_size=SIZE, pixel_spacing_mm=SPACING, params=odd)
        assert np.array_equal(a, b) and np.array_equal(ma, mb) and ia == ib, task
    # film knobs are stored in film datalists only, so target / intermediate datalists are unchanged too
    params = read_datalist(target_dir / "target" / "datalist.json")["metadata"]["generator"]["params"]
    assert not [k for k in params if k.startswith("film_")]
    for index in range(4):
        t, mt, _ = generate_roi("target", index, index % 2, index, seed=0, image_size=SIZE, pixel_spacing_mm=SPACING)
        f, mf, _ = generate_roi("film", index, index % 2, index, seed=0, image_size=SIZE, pixel_spacing_mm=SPACING)
        assert not np.allclose(t, f, atol=0.01) and not np.array_equal(mt, mf), index


def test_film_roi_is_the_target_scene_through_the_film_domain():
    """With neutral film knobs, a film ROI is exactly the target ROI drawn from the same random stream."""
    style = {"beta": 3.0, "density": 0.4, "fat_level": 0.32, "dense_contrast": 0.22}
    neutral = SynthParams(**FILM_NEUTRAL)
    for label in (0, 1):
        t, mt, it = render_target_roi(np.random.default_rng(label), label, style, SIZE, SPACING, neutral)
        f, mf, info = render_film_roi(np.random.default_rng(label), label, style, SIZE, SPACING, neutral)
        assert np.array_equal(t, f) and np.array_equal(mt, mf) and it == info
        # the default film domain keeps the morphology and the mask, and changes the image
        f2, mf2, info2 = render_film_roi(np.random.default_rng(label), label, style, SIZE, SPACING, SynthParams())
        assert np.array_equal(mf2, mt) and info2 == it and not np.allclose(f2, t, atol=0.01)
    assert class_morphology(SynthParams(), "film", 1) == class_morphology(SynthParams(), "target", 1)


def test_film_images_are_blurrier_with_correlated_grain():
    hf = {"target": [], "film": []}
    lag = {"target": [], "film": []}
    for task in hf:
        for index in range(6):
            image, _, _ = generate_roi(task, index, index % 2, index, seed=0, image_size=SIZE, pixel_spacing_mm=SPACING)
            hf[task].append(_hf_power_fraction(image))
            lag[task].append(_residual_lag1(image))
    # measured: target 0.057 / 0.64, film 0.015 / 0.83 (64 px at 0.1 mm)
    assert np.mean(hf["film"]) < 0.5 * np.mean(hf["target"]), hf
    assert max(hf["film"]) < min(hf["target"]), hf
    assert np.mean(lag["film"]) > np.mean(lag["target"]) + 0.1, lag


def test_film_blur_and_grain_scale_with_the_pixel_pitch():
    """``film_blur_mm`` and ``film_grain_mm`` are in mm: at half the pitch the blur and grain span twice the px."""
    p = SynthParams(**{**FILM_NEUTRAL, "film_blur_mm": 0.1}, noise_sigma=0.0)
    for spacing, sigma_px in ((0.1, 1.0), (0.05, 2.0)):
        delta = np.zeros((33, 33))
        delta[16, 16] = 1.0
        out = apply_film_domain(np.random.default_rng(0), delta, spacing, p)
        r2 = np.add.outer((np.arange(33) - 16.0) ** 2, np.zeros(33))
        assert (out * r2).sum() / out.sum() == pytest.approx(sigma_px**2, rel=0.05)
    for corr_px in (1.0, 2.0):
        g = film_grain(np.random.default_rng(1), (128, 96), corr_px)
        assert abs(g.mean()) < 1e-9 and g.std() == pytest.approx(1.0)
        rho = np.corrcoef(g[:, 1:].ravel(), g[:, :-1].ravel())[0, 1]
        assert rho == pytest.approx(np.exp(-1 / (4 * corr_px**2)), abs=0.03)  # Gaussian-filtered white noise


def test_film_task_datalist(tmp_path):
    path = generate_dataset(
        tmp_path, "film", n_train=10, n_test=0, num_folds=2, image_size=SIZE, pixel_spacing_mm=SPACING, seed=1
    )
    assert path == tmp_path / "film" / "datalist.json"
    dl = read_datalist(path)  # validates schema and files
    validate_datalist(dl, base_dir=path.parent)
    meta = dl["metadata"]
    assert meta["task"] == "film" and meta["synthetic"] is True and meta["class_names"] == ["benign", "malignant"]
    params = meta["generator"]["params"]
    assert params["film_gamma"] == SynthParams().film_gamma and params["film_blur_mm"] == SynthParams().film_blur_mm
    assert dl["test"] == [] and {it["label"] for it in dl["training"]} == {0, 1}
    assert meta["reader"]["kind"] == "simulated" and all(it["birads"] in (0, 2, 3, 4, 5) for it in dl["training"])
    assert {it["fold"] for it in dl["training"]} == {0, 1}
    for it in dl["training"]:
        assert it["case"].startswith("f-") and it["patient"].startswith("synth-fp") and it["n_calcifications"] >= 1
        image, mask = read_roi_png(path.parent / it["image"]), read_mask_png(path.parent / it["mask"])
        assert image.shape == mask.shape == (SIZE, SIZE) and mask.any()
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        assert image[mask].mean() > image[ring].mean(), it["case"]  # calcifications stay brighter than around them
    # overlap / cnr overrides act on the (shared) calcification knobs
    path2 = generate_dataset(tmp_path, "film", n_train=4, n_test=0, num_folds=2, image_size=32, overlap=0.1, cnr=9)
    assert json.loads(path2.read_text())["metadata"]["generator"]["params"]["overlap"] == 0.1


def test_film_determinism(tmp_path):
    kw = dict(image_size=SIZE, pixel_spacing_mm=SPACING)
    a, ma, _ = generate_roi("film", 3, 1, 2, seed=4, **kw)
    b, mb, _ = generate_roi("film", 3, 1, 2, seed=4, **kw)
    c, _, _ = generate_roi("film", 3, 1, 2, seed=5, **kw)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert a.dtype == np.float64 and 0.0 <= a.min() and a.max() <= 1.0
    dkw = dict(n_train=6, n_test=3, num_folds=2, image_size=32, seed=4)
    generate_dataset(tmp_path / "one", "film", workers=1, **dkw)
    generate_dataset(tmp_path / "two", "film", workers=2, **dkw)
    assert _files(tmp_path / "one" / "film") == _files(tmp_path / "two" / "film")


@pytest.mark.parametrize(
    "knob",
    [
        {"film_blur_mm": -0.1},
        {"film_gamma": 0.0},
        {"film_gamma": -0.7},
        {"film_gamma": float("nan")},
        {"film_gamma": 6.0},
        {"film_grain_sigma": -0.01},
        {"film_grain_mm": -0.1},
        {"film_grain_mm": 3.0},
        {"film_tissue_contrast": -1.0},
        {"film_calc_contrast": float("nan")},
    ],
)
def test_invalid_film_knobs_raise(tmp_path, knob):
    with pytest.raises(ValueError, match=next(iter(knob))):
        SynthParams.from_dict(knob).validate()
    with pytest.raises(ValueError, match=next(iter(knob))):
        generate_dataset(tmp_path, "film", n_train=2, n_test=0, num_folds=2, image_size=32, params=knob)


@pytest.mark.slow
def test_cli_film_task(tmp_path):
    cmd = [sys.executable, "-m", "scripts.data.synthetic", "--out", str(tmp_path), "--task", "film", "--n-train", "4"]
    cmd += ["--n-test", "0", "--folds", "2", "--size", "32", "--params", '{"film_gamma": 0.8}']
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "film" / "datalist.json"
    dl = read_datalist(path)
    assert dl["metadata"]["task"] == "film" and dl["metadata"]["generator"]["params"]["film_gamma"] == 0.8


# ----------------------------------------------------------------------------------------------- simulated reader
def _pixel_digest(root: Path) -> str:
    """SHA-256 over every PNG's relative path and decoded pixels (independent of the PNG encoder's settings)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        pixels = read_raster(path)
        h.update(path.relative_to(root).as_posix().encode())
        h.update(str(pixels.dtype).encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def test_images_and_masks_are_those_written_before_the_simulated_reader(tmp_path):
    """Digests recorded with generator version 1, before the reader existed (numpy 2.4, scipy 1.17): the reader's
    own random stream leaves every image and mask of every task unchanged."""
    recorded = {
        "target": "e8f7d7d9f026e372fe25c403c9ed5131fd91b5289819769dc07a3d758e054d06",
        "film": "b7cb87779bb4bb627dc80fd050afb318a60109059fb12a434dd335e501cefe9f",
        "intermediate": "4dd0aef08d63e7751417c58362403463224d0a3e1aaf805cdbb1c3b32bbe4a26",
    }
    for task, digest in recorded.items():
        generate_dataset(
            tmp_path, task, n_train=12, n_test=6, num_folds=3, image_size=SIZE, pixel_spacing_mm=SPACING, seed=5
        )
        assert _pixel_digest(tmp_path / task) == digest, task


def test_reader_tasks_are_the_benign_malignant_calcification_tasks():
    assert set(READER_TASKS) == {t for t, v in TASKS.items() if tuple(v[3]) == ("benign", "malignant")}
    assert set(READER_TASKS) == {"target", "film"}
    assert simulated_birads("intermediate", 0, 1, seed=0) is None
    with pytest.raises(ValueError):
        simulated_birads("nope", 0, 1)


def test_simulated_birads_follows_the_cbis_ddsm_frequencies_by_pathology():
    n = 6000
    for label, name in enumerate(("benign", "malignant")):
        counts = CBIS_DDSM_CALC_BIRADS_COUNTS[name]
        draws = np.array([simulated_birads("target", i, label, seed=0) for i in range(n)])
        assert set(np.unique(draws)) <= set(counts)
        total = sum(counts.values())
        for category, count in counts.items():
            p = count / total
            assert abs(np.mean(draws == category) - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (name, category)
    expected = expected_reader_performance()
    assert expected["sensitivity"] == pytest.approx(582 / 673) and expected["specificity"] == pytest.approx(651 / 1199)
    assert expected["auc"] == pytest.approx(0.7754, abs=1e-4) and expected["cut"] == 4


def test_simulated_birads_is_independent_of_the_image_and_its_knobs(tmp_path):
    """The category is a function of (seed, task, index, label) alone: other knobs, sizes or worker counts change
    no category, and the datalist holds exactly these draws."""
    kw = dict(n_train=10, n_test=6, num_folds=2, seed=2)
    a = read_datalist(generate_dataset(tmp_path / "a", "target", image_size=32, **kw))
    b = read_datalist(generate_dataset(tmp_path / "b", "target", image_size=48, cnr=25.0, overlap=0.9, workers=2, **kw))
    birads_a = {it["case"]: it["birads"] for it in _all_items(a)}
    assert birads_a == {it["case"]: it["birads"] for it in _all_items(b)}
    for it in _all_items(a):
        index = int(it["case"].split("-")[1]) - 1
        assert it["birads"] == simulated_birads("target", index, it["label"], seed=2)
    # the film task draws from its own stream: another task code gives other categories
    film = [simulated_birads("film", i, 1, seed=2) for i in range(50)]
    assert film != [simulated_birads("target", i, 1, seed=2) for i in range(50)]


def test_reader_metadata_describes_the_simulated_reader(target_dir):
    reader = read_datalist(target_dir / "target" / "datalist.json")["metadata"]["reader"]
    assert reader == reader_metadata()
    assert {"kind", "label", "model", "birads_counts", "citation", "expected", "independent_of_image"} <= set(reader)
    assert reader["kind"] == "simulated" and reader["independent_of_image"] is True
    assert "10.7937/K9/TCIA.2016.7O02S9CY" in reader["citation"] and "CC BY 3.0" in reader["citation"]
    assert reader["birads_counts"]["malignant"] == {"0": 37, "2": 1, "3": 53, "4": 385, "5": 197}
    assert reader["expected"] == {"cut": 4, "auc": 0.7754, "sensitivity": 0.8648, "specificity": 0.543}


@pytest.mark.skipif(
    not all(table_path(CBIS_TABLES, "calc", split).is_file() for split in ("train", "test")),
    reason=f"CBIS-DDSM calcification case tables (calc_case_description_{{train,test}}_set.csv) not found in {CBIS_TABLES}",
)
def test_embedded_birads_counts_are_those_of_the_cbis_ddsm_calc_tables():
    counted: dict[str, Counter] = {"benign": Counter(), "malignant": Counter()}
    for split in ("train", "test"):
        for row in load_case_table(table_path(CBIS_TABLES, "calc", split), split):
            counted[("benign", "malignant")[row["label"]]][row["birads"]] += 1
    assert set(PATHOLOGY_LABELS) == {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}
    assert {k: dict(v) for k, v in counted.items()} == CBIS_DDSM_CALC_BIRADS_COUNTS
