"""Lossy conversions are per-file errors, in preparation and in inference: complex values, colour or multi-channel
images where gray is expected, multi-frame files, negative values of signed rasters, ROI arrays outside [0, 1]."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts.data.inputs import InferenceInputError, LoadInputd
from scripts.data.prepare.csv_source import prepare_csv
from scripts.data.prepare.errors import PrepareError
from scripts.data.prepare.loaders import load_image

N = 96


def _gray(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, (N, N)).astype(np.uint16)


def _affine() -> np.ndarray:
    return np.diag([0.1, 0.1, 1.0, 1.0])


def write_lossy_files(folder: Path) -> dict[str, str]:
    """One file per lossy conversion; returns {file name: the words its error must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = _gray()
    expected = {}
    nib.save(nib.Nifti1Image((g + 1j * g[::-1]).astype(np.complex64).T, _affine()), str(folder / "complex.nii"))
    expected["complex.nii"] = "complex-valued NIfTI (datatype complex64)"
    rgb_dtype = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros((N, N), dtype=rgb_dtype)
    rgb["R"], rgb["G"], rgb["B"] = g // 16, g // 32, g // 64
    nib.save(nib.Nifti1Image(rgb.T, _affine()), str(folder / "rgb.nii.gz"))
    expected["rgb.nii.gz"] = "multi-channel NIfTI (datatype with fields R, G, B"
    nib.save(nib.Nifti1Image(np.stack([g, g, g], -1).astype(np.float32).transpose(1, 0, 2), _affine()),
             str(folder / "channels.nii"))  # fmt: skip
    expected["channels.nii"] = "expected a 2-D NIfTI image, got shape (96, 96, 3)"
    frames = [Image.fromarray(g), Image.fromarray(g[::-1].copy())]
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    expected["pages.tif"] = "2 frames (a multi-page TIFF or an animated image)"
    eight = [Image.fromarray((g // 16).astype(np.uint8)), Image.fromarray((g[::-1] // 16).astype(np.uint8))]
    eight[0].save(folder / "animated.png", save_all=True, append_images=eight[1:])
    expected["animated.png"] = "2 frames"
    Image.fromarray(np.stack([g // 16] * 3, -1).astype(np.uint8)).save(folder / "rgb.tif")
    expected["rgb.tif"] = "colour or multi-channel image (PIL mode RGB)"
    Image.fromarray((g // 16).astype(np.uint8)).convert("LA").save(folder / "gray_alpha.png")
    expected["gray_alpha.png"] = "colour or multi-channel image (PIL mode LA)"
    Image.fromarray(g.astype(np.int32) - 2000).save(folder / "signed.tif")
    expected["signed.tif"] = "negative pixel values (down to"
    return expected


@pytest.fixture()
def lossy(tmp_path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "in"
    expected = write_lossy_files(folder)
    Image.fromarray(_gray(1) * 16).save(folder / "good.png")
    nib.save(nib.Nifti1Image(_gray(2).astype(np.float32).T, _affine()), str(folder / "good.nii"))
    return folder, expected


def test_each_lossy_conversion_is_an_error_naming_what_is_wrong(lossy):
    folder, expected = lossy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning either (nibabel's complex cast warned before)
        for name, words in expected.items():
            with pytest.raises(PrepareError) as e:
                load_image(folder / name, spacing_mm=0.1)
            assert words in str(e.value), (name, str(e.value))
        for name in ("good.png", "good.nii"):  # the gray versions of the same content are read
            assert load_image(folder / name, spacing_mm=0.1).mapped.shape == (N, N)


def test_prepare_and_inference_report_them_per_file(lossy, tmp_path):
    folder, expected = lossy
    names = sorted(expected) + ["good.png", "good.nii"]
    with open(folder / "rois.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "x", "y", "spacing_mm"])
        for k, name in enumerate(names):
            w.writerow([name, k % 2, f"p{k}", N // 2, N // 2, 0.1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = prepare_csv(folder / "rois.csv", tmp_path / "out", on_error="skip", num_folds=2)
        load = LoadInputd("image", image_size=32, roi_size=32)
        rows = {name: load({"image": str(folder / name), "case": name, "x": N // 2, "y": N // 2, "spacing_mm": 0.1})
                for name in names}  # fmt: skip
    assert not [w for w in caught if "complex" in str(w.message).lower() or "discard" in str(w.message).lower()]
    errors = {e["file"].rsplit("/", 1)[-1]: e["reason"] for e in res["errors"]}
    assert set(errors) == set(expected) and res["n_ok"] == 2
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])
        assert rows[name]["error"] and words in rows[name]["error"], (name, rows[name]["error"])
    assert rows["good.png"]["error"] == "" and rows["good.nii"]["error"] == ""


@pytest.mark.parametrize(
    "array, words",
    [
        (np.ones((8, 8), np.complex64), "complex values"),
        (np.full((8, 8), 1.5, np.float32), "outside [0, 1]"),
        (np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "outside [0, 1]"),
        (np.arange(-32, 32, dtype=np.int16).reshape(8, 8), "negative values"),
        (np.zeros((3, 8, 8), np.float32), "expected a 2-D grayscale ROI"),
    ],
)
def test_arrays_handed_to_inference_are_not_converted_with_loss(array, words):
    with pytest.raises(InferenceInputError, match="case a: ") as e:
        LoadInputd("image", image_size=8, on_error="raise")({"image": array, "case": "a"})
    assert words in str(e.value)


def test_arrays_that_need_no_lossy_conversion_are_taken():
    load = LoadInputd("image", image_size=8, on_error="raise")
    u16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    np.testing.assert_allclose(load({"image": u16, "case": "a"})["image"][0].numpy(), u16 / 65535.0, atol=1e-6)
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    np.testing.assert_allclose(load({"image": f, "case": "b"})["image"].numpy(), f, atol=1e-7)
