"""Test-time augmentation (the 8 flips and 90-degree rotations) against the plain ensemble, over main-job runs.

For each run (a main job's ``--bundle_root``), in a scratch copy that links the run's weights and data:

* ``plain``: the test evaluation as the main job ran it (``configs/evaluate.json``);
* ``tta, saved operating point``: the same with ``--tta true``: what a user gets by switching TTA on for a bundle
  whose calibration and threshold were chosen without it;
* ``tta throughout``: the out-of-fold evaluations with ``--tta true``, a new operating point from them (same rule),
  then the test evaluation with ``--tta true``: what ``python -m scripts.main_job --tta true`` gives.

Per arm: test AUC, expected calibration error and Brier score of the calibrated probability, test sensitivity and
specificity at the arm's threshold, and seconds per test ROI for the 3-member evaluation (data loading included).

    python -m benchmarks.tta --runs /tmp/seed0 /tmp/seed1 /tmp/seed2 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import table, write_result
from scripts.data import schema
from scripts.engine.steps import run_config
from scripts.evaluation.case_table import read_cases_csv
from scripts.evaluation.intervals import roc_auc
from scripts.evaluation.metrics import brier_score, reliability_curve
from scripts.model.calibration import OPERATING_POINT_FILE

EVALUATE = ("train.json", "evaluate.json")


def scratch_copy(run: Path, into: Path) -> Path:
    """A work folder whose ``models/`` links the run's weights (not its operating point) and whose ``data`` links
    the run's data, so evaluations and a new operating point can be written without touching the run."""
    (into / "models").mkdir(parents=True)
    for item in (run / "models").iterdir():
        if item.name != OPERATING_POINT_FILE:
            (into / "models" / item.name).symlink_to(item.resolve())
    (into / "data").symlink_to((run / "data").resolve())
    return into


def evaluate(root: Path, overrides: dict) -> float:
    """Run one evaluation; returns its wall time in seconds."""
    t0 = time.perf_counter()
    run_config(EVALUATE, {"bundle_root": str(root), **overrides})
    return time.perf_counter() - t0


def threshold(root: Path) -> float:
    return json.loads((root / "models" / OPERATING_POINT_FILE).read_text())["threshold"]


def arm_row(seed: int, arm: str, root: Path, cases: str, seconds: float) -> dict:
    rows = read_cases_csv(root / "results" / cases)
    y = np.array([r["label"] for r in rows])
    p = np.array([r["prob"] for r in rows])
    call = (p >= threshold(root)).astype(int)
    return {
        "seed": seed,
        "arm": arm,
        "test_auc": roc_auc(y, p),
        "ece": reliability_curve(y, p)["ece"],
        "brier": brier_score(y, p),
        "test_sens": float((call[y == 1] == 1).mean()),
        "test_spec": float((call[y == 0] == 0).mean()),
        "threshold": threshold(root),
        "s_per_roi": seconds / len(rows),
    }


def run_arms(run: Path) -> list[dict]:
    record = run / "results" / "main_job.json"
    if not record.is_file():
        raise SystemExit(f"{run}: not a main-job work folder (no {record.relative_to(run)})")
    settings = json.loads(record.read_text())["settings"]
    seed = settings["seed"]
    given = settings.get("target_datalist")
    datalist = Path(given) if given else run / "data" / "synthetic" / "target" / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"{run}: no target datalist at {datalist} (runs made on synthetic data or --target_datalist)")
    common = {"datalist": str(datalist), "dataset_dir": str(datalist.parents[1]), "seed": seed}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = scratch_copy(run, Path(tmp) / "plain")
        shutil.copy(run / "models" / OPERATING_POINT_FILE, plain / "models" / OPERATING_POINT_FILE)
        rows.append(arm_row(seed, "plain", plain, "cases_test.csv", evaluate(plain, common)))
        seconds = evaluate(plain, {**common, "tta": True, "cases_csv": f"{plain}/results/cases_test_tta.csv"})
        rows.append(arm_row(seed, "tta, saved operating point", plain, "cases_test_tta.csv", seconds))
        tta = scratch_copy(run, Path(tmp) / "tta")
        for k in range(schema.num_folds(datalist)):
            evaluate(tta, {**common, "tta": True, "eval_split": "validation", "eval_fold": k})
        op = json.loads((run / "models" / OPERATING_POINT_FILE).read_text())
        rule = {"threshold_rule": op["rule"], "threshold_value": op.get("value")}
        run_config(("train.json", "summarize.json"), {"bundle_root": str(tta), **common, **rule}, "operating_point")
        seconds = evaluate(tta, {**common, "tta": True})
        rows.append(arm_row(seed, "tta throughout", tta, "cases_test.csv", seconds))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tta", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="main-job work folders (each with models/ and data/)")
    ap.add_argument("--out", default=None, help="JSON result file")
    args = ap.parse_args(argv)
    rows = [row for run in args.runs for row in run_arms(Path(run))]
    print(table(rows, list(rows[0]), "Test-time augmentation (test split)"))
    if args.out:
        write_result(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
