"""Network construction, explicit initialisation, weight transfer and the ensemble."""

from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
import torchvision

from scripts.model.network import (
    Ensemble,
    GrayClassifier,
    WeightsError,
    build_ensemble,
    build_network,
    freeze_before,
    load_state_dict_file,
    param_groups,
    save_ensemble,
)


def test_default_architecture_is_efficientnet_lite0_and_outputs_logits():
    net = build_network()
    assert net.arch == "efficientnet_lite0" and net.head_name == "classifier"
    assert net.backbone.bn2.num_features == 1280 and net.target_layer is net.backbone.blocks[4]
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_resnext50_stays_the_papers_network():
    net = build_network("resnext50_32x4d")
    assert isinstance(net.backbone, torchvision.models.ResNet)
    assert net.backbone.layer1[0].conv2.groups == 32  # the ResNeXt cardinality
    assert net.target_layer is net.backbone.layer4[-1]
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_grayscale_input_is_normalised_like_imagenet():
    net = GrayClassifier("resnet18").eval()
    x = torch.rand(1, 1, 32, 32)
    seen = {}
    net.backbone.conv1.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    net(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], (x.expand(-1, 3, -1, -1) - mean) / std)


def test_imagenet_weights_from_local_file_replace_the_head(tmp_path, caplog):
    reference = torchvision.models.resnet18(weights=None)  # a torchvision-format ImageNet state dict (1000 classes)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.INFO):
        net = build_network("resnet18", num_classes=2, init="imagenet", weights=str(path))
    assert torch.equal(net.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(net.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert net.backbone.fc.out_features == 2
    assert "shape mismatch" in caplog.text and "backbone.fc.weight" in caplog.text


def test_imagenet_offline_gives_a_clear_error_naming_both_remedies(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        build_network("resnet18", init="imagenet")
    msg = str(err.value)
    assert "could not be downloaded" in msg
    assert "path" in msg and "network access" in msg


def test_checkpoint_init_with_another_head_is_handled_and_logged(tmp_path, caplog):
    source = GrayClassifier("resnet18", num_classes=3)
    path = tmp_path / "stage1.pt"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO):
        net = build_network("resnet18", num_classes=2, init="checkpoint", weights=str(path))
    assert torch.equal(net.backbone.layer3[0].conv1.weight, source.backbone.layer3[0].conv1.weight)
    assert net.backbone.fc.out_features == 2
    assert "backbone.fc.weight (3, 512) -> (2, 512)" in caplog.text


def test_unknown_init_and_missing_checkpoint_are_refused(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        build_network("resnet18", init="random")
    with pytest.raises(WeightsError, match="not found"):
        build_network("resnet18", init="checkpoint", weights=str(tmp_path / "nope.pt"))


def test_truncated_and_foreign_checkpoints_are_refused_with_the_file_name(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(GrayClassifier("resnet18").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated.pt"):
        load_state_dict_file(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"something.else": torch.zeros(3)}, foreign)
    with pytest.raises(WeightsError, match="foreign.pt"):
        build_network("resnet18", init="checkpoint", weights=str(foreign))


def test_freezing_and_backbone_learning_rate_factor():
    net = build_network("resnet18", trainable_from="layer3")
    assert not any(p.requires_grad for p in net.backbone.layer2.parameters())
    assert all(p.requires_grad for p in net.backbone.layer3.parameters())
    groups = param_groups(net, lr=1e-3, backbone_lr_factor=0.1)
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in net.parameters() if p.requires_grad
    )
    with pytest.raises(ValueError):
        freeze_before(net, "layer9")


@pytest.mark.slow
def test_ensemble_is_the_mean_of_member_softmax(tmp_path):
    paths = []
    for k in range(3):
        torch.manual_seed(k)
        p = tmp_path / f"fold{k}.pt"
        torch.save(GrayClassifier("resnet18").state_dict(), p)
        paths.append(p)
    ens = build_ensemble(paths, arch="resnet18").eval()
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), 1) for m in ens.members]).mean(0)
        out = ens(x)
    assert torch.allclose(out, expected) and torch.allclose(out.sum(1), torch.ones(4))
    # the saved ensemble state dict loads into a fresh Ensemble (what models/model.pt holds)
    save_ensemble(paths, tmp_path / "model.pt", arch="resnet18")
    fresh = Ensemble(3, "resnet18")
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), out)


@pytest.mark.slow
def test_ensemble_torchscript_export_matches_eager():
    ens = Ensemble(2, "resnet18").eval()
    scripted = torch.jit.script(ens)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), ens(x), atol=1e-5)


def test_default_precision_follows_the_machine(monkeypatch):
    from scripts.model import inferers

    native = (True, "native")
    monkeypatch.setattr(inferers, "native_cpu_bf16", lambda: native)
    assert inferers.default_amp("efficientnet_lite0", "cpu", 128) is False  # float32 + channels_last is faster there
    assert inferers.default_amp("efficientnet_lite0", "cpu", 224) is True
    assert inferers.default_amp("resnext50_32x4d", "cpu", 128) is True
    assert inferers.default_amp("efficientnet_lite0", "cuda:0", 128) is True
    native = (False, "no bf16 instructions")
    for arch in ("efficientnet_lite0", "resnext50_32x4d"):
        for size in (128, 224):
            choice = inferers.precision_choice(arch, "cpu", size)
            assert choice["amp"] is False and "no bf16 instructions" in choice["reason"]
    assert inferers.default_amp("resnext50_32x4d", "cuda:0", 128) is True


def test_native_cpu_bf16_needs_the_instructions_and_uncapped_kernels(monkeypatch, tmp_path):
    from scripts.model import inferers

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert inferers.cpu_flags(cpuinfo) >= {"avx2", "avx512_bf16"}
    assert inferers.cpu_flags(tmp_path / "missing") == set()
    assert inferers.native_cpu_bf16({"avx2", "fma"}, {})[0] is False
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert inferers.native_cpu_bf16({"avx512f", "avx512_bf16"}, {}) == (
        True,
        inferers.native_cpu_bf16({"avx512_bf16"}, {})[1],
    )
    assert inferers.native_cpu_bf16({"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})[0] is True
    capped = inferers.native_cpu_bf16({"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped[0] is False and "ONEDNN_MAX_CPU_ISA=AVX2" in capped[1]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    lowered = inferers.native_cpu_bf16({"avx512_bf16"}, {})
    assert lowered[0] is False and "AVX2 kernels" in lowered[1]
