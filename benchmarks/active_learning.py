"""Uncertainty-ranked against random choice of the images to label, at equal label budgets, over main-job runs.

For each run (a main job's ``--bundle_root``: its ``models/model.pt`` and operating point are the model in use), a new
site's data are generated: the synthetic target task at another contrast-to-noise ratio (``--cnr``) and another seed,
as a pool of unlabelled ROIs and a test split. Both strategies start from one random seed set of labels (the first
budget, with at least as many images of each class as the ensemble has members); at each later budget each adds the
pool images its rule picks with its model in use:

* ``random``: images drawn at random;
* ``uncertainty``: the images on which the members disagree most (the population SD of their probabilities of
  malignancy: the MONAI Label app's ``uncertainty`` strategy).

After each addition the model in use is fine-tuned on all the labels so far (:func:`scripts.finetune.finetune`: what
the MONAI Label app's train task runs) and becomes the model in use; its test AUC is measured. Budget 0 is the run's
own model on the new site.

    python -m benchmarks.active_learning --runs /tmp/seed0 /tmp/seed1 /tmp/seed2 [--budgets 12 24 48]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import table, write_result
from scripts.data import schema
from scripts.data.synthetic import generate_dataset
from scripts.data.transforms import LoadROId
from scripts.evaluation.intervals import roc_auc
from scripts.finetune import finetune
from scripts.model.calibration import CalibratedEnsembled, read_operating_point
from scripts.model.network import Ensemble, count_members, load_state_dict_file

STRATEGIES = ("random", "uncertainty")


def load_model(model_file: Path, arch: str) -> Ensemble:
    """The ensemble in ``model_file`` with the calibration saved beside it, as ``configs/inference.json`` builds it."""
    op = read_operating_point(model_file)
    net = Ensemble(count_members(model_file), arch, 2, op and op["calibration"])
    net.load_state_dict(load_state_dict_file(model_file))
    return net.eval()


def score(model_file: Path, images: torch.Tensor, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """``(calibrated probability of malignancy, members' disagreement)`` of each image, with the uncertainty of the
    bundle's evaluation (:class:`scripts.model.calibration.CalibratedEnsembled`)."""
    net = load_model(model_file, arch)
    with torch.no_grad():
        members = torch.cat([net.member_probabilities(x) for x in images.split(64)], dim=1)  # (K, N, 2)
    keys = [f"member_{k}" for k in range(members.shape[0])]
    spread = CalibratedEnsembled(keys, output_key="pred", calibration=None, uncertainty_key="uncertainty")
    u = np.array([float(spread(dict(zip(keys, members[:, i])))["uncertainty"]) for i in range(members.shape[1])])
    return net.combine(members)[:, 1].double().numpy(), u


def read_split(datalist: Path, split: str, image_size: int) -> tuple[list[dict], torch.Tensor]:
    items = schema.load_split(datalist, split)
    load = LoadROId(keys="image", image_size=image_size)
    return items, torch.stack([torch.as_tensor(load(dict(it))["image"]).float() for it in items])


def seed_set(labels: np.ndarray, size: int, per_class: int, rng: np.random.Generator) -> list[int]:
    """``size`` pool indices drawn at random until each class has at least ``per_class`` of them."""
    for _ in range(1000):
        chosen = rng.choice(labels.size, size, replace=False)
        if all((labels[chosen] == c).sum() >= per_class for c in (0, 1)):
            return [int(i) for i in chosen]
    raise ValueError(f"no seed set of {size} with {per_class} of each class in a pool of {labels.size}")


def write_labels(path: Path, pool: list[dict], chosen: list[int]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        for i in chosen:
            writer.writerow([pool[i]["image"], schema.TARGET_CLASSES[int(pool[i]["label"])]])
    return path


def run_strategies(run: Path, budgets: list[int], cnr: float, n_pool: int, n_test: int, epochs: int | None) -> list:
    """The AUC rows of both strategies on one run."""
    base = run / "models" / "model.pt"
    settings = json.loads((run / "results" / "main_job.json").read_text())["settings"]
    seed, arch, image_size = int(settings["seed"]), str(settings["arch"]), int(settings["image_size"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="active-learning-") as tmp:
        work = Path(tmp)
        datalist = generate_dataset(
            work / "site", "target", n_train=n_pool, n_test=n_test, num_folds=3, image_size=image_size,
            seed=1000 + seed, cnr=cnr,
        )  # fmt: skip
        pool, pool_x = read_split(datalist, "training", image_size)
        test, test_x = read_split(datalist, "test", image_size)
        y_pool = np.array([int(it["label"]) for it in pool])
        y_test = np.array([int(it["label"]) for it in test])
        rng = np.random.default_rng(seed)
        start = seed_set(y_pool, budgets[0], count_members(base), rng)
        auc0 = roc_auc(y_test, score(base, test_x, arch)[0])
        rows.append({"seed": seed, "labels": 0, "random": auc0, "uncertainty": auc0})
        state = {s: {"model": base, "chosen": list(start)} for s in STRATEGIES}
        trained: dict = {}  # (model, labels) -> fine-tuned model: the shared seed set is fine-tuned once
        for budget in budgets:
            row = {"seed": seed, "labels": budget}
            for name in STRATEGIES:
                st = state[name]
                extra = budget - len(st["chosen"])
                if extra > 0:
                    taken = set(st["chosen"])
                    free = np.array([i for i in range(len(pool)) if i not in taken])
                    if name == "random":
                        picked = rng.choice(free, extra, replace=False)
                    else:
                        u = score(st["model"], pool_x[free], arch)[1]
                        picked = free[np.argsort(-u, kind="stable")[:extra]]
                    st["chosen"] += [int(i) for i in picked]
                key = (st["model"], tuple(sorted(st["chosen"])))
                t0 = time.time()
                if key not in trained:
                    folder = work / name / f"labels{budget}"
                    folder.mkdir(parents=True)
                    labels = write_labels(folder / "labels.csv", pool, st["chosen"])
                    trained[key] = finetune(
                        labels, st["model"], folder / "run", epochs, seed, arch=arch, image_size=image_size
                    )
                st["model"] = trained[key]
                row[name] = roc_auc(y_test, score(st["model"], test_x, arch)[0])
                row[f"{name}_malignant"] = int(y_pool[st["chosen"]].sum())
                print(f"[seed {seed}] {name}, {budget} labels: test AUC {row[name]:.3f} ({time.time() - t0:.0f} s)")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.active_learning", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="main-job work folders (one per seed)")
    ap.add_argument("--budgets", nargs="+", type=int, default=[12, 24, 48], help="label counts; the first is random")
    ap.add_argument("--cnr", type=float, default=8.0, help="the new site's contrast-to-noise ratio (training: 12)")
    ap.add_argument("--pool", type=int, default=200, help="unlabelled ROIs of the new site")
    ap.add_argument("--test", type=int, default=200, help="test ROIs of the new site")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fine-tuning (default: the target stage's)")
    ap.add_argument("--out", default=None, help="JSON result file")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        rows += run_strategies(Path(run), sorted(args.budgets), args.cnr, args.pool, args.test, args.epochs)
    for r in rows:
        r["difference"] = r["uncertainty"] - r["random"]
    columns = ["seed", "labels", "random", "uncertainty", "difference", "random_malignant", "uncertainty_malignant"]
    print(table(rows, columns, f"Test AUC on a new site (synthetic, cnr {args.cnr:g}) against labels added"))
    means = []
    for budget in [0, *sorted(args.budgets)]:
        at = [r for r in rows if r["labels"] == budget]
        means.append({"labels": budget, **{k: float(np.mean([r[k] for r in at])) for k in (*STRATEGIES, "difference")}})
        means[-1]["uncertainty_better"] = f"{sum(r['difference'] > 0 for r in at)}/{len(at)}"
    print(table(means, ["labels", *STRATEGIES, "difference", "uncertainty_better"], "Mean over runs"))
    if args.out:
        write_result(args.out, {"settings": vars(args), "rows": rows, "means": means})
    return rows


if __name__ == "__main__":
    main()
