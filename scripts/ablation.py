"""Ablation: how much does each transfer step add, as the target training set grows?

Arms (each is the main job, :func:`scripts.pipeline.run_pipeline`, with one setting changed):

==============  =======================================  ==========================================
arm             stage 1 (intermediate task)              stage 2 (target folds) initialised from
==============  =======================================  ==========================================
``scratch``     none                                     random weights
``imagenet``    none                                     ImageNet weights
``intermediate`` random weights -> intermediate task     the intermediate model
``dtl``         ImageNet weights -> intermediate task    the intermediate model (double transfer)
==============  =======================================  ==========================================

For every target training size and seed, all arms share one synthetic dataset (paired comparison). ImageNet
arms need ImageNet weights (``--imagenet-weights FILE`` or network access); when they cannot be had, those arms
are reported as "not run" with the reason, never replaced by something else.

    python -m scripts.ablation                      # default: 128 px ResNet-18, 50/100/200 ROIs, 3 seeds (~1 h, 2 CPUs)
    python -m scripts.ablation --sizes 100 200 --seeds 0 1 --arms scratch intermediate      # ~35 min
    python -m scripts.ablation --arch resnext50_32x4d --sizes 100 200 400 --imagenet-weights FILE   # a GPU's job

The default network is ResNet-18, not the paper's ResNeXt50: from scratch, ResNeXt50 does not learn this task in
a CPU budget (docs/README.md), so an ablation with it would compare arms that are all at chance. ROIs are 128 px
(0.1 mm pitch): at 64 px the finest calcifications fall below a pixel.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from scripts.pipeline import Settings, prepare_synthetic, run_pipeline

logger = logging.getLogger("ablation")

ARMS = {
    "scratch": {"intermediate": False, "init": "scratch", "backbone_lr_factor": 1.0},
    "imagenet": {"intermediate": False, "init": "imagenet", "backbone_lr_factor": 0.1},
    "intermediate": {"intermediate": True, "init": "scratch", "backbone_lr_factor": 0.1},
    "dtl": {"intermediate": True, "init": "imagenet", "backbone_lr_factor": 0.1},
}


def imagenet_available(arch: str, weights: str | None) -> tuple[bool, str]:
    """Whether ImageNet weights can be had for ``arch`` (a local file, or torchvision's download)."""
    from scripts.network import WeightsError, build_network

    try:
        build_network(arch, init="imagenet", weights=weights)
    except WeightsError as e:
        return False, str(e)
    return True, weights or "torchvision download"


def run_ablation(
    out_dir: str | Path,
    sizes: Sequence[int] = (50, 100, 200),
    seeds: Sequence[int] = (0, 1, 2),
    arms: Sequence[str] = tuple(ARMS),
    base: Settings | None = None,
) -> dict:
    """Run every arm × size × seed; write ``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``out_dir``."""
    from scripts.atomic import write_json, write_text

    out = Path(out_dir).resolve()
    base = base or Settings()
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    not_run: dict[str, str] = {}
    if any(ARMS[a]["init"] == "imagenet" for a in arms):
        ok, why = imagenet_available(base.arch, base.imagenet_weights)
        if not ok:
            for a in arms:
                if ARMS[a]["init"] == "imagenet":
                    not_run[a] = why
            logger.warning("ImageNet arms not run: %s", why)
    runs = []
    t0 = time.time()
    for size in sizes:
        for seed in seeds:
            data_dir = out / "data" / f"n{size}_seed{seed}"
            shared = Settings(**{**base.__dict__, "n_target_train": size, "seed": seed})
            prepare_synthetic(shared, data_dir)
            for arm in arms:
                if arm in not_run:
                    continue
                s = Settings(
                    **{
                        **shared.__dict__,
                        **ARMS[arm],
                        "workdir": str(out / "runs" / arm / f"n{size}_seed{seed}"),
                        "dataset_dir": str(data_dir),
                        "saliency": False,
                    }
                )
                logger.info("arm %s, %d target ROIs, seed %d", arm, size, seed)
                summary = json.loads(run_pipeline(s).read_text())
                runs.append({"arm": arm, "size": size, "seed": seed, "auc": summary["auc"]["auc"]})
    table = summarise_runs(runs, arms, sizes, not_run)
    result = {
        "settings": {k: v for k, v in base.__dict__.items() if k != "extra_overrides"},
        "sizes": list(sizes),
        "seeds": list(seeds),
        "arms": list(arms),
        "not_run": not_run,
        "runs": runs,
        "table": table,
        "data_source": "synthetic",
        "elapsed_s": round(time.time() - t0, 1),
    }
    write_json(out / "ablation.json", result)
    write_text(out / "ablation.md", format_table(result))
    plot(result, out / "ablation.png")
    return result


def summarise_runs(runs: list[dict], arms: Sequence[str], sizes: Sequence[int], not_run: dict) -> dict:
    """Mean, standard deviation and count of the test AUC per arm and size."""
    table: dict = {}
    for arm in arms:
        table[arm] = {}
        for size in sizes:
            aucs = [r["auc"] for r in runs if r["arm"] == arm and r["size"] == size and r["auc"] is not None]
            if arm in not_run:
                table[arm][str(size)] = {"status": "not run"}
            else:
                table[arm][str(size)] = {
                    "mean": float(np.mean(aucs)) if aucs else None,
                    "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
                    "n": len(aucs),
                }
    return table


def format_table(result: dict) -> str:
    """Markdown table: test AUC mean ± SD over seeds, per arm (rows) and target training size (columns)."""
    sizes = result["sizes"]
    lines = [
        "| arm | " + " | ".join(f"{n} ROIs" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for arm, row in result["table"].items():
        cells = []
        for n in sizes:
            c = row[str(n)]
            if c.get("status") == "not run":
                cells.append("not run")
            elif c["mean"] is None:
                cells.append("n/a")
            else:
                sd = f" ± {c['sd']:.3f}" if c["sd"] is not None else ""
                cells.append(f"{c['mean']:.3f}{sd} (n={c['n']})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for arm, why in result["not_run"].items():
        lines.append(f"\n{arm}: not run: {why}")
    lines.append("\nTest AUC of the ensemble, mean ± SD over seeds; synthetic data (not clinical evidence).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """AUC against target training size, one line per arm that ran, error bars = SD over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from scripts.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for arm, row in result["table"].items():
        pts = [(int(n), c["mean"], c.get("sd") or 0.0) for n, c in row.items() if c.get("mean") is not None]
        if pts:
            x, y, e = zip(*sorted(pts))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm)
    ax.set_xlabel("target training ROIs")
    ax.set_ylabel("test AUC (ensemble)")
    ax.set_title("Ablation (synthetic data)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/ablation")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-intermediate", type=int, default=300)
    p.add_argument("--epochs-intermediate", type=int, default=6)
    p.add_argument("--epochs-target", type=int, default=20)
    p.add_argument("--imagenet-weights", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    base = Settings(
        arch=a.arch,
        image_size=a.image_size,
        folds=a.folds,
        n_target_test=a.n_test,
        n_intermediate=a.n_intermediate,
        epochs_intermediate=a.epochs_intermediate,
        epochs_target=a.epochs_target,
        imagenet_weights=a.imagenet_weights,
        n_boot=200,
    )
    result = run_ablation(a.out, a.sizes, a.seeds, a.arms, base)
    print(format_table(result))
    print(f"written: {Path(a.out) / 'ablation.json'}, ablation.md, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
