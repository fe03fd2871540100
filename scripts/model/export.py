"""Export the ensemble (``network_def`` of ``configs/inference.json`` + ``models/model.pt``) to TorchScript and ONNX
through MONAI's bundle tools, and check that eager PyTorch, TorchScript and ONNX Runtime agree.

    python -m scripts.model.export                          # models/model.ts + models/model.onnx, then the parity check
    python -m scripts.model.export --formats onnx --arch resnet18 --num-members 2 --bundle-root /path/to/bundle

The same exports by hand (what this module runs):

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json
    python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
        --converter_kwargs "$ONNX_KWARGS"

with ``ONNX_KWARGS`` = :data:`ONNX_CONVERTER_KWARGS` (the legacy TorchScript-based ONNX exporter, which needs no
``onnxscript``; a dynamic batch axis; input ``image`` ``(B, 1, H, W)`` in [0, 1], output ``pred`` ``(B, 2)``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser, ckpt_export, onnx_export

from scripts.model.network import load_state_dict_file

BUNDLE_DIR = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)

ONNX_CONVERTER_KWARGS: dict[str, Any] = {
    "dynamo": False,
    "input_names": ["image"],
    "output_names": ["pred"],
    "dynamic_axes": {"image": {0: "batch"}, "pred": {0: "batch"}},
}
ONNX_KWARGS_CLI = (
    "{'dynamo': False, 'input_names': ['image'], 'output_names': ['pred'], "
    "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}"
)


def _paths(bundle_root: str | Path) -> dict[str, str]:
    root = Path(bundle_root)
    return {
        "ckpt_file": str(root / "models" / "model.pt"),
        "meta_file": str(BUNDLE_DIR / "configs" / "metadata.json"),
        "config_file": str(BUNDLE_DIR / "configs" / "inference.json"),
    }


def export_torchscript(
    bundle_root: str | Path = BUNDLE_DIR, filepath: str | Path | None = None, **overrides: Any
) -> Path:
    """``monai.bundle.ckpt_export`` of ``network_def`` (scripted, with metadata and config inside); returns the path."""
    filepath = Path(filepath or Path(bundle_root) / "models" / "model.ts")
    ckpt_export("network_def", filepath=str(filepath), **_paths(bundle_root), **overrides)
    return filepath


def export_onnx(bundle_root: str | Path = BUNDLE_DIR, filepath: str | Path | None = None, **overrides: Any) -> Path:
    """``monai.bundle.onnx_export`` of ``network_def`` with a dynamic batch axis; returns the path."""
    filepath = Path(filepath or Path(bundle_root) / "models" / "model.onnx")
    onnx_export(
        "network_def",
        filepath=str(filepath),
        use_trace=True,
        converter_kwargs=copy.deepcopy(ONNX_CONVERTER_KWARGS),
        **_paths(bundle_root),
        **overrides,
    )
    return filepath


def eager_network(bundle_root: str | Path = BUNDLE_DIR, **overrides: Any) -> torch.nn.Module:
    """``network_def`` of ``configs/inference.json`` with ``models/model.pt`` loaded strictly, in eval mode."""
    parser = ConfigParser()
    parser.read_config(_paths(bundle_root)["config_file"])
    for k, v in overrides.items():
        parser[k] = v
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(load_state_dict_file(Path(bundle_root) / "models" / "model.pt"))
    return net.eval()


def check_parity(
    eager: torch.nn.Module,
    torchscript_file: str | Path | None = None,
    onnx_file: str | Path | None = None,
    image_size: int = 128,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Largest absolute difference of TorchScript and ONNX Runtime outputs from eager PyTorch on random ROIs.

    Raises :class:`AssertionError` when a difference exceeds ``atol`` or an output is not a probability vector.
    """
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.rand(b, 1, image_size, image_size, generator=g) for b in batch_sizes]
    with torch.no_grad():
        reference = [eager(x).float() for x in inputs]
    for ref in reference:
        if not torch.allclose(ref.sum(1), torch.ones(ref.shape[0]), atol=1e-5):
            raise AssertionError("eager outputs are not probabilities (rows do not sum to 1)")
    diffs: dict[str, float] = {}
    if torchscript_file is not None:
        ts = torch.jit.load(str(torchscript_file), map_location="cpu").eval()
        with torch.no_grad():
            diffs["torchscript"] = max(float((ts(x) - r).abs().max()) for x, r in zip(inputs, reference))
    if onnx_file is not None:
        import onnxruntime as ort  # optional: only to check an ONNX export (not in the apps' environments)

        runner = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        name = runner.get_inputs()[0].name
        diffs["onnxruntime"] = max(
            float(np.abs(runner.run(None, {name: x.numpy()})[0] - r.numpy()).max()) for x, r in zip(inputs, reference)
        )
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise AssertionError(f"exported outputs differ from eager PyTorch by more than {atol}: {bad}")
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.model.export", description=__doc__.splitlines()[0])
    p.add_argument("--bundle-root", default=str(BUNDLE_DIR), help="folder holding models/model.pt (outputs go there)")
    p.add_argument("--formats", nargs="+", choices=("torchscript", "onnx"), default=["torchscript", "onnx"])
    p.add_argument("--arch", default=None, help="override the config's arch (efficientnet_lite0), e.g. resnext50_32x4d")
    p.add_argument("--num-members", type=int, default=None, help="override the config's num_members")
    p.add_argument("--image-size", type=int, default=128, help="ROI size for the parity check")
    p.add_argument("--no-check", action="store_true", help="skip the eager / TorchScript / ONNX Runtime parity check")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    overrides = {k: v for k, v in (("arch", a.arch), ("num_members", a.num_members)) if v is not None}
    out: dict[str, Path] = {}
    if "torchscript" in a.formats:
        out["torchscript"] = export_torchscript(a.bundle_root, **overrides)
    if "onnx" in a.formats:
        out["onnx"] = export_onnx(a.bundle_root, **overrides)
    for fmt, path in out.items():
        print(f"{fmt}: {path}")
    if not a.no_check:
        diffs = check_parity(
            eager_network(a.bundle_root, **overrides), out.get("torchscript"), out.get("onnx"), image_size=a.image_size
        )
        for fmt, d in diffs.items():
            print(f"parity {fmt}: max |difference| from eager PyTorch {d:.2e} (limit 1e-4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
