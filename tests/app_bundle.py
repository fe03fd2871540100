"""A tiny trained bundle for the MONAI Label and MONAI Deploy apps' tests (and for trying the apps by hand).

    python -m tests.app_bundle /tmp/apps/microcalcification_classification [--threshold 0.6]

writes a bundle folder laid out like a fresh clone after the main job: ``configs/`` (the tiny network's settings
written into ``inference.json``), ``scripts/``, ``apps/`` (the apps' code, without their environments), ``LICENSE``,
``README.md``, ``docs/`` and ``models/model.pt`` (no ``model.ts``); ``--threshold`` (and
:func:`write_tiny_operating_point`) adds the ``models/operating_point.json`` the main job writes beside it. Its network
is a two-member resnet18 ensemble at 64 px, each member trained for one epoch on a few synthetic ROIs from its own
initialisation (so that the members disagree): seconds on a 2-core CPU. As after the main job, the member count is
not written into any config: ``configs/inference.json`` reads it from ``models/model.pt`` relative to
``bundle_root``, so an app that resolved the bundle against the current directory fails on this bundle.
The folder name must contain "classification" for MONAI Label.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

#: values written into the tiny bundle's configs/inference.json (fp32 so that every tool computes the same numbers);
#: deliberately not ``num_members``, which the bundle reads from its weights file as after the main job
TINY_SETTINGS: dict[str, Any] = {
    "arch": "resnet18",
    "image_size": 64,
    "roi_size": 64,
    "roi_pitch_mm": 0.2,
    "amp": False,
    "batch_size": 4,
}


#: the tiny bundle's calibration (``models/operating_point.json``): far enough from the identity that the calibrated
#: probability differs from the mean of the members' probabilities
TINY_CALIBRATION: dict[str, Any] = {"scale": 0.7, "bias": 0.2, "method": "test"}
NUM_MEMBERS = 2


def train_tiny_ensemble(data_root: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """One epoch of each member of a two-member resnet18 ensemble on 16 synthetic 64-px target ROIs; returns its
    state dict."""
    from scripts.data.schema import load_split
    from scripts.data.synthetic import generate_dataset
    from scripts.data.transforms import LoadROId
    from scripts.model.network import Ensemble

    datalist = generate_dataset(data_root, "target", n_train=16, n_test=0, num_folds=2, image_size=64, seed=seed)
    items = load_split(datalist, "training")
    load = LoadROId(keys="image", image_size=64)
    x = torch.stack([torch.as_tensor(load(dict(it))["image"]).float() for it in items])
    y = torch.tensor([int(it["label"]) for it in items])
    torch.manual_seed(seed)
    ens = Ensemble(NUM_MEMBERS, "resnet18")
    for net in ens.members:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for i in range(0, len(items), 8):  # one epoch, batch 8
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i : i + 8]), y[i : i + 8])
            loss.backward()
            opt.step()
    return ens.eval().state_dict()


def write_tiny_operating_point(bundle: str | Path, threshold: float) -> Path:
    """Write ``models/operating_point.json`` into ``bundle`` (as the main job's operating point step does): the
    decision ``threshold`` on the probability calibrated by :data:`TINY_CALIBRATION`."""
    from scripts.model.calibration import write_operating_point

    op = {"threshold": float(threshold), "rule": "fixed", "rule_description": "test", "calibration": TINY_CALIBRATION}
    return write_operating_point(Path(bundle) / "models" / "model.pt", op)


def read_predictions(output_dir: str | Path) -> list[dict]:
    """The rows of ``output_dir/predictions.csv`` (the inference workflow's table)."""
    import csv

    with open(Path(output_dir) / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_inference_workflow(config_dir: str | Path, output_dir: str | Path, **settings: Any) -> list[dict]:
    """Run ``config_dir/inference.json`` (with its ``metadata.json``) in this process with ``settings`` as config
    overrides; return the rows of the predictions table."""
    from monai.bundle import ConfigWorkflow

    config_dir = Path(config_dir)
    wf = ConfigWorkflow(
        config_file=str(config_dir / "inference.json"),
        meta_file=str(config_dir / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        output_dir=str(output_dir),
        **settings,
    )
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    return read_predictions(output_dir)


#: what of the repository the tiny bundle copies (the apps without their environments, logs and caches)
COPIED = ("configs", "scripts", "apps", "docs", "LICENSE", "README.md")
NOT_COPIED = shutil.ignore_patterns("__pycache__", ".venv", "logs", "*.pyc", ".monai_workdir")


def make_app_bundle(dest: str | Path, data_root: str | Path | None = None) -> Path:
    """Write the tiny bundle to ``dest`` (created; must not exist) and return it."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    (dest / "models").mkdir(parents=True)
    for name in COPIED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=NOT_COPIED)
        else:
            shutil.copy2(REPO / name, dest / name)
    config_path = dest / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config.update(TINY_SETTINGS)
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    meta_path = dest / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [64, 64]
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    data_root = Path(data_root) if data_root else dest.parent / f"{dest.name}_data"
    torch.save(train_tiny_ensemble(data_root), dest / "models" / "model.pt")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.app_bundle", description=__doc__.splitlines()[0])
    p.add_argument("dest", help="bundle folder to create (its name must contain 'classification' for MONAI Label)")
    p.add_argument(
        "--threshold",
        type=float,
        help="also write models/operating_point.json: the test calibration and this decision threshold",
    )
    a = p.parse_args(argv)
    bundle = make_app_bundle(a.dest)
    if a.threshold is not None:
        write_tiny_operating_point(bundle, a.threshold)
    print(bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
