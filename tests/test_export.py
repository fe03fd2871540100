"""Exports of the ensemble: `python -m monai.bundle ckpt_export` (TorchScript) and `onnx_export` as a user types
them, eager / TorchScript / ONNX Runtime parity within 1e-4, and `verify_net_in_out` against metadata.json; for both
backbone families (resnet18, and efficientnet_lite0 with its TensorFlow "same" padding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.model.export import ONNX_KWARGS_CLI, check_parity, eager_network, export_torchscript
from scripts.model.network import Ensemble, build_network
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

ARCHS = ["resnet18", "efficientnet_lite0"]


def seeded_ensemble(arch: str) -> Ensemble:
    """A seeded 2-member ensemble whose probabilities depend on the input (so that parity is not trivial).

    resnet18: random weights. efficientnet_lite0: random weights saturate it (each member's softmax is ~one-hot, and
    two members' mean is exactly 0.5 for every input), so its members are the packaged ImageNet backbone with a
    small random head, different for each member.
    """
    torch.manual_seed(0)
    ens = Ensemble(2, arch)
    if arch == "efficientnet_lite0":
        for member in ens.members:
            member.load_state_dict(build_network(arch, init="imagenet").state_dict())
            torch.nn.init.normal_(member.backbone.classifier.weight, std=0.02)
            torch.nn.init.normal_(member.backbone.classifier.bias, std=0.02)
    return ens.eval()


def monai_bundle(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def exported(tmp_path_factory, arch) -> Path:
    """models/model.pt of a seeded 2-member ensemble of ``arch``, exported to models/model.ts and models/model.onnx."""
    root = tmp_path_factory.mktemp(f"export_{arch}")
    (root / "models").mkdir()
    torch.save(seeded_ensemble(arch).state_dict(), root / "models" / "model.pt")
    common = [
        "network_def",
        "--ckpt_file",
        str(root / "models" / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--arch",
        arch,
        "--num_members",
        "2",
    ]
    # TorchScript through monai.bundle.ckpt_export in this process (same arguments as the CLI), ONNX through the CLI
    export_torchscript(root, arch=arch, num_members=2)
    monai_bundle(
        "onnx_export",
        *common,
        "--filepath",
        str(root / "models" / "model.onnx"),
        "--use_trace",
        "True",
        "--converter_kwargs",
        ONNX_KWARGS_CLI,
    )
    return root


def test_torchscript_and_onnx_match_eager_within_1e4(exported, arch):
    eager = eager_network(exported, arch=arch, num_members=2)
    assert all(m.arch == arch for m in eager.members)
    diffs = check_parity(
        eager, exported / "models" / "model.ts", exported / "models" / "model.onnx", image_size=128, batch_sizes=(1, 3)
    )
    assert set(diffs) == {"torchscript", "onnxruntime"}
    assert all(d <= 1e-4 for d in diffs.values()), diffs
    # the outputs compared are informative: they vary from one ROI to another and are not saturated
    with torch.no_grad():
        probs = eager(torch.rand(4, 1, 128, 128, generator=torch.Generator().manual_seed(3)))
    assert float(probs[:, 1].max() - probs[:, 1].min()) > 1e-3
    assert 0.01 < float(probs.min()) and float(probs.max()) < 0.99


def test_torchscript_serves_other_roi_sizes(exported, arch):
    """The TorchScript file takes any ROI size (inference and saliency at native size), including odd sizes where
    efficientnet_lite0's TensorFlow "same" padding is asymmetric, and matches eager PyTorch there too."""
    eager = eager_network(exported, arch=arch, num_members=2)
    ts = torch.jit.load(str(exported / "models" / "model.ts"), map_location="cpu").eval()
    x = torch.rand(2, 1, 97, 131, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = eager(x), ts(x)
    assert out.shape == (2, 2)
    assert float((out - ref).abs().max()) <= 1e-4


def test_export_command_writes_onnx_and_checks_parity(exported, arch, tmp_path, capsys):
    """`python -m scripts.model.export --formats onnx --arch ARCH --num-members 2 --bundle-root ROOT` (scripts/model/export.py's
    own ONNX export, then its parity check against eager PyTorch)."""
    import shutil

    from scripts.model.export import main

    (tmp_path / "models").mkdir()
    shutil.copy(exported / "models" / "model.pt", tmp_path / "models" / "model.pt")
    argv = ["--bundle-root", str(tmp_path), "--formats", "onnx", "--arch", arch, "--num-members", "2"]
    assert main(argv) == 0
    assert (tmp_path / "models" / "model.onnx").is_file() and not (tmp_path / "models" / "model.ts").exists()
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("parity onnxruntime")]
    assert float(line.split("eager PyTorch ")[1].split()[0]) <= 1e-4


def test_exports_follow_network_data_format(exported):
    import onnx

    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    n_in, n_out = fmt["inputs"]["image"]["num_channels"], fmt["outputs"]["pred"]["num_channels"]
    extra = {"metadata.json": ""}
    ts = torch.jit.load(str(exported / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == meta["version"]
    out = ts(torch.rand(2, n_in, *fmt["inputs"]["image"]["spatial_shape"]))
    assert out.shape == (2, n_out) and out.dtype == torch.float32
    model = onnx.load(str(exported / "models" / "model.onnx"))
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("image", "pred")
    assert inp.type.tensor_type.shape.dim[1].dim_value == n_in
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # any batch size
    assert outp.type.tensor_type.shape.dim[1].dim_value == n_out


def test_parity_check_catches_a_mismatch(exported, arch):
    other = eager_network(exported, arch=arch, num_members=2)
    head = getattr(other.members[0].backbone, other.members[0].head_name)  # fc / classifier
    with torch.no_grad():
        head.bias[1] += 1.0
    with pytest.raises(AssertionError, match="differ"):
        check_parity(other, exported / "models" / "model.ts", image_size=64, batch_sizes=(2,))


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_net_in_out_with_metadata(caplog, arch):
    """What `python -m monai.bundle verify_net_in_out network_def --meta_file ... --config_file ...` runs."""
    from monai.bundle import verify_net_in_out

    with caplog.at_level("INFO"):
        verify_net_in_out(
            "network_def",
            meta_file=str(REPO / "configs" / "metadata.json"),
            config_file=str(REPO / "configs" / "inference.json"),
            device="cpu",
            arch=arch,
            num_members=2,
        )
    assert "verified with no error" in caplog.text


def test_hash_weights_fills_and_checks_large_files_yml(tmp_path):
    import hashlib

    import yaml

    from scripts.model.hash_weights import check_hashes, fill_hashes

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights")
    yml = tmp_path / "large_files.yml"
    yml.write_text((REPO / "large_files.yml").read_text())
    assert check_hashes(yml) == ["models/model.pt: sha256 differs from hash_val"]
    digest = hashlib.sha256(b"weights").hexdigest()
    assert fill_hashes(yml) == {"models/model.pt": digest}
    entry = yaml.safe_load(yml.read_text())["large_files"][0]
    assert entry == {**yaml.safe_load((REPO / "large_files.yml").read_text())["large_files"][0], "hash_val": digest}
    assert yml.read_text().startswith("#")  # comments kept
    assert check_hashes(yml) == []
    (tmp_path / "models" / "model.pt").write_bytes(b"other")
    assert check_hashes(yml) == ["models/model.pt: sha256 differs from hash_val"]
