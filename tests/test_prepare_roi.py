"""Physical-scale ROI extraction: geometry, same object at two pitches, edge padding, bad centres."""

import numpy as np
import pytest

from scripts.data.prepare.errors import PrepareError
from scripts.data.prepare.roi import RoiGeometry, crop_mask, crop_roi, disc_mask, mask_box


def _render_blob(pitch_mm: float, extent_mm: float, centre_mm: tuple, sigma_mm: float = 0.6) -> np.ndarray:
    """A Gaussian blob plus a small disc, sampled at pixel centres of a ``pitch_mm`` grid."""
    n = int(round(extent_mm / pitch_mm))
    coords = (np.arange(n) + 0.5) * pitch_mm
    rr, cc = np.meshgrid(coords - centre_mm[0], coords - centre_mm[1], indexing="ij")
    blob = 0.7 * np.exp(-(rr**2 + cc**2) / (2 * sigma_mm**2))
    side = 0.25 * np.exp(-((rr - 2.0) ** 2 + (cc + 1.5) ** 2) / (2 * 0.8**2))  # asymmetric: catches flips
    return (0.1 + blob + side).astype(np.float32)


def test_geometry_resolve():
    assert RoiGeometry.resolve().fov_mm == pytest.approx(12.8)
    g = RoiGeometry.resolve(fov_mm=25.6, size=128)
    assert g.pitch_mm == pytest.approx(0.2)
    assert RoiGeometry.resolve(pitch_mm=0.05, fov_mm=6.4).size == 128
    with pytest.raises(ValueError):
        RoiGeometry.resolve(pitch_mm=0.1, fov_mm=10.0, size=128)


@pytest.mark.parametrize("pitches", [(0.05, 0.2), (0.07, 0.05)])
def test_same_physical_object_gives_same_roi(pitches):
    geom = RoiGeometry(0.1, 96)
    centre_mm = (17.3, 21.1)
    rois = []
    for p in pitches:
        img = _render_blob(p, 40.0, centre_mm)
        centre_px = (centre_mm[0] / p - 0.5, centre_mm[1] / p - 0.5)
        roi, outside = crop_roi(img, (p, p), centre_px, geom)
        assert roi.shape == (96, 96) and outside == 0.0
        rois.append(roi)
    a, b = rois
    assert np.abs(a - b).max() < 0.03
    # the blob peak sits at the ROI centre in both (to within one output pixel)
    for roi in rois:
        peak = np.unravel_index(np.argmax(roi), roi.shape)
        assert abs(peak[0] - 47.5) <= 1.0 and abs(peak[1] - 47.5) <= 1.0


def test_anisotropic_pitch():
    geom = RoiGeometry(0.1, 64)
    iso = _render_blob(0.1, 20.0, (10.0, 10.0))
    # same object with rows at 0.05 mm and columns at 0.1 mm
    n_r, n_c = 400, 200
    rr, cc = np.meshgrid((np.arange(n_r) + 0.5) * 0.05 - 10.0, (np.arange(n_c) + 0.5) * 0.1 - 10.0, indexing="ij")
    aniso = (0.1 + 0.7 * np.exp(-(rr**2 + cc**2) / (2 * 0.6**2))).astype(np.float32)
    aniso += 0.25 * np.exp(-((rr - 2.0) ** 2 + (cc + 1.5) ** 2) / (2 * 0.8**2))
    a, _ = crop_roi(iso, (0.1, 0.1), (99.5, 99.5), geom)
    b, _ = crop_roi(aniso, (0.05, 0.1), (199.5, 99.5), geom)
    assert np.abs(a - b).max() < 0.03


def test_edge_padding_keeps_position():
    geom = RoiGeometry(0.1, 64)
    img = np.zeros((100, 100), np.float32)
    img[2, 3] = 1.0  # a bright dot near the corner
    roi, outside = crop_roi(img, (0.1, 0.1), (2.0, 3.0), geom)
    assert 0.5 < outside < 0.8  # about three quarters of the ROI lies outside: padded, reported
    peak = np.unravel_index(np.argmax(roi), roi.shape)
    assert abs(peak[0] - 31.5) <= 0.5 and abs(peak[1] - 31.5) <= 0.5  # not shifted
    zero, _ = crop_roi(img + 0.5, (0.1, 0.1), (2.0, 3.0), RoiGeometry(0.1, 64, pad="zero"))
    assert zero[0, 0] == 0.0
    edge, _ = crop_roi(img + 0.5, (0.1, 0.1), (2.0, 3.0), geom)
    assert edge[0, 0] == pytest.approx(0.5)


def test_bad_centres_and_spacing():
    geom = RoiGeometry(0.1, 32)
    img = np.zeros((50, 50), np.float32)
    with pytest.raises(PrepareError, match="outside the image"):
        crop_roi(img, (0.1, 0.1), (60.0, 10.0), geom)
    with pytest.raises(PrepareError, match="pitch unknown"):
        crop_roi(img, None, (10.0, 10.0), geom)
    with pytest.raises(PrepareError, match="empty"):
        mask_box(np.zeros((5, 5), bool))


def test_masks():
    geom = RoiGeometry(0.1, 64)
    d = disc_mask(geom, 1.0)
    assert abs(d.sum() - np.pi * 100) < 30
    tiny = disc_mask(geom, 0.001)
    assert tiny.any()
    full = np.zeros((200, 200), bool)
    full[90:110, 80:100] = True  # 2 x 2 mm at 0.1 mm
    m = crop_mask(full, (0.1, 0.1), (99.5, 89.5), geom)
    assert abs(int(m.sum()) - 400) < 50
    m2 = crop_mask(full[::2, ::2], (0.2, 0.2), (49.5 - 0.25, 44.5 - 0.25), geom)
    assert abs(int(m2.sum()) - 400) < 80


def test_resampler_bounds_its_own_cost_and_refuses_blank_rois():
    image = np.random.default_rng(0).random((400, 400)).astype(np.float32)
    with pytest.raises(PrepareError, match="anti-alias Gaussian of sigma 100 px"):
        crop_roi(image, (0.1, 0.1), (200.0, 200.0), RoiGeometry(pitch_mm=20.1, size=8))
    with pytest.raises(PrepareError, match="outside the plausible pixel pitch range"):
        crop_roi(image, (1e-7, 1e-7), (200.0, 200.0), RoiGeometry())
    flat = np.zeros((400, 400), np.float32)
    flat[:10, :10] = 1.0  # content far from the centre: the ROI itself is blank
    with pytest.raises(PrepareError, match="blank"):
        crop_roi(flat, (0.1, 0.1), (300.0, 300.0), RoiGeometry(size=32))


def test_scrub_keeps_words_and_tags_but_no_values():
    from scripts.data.prepare.bounds import header_problem, scrub

    msg = "The value length (70) exceeds the maximum length of 64 allowed for VR UI. Value: b'1.2.QZXMARK^JANE'"
    assert "QZXMARK" not in scrub(msg) and "VR UI" in scrub(msg)
    assert scrub("A (0028,0101) 'BitsStored' value of '99'") == "A (0028,0101) 'BitsStored' value of <value>"
    assert scrub("Invalid value for VR PN: QZXMARK JANE") == "Invalid value for VR PN: <value>"
    assert (
        header_problem("Invalid value for VR DA: 'QZXMARK' in (0010,0030)") == "invalid value for VR DA in (0010,0030)"
    )
