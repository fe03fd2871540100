"""Which saliency method and target layer point at the calcifications: every (method, layer) pair over one trained
ensemble and one split, scored by the bundle's localisation metrics (pointing game, energy in mask) with 95 %
bootstrap CIs, their chance levels and the centre prior, side by side in one run.

The pairs default to the choices that matter for EfficientNet-Lite at 128 px: its last feature map (``bn2``,
4 x 4 cells, where Grad-CAM and HiResCAM coincide) and the stride-16 output of ``blocks.4`` (the bundle's default
layer), each with Grad-CAM, HiResCAM and LayerCAM. Needs the main job's ``models/model.pt`` (or ``--weights``).

    python -m benchmarks.saliency_localisation                       # the main job's ensemble, test split (~6 min)
    python -m benchmarks.saliency_localisation --pairs hirescam:backbone.layer3 gradcam:backbone.layer4.2 \\
        --arch resnext50_32x4d --weights models/model.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from scripts.data.imageio import read_mask_png, read_roi_png
from scripts.data.schema import load_split
from scripts.model.network import Ensemble, load_state_dict_file
from scripts.saliency import EnsembleCAM, localisation_metrics, localisation_table

DEFAULT_PAIRS = [
    "gradcam:backbone.bn2",
    "hirescam:backbone.bn2",
    "layercam:backbone.bn2",
    "gradcam:backbone.blocks.4",
    "hirescam:backbone.blocks.4",
    "layercam:backbone.blocks.4",
]


def _fmt(v: dict, key: str) -> str:
    lo, hi = v[f"{key}_ci"]
    digits = 2 if key == "pointing_game" else 4
    star = "*" if v[f"{key}_above_chance"] else " "
    return f"{v[key]:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]{star} ({v[key + '_chance']:.{digits}f})"


def _mask_ablation(ensemble: torch.nn.Module, x: torch.Tensor, masks: list, labels: np.ndarray) -> dict:
    """Test AUC of the ensemble on the ROIs as they are, with the calcifications removed (pixels within 2 px of the
    mask replaced by a 7 x 7 median filter of the ROI, scaled to the ROI size) and with only them kept."""
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    size = max(3, 7 * x.shape[-1] // 128)
    filtered = torch.from_numpy(np.stack([ndimage.median_filter(r[0].numpy(), size=size) for r in x]))[:, None]
    near = torch.from_numpy(np.stack([ndimage.binary_dilation(m, iterations=2) for m in masks]))[:, None]
    variants = {
        "original": x,
        "calcs_removed": torch.where(near, filtered, x),
        "only_calcs": torch.where(near, x, filtered),
    }
    with torch.no_grad():
        return {k: float(roc_auc_score(labels, ensemble(v)[:, 1].numpy())) for k, v in variants.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.saliency_localisation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--weights", default=str(ROOT / "models" / "model.pt"), help="the ensemble's state dict")
    ap.add_argument("--datalist", default=str(ROOT / "data" / "synthetic" / "target" / "datalist.json"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="method:layer (a module name in a member)")
    ap.add_argument("--limit", type=int, default=None, help="first N ROIs only")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state = load_state_dict_file(args.weights)
    members = len({k.split(".")[1] for k in state if k.startswith("members.")})
    ensemble = Ensemble(members, args.arch)
    ensemble.load_state_dict(state)
    ensemble.eval()
    items = [it for it in load_split(args.datalist, args.split) if it.get("mask")][: args.limit]
    x = torch.stack([torch.from_numpy(read_roi_png(it["image"]))[None] for it in items]).float()
    masks = [read_mask_png(it["mask"]) for it in items]
    print(
        f"{len(items)} ROIs of {args.datalist} ({args.split}), {members}-member {args.arch}, input {tuple(x.shape[-2:])}"
    )
    mask_check = _mask_ablation(ensemble, x, masks, np.array([int(it["label"]) for it in items]))
    print(
        "does the ensemble use the calcifications? test AUC {original:.3f} as is, {calcs_removed:.3f} with the pixels "
        "in and near the masks median-filtered, {only_calcs:.3f} with everything else median-filtered".format(
            **mask_check
        )
    )
    rows = []
    for pair in args.pairs:
        method, layer = pair.split(":", 1)
        t0 = time.time()
        with EnsembleCAM(ensemble, method=method, layer=layer) as cam:
            maps = np.concatenate([cam(x[i : i + args.batch_size]).maps for i in range(0, len(x), args.batch_size)])
            cell = math.sqrt(cam.cell_px[0] * cam.cell_px[1])
        records = [
            {"label": it.get("label"), **localisation_metrics(m, mk, cell)} for it, m, mk in zip(items, maps, masks)
        ]
        row = {"method": method, "layer": layer, "cell_px": cell, "seconds": time.time() - t0}
        for group, label in (("all", None), ("benign", 0), ("malignant", 1)):
            subset = [r for r in records if label is None or r["label"] == label]
            row[group] = localisation_table(subset)["all"] if subset else None
        rows.append(row)
    print(
        "\npointing game and energy in mask: mean [95 % bootstrap CI]* (chance); * = above chance (paired excess CI > 0)"
    )
    print(
        f"{'method':9s} {'layer':18s} {'cell':>4s}  {'pointing game (all)':30s} {'centre':>6s}  "
        f"{'energy in mask (all)':34s} {'energy in mask (malignant)':34s} {'s':>4s}"
    )
    for r in rows:
        a, m = r["all"], r["malignant"] or r["all"]
        print(
            f"{r['method']:9s} {r['layer']:18s} {r['cell_px']:4.0f}  {_fmt(a, 'pointing_game'):30s} "
            f"{a['pointing_game_centre']:6.3f}  {_fmt(a, 'energy_in_mask'):34s} {_fmt(m, 'energy_in_mask'):34s} "
            f"{r['seconds']:4.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"mask_ablation": mask_check, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
