"""Exports of the ensemble: `python -m monai.bundle ckpt_export` (TorchScript) and `onnx_export` as a user types
them, eager / TorchScript / ONNX Runtime parity within 1e-4, and `verify_net_in_out` against metadata.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.export import ONNX_KWARGS_CLI, check_parity, eager_network, export_torchscript
from scripts.network import Ensemble
from tests.conftest import REPO


def monai_bundle(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """models/model.pt of a seeded 2-member resnet18 ensemble, exported to models/model.ts and models/model.onnx."""
    root = tmp_path_factory.mktemp("export")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(Ensemble(2, "resnet18").state_dict(), root / "models" / "model.pt")
    common = [
        "network_def",
        "--ckpt_file",
        str(root / "models" / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--arch",
        "resnet18",
        "--num_members",
        "2",
    ]
    # TorchScript through monai.bundle.ckpt_export in this process (same arguments as the CLI), ONNX through the CLI
    export_torchscript(root, arch="resnet18", num_members=2)
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


def test_torchscript_and_onnx_match_eager_within_1e4(exported):
    eager = eager_network(exported, arch="resnet18", num_members=2)
    diffs = check_parity(
        eager, exported / "models" / "model.ts", exported / "models" / "model.onnx", image_size=128, batch_sizes=(1, 3)
    )
    assert set(diffs) == {"torchscript", "onnxruntime"}
    assert all(d <= 1e-4 for d in diffs.values()), diffs


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


def test_parity_check_catches_a_mismatch(exported):
    other = eager_network(exported, arch="resnet18", num_members=2)
    with torch.no_grad():
        other.members[0].backbone.fc.bias[1] += 1.0
    with pytest.raises(AssertionError, match="differ"):
        check_parity(other, exported / "models" / "model.ts", image_size=64, batch_sizes=(2,))


def test_verify_net_in_out_with_metadata(caplog):
    """What `python -m monai.bundle verify_net_in_out network_def --meta_file ... --config_file ...` runs."""
    from monai.bundle import verify_net_in_out

    with caplog.at_level("INFO"):
        verify_net_in_out(
            "network_def",
            meta_file=str(REPO / "configs" / "metadata.json"),
            config_file=str(REPO / "configs" / "inference.json"),
            device="cpu",
            arch="resnet18",
            num_members=2,
        )
    assert "verified with no error" in caplog.text


def test_hash_weights_fills_and_checks_large_files_yml(tmp_path):
    import hashlib

    import yaml

    from scripts.hash_weights import check_hashes, fill_hashes

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
