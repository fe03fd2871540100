"""The operating point of the deployed ensemble, chosen on out-of-fold validation predictions only.

``configs/summarize.json``'s run id ``operating_point`` runs :func:`choose_operating_point` after the out-of-fold
evaluations and before the test evaluation: it fits the calibration (:func:`fit_calibration`) on the members'
out-of-fold predictions, chooses the decision threshold on the calibrated validation probabilities by a rule
(``youden``, ``sensitivity``, ``specificity``, ``fixed`` or ``radiologist``), and writes both, with the validation
sensitivity and specificity (and CIs) they give, to ``models/operating_point.json`` beside ``models/model.pt``.
Everything that answers with the model (test evaluation, ``configs/inference.json``, the apps, the exports'
network definition) reads that file, so they all give the same probability and the same call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from scripts.data import schema
from scripts.evaluation.case_table import read_cases_csv, write_cases_csv
from scripts.evaluation.metrics import THRESHOLD_RULES, binary_metrics, choose_threshold
from scripts.model.calibration import Calibration, member_logits, write_operating_point

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike
CALIBRATION_METHOD = "platt on out-of-fold member log-odds, applied to the mean member log-odds"
NOT_FITTED = "none: the Platt slope on the out-of-fold cases was not positive (identity on the mean member log-odds)"


def fit_calibration(labels: np.ndarray, member_probs: np.ndarray) -> Calibration:
    """Platt scaling (scikit-learn's unpenalised ``LogisticRegression``) of out-of-fold member log-odds.

    Each out-of-fold probability comes from a member that never saw the case, so the fit sees the error a member
    makes on new data; applied to the mean of the K members' log-odds it keeps that scale (averaging log-odds,
    unlike averaging probabilities, does not pull confident members towards 0.5). docs/evaluation.md compares it
    with the alternatives over 3 seeds.

    Args:
        labels: 0/1 ground truth of the out-of-fold cases.
        member_probs: each case's out-of-fold probability of malignancy (from the member that did not train on it).

    Returns:
        The fitted :class:`~scripts.model.calibration.Calibration`; the identity (method :data:`NOT_FITTED`, logged)
        when the fitted slope is not positive, which would reverse the members' ranking (few or uninformative
        out-of-fold cases, e.g. a fine-tuning on a handful of labels).

    Raises:
        ValueError: ``labels`` hold one class only.
    """
    x = member_logits(torch.as_tensor(np.asarray(member_probs, dtype=np.float64))).numpy()[:, None]
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both classes in the out-of-fold validation predictions")
    model = LogisticRegression(C=np.inf).fit(x, y)
    scale = float(model.coef_[0, 0])
    if scale <= 0:  # out-of-fold scores that rank no better than chance: the fit would reverse the model's ranking
        logger.warning(
            "Platt slope %.3g <= 0 on %d out-of-fold cases: the members' scores do not rank them; the calibration is "
            "left as the identity (mean member log-odds)", scale, y.size
        )  # fmt: skip
        return Calibration(1.0, 0.0, NOT_FITTED)
    return Calibration(scale, float(model.intercept_[0]), CALIBRATION_METHOD)


def validation_cases(results_dir: PathLike, num_folds: int) -> list[dict]:
    """Join ``cases_validation_fold<k>.csv`` (k < ``num_folds``) into ``cases_validation.csv``; returns its rows.

    Each out-of-fold row was scored by one member: its probability is the case's score (the ``member_0`` and
    ``uncertainty`` columns are dropped).

    Args:
        results_dir: holds the per-fold tables; ``cases_validation.csv`` is written there.
        num_folds: the number of folds (tables ``k = 0 .. num_folds - 1``).
    """
    results_dir = Path(results_dir)
    rows = []
    for k in range(num_folds):
        for r in read_cases_csv(results_dir / f"cases_validation_fold{k}.csv"):
            r.pop("member_0", None)
            r.pop("uncertainty", None)
            rows.append(r)
    write_cases_csv(results_dir / "cases_validation.csv", rows)
    return rows


def reader_sensitivity(rows: list[dict], cut: int = 4) -> dict | None:
    """Sensitivity of ``BI-RADS >= cut`` on the rows that carry a BI-RADS category.

    Args:
        rows: case rows with ``label`` and ``birads`` (``None`` where the case has no category).
        cut: BI-RADS at or above which the reader recommends biopsy.

    Returns:
        ``{"cut", "n_malignant", "sensitivity"}``, or ``None`` when no malignant row carries a category.
    """
    rated = [r for r in rows if r.get("birads") is not None and int(r["label"]) == 1]
    if not rated:
        return None
    hits = sum(int(r["birads"]) >= cut for r in rated)
    return {"cut": cut, "n_malignant": len(rated), "sensitivity": hits / len(rated)}


def _validation_point(labels: np.ndarray, probs: np.ndarray, patients: list[str], thr: dict, **boot) -> dict:
    m = binary_metrics(labels, probs, thr["threshold"], clusters=patients, **boot)
    return {
        "threshold": thr["threshold"],
        "description": thr["description"],
        "validation": {k: m[k] for k in ("sensitivity", "specificity", "ppv", "npv", "confusion") if k in m},
    }


def choose_operating_point(
    results_dir: PathLike,
    datalist: PathLike,
    model_file: PathLike,
    rule: str = "sensitivity",
    value: float | None = 0.9,
    birads_cut: int = 4,
    n_boot: int = 1000,
    seed: int = 0,
    reader: str | None = None,
) -> Path:
    """Fit the calibration and choose the threshold on the out-of-fold predictions; write ``operating_point.json``.

    Args:
        results_dir: holds ``cases_validation_fold<k>.csv`` (``configs/evaluate.json`` on each fold).
        datalist: the target datalist (its folds and metadata).
        model_file: the ensemble's weights; the operating point is written beside it.
        rule: one of :data:`scripts.evaluation.metrics.THRESHOLD_RULES`.
        value: the rule's target (sensitivity / specificity) or the fixed threshold.
        birads_cut: BI-RADS at or above which the reader recommends biopsy.
        n_boot: patient-clustered bootstrap resamples for the validation CIs.
        seed: bootstrap seed.
        reader: who gave the BI-RADS categories (e.g. ``"simulated reader"``); default from the datalist.

    Returns:
        The path of ``operating_point.json``.

    Raises:
        ValueError: an unknown rule, a rule without its value, or ``radiologist`` without BI-RADS on validation.
    """
    rule = str(rule).lower()
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
    target = schema.read_datalist(datalist, check_files=False)
    rows = validation_cases(results_dir, schema.num_folds(datalist))
    y = np.array([int(r["label"]) for r in rows])
    raw = np.array([float(r["prob"]) for r in rows])
    patients = [str(r.get("patient")) for r in rows]
    cal = fit_calibration(y, raw)
    probs = cal.probability(torch.as_tensor(raw)[None]).numpy()
    reader = reader or schema.reader_label(target)
    reader_sens = reader_sensitivity(rows, birads_cut)
    boot = {"n_boot": n_boot, "seed": seed}
    if rule == "radiologist":
        if reader_sens is None:
            raise ValueError(
                f"threshold rule 'radiologist' needs BI-RADS categories on the validation rows ({datalist} has none)"
            )
        thr = choose_threshold(y, probs, "sensitivity", reader_sens["sensitivity"], data_name="validation")
        thr["description"] = f"{reader}'s sensitivity (BI-RADS >= {birads_cut}) matched on validation: " + thr[
            "description"
        ].replace("highest threshold with", "threshold with")
    else:
        thr = choose_threshold(y, probs, rule, value, data_name="validation")
    op = {
        "rule": rule,
        "value": None if rule == "radiologist" else value,
        "rule_description": thr["description"],
        "threshold": thr["threshold"],
        "calibration": {**cal.to_dict(), "n": int(y.size), "n_malignant": int(y.sum())},
        "chosen_on": f"out-of-fold validation predictions of {schema.num_folds(datalist)} folds (n={y.size})",
        "validation": _validation_point(y, probs, patients, thr, **boot)["validation"],
        "reader": reader,
        "reader_sensitivity": reader_sens,
        "reader_matched": None,
        "model_file": Path(model_file).name,
        "class_names": schema.class_names(target),
    }
    if reader_sens is not None:
        matched = choose_threshold(y, probs, "sensitivity", reader_sens["sensitivity"], data_name="validation")
        op["reader_matched"] = {"target_sensitivity": reader_sens["sensitivity"], **_validation_point(
            y, probs, patients, matched, **boot
        )}  # fmt: skip
    path = write_operating_point(model_file, op)
    logger.info("operating point: %s -> %s", op["rule_description"], path)
    return path
