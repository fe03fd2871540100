"""DICOM pixel handling: MONOCHROME1, rescale, VOI, BitsStored, spacing, missing decoder, corrupt files, real file."""

from pathlib import Path

import numpy as np
import pytest

from scripts.data.prepare.dicom_io import DicomReadError, missing_decoder_message, read_dicom
from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.prepare.loaders import load_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CROP = DATA / "cbis-ddsm" / "Mass-Training_P_00004_LEFT_CC_1_cropped_000001.dcm"
RAMP = (np.arange(32 * 32).reshape(32, 32) * 4).astype(np.uint16)  # 0 .. 4092 (12-bit)


def test_monochrome1_is_inverted(tmp_path):
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP, bits_stored=12)).pixels
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12)).pixels
    assert m2[0, 0] == 0.0 and m2[-1, -1] == 1.0
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_rescale_and_window(tmp_path):
    # stored 0..4092 with slope 2, intercept -1000 -> -1000..7184; window centre 3092 width 8184 spans it
    d = read_dicom(write_dicom(tmp_path / "r.dcm", RAMP, slope=2.0, intercept=-1000.0, window=(3092.5, 8185)))
    assert d.voi.startswith("window")
    assert d.pixels[0, 0] == pytest.approx(0.0, abs=1e-3) and d.pixels[-1, -1] == pytest.approx(1.0, abs=1e-3)
    # a narrow window saturates: values above centre + width/2 -> 1
    d = read_dicom(write_dicom(tmp_path / "w.dcm", RAMP, slope=2.0, intercept=-1000.0, window=(0.0, 100.0)))
    stored_at_zero = 500  # 2 * 500 - 1000 = 0 -> mid-grey
    flat = d.pixels.ravel()
    assert flat[stored_at_zero // 4] == pytest.approx(0.5, abs=0.02)
    assert flat[-1] == 1.0 and flat[0] == 0.0
    # no window: min-max of the rescaled values, rescale sign respected (negative slope flips)
    d = read_dicom(write_dicom(tmp_path / "n.dcm", RAMP, slope=-1.0, intercept=0.0))
    assert d.voi == "minmax" and d.pixels[0, 0] == 1.0 and d.pixels[-1, -1] == 0.0


def test_voi_lut_sequence(tmp_path):
    lut = [min(65535, 2 * v) for v in range(4096)]  # doubles intensities, clips at half range
    d = read_dicom(write_dicom(tmp_path / "lut.dcm", RAMP, bits_stored=12, voi_lut=lut))
    assert d.voi == "VOILUTSequence[0]"
    assert d.pixels.ravel()[1] == pytest.approx(8 / 65535, rel=1e-3)
    assert read_dicom(tmp_path / "lut.dcm", apply_voi=False).voi == "minmax"


def test_bits_stored_masks_high_bits(tmp_path):
    dirty = RAMP | np.uint16(0xF000)  # junk (e.g. overlay) in the 4 unused high bits of 12-bit data
    d = read_dicom(write_dicom(tmp_path / "b.dcm", dirty, bits_stored=12))
    clean = read_dicom(write_dicom(tmp_path / "c.dcm", RAMP, bits_stored=12))
    np.testing.assert_allclose(d.pixels, clean.pixels)


def test_spacing_attributes(tmp_path):
    assert read_dicom(write_dicom(tmp_path / "p.dcm", RAMP, pixel_spacing=(0.07, 0.08))).spacing_mm == (0.07, 0.08)
    d = read_dicom(write_dicom(tmp_path / "i.dcm", RAMP, imager_pixel_spacing=(0.1, 0.1)))
    assert d.spacing_mm == (0.1, 0.1) and d.spacing_source == "ImagerPixelSpacing"
    both = read_dicom(
        write_dicom(tmp_path / "b.dcm", RAMP, pixel_spacing=(0.05, 0.05), imager_pixel_spacing=(0.1, 0.1))
    )
    assert both.spacing_mm == (0.05, 0.05)
    assert read_dicom(write_dicom(tmp_path / "none.dcm", RAMP)).spacing_mm is None
    assert load_image(tmp_path / "none.dcm", spacing_mm=0.05).spacing_mm == (0.05, 0.05)


def test_compressed_without_decoder(tmp_path):
    uid = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    if missing_decoder_message(uid) is None:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(tmp_path / "jls.dcm", RAMP, transfer_syntax=uid)
    with pytest.raises(DicomReadError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        read_dicom(path)


def test_corrupt_and_truncated(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file" * 20)
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_dicom(bad)
    good = write_dicom(tmp_path / "good.dcm", RAMP)
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DicomReadError, match="pixel data"):
        read_dicom(cut)
    with pytest.raises(DicomReadError, match="not found"):
        read_dicom(tmp_path / "missing.dcm")


def test_messages_carry_no_identifiers(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", RAMP, patient_name="DOE^JANE", patient_id="99887766")
    data = path.read_bytes()
    (tmp_path / "y.dcm").write_bytes(data[: len(data) - 100])
    with pytest.raises(DicomReadError) as err:
        read_dicom(tmp_path / "y.dcm")
    assert "DOE" not in str(err.value) and "99887766" not in str(err.value)
    d = read_dicom(path)
    assert not any("DOE" in str(v) for v in vars(d).values())


@pytest.mark.skipif(not REAL_CROP.is_file(), reason=f"real CBIS-DDSM DICOM not found at {REAL_CROP}")
def test_real_cbis_ddsm_crop():
    import pydicom

    ds = pydicom.dcmread(REAL_CROP)
    raw = ds.pixel_array.astype(np.float64)
    d = read_dicom(REAL_CROP)
    assert d.pixels.shape == (466, 423) and d.pixels.dtype == np.float32
    assert d.photometric == "MONOCHROME2" and d.spacing_mm is None  # CBIS-DDSM states no pitch
    assert d.pixels.min() == 0.0 and d.pixels.max() == 1.0
    # min-max mapping is monotone and linear in the stored values
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(d.pixels, expected, atol=1e-6)
    assert len(np.unique(d.pixels)) > 100  # a crop, not a binary mask


def test_physical_bounds_checked_before_decoding(tmp_path):
    """Out-of-range pitch, magnification, window, rescale and size: an error naming the field, value and range."""
    import time

    cases = {
        "tiny.dcm": (dict(pixel_spacing=(1e-7, 1e-7)), "PixelSpacing 1e-07\\1e-07 mm is outside the plausible"),
        "mag.dcm": (dict(imager_pixel_spacing=(0.07, 0.07)), "EstimatedRadiographicMagnificationFactor 1e+09"),
        "win.dcm": (dict(window=(2048.0, 0.0)), "WindowWidth 0 is out of range"),
        "slope.dcm": (dict(slope=1.0, intercept=float("inf")), "RescaleIntercept inf is not a finite number"),
    }
    for name, (kwargs, needle) in cases.items():
        path = write_dicom(tmp_path / name, RAMP, **kwargs)
        if name == "mag.dcm":
            import pydicom

            ds = pydicom.dcmread(path)
            ds.EstimatedRadiographicMagnificationFactor = 1e9
            ds.save_as(path)
        t = time.perf_counter()
        with pytest.raises(DicomReadError) as err:
            read_dicom(path)
        assert needle in str(err.value) and time.perf_counter() - t < 1.0, str(err.value)
    import pydicom

    ds = pydicom.dcmread(write_dicom(tmp_path / "one.dcm", RAMP, pixel_spacing=(0.1, 0.1)))
    ds.PixelSpacing = 0.1  # one value: once "unexpected TypeError: object of type 'DSfloat' has no len()"
    ds.save_as(tmp_path / "one.dcm")
    with pytest.raises(DicomReadError, match=r"PixelSpacing has 1 value\(s\): two \(row, column\) are expected"):
        read_dicom(tmp_path / "one.dcm")
    with pytest.raises(DicomReadError, match="exceeds the decode limit of 0.001 Mpixel"):
        read_dicom(write_dicom(tmp_path / "big.dcm", RAMP), max_pixels=1000)


def test_pydicom_messages_never_carry_header_values(tmp_path, caplog):
    """Two corrupted bytes (the VR of TransferSyntaxUID becomes 5I) make pydicom quote the raw value: summarised."""
    import logging

    path = write_dicom(tmp_path / "x.dcm", RAMP, patient_name="QZXMARK^JANE", patient_id="QZXMARK-ID")
    data = path.read_bytes()
    i = data.find(b"\x02\x00\x10\x00UI")
    (tmp_path / "bad.dcm").write_bytes(data[: i + 4] + b"5I" + data[i + 6 :])
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomReadError) as err:
            read_dicom(tmp_path / "bad.dcm")
    assert "QZXMARK" not in str(err.value) and "QZXMARK" not in caplog.text
    assert "bad.dcm: the DICOM reader reported" in caplog.text
    path = write_dicom(tmp_path / "ph.dcm", RAMP, photometric="QZXMARK")
    with pytest.raises(DicomReadError, match="unsupported PhotometricInterpretation") as err:
        read_dicom(path)
    assert "QZXMARK" not in str(err.value)


def test_deflated_file_is_read_and_its_size_checked_before_inflating(tmp_path, monkeypatch):
    """A deflated DICOM reads like an uncompressed one; above the decode cap it is refused from its first inflated
    bytes, before pydicom is asked to inflate the whole file."""
    import pydicom

    from scripts.data.prepare.dicom_io import DEFLATED

    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", RAMP, bits_stored=12)).pixels
    path = write_dicom(tmp_path / "deflated.dcm", RAMP, bits_stored=12, transfer_syntax=DEFLATED)
    assert str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID) == DEFLATED
    np.testing.assert_array_equal(read_dicom(path).pixels, plain)
    whole_reads = []
    dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda fp, *a, **k: whole_reads.append(fp) or dcmread(fp, *a, **k))
    with pytest.raises(DicomReadError, match="exceeds the decode limit of 0.001 Mpixel"):
        read_dicom(path, max_pixels=1000)
    assert not [fp for fp in whole_reads if not hasattr(fp, "read")], whole_reads
