"""Saliency: ensemble maps, the frozen-parameter path, localisation metrics, the randomisation check, the workflow
and its bundle config, for both backbone families (resnet18 and efficientnet_lite0 members at 64 px, so that it runs
in seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.data.imageio import read_mask_png, write_mask_png, write_roi_png
from scripts.data.inputs import LoadInputd
from scripts.model.inferers import saliency_amp
from scripts.model.network import Ensemble, build_network
from scripts.saliency import (
    EnsembleCAM,
    SaliencySettings,
    TargetLayerCut,
    chance_levels,
    energy_in_mask,
    iou_at,
    load_mask,
    localisation_table,
    map_similarity,
    none_if_off,
    normalise_maps,
    pointing_game,
    randomisation_check,
    run_saliency,
)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["resnet18", "efficientnet_lite0"]
# the saliency target layer, its stride and channels, and the randomisation order (head first), for each family
TARGET_LAYERS = {"resnet18": "backbone.layer4.1", "efficientnet_lite0": "backbone.blocks.4"}
TARGET_STRIDE = {"resnet18": 32, "efficientnet_lite0": 16}
LAST_LAYERS = {"resnet18": "backbone.layer4.1", "efficientnet_lite0": "backbone.bn2"}  # before global pooling
STAGES_TOP_DOWN = {
    "resnet18": ["fc", "layer4", "layer3", "layer2", "layer1", "stem"],
    "efficientnet_lite0": ["classifier", "conv_head", *(f"blocks.{i}" for i in range(6, -1, -1)), "stem"],
}

# bf16 maps against float32 ones (member maps, Pearson): resnet18 > 0.999; efficientnet_lite0 only 0.78-0.99 at its
# stride-16 target layer (16 blocks of depthwise and pointwise convolutions in bf16), so saliency never autocasts it
AMP_MAP_CORR = {"resnet18": 0.99}


@pytest.fixture(scope="module", params=ARCHS)
def ensemble(request) -> Ensemble:
    """Two seeded members. efficientnet_lite0's are the packaged ImageNet backbone with a random head: with random
    weights (and batch-norm statistics never fitted) one of the two seeded members gives all-zero maps for every
    input (its weighted activations are negative everywhere, which Grad-CAM's ReLU removes), so that comparisons of
    its maps would pass on empty maps."""
    arch = request.param
    torch.manual_seed(0)
    ens = Ensemble(2, arch)
    if arch == "efficientnet_lite0":
        for member in ens.members:
            head = member.backbone.classifier.state_dict()
            member.load_state_dict(build_network(arch, init="imagenet").state_dict())
            member.backbone.classifier.load_state_dict(head)
    return ens.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 64, 64, generator=g)


# ---- maps -------------------------------------------------------------------------------------------------------


def test_target_layer_and_its_stride(ensemble):
    member = ensemble.members[0]
    names = {mod: name for name, mod in member.named_modules()}
    assert names[member.target_layer] == TARGET_LAYERS[member.arch]
    seen = []
    handle = member.target_layer.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            member(torch.rand(1, 1, 64, 96))
            member(torch.rand(1, 1, 97, 131))  # odd sizes: ceil (TF "same" padding) or floor + 1 (ResNet) per stride
    finally:
        handle.remove()
    stride = TARGET_STRIDE[member.arch]
    assert seen[0][-2:] == (64 // stride, 96 // stride)
    assert seen[1][-2:] == (-(-97 // stride), -(-131 // stride))
    assert seen[0][1] == {"resnet18": 512, "efficientnet_lite0": 112}[member.arch]
    with EnsembleCAM(ensemble) as cam:
        assert cam.cell_px is None
        cam(torch.rand(1, 1, 64, 96))
        assert cam.cell_px == (stride, stride)  # measured from the feature map: the pointing game's tolerance


def test_hirescam_equals_gradcam_at_the_last_layer(ensemble, x):
    """Before global average pooling and a linear head, Grad-CAM's channel weights (the spatial mean of the
    gradient) equal the per-cell gradients, so HiResCAM's gradient x activation gives the same map; at the
    stride-16 layer of EfficientNet-Lite they differ."""
    last = LAST_LAYERS[ensemble.members[0].arch]
    with EnsembleCAM(ensemble, method="gradcam", layer=last) as cam:
        grad = cam(x)
        assert cam.cell_px == (32, 32)
    with EnsembleCAM(ensemble, method="hirescam", layer=last) as cam:
        hires = cam(x)
    assert grad.maps.std() > 0.05
    np.testing.assert_allclose(hires.member_maps, grad.member_maps, atol=1e-4)
    if ensemble.members[0].arch == "efficientnet_lite0":
        with EnsembleCAM(ensemble, method="gradcam") as cam:
            mid_grad = cam(x)
        with EnsembleCAM(ensemble, method="hirescam") as cam:
            mid_hires = cam(x)
        assert np.abs(mid_hires.maps - mid_grad.maps).max() > 0.1


def test_unknown_layer_name(ensemble):
    with pytest.raises(ValueError, match="no module 'backbone.nowhere'"):
        EnsembleCAM(ensemble, layer="backbone.nowhere")


def test_maps_shape_range_probs(ensemble, x):
    with EnsembleCAM(ensemble) as cam:
        res = cam(x)
        rect = cam(torch.rand(1, 1, 64, 96))
        odd = cam(torch.rand(1, 1, 97, 131))
    assert res.maps.shape == (2, 64, 64) and res.maps.dtype == np.float32
    assert res.member_maps.shape == (2, 2, 64, 64)
    assert np.isfinite(res.maps).all() and res.maps.min() >= 0 and res.maps.max() <= 1
    assert np.isclose(res.maps.max(), 1.0)
    with torch.no_grad():
        expected = ensemble(x).numpy()
    np.testing.assert_allclose(res.probs, expected, atol=1e-5)
    assert rect.maps.shape == (1, 64, 96) and odd.maps.shape == (1, 97, 131)
    assert rect.maps.std() > 0.05 and odd.maps.std() > 0.05  # informative maps, not flat ones
    assert (res.member_maps.reshape(4, -1).std(1) > 0.05).all()  # every member's, too
    # hooks live only during a call
    for m in ensemble.members:
        assert not m.target_layer._forward_hooks
        assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())


def test_frozen_equals_plain_and_flags_restored(ensemble, x):
    first_stage = ensemble.members[0].stages()[1]  # layer1 / blocks.0: frozen, as with trainable_from
    assert first_stage[0] in ("layer1", "blocks.0")
    for module in first_stage[1]:
        for p in module.parameters():
            p.requires_grad_(False)
    before = [p.requires_grad for p in ensemble.parameters()]
    with EnsembleCAM(ensemble, freeze=True) as cam:
        frozen = cam(x)
    assert [p.requires_grad for p in ensemble.parameters()] == before
    with EnsembleCAM(ensemble, freeze=False) as cam:
        plain = cam(x)
    assert [p.requires_grad for p in ensemble.parameters()] == before
    assert all(p.grad is None for p in ensemble.parameters())
    assert plain.maps.std() > 0.05  # not two flat maps
    np.testing.assert_allclose(frozen.maps, plain.maps, atol=1e-5)
    np.testing.assert_allclose(frozen.member_maps, plain.member_maps, atol=1e-5)
    np.testing.assert_allclose(frozen.probs, plain.probs, atol=1e-6)
    for m in ensemble.members:
        assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())
    for p in ensemble.parameters():
        p.requires_grad_(True)


def test_target_layer_cut_hands_on_a_float32_leaf_and_removes_its_hooks(ensemble, x):
    member = ensemble.members[0]
    for freeze in (True, False):
        seen = []
        with TargetLayerCut([member.target_layer], freeze=freeze) as cut, torch.enable_grad():
            probe = member.target_layer.register_forward_hook(lambda _m, _a, out: seen.append(out))  # after the cut
            with torch.autocast("cpu", torch.bfloat16):
                member(x)
            probe.remove()
        assert seen[0].dtype == torch.float32 and seen[0].requires_grad
        assert (seen[0].grad_fn is None) is freeze  # frozen: a leaf, so the backward pass stops here
        assert cut.feature_hw == tuple(seen[0].shape[-2:])
        assert not member.target_layer._forward_hooks


def test_works_under_no_grad_inference_mode_and_bf16_autocast(ensemble, x):
    with EnsembleCAM(ensemble) as cam:
        ref = cam(x).maps
        with torch.no_grad():
            under_no_grad = cam(x).maps
        with torch.inference_mode():
            under_inference = cam(x).maps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = cam(x).maps
    for maps in (under_no_grad, under_inference, under_autocast):
        np.testing.assert_allclose(maps, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["hirescam", "layercam"])
def test_amp_maps_match_float32(ensemble, x, method):
    arch = ensemble.members[0].arch
    if arch not in AMP_MAP_CORR:
        assert saliency_amp(arch, True) is False and saliency_amp(arch, "true") is False
        return
    assert saliency_amp(arch, True) is True and saliency_amp(arch, False) is False
    before = [p.requires_grad for p in ensemble.parameters()]
    with EnsembleCAM(ensemble, method=method) as cam:
        ref = cam(x)
    with EnsembleCAM(ensemble, method=method, amp=True) as cam:
        fast = cam(x)
    assert [p.requires_grad for p in ensemble.parameters()] == before
    assert not any(m.target_layer._forward_hooks for m in ensemble.members)
    assert fast.maps.dtype == np.float32 and fast.maps.shape == ref.maps.shape
    corr = [
        np.corrcoef(a, b)[0, 1]
        for a, b in zip(fast.member_maps.reshape(-1, 64 * 64), ref.member_maps.reshape(-1, 64 * 64))
    ]
    assert min(corr) > AMP_MAP_CORR[ensemble.members[0].arch], corr
    np.testing.assert_allclose(fast.probs, ref.probs, atol=2e-2)


@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "layercam"])
def test_other_methods_and_predicted_target(ensemble, x, method):
    with EnsembleCAM(ensemble, method=method, target="predicted") as cam:
        res = cam(x)
    assert res.maps.shape == (2, 64, 64)
    assert np.isfinite(res.maps).all() and res.maps.min() >= 0 and res.maps.max() <= 1


def test_bad_arguments(ensemble):
    with pytest.raises(ValueError):
        EnsembleCAM(ensemble, method="scorecam")
    with pytest.raises(ValueError):
        EnsembleCAM(ensemble, target="benign")


def test_normalise_flat_and_nan_maps():
    maps = np.stack([np.zeros((8, 8)), np.full((8, 8), 3.0), np.full((8, 8), np.nan), np.arange(64.0).reshape(8, 8)])
    out = normalise_maps(maps)
    assert np.isfinite(out).all()
    assert (out[:3] == 0).all()
    assert out[3].min() == 0 and out[3].max() == 1


# ---- metrics on hand-made maps ----------------------------------------------------------------------------------


def _square_mask() -> np.ndarray:
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True  # 25 pixels, nearest to (15, 15) is (9, 9)
    return mask


def test_pointing_game():
    mask = _square_mask()
    cam = np.zeros((20, 20))
    cam[7, 7] = 1
    assert pointing_game(cam, mask, tolerance_px=0)
    cam = np.zeros((20, 20))
    cam[15, 15] = 1  # sqrt(6^2 + 6^2) = 8.49 px from the mask
    assert not pointing_game(cam, mask, tolerance_px=8)
    assert pointing_game(cam, mask, tolerance_px=9)
    assert not pointing_game(np.ones((20, 20)), mask, tolerance_px=100)  # a flat map points nowhere
    with pytest.raises(ValueError):
        pointing_game(cam, np.zeros((20, 20), bool))


def test_energy_in_mask():
    mask = _square_mask()
    assert energy_in_mask(mask.astype(float), mask) == pytest.approx(1.0)
    assert energy_in_mask(np.ones((20, 20)), mask) == pytest.approx(25 / 400)
    cam = np.where(mask, 1.0, 0.25)
    assert energy_in_mask(cam, mask) == pytest.approx(25 / (25 + 375 * 0.25))
    assert energy_in_mask(np.zeros((20, 20)), mask) == 0.0


def test_iou_at():
    mask = _square_mask()
    cam = np.full((20, 20), 0.4)
    cam[5:10, 5:15] = 1.0  # 50 pixels, 25 of them in the mask
    assert iou_at(cam, mask, 0.5) == pytest.approx(0.5)
    assert iou_at(cam, mask, 0.3) == pytest.approx(25 / 400)
    assert iou_at(mask.astype(float), mask) == pytest.approx(1.0)


def test_chance_levels():
    mask = _square_mask()
    assert chance_levels(mask, 0) == {"area_fraction": 25 / 400, "pointing": 25 / 400, "centre": 0.0}
    assert chance_levels(mask, 0.71)["centre"] == 1.0  # the centre (9.5, 9.5) is 0.707 px from the pixel (9, 9)
    # within 1 px (Euclidean): the 7x7 square without its 4 corners
    assert chance_levels(mask, 1)["pointing"] == pytest.approx(45 / 400)


def test_localisation_table():
    def rec(label, correct, hit, energy, iou):
        return {
            "label": label,
            "correct": correct,
            "hit": hit,
            "energy": energy,
            "iou": iou,
            "chance_area": 0.1,
            "chance_pointing": 0.3,
            "centre_hit": 1.0,
        }

    records = [
        rec(1, True, True, 0.8, 0.6),
        rec(1, False, False, 0.2, 0.0),
        rec(0, True, True, 0.5, 0.4),
        rec(None, None, True, 0.5, 0.5),
    ]
    table = localisation_table(records)
    assert table["all"]["n"] == 4
    assert table["malignant"]["n"] == 2 and table["malignant"]["pointing_game"] == pytest.approx(0.5)
    assert table["malignant/correct"]["energy_in_mask"] == pytest.approx(0.8)
    assert table["malignant/misclassified"]["iou"] == pytest.approx(0.0)
    assert table["correct"]["n"] == 2 and table["misclassified"]["n"] == 1
    assert table["benign/misclassified"]["n"] == 0
    assert all(v is None for k, v in table["benign/misclassified"].items() if k != "n")
    assert table["all"]["pointing_game_chance"] == pytest.approx(0.3)
    assert table["all"]["energy_in_mask_chance"] == pytest.approx(0.1)
    for group in ("all", "malignant", "correct"):
        for key in ("pointing_game", "energy_in_mask", "iou"):
            low, high = table[group][f"{key}_ci"]
            assert low <= table[group][key] <= high
    # 1 hit in 2 against a chance of 0.3: the excess CI spans 0; 20 hits in 20: above chance, with a zero-width CI
    assert table["malignant"]["pointing_game_excess_ci"] == pytest.approx([-0.3, 0.7])
    assert table["malignant"]["pointing_game_above_chance"] is False
    sure = localisation_table([rec(1, True, True, 0.8, 0.6) for _ in range(20)])["all"]
    assert sure["pointing_game_ci"] == pytest.approx([1.0, 1.0]) and sure["pointing_game_above_chance"] is True
    assert sure["energy_in_mask_excess_ci"] == pytest.approx([0.7, 0.7]) and sure["energy_in_mask_above_chance"]
    spread = localisation_table([rec(1, True, i % 2 == 0, i / 40, 0.5) for i in range(40)])["all"]
    low, high = spread["energy_in_mask_ci"]
    assert low < spread["energy_in_mask"] < high and high - low < 0.25
    assert table["all"]["pointing_game_centre"] == 1.0


# ---- randomisation ----------------------------------------------------------------------------------------------


def test_map_similarity():
    a = np.random.default_rng(0).random((16, 16))
    assert map_similarity(a, a)["spearman"] == 1.0
    assert map_similarity(a, np.zeros((16, 16)))["pearson"] == 0.0
    assert map_similarity(a, 1 - a)["spearman"] == pytest.approx(-1.0)


def test_randomisation_check_detects_change(ensemble, x):
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    result = randomisation_check(ensemble, x, mode="full", seed=0)
    assert result["n_images"] == 2 and result["final"]["randomised"] == "all"
    assert result["final"]["spearman"] < 0.9
    assert result["final"]["ssim"] < 0.9
    after = ensemble.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the trained ensemble is untouched


@pytest.mark.slow
def test_cascading_randomisation_follows_the_stages(ensemble, x):
    """Cascading randomisation walks ``stages()`` from the head to the stem, every step re-initialising one more
    stage of every member; the maps drift away from the original ones."""
    arch = ensemble.members[0].arch
    assert [name for name, _ in reversed(ensemble.members[0].stages())] == STAGES_TOP_DOWN[arch]
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    result = randomisation_check(ensemble, x, mode="cascading", seed=0)
    assert [s["randomised"] for s in result["steps"]] == [f"top..{n}" for n in STAGES_TOP_DOWN[arch]]
    assert result["final"] == result["steps"][-1] and result["final"]["spearman"] < 0.9
    assert all(torch.equal(v, ensemble.state_dict()[k]) for k, v in before.items())
    for m in ensemble.members:
        assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())


# ---- workflow ---------------------------------------------------------------------------------------------------


def _write_rois(root: Path, shapes: list[tuple[int, int]]) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for i, shape in enumerate(shapes):
        roi = rng.random(shape) * 0.3
        mask = np.zeros(shape, bool)
        r, c = shape[0] // 3 + i, shape[1] // 2
        mask[r : r + 6, c : c + 6] = True
        roi[mask] = 0.9
        img = write_roi_png(root / f"roi_{i}.png", roi)
        write_mask_png(root / f"mask_{i}.png", mask)
        items.append(
            {
                "image": str(img),
                "label": i % 2,
                "patient": f"PATIENT-SECRET-{i}",
                "case": f"case{i:03d}",
                "mask": str(root / f"mask_{i}.png") if i != 1 else None,
                "spacing_mm": 0.07 if i != 2 else [0.05, 0.1],
            }
        )
    return items


def _settings(**kw) -> SaliencySettings:
    return SaliencySettings(**{"batch_size": 2, "randomisation": None, "spacing_mm": 0.07, **kw})


@pytest.mark.slow
def test_run_saliency_writes_outputs(ensemble, tmp_path):
    import nibabel as nib

    items = _write_rois(tmp_path / "data", [(64, 64), (64, 64), (64, 64), (96, 80)])
    out = tmp_path / "sal"
    settings = _settings(randomisation="full", randomisation_images=2)
    summary = run_saliency(items, ensemble, settings, out, LoadInputd("image", image_size=64))
    assert summary["counts"]["n"] == 4 and summary["counts"]["with_mask"] == 3
    assert summary["counts"]["unmasked"] == 1 and summary["counts"]["errors"] == 0
    assert summary["localisation"]["all"]["n"] == 3
    assert summary["randomisation"]["n_images"] == 2
    for it in items:
        case = it["case"]
        assert (out / "overlays" / f"{case}.png").is_file()
        img = nib.load(out / "maps" / f"{case}.nii.gz")
        data = np.asarray(img.dataobj).T
        assert data.shape == (64, 64)  # the network input's geometry, also for the 96 x 80 ROI
        assert data.min() >= 0 and data.max() <= 1
        np.testing.assert_allclose(img.header.get_zooms()[:2], (0.07, 0.07), rtol=1e-5)
    assert (out / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loc = json.loads((out / "localisation.json").read_text())
    assert loc["table"]["all"]["n"] == 3 and len(loc["cases"]) == 4
    assert {"hit", "energy", "iou", "chance_area", "chance_pointing"} <= set(loc["cases"][0])
    assert "hit" not in next(r for r in loc["cases"] if r["case"] == "case001")  # no mask: maps only
    # energy in mask, recomputed from the written map and the mask file (64 px ROIs: no resizing in between)
    energies = {r["case"]: r["energy"] for r in loc["cases"] if "energy" in r}
    assert summary["localisation"]["all"]["energy_in_mask"] == pytest.approx(np.mean(list(energies.values())))
    for i in (0, 2):
        cam = np.asarray(nib.load(out / "maps" / f"case{i:03d}.nii.gz").dataobj).T.astype(np.float64)
        mask = read_mask_png(tmp_path / "data" / f"mask_{i}.png")
        assert energies[f"case{i:03d}"] == pytest.approx(cam[mask].sum() / cam.sum(), rel=1e-4)
    # one feature-map cell, in pixels of the 64 px network input
    resized = next(r for r in loc["cases"] if r["case"] == "case003")
    assert resized["tolerance_px"] == pytest.approx(TARGET_STRIDE[ensemble.members[0].arch])
    # anonymous outputs: no patient key anywhere
    names = " ".join(str(p) for p in out.rglob("*"))
    assert "SECRET" not in names and "SECRET" not in (out / "localisation.json").read_text()


def test_mask_loaded_at_the_image_geometry(tmp_path):
    mask = np.zeros((96, 80), bool)
    mask[30:60, 20:40] = True
    write_mask_png(tmp_path / "m.png", mask)
    got = load_mask(tmp_path / "m.png", (48, 40), "c")
    assert got.shape == (48, 40) and got.dtype == bool
    np.testing.assert_array_equal(np.argwhere(got)[[0, -1]], [[15, 10], [29, 19]])
    tiny = np.zeros((96, 80), bool)
    tiny[50, 41] = True  # a quarter of a cell after halving: kept, not dropped
    write_mask_png(tmp_path / "t.png", tiny)
    assert load_mask(tmp_path / "t.png", (48, 40), "c").sum() == 1
    write_mask_png(tmp_path / "e.png", np.zeros((64, 64), bool))
    assert load_mask(tmp_path / "e.png", (64, 64), "c") is None


def _merged_parser(ensemble, root: Path, **overrides):
    """configs/inference.json + configs/saliency.json with the test ensemble's weights under ``root``."""
    from monai.bundle import ConfigParser

    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(ensemble.state_dict(), root / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "saliency.json")])
    values = dict(bundle_root=str(root), device="$torch.device('cpu')", arch=ensemble.members[0].arch, amp=True)
    values.update(num_members=2, image_size=64, roi_size=64, output_dir=str(root / "eval"))
    values.update({"saliency#randomisation": "none", "saliency#threshold": 0.5, **overrides})
    for key, value in values.items():
        parser[key] = value
    return parser


@pytest.mark.slow
def test_bundle_config_over_a_datalist_gives_the_localisation_table(ensemble, tmp_path):
    from scripts.data.schema import make_datalist, write_datalist

    items = _write_rois(tmp_path / "data", [(64, 64), (64, 64), (64, 64)])
    for it in items:
        it["image"] = Path(it["image"]).name
        it["mask"] = Path(it["mask"]).name if it["mask"] else None
        del it["spacing_mm"]
    write_datalist(tmp_path / "data" / "datalist.json", make_datalist([], items, source="test", task="target"))
    parser = _merged_parser(ensemble, tmp_path, datalist=str(tmp_path / "data" / "datalist.json"))
    assert parser["saliency#method"] == "hirescam" and parser["saliency#target"] == "malignant"
    summary = parser.get_parsed_content("saliency#summary")
    out = tmp_path / "eval" / "saliency"
    assert (out / "gallery.png").is_file() and (out / "localisation.json").is_file()
    assert summary["counts"]["with_mask"] == 2 and summary["table"]["all"]["n"] == 2
    assert summary["counts"]["unmasked"] == 1
    settings = json.loads((out / "localisation.json").read_text())["settings"]
    assert settings["amp"] is (ensemble.members[0].arch == "resnet18")  # bf16 maps only where they match float32
    assert settings["cell_px"] == [TARGET_STRIDE[ensemble.members[0].arch]] * 2
    assert settings["layer"] == TARGET_LAYERS[ensemble.members[0].arch]
    assert settings["spacing_mm"] == pytest.approx(0.1)  # roi_pitch_mm x roi_size / image_size
    loaded = parser.get_parsed_content("saliency#network")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ensemble.state_dict().values()))


@pytest.mark.slow
def test_bundle_config_over_a_folder_and_a_csv_of_png_and_dicom(ensemble, tmp_path):
    from scripts.data.prepare.dicom_writer import write_dicom

    folder = tmp_path / "in"
    _write_rois(folder, [(64, 64), (64, 64)])
    for m in folder.glob("mask_*.png"):
        m.unlink()
    rng = np.random.default_rng(3)
    stored = np.round(np.clip(0.4 + 0.15 * rng.standard_normal((96, 96)), 0, 1) * 4000).astype(np.uint16)
    write_dicom(folder / "spot.dcm", stored, pixel_spacing=(0.1, 0.1), patient_name="DOE^JANE", patient_id="PID1")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    summary = _merged_parser(ensemble, tmp_path, input_dir=str(folder)).get_parsed_content("saliency#summary")
    out = tmp_path / "eval" / "saliency"
    assert sorted(p.name for p in (out / "maps").iterdir()) == [f"{c}.nii.gz" for c in ("roi_0", "roi_1", "spot")]
    assert summary["counts"]["n"] == 3 and summary["counts"]["errors"] == 1 and summary["counts"]["with_mask"] == 0
    assert summary["counts"]["label unknown"] == 3 and summary["table"]["all"]["n"] == 0
    assert "DOE" not in (out / "localisation.json").read_text()
    (tmp_path / "in.csv").write_text("image,case\nin/spot.dcm,dicom_case\nin/roi_1.png,png_case\n")
    out2 = tmp_path / "eval2"
    parser = _merged_parser(ensemble, tmp_path, input_csv=str(tmp_path / "in.csv"), output_dir=str(out2))
    assert parser.get_parsed_content("saliency#summary")["counts"]["n"] == 2
    assert sorted(p.name for p in (out2 / "saliency" / "overlays").iterdir()) == ["dicom_case.png", "png_case.png"]


def test_threshold_and_calibration_come_from_the_operating_point_beside_the_weights(ensemble, tmp_path):
    from scripts.model.calibration import write_operating_point

    default = json.loads((ROOT / "configs" / "saliency.json").read_text())["saliency"]["threshold"]
    assert default == "@threshold"  # inference.json's: the saved operating point unless --decision_threshold
    parser = _merged_parser(ensemble, tmp_path, **{"saliency#threshold": default})
    assert parser.get_parsed_content("saliency#settings").threshold == pytest.approx(0.5)  # nothing saved yet
    op = {"threshold": 0.37, "rule": "sensitivity", "rule_description": "r", "calibration": {"scale": 0.5, "bias": 1.0}}
    write_operating_point(tmp_path / "models" / "model.pt", op)
    parser = _merged_parser(ensemble, tmp_path, **{"saliency#threshold": default})
    assert parser.get_parsed_content("saliency#settings").threshold == pytest.approx(0.37)
    net = parser.get_parsed_content("saliency#network")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        member = torch.stack([torch.softmax(m(x), 1) for m in ensemble.members])[:, :, 1].double()
    z = torch.log(member.clamp(1e-6, 1 - 1e-6) / (1 - member.clamp(1e-6, 1 - 1e-6))).mean(0)  # clamped as documented
    with EnsembleCAM(net) as cam:  # the maps' probabilities are the calibrated ones the threshold applies to
        np.testing.assert_allclose(cam(x).probs[:, 1], torch.sigmoid(0.5 * z + 1.0).numpy(), atol=1e-5)
    parser = _merged_parser(ensemble, tmp_path, decision_threshold=0.8, **{"saliency#threshold": default})
    assert parser.get_parsed_content("saliency#settings").threshold == pytest.approx(0.8)


def test_settings_parse_off_values_and_reject_bad_ones():
    s = SaliencySettings(randomisation="None", layer="none", freeze="false", amp="true", threshold="0.3")
    assert s.randomisation is None and s.layer is None and s.freeze is False and s.amp is True and s.threshold == 0.3
    assert none_if_off("off") is None and none_if_off("cascading") == "cascading" and none_if_off(0) == 0
    with pytest.raises(ValueError, match="saliency#freeze"):  # the shared parser names the setting
        SaliencySettings(freeze="maybe")
    for bad in ({"randomisation": "half"}, {"method": "cam"}, {"target": "benign"}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            SaliencySettings(**bad)


def test_gallery_draws_no_row_for_an_empty_group(tmp_path):
    from PIL import Image

    from scripts.saliency import save_gallery

    ex = {"roi": np.random.default_rng(0).random((32, 32)), "cam": np.zeros((32, 32)), "mask": None, "case": "c1"}
    ex["prob"] = 0.7
    one = save_gallery(tmp_path / "one.png", {"malignant correct": [ex], "benign misclassified": []}, per_group=2)
    two = save_gallery(tmp_path / "two.png", {"malignant correct": [ex], "benign correct": [ex]}, per_group=2)
    with Image.open(one) as a, Image.open(two) as b:
        h_one, h_two = a.size[1], b.size[1]
    assert h_two - h_one == 240  # one 2.4-inch row fewer at 100 dpi
