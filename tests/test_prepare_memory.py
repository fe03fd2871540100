"""Bounded memory per input image: the stored values are held once and only the ROI's window becomes float.

The peak of a whole preparation or inference process, up to the 100-Mpixel cap, is measured by
``benchmarks/input_memory.py`` (figures in docs/robustness.md) and bounded in ``tests/test_fuzz_inputs.py``; these
are the quick checks: the same ROI as from a full float image, no full float copy, and a traced allocation peak
close to the stored size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.prepare.loaders import load_image
from scripts.data.prepare.pixels import MappedImage
from scripts.data.prepare.roi import RoiGeometry, crop_roi
from tests.conftest import REPO

SHAPE = (3000, 4000)  # 12 Mpixel, 16-bit: 22.9 MiB stored; well above the 1-Mpixel blocks


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    px = np.random.default_rng(0).integers(0, 4096, SHAPE).astype(np.uint16)
    write_dicom(folder / "small.dcm", px[:64, :64], bits_stored=12, pixel_spacing=(0.07, 0.07))
    write_dicom(folder / "ffdm.dcm", px | 0xF000, bits_stored=12, window=(2000, 3000), pixel_spacing=(0.07, 0.07))
    nib.save(nib.Nifti1Image(px.astype(np.int16).T, np.diag([0.07, 0.07, 1.0, 1.0])), str(folder / "ffdm.nii"))
    Image.fromarray(px * 16).save(folder / "ffdm.png", compress_level=1)
    load_image(folder / "small.dcm")  # imports and first-use caches out of the way of the measurements
    return folder, px


@pytest.mark.parametrize("name", ["ffdm.dcm", "ffdm.nii"])
def test_load_and_crop_peak_allocation_stays_near_the_stored_size(images, name):
    folder, px = images
    stored_mb = px.nbytes / 2**20
    tracemalloc.start()
    try:
        img = load_image(folder / name)
        roi, _ = crop_roi(img.mapped, img.spacing_mm, (1500.0, 2000.0), RoiGeometry())
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert roi.shape == (128, 128)
    # before: a float64 copy and its window/clip temporaries, 15x the stored size for the DICOM (343 MiB)
    assert peak_mb < 2.0 * stored_mb, f"{name}: peak {peak_mb:.0f} MiB for {stored_mb:.0f} MiB stored"


@pytest.mark.parametrize("name", ["ffdm.dcm", "ffdm.nii", "ffdm.png"])
def test_a_crop_maps_only_its_window_and_equals_the_crop_of_the_full_image(images, name, monkeypatch):
    folder, px = images
    img = load_image(folder / name, spacing_mm=0.07 if name.endswith(".png") else None)
    assert isinstance(img.mapped, MappedImage) and img.mapped.shape == SHAPE
    full = img.pixels  # the whole image as one float32 array, for comparison
    assert full.dtype == np.float32 and full.shape == SHAPE
    expected, _ = crop_roi(full, img.spacing_mm, (1234.5, 2345.5), RoiGeometry(0.1, 96))

    def no_full_copy(*args, **kwargs):
        raise AssertionError("the crop made a full float copy of the image")

    monkeypatch.setattr(MappedImage, "__array__", no_full_copy)
    got, _ = crop_roi(img.mapped, img.spacing_mm, (1234.5, 2345.5), RoiGeometry(0.1, 96))
    np.testing.assert_array_equal(got, expected)
    if name.endswith(".dcm"):  # the decoded pixels are a view on the file's pixel data, not a copy of them
        assert not img.mapped.stored.flags.owndata


@pytest.mark.slow  # a subprocess per case
def test_the_input_memory_benchmark_runs_and_measures(tmp_path):
    """``python -m benchmarks.input_memory --smoke`` (prepare only): a table, a JSON with a peak per case."""
    out = tmp_path / "input_memory.json"
    argv = [sys.executable, "-m", "benchmarks.input_memory", "--smoke", "--modes", "prepare", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # run from another folder: the repository must be importable
    proc = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dicom-tiny" in proc.stdout and "|---" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["mode"] == "prepare"
    assert 20 < row["process_peak_rss_mb"] < 500 and row["growth_mb"] < row["process_peak_rss_mb"]
