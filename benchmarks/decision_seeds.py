"""From score to decision over several main-job runs (e.g. seeds 0, 1, 2), side by side.

Reads each run's ``results/`` (the out-of-fold ``cases_validation_fold<k>.csv``, ``cases_test.csv`` and
``metrics.json``) and prints three tables:

1. **Calibration methods** (fitted on the out-of-fold predictions only, evaluated on test): expected calibration
   error and Brier score of the ensemble score, and where a threshold chosen on validation lands on test (the
   ``sensitivity`` rule at 0.90 and Youden's J). ``mean prob`` is the bundle's score before calibration;
   ``platt, mean logit`` is the one it deploys (:mod:`scripts.evaluation.operating_point`).
2. **The deployed operating point**: test AUC, the threshold and its validation sensitivity/specificity, test
   sensitivity/specificity/PPV/NPV, calibration before/after, the reader (BI-RADS >= 4) and the model at the
   reader's validation sensitivity with the benign biopsies avoided.
3. **Referral**: error rate and AUC of the cases kept when the most uncertain 10/20/30 % are referred, beside
   random referral.

    python -m benchmarks.decision_seeds --runs /tmp/seed0 /tmp/seed1 /tmp/seed2 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from benchmarks._common import table, write_result
from scripts.evaluation.case_table import read_cases_csv
from scripts.evaluation.intervals import roc_auc
from scripts.evaluation.metrics import brier_score, choose_threshold, reliability_curve
from scripts.evaluation.operating_point import fit_calibration
from scripts.model.calibration import member_logits


def logit(p: np.ndarray) -> np.ndarray:
    return member_logits(torch.as_tensor(np.asarray(p, dtype=np.float64))).numpy()


def _platt(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    model = LogisticRegression(C=np.inf).fit(x[:, None], y)
    return lambda z: model.predict_proba(np.asarray(z)[:, None])[:, 1]


def _per_member_platt(vk, vy, vp, members, combine_logits: bool):
    fits = [_platt(logit(vp[vk == k]), vy[vk == k]) for k in range(members.shape[1])]
    val = np.empty_like(vp)
    for k, f in enumerate(fits):
        val[vk == k] = f(logit(vp[vk == k]))
    test = np.stack([f(logit(members[:, k])) for k, f in enumerate(fits)])
    if combine_logits:
        return val, 1 / (1 + np.exp(-logit(test).mean(0)))
    return val, test.mean(0)


def methods(vk: np.ndarray, vy: np.ndarray, vp: np.ndarray, members: np.ndarray) -> dict:
    """Validation and test scores of each calibration method: ``{name: (validation, test)}``."""
    mean_p = members.mean(1)
    cal = fit_calibration(vy, vp)
    deployed = cal.probability(torch.as_tensor(members.T)).numpy()
    platt = _platt(logit(vp), vy)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(vp, vy)
    return {
        "mean prob (uncalibrated)": (vp, mean_p),
        "platt, mean logit (deployed)": (cal.probability(torch.as_tensor(vp)[None]).numpy(), deployed),
        "platt, logit of mean prob": (platt(logit(vp)), platt(logit(mean_p))),
        "isotonic, mean prob": (iso.predict(vp), iso.predict(mean_p)),
        "per-member platt, mean prob": _per_member_platt(vk, vy, vp, members, False),
        "per-member platt, mean logit": _per_member_platt(vk, vy, vp, members, True),
    }


def load_run(run: Path) -> dict:
    res = run / "results"
    folds = sorted(res.glob("cases_validation_fold*.csv"))
    vk, vy, vp = [], [], []
    for k, f in enumerate(folds):
        for r in read_cases_csv(f):
            vk.append(k)
            vy.append(r["label"])
            vp.append(r["prob"])
    test = read_cases_csv(res / "cases_test.csv")
    keys = sorted(k for k in test[0] if k.startswith("member_"))
    return {
        "vk": np.array(vk),
        "vy": np.array(vy),
        "vp": np.array(vp),
        "ty": np.array([r["label"] for r in test]),
        "members": np.array([[r[k] for k in keys] for r in test]),
        "metrics": json.loads((res / "metrics.json").read_text()),
        "seed": json.loads((res / "main_job.json").read_text())["settings"]["seed"],
    }


def method_rows(run: dict) -> list[dict]:
    rows = []
    ty = run["ty"]
    for name, (val, test) in methods(run["vk"], run["vy"], run["vp"], run["members"]).items():
        row = {"seed": run["seed"], "method": name, "test_auc": roc_auc(ty, test)}
        row["ece"] = reliability_curve(ty, test)["ece"]
        row["brier"] = brier_score(ty, test)
        for rule, value in (("sensitivity", 0.9), ("youden", None)):
            t = choose_threshold(run["vy"], val, rule, value)["threshold"]
            tag = "sens90" if rule == "sensitivity" else "youden"
            row[f"{tag}_test_sens"] = float((test[ty == 1] >= t).mean())
            row[f"{tag}_test_spec"] = float((test[ty == 0] < t).mean())
        rows.append(row)
    return rows


def deployed_row(run: dict) -> dict:
    m = run["metrics"]
    op, rad, matched = m["operating_point"], m.get("radiologist") or {}, m.get("reader_matched") or {}
    v = lambda d, k: (d.get(k) or {}).get("value")  # noqa: E731
    row = {
        "seed": run["seed"],
        "auc": m["auc"]["auc"],
        "rule": f"{op['rule']} {op.get('value') or ''}".strip(),
        "threshold": op["threshold"],
        "val_sens": v(op["validation"], "sensitivity"),
        "val_spec": v(op["validation"], "specificity"),
        "test_sens": v(m["metrics"], "sensitivity"),
        "test_spec": v(m["metrics"], "specificity"),
        "test_ppv": v(m["metrics"], "ppv"),
        "test_npv": v(m["metrics"], "npv"),
        "ece_before": m["calibration"]["before"]["reliability"]["ece"],
        "ece_after": m["calibration"]["after"]["reliability"]["ece"],
        "brier_before": m["calibration"]["before"]["brier"],
        "brier_after": m["calibration"]["after"]["brier"],
    }
    if rad and matched:
        b = matched["biopsies"]
        av, miss = b["benign_biopsies_avoided"], b["cancers_missed_caught_by_reader"]
        boot = av.get("bootstrap") or {}
        row.update(
            reader_auc=rad["birads_auc"]["auc"],
            reader_sens=v(rad["birads_at_cut"], "sensitivity"),
            reader_spec=v(rad["birads_at_cut"], "specificity"),
            reader_ppv=v(rad["birads_at_cut"], "ppv"),
            matched_sens=v(matched["metrics"], "sensitivity"),
            matched_spec=v(matched["metrics"], "specificity"),
            matched_ppv=v(matched["metrics"], "ppv"),
            biopsies_avoided=f"{av['count']}/{av['of']} ({av['fraction']:.2f}, {boot.get('ci_low', 0):.2f}-"
            f"{boot.get('ci_high', 0):.2f})",
            cancers_missed_reader_caught=f"{miss['count']}/{miss['of']}",
            delong_p=rad["paired_delong"]["p"],
        )
    return row


def referral_rows(run: dict) -> list[dict]:
    ref = run["metrics"].get("referral") or {"rows": []}
    return [
        {"seed": run["seed"], **{k: r[k] for k in ("fraction", "kept", "error_rate", "random_error_rate", "auc")},
         "random_auc": r["random_auc"]}
        for r in ref["rows"]
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decision_seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="main-job work folders (each with results/)")
    ap.add_argument("--out", default=None, help="JSON result file")
    args = ap.parse_args(argv)
    runs = [load_run(Path(r)) for r in args.runs]
    payload = {
        "methods": [row for run in runs for row in method_rows(run)],
        "deployed": [deployed_row(run) for run in runs],
        "referral": [row for run in runs for row in referral_rows(run)],
    }
    cols = ["seed", "method", "test_auc", "ece", "brier", "sens90_test_sens", "sens90_test_spec"]
    print(table(payload["methods"], cols + ["youden_test_sens", "youden_test_spec"], "Calibration methods (test)"))
    print()
    d = payload["deployed"]
    print(table(d, list(d[0])[:14], "The deployed operating point"))
    if "reader_sens" in d[0]:
        print()
        print(table(d, ["seed", *list(d[0])[14:]], "Model and reader at the reader's validation sensitivity (test)"))
    print()
    print(table(payload["referral"], list(payload["referral"][0]) if payload["referral"] else [], "Referral (test)"))
    if args.out:
        write_result(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
