"""Evaluation metrics for binary (benign 0 / malignant 1) classification of lesions.

Everything here is plain numpy/scipy so that it can be used from configs, scripts and tests alike. This module
holds the point metrics and thresholds and re-exports its two siblings' public names:

- per-case CSV I/O (:func:`read_cases_csv`, :func:`write_cases_csv`: ``scripts/evaluation/case_table.py``);
- ROC AUC with DeLong variance/CI and DeLong's paired test, patient-clustered percentile bootstrap CIs and
  Wilson score CIs (``scripts/evaluation/intervals.py``);
- operating-threshold selection on validation data only (:func:`choose_threshold`);
- sensitivity, specificity, PPV, NPV, accuracy, F1 with Wilson score CIs (:func:`binary_metrics`);
- calibration (:func:`brier_score`, :func:`reliability_curve`);
- the radiologist BI-RADS comparison (:func:`birads_comparison`) and the one-call :func:`summarize`.

Convention: a case is predicted positive (malignant) when ``score >= threshold``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from scripts.data.schema import TARGET_CLASSES, default_reference_standard
from scripts.evaluation.case_table import CASE_COLUMNS, member_keys, read_cases_csv, write_cases_csv
from scripts.evaluation.clinical import biopsies_avoided, decision_curve, referral_curve
from scripts.evaluation.intervals import (
    as_labels,
    as_scores,
    bootstrap_auc_ci,
    bootstrap_ci,
    bootstrap_weights,
    cluster_index,
    delong_ci,
    delong_covariance,
    delong_paired_test,
    delong_variance,
    has_both_classes,
    json_float,
    roc_auc,
    roc_curve_points,
    wilson_ci,
)

__all__ = [
    "read_cases_csv",
    "write_cases_csv",
    "roc_auc",
    "roc_curve_points",
    "delong_variance",
    "delong_covariance",
    "delong_ci",
    "delong_paired_test",
    "bootstrap_auc_ci",
    "bootstrap_ci",
    "wilson_ci",
    "choose_threshold",
    "binary_metrics",
    "brier_score",
    "reliability_curve",
    "operating_point_at_sensitivity",
    "operating_point_at_specificity",
    "birads_comparison",
    "summarize",
    "member_keys",
    "class_counts",
    "CASE_COLUMNS",
]

# ----------------------------------------------------------------------------------------------------------------------
# thresholded metrics
# ----------------------------------------------------------------------------------------------------------------------


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum((y == 1) & (pred == 1)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    return tn, fp, fn, tp


_PROPORTIONS = {
    # name: (numerator, denominator) as functions of (tn, fp, fn, tp)
    "sensitivity": (lambda tn, fp, fn, tp: tp, lambda tn, fp, fn, tp: tp + fn),
    "specificity": (lambda tn, fp, fn, tp: tn, lambda tn, fp, fn, tp: tn + fp),
    "ppv": (lambda tn, fp, fn, tp: tp, lambda tn, fp, fn, tp: tp + fp),
    "npv": (lambda tn, fp, fn, tp: tn, lambda tn, fp, fn, tp: tn + fn),
    "accuracy": (lambda tn, fp, fn, tp: tp + tn, lambda tn, fp, fn, tp: tn + fp + fn + tp),
}
METRIC_NAMES = (*_PROPORTIONS, "f1")


def _metric_values(tn: int, fp: int, fn: int, tp: int) -> dict[str, float]:
    out = {}
    for name, (num, den) in _PROPORTIONS.items():
        d = den(tn, fp, fn, tp)
        out[name] = num(tn, fp, fn, tp) / d if d else float("nan")
    d = 2 * tp + fp + fn
    out["f1"] = 2 * tp / d if d else float("nan")
    return out


def binary_metrics(
    labels: Iterable,
    scores_or_preds: Iterable,
    threshold: float | None = 0.5,
    clusters: Iterable | None = None,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Sensitivity, specificity, PPV, NPV, accuracy, F1 and the confusion matrix at ``score >= threshold``.

    ``threshold=None`` means ``scores_or_preds`` are already 0/1 predictions. Each proportion has a Wilson CI
    (``ci_low``/``ci_high``; F1 has none); with ``n_boot > 0`` a percentile bootstrap CI (``boot_ci``) is added,
    resampling ``clusters`` (patients) when given.
    """
    y = as_labels(labels)
    s = as_scores(scores_or_preds, y.size)
    pred = (s >= threshold).astype(int) if threshold is not None else s.astype(int)
    if threshold is None and not np.all(np.isin(s, (0, 1))):
        raise ValueError("threshold=None needs 0/1 predictions")
    tn, fp, fn, tp = _confusion(y, pred)
    values = _metric_values(tn, fp, fn, tp)
    out: dict[str, Any] = {
        "threshold": json_float(threshold) if threshold is not None else None,
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "n_neg": int(y.size - y.sum()),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "ci_method": f"Wilson score {100 * (1 - alpha):g}%",
    }
    for name in METRIC_NAMES:
        entry: dict[str, Any] = {"value": json_float(values[name])}
        if name in _PROPORTIONS:
            num, den = _PROPORTIONS[name]
            k, d = num(tn, fp, fn, tp), den(tn, fp, fn, tp)
            lo, hi = wilson_ci(k, d, alpha)
            entry.update({"num": k, "den": d, "ci_low": json_float(lo), "ci_high": json_float(hi)})
        out[name] = entry
    if n_boot and n_boot > 0:
        masks = [(y == 0) & (pred == 0), (y == 0) & (pred == 1), (y == 1) & (pred == 0), (y == 1) & (pred == 1)]
        inv, n_clusters = cluster_index(y.size, clusters)
        rng = np.random.default_rng(seed)
        reps = np.empty((int(n_boot), len(METRIC_NAMES)))
        for b in range(int(n_boot)):
            w = bootstrap_weights(rng, inv, n_clusters)
            v = _metric_values(*(float(np.sum(w[m])) for m in masks))
            reps[b] = [v[k] for k in METRIC_NAMES]
        for j, name in enumerate(METRIC_NAMES):
            col = reps[:, j][np.isfinite(reps[:, j])]  # undefined replicates (e.g. no predicted positives) dropped
            if col.size:
                lo, hi = np.percentile(col, [100 * alpha / 2, 100 * (1 - alpha / 2)])
                out[name]["boot_ci"] = [json_float(lo), json_float(hi)]
            else:
                out[name]["boot_ci"] = [None, None]
        out["boot"] = {
            "n_boot": int(n_boot),
            "n_clusters": n_clusters,
            "clustered": clusters is not None,
            "method": "percentile bootstrap" + (" (resampling patients)" if clusters is not None else ""),
        }
    return out


THRESHOLD_RULES = ("youden", "sensitivity", "specificity", "fixed", "radiologist")


def choose_threshold(
    labels: Iterable, probs: Iterable, rule: str = "youden", value: float | None = None, data_name: str = "validation"
) -> dict:
    """Choose the operating threshold on the given (validation) data.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 (ties: the highest threshold);
    ``"sensitivity"`` is the highest threshold whose sensitivity is at least ``value``;
    ``"specificity"`` is the lowest threshold whose specificity is at least ``value``;
    ``"fixed"`` uses ``value`` unchanged. Data-driven thresholds are placed midway between adjacent distinct
    scores, so the classification of the tuning data is unambiguous. (``"radiologist"`` is ``"sensitivity"`` at
    the BI-RADS sensitivity of the same data: :func:`scripts.evaluation.operating_point.choose_operating_point`.)
    """
    rule = rule.lower()
    if rule == "fixed":
        if value is None:
            raise ValueError("rule='fixed' needs a value")
        desc = f"fixed threshold {float(value):g} (not tuned on any data)"
        return {"threshold": float(value), "rule": "fixed", "value": float(value), "n": 0, "description": desc}
    if rule not in ("youden", "sensitivity", "specificity"):
        raise ValueError(f"unknown threshold rule {rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
    y = as_labels(labels)
    s = as_scores(probs, y.size)
    if not has_both_classes(y):
        raise ValueError(f"threshold rule {rule!r} needs both classes in the {data_name} data")
    u = np.unique(s)[::-1]  # descending distinct scores
    # candidate c_i classifies scores >= u[i] as positive; placed midway to the next lower distinct score
    cands = np.r_[(u[:-1] + u[1:]) / 2.0, u[-1]]
    pos, neg = s[y == 1], s[y == 0]
    sens = np.array([(pos >= t).mean() for t in cands])
    spec = np.array([(neg < t).mean() for t in cands])
    n = y.size
    if rule == "youden":
        j = sens + spec - 1
        i = int(np.argmax(j))  # first maximum = highest threshold among ties
        desc = f"Youden's J on {data_name} (n={n}): J={j[i]:.3f}, sensitivity {sens[i]:.3f}, specificity {spec[i]:.3f}"
    else:
        if value is None or not 0 < value <= 1:
            raise ValueError(f"rule={rule!r} needs a target value in (0, 1]")
        if rule == "sensitivity":
            i = int(np.flatnonzero(sens >= value - 1e-12)[0])
            desc = f"highest threshold with sensitivity >= {value:g} on {data_name} (n={n})"
        else:
            ok = np.flatnonzero(spec >= value - 1e-12)
            if not ok.size:  # even the highest candidate calls the top score positive: call nothing positive
                cands, sens, spec, ok = (
                    np.r_[cands, np.nextafter(u[0], np.inf)],
                    np.r_[sens, 0.0],
                    np.r_[spec, 1.0],
                    [-1],
                )
            i = int(ok[-1])
            desc = f"lowest threshold with specificity >= {value:g} on {data_name} (n={n})"
        desc += f": sensitivity {sens[i]:.3f}, specificity {spec[i]:.3f}"
    return {
        "threshold": float(cands[i]),
        "rule": rule,
        "value": json_float(value),
        "n": int(n),
        "n_pos": int(y.sum()),
        "n_neg": int(n - y.sum()),
        "tuning_sensitivity": float(sens[i]),
        "tuning_specificity": float(spec[i]),
        "description": f"{desc}; threshold {cands[i]:.4g}",
    }


# ----------------------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------------------
def brier_score(labels: Iterable, probs: Iterable) -> float:
    """Mean squared difference between predicted malignant probability and outcome."""
    y = as_labels(labels)
    p = as_scores(probs, y.size)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def reliability_curve(labels: Iterable, probs: Iterable, n_bins: int = 10) -> dict:
    """Equal-width reliability diagram on [0, 1] (bins ``(lo, hi]``, the first also holds 0).

    Returns per non-empty bin the mean predicted probability, observed malignant fraction (with Wilson CI) and
    count, plus the expected calibration error (count-weighted mean |observed - predicted|).
    """
    y = as_labels(labels)
    p = as_scores(probs, y.size)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.clip(np.searchsorted(edges[1:-1], p, side="left"), 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        sel = ids == b
        k = int(sel.sum())
        if not k:
            continue
        pos = int(y[sel].sum())
        lo, hi = wilson_ci(pos, k)
        mean_pred, frac = float(p[sel].mean()), pos / k
        ece += k * abs(frac - mean_pred)
        bins.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "n": k,
                "mean_pred": mean_pred,
                "frac_pos": frac,
                "ci_low": json_float(lo),
                "ci_high": json_float(hi),
            }
        )
    return {"n_bins": n_bins, "bins": bins, "ece": json_float(ece / y.size) if y.size else None}


# ----------------------------------------------------------------------------------------------------------------------
# operating points and the radiologist comparison
# ----------------------------------------------------------------------------------------------------------------------
def operating_point_at_sensitivity(labels: Iterable, scores: Iterable, target: float) -> dict:
    """The model's specificity at a target sensitivity on these data.

    ``achievable``: the highest threshold whose sensitivity is >= ``target`` (an attainable operating point, no
    interpolation). ``interpolated``: specificity read off the linearly interpolated empirical ROC at exactly
    ``target`` (the best specificity at that sensitivity among randomised mixtures of adjacent thresholds).
    """
    y = as_labels(labels)
    s = as_scores(scores, y.size)
    roc = roc_curve_points(y, s)
    tpr, fpr, thr = roc["tpr"], roc["fpr"], roc["thresholds"]
    # first ROC point (highest threshold) reaching the target; interpolate between it and the point before
    i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    if i == 0 or tpr[i] == tpr[i - 1]:
        fpr_interp = float(fpr[i])
    else:
        w = (target - tpr[i - 1]) / (tpr[i] - tpr[i - 1])
        fpr_interp = float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))
    return {
        "target_sensitivity": float(target),
        "threshold": json_float(thr[i]),
        "sensitivity": float(tpr[i]),
        "specificity": float(1 - fpr[i]),
        "specificity_interpolated": float(1 - fpr_interp),
        "method": (
            "achievable: highest model threshold with sensitivity >= target (no interpolation); "
            "interpolated: linear interpolation of the empirical ROC at the target sensitivity"
        ),
    }


def operating_point_at_specificity(labels: Iterable, scores: Iterable, target: float) -> dict:
    """The model's sensitivity at the lowest threshold whose specificity is >= ``target`` (attainable point)."""
    y = as_labels(labels)
    s = as_scores(scores, y.size)
    roc = roc_curve_points(y, s)
    spec = 1 - roc["fpr"]
    i = int(np.flatnonzero(spec >= target - 1e-12)[-1])
    return {
        "target_specificity": float(target),
        "threshold": json_float(roc["thresholds"][i]),
        "sensitivity": float(roc["tpr"][i]),
        "specificity": float(spec[i]),
        "method": "lowest model threshold with specificity >= target (no interpolation)",
    }


def birads_comparison(
    labels: Iterable,
    probs: Iterable,
    birads: Iterable,
    cut: int = 4,
    clusters: Iterable | None = None,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Model vs radiologist BI-RADS on the same lesions (rows with a BI-RADS category only).

    BI-RADS is used as an ordinal score for ROC (DeLong CI) and as a positive call at ``BI-RADS >= cut`` for
    sensitivity/specificity/PPV/NPV; the AUCs are compared by DeLong's paired test; the model's specificity is
    read at the radiologist's sensitivity (and its sensitivity at the radiologist's specificity).
    """
    y_all = as_labels(labels)
    p_all = as_scores(probs, y_all.size)
    b_list = list(birads)
    if len(b_list) != y_all.size:
        raise ValueError("birads must have one entry per case")
    keep = np.array([b is not None and not (isinstance(b, float) and math.isnan(b)) for b in b_list])
    y = y_all[keep]
    p = p_all[keep]
    b = np.array([float(v) for v, k in zip(b_list, keep) if k])
    cl = None
    if clusters is not None:
        cl = np.asarray(list(clusters)).astype(str)[keep]
    out: dict[str, Any] = {
        "cut": int(cut),
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "n_neg": int(y.size - y.sum()),
        "n_excluded_missing_birads": int((~keep).sum()),
        "birads_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(b, return_counts=True))} if b.size else {},
    }
    if not has_both_classes(y):
        out["error"] = "the lesions with a BI-RADS category do not contain both classes"
        return out
    out["birads_auc"] = delong_ci(y, b, alpha)
    out["model_auc"] = delong_ci(y, p, alpha)
    if n_boot:
        out["birads_auc"]["bootstrap"] = bootstrap_auc_ci(y, b, cl, n_boot=n_boot, seed=seed, alpha=alpha)
        out["model_auc"]["bootstrap"] = bootstrap_auc_ci(y, p, cl, n_boot=n_boot, seed=seed, alpha=alpha)
    out["birads_at_cut"] = binary_metrics(y, b, threshold=cut, clusters=cl, n_boot=n_boot, seed=seed, alpha=alpha)
    out["paired_delong"] = delong_paired_test(y, p, b, alpha)
    out["paired_delong"]["a"] = "model"
    out["paired_delong"]["b"] = "BI-RADS"
    rad_sens = out["birads_at_cut"]["sensitivity"]["value"]
    rad_spec = out["birads_at_cut"]["specificity"]["value"]
    out["model_at_radiologist_sensitivity"] = operating_point_at_sensitivity(y, p, rad_sens)
    out["model_at_radiologist_specificity"] = operating_point_at_specificity(y, p, rad_spec)
    out["note"] = (
        "Model operating points at the radiologist's sensitivity/specificity are read off the model's ROC on these "
        "same lesions: they describe the curve and are not a deployable threshold."
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# top level
# ----------------------------------------------------------------------------------------------------------------------
def class_counts(rows: Sequence[dict], class_names: Sequence[str] = TARGET_CLASSES) -> dict:
    """Cases, patients, lesions (``None`` when no row names one) and cases per class (keyed by class name)."""
    labels = [int(r["label"]) for r in rows]
    lesions = {(str(r.get("patient")), str(r.get("lesion"))) for r in rows if r.get("lesion") not in (None, "")}
    return {
        "cases": len(rows),
        "patients": len({str(r.get("patient")) for r in rows}),
        "lesions": len(lesions) if lesions else None,
        **{str(name): labels.count(i) for i, name in enumerate(class_names)},
    }


def summary_threshold(
    rule: str, value: float | None, val_rows: Sequence[dict] | None, operating_point: dict | None
) -> dict:
    """The test's decision threshold: the saved ``operating_point``'s (rule ``"operating_point"``), a ``fixed``
    ``value``, or ``rule`` chosen on the validation rows (:func:`choose_threshold`)."""
    if operating_point is not None:
        return {
            "threshold": float(operating_point["threshold"]),
            "rule": operating_point["rule"],
            "value": operating_point.get("value"),
            "description": f"{operating_point['rule_description']} (models/operating_point.json)",
            "validation": operating_point.get("validation"),
        }
    if rule == "fixed":
        return choose_threshold([], [], rule="fixed", value=value)
    yv = [int(r["label"]) for r in val_rows or []]
    pv = [float(r["prob"]) for r in val_rows or []]
    return choose_threshold(yv, pv, rule=rule, value=value, data_name="validation")


def member_aucs(test_rows: Sequence[dict], y: np.ndarray, alpha: float) -> dict:
    """Each member's AUC with its DeLong interval (``{"auc": None}`` when its rows hold one class) and row count,
    from the table's ``member_<k>`` columns."""
    members = {}
    for k in member_keys(test_rows):
        sel = [i for i, r in enumerate(test_rows) if r.get(k) is not None and r.get(k) != ""]
        ym = y[sel]
        pm = np.array([float(test_rows[i][k]) for i in sel])
        members[k] = delong_ci(ym, pm, alpha) if has_both_classes(ym) else {"auc": None}
        members[k]["n"] = len(sel)
    return members


def validation_summary(val_rows: Sequence[dict], threshold: float, alpha: float, with_metrics: bool) -> dict:
    """The validation rows' AUC (``validation_auc``) and, ``with_metrics``, their metrics at ``threshold``
    (``validation_metrics``; the saved operating point carries its own)."""
    yv = [int(r["label"]) for r in val_rows]
    pv = [float(r["prob"]) for r in val_rows]
    out = {"validation_metrics": binary_metrics(yv, pv, threshold, alpha=alpha)} if with_metrics else {}
    out["validation_auc"] = delong_ci(yv, pv, alpha)
    return out


def summarize(
    test_rows: Sequence[dict],
    val_rows: Sequence[dict] | None = None,
    threshold_rule: str = "youden",
    threshold_value: float | None = None,
    birads_cut: int = 4,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    data_source: str | None = None,
    class_names: Sequence[str] | None = None,
    reference_standard: str | None = None,
    operating_point: dict | None = None,
    reader: str = "radiologist",
) -> dict:
    """All test-set metrics in one JSON-serialisable dict; the threshold is tuned on ``val_rows`` only.

    With ``operating_point`` (``models/operating_point.json``, chosen on the out-of-fold predictions by
    :func:`scripts.evaluation.operating_point.choose_operating_point`) its threshold is used as is, the test rows'
    ``prob`` is taken to be its calibrated probability, and the summary adds calibration before/after (the mean
    of the ``member_k`` columns is the uncalibrated score), the decision curve, the referral curve (rows with an
    ``uncertainty`` column) and, with BI-RADS, the biopsies avoided at the reader-matched threshold. ``reader``
    names who gave the BI-RADS categories (``"simulated reader"`` on synthetic data).

    ``class_names`` (default the target classes) and ``reference_standard`` (default that of ``data_source``,
    :func:`scripts.data.schema.default_reference_standard`) are the datalist's (``scripts.data.schema.class_names`` /
    ``scripts.data.schema.reference_standard``); the report prints them.

    Raises ``ValueError`` when a data-driven threshold rule is asked for without validation rows: the test set is
    never used to tune the operating point.
    """
    if not test_rows:
        raise ValueError("no test rows")
    rule = threshold_rule.lower() if operating_point is None else "operating_point"
    if rule not in ("fixed", "operating_point") and not val_rows:
        raise ValueError(
            f"threshold rule {threshold_rule!r} needs validation rows (val_rows); the threshold is never tuned on "
            "the test set. Pass val_rows, or use threshold_rule='fixed' with threshold_value."
        )
    y = as_labels([int(r["label"]) for r in test_rows])
    p = as_scores([float(r["prob"]) for r in test_rows], y.size)
    patients = [str(r.get("patient")) for r in test_rows]

    thr = summary_threshold(rule, threshold_value, val_rows, operating_point)

    names = [str(c) for c in (class_names or TARGET_CLASSES)]
    out: dict[str, Any] = {
        "data_source": data_source,
        "class_names": names,
        "reference_standard": reference_standard or default_reference_standard(data_source),
        "alpha": alpha,
        "counts": {
            "test": class_counts(test_rows, names),
            "validation": class_counts(val_rows, names) if val_rows else None,
        },
        "threshold": thr,
    }
    auc = delong_ci(y, p, alpha)
    auc["bootstrap"] = bootstrap_auc_ci(y, p, patients, n_boot=n_boot, seed=seed, alpha=alpha) if n_boot else None
    out["auc"] = auc
    out["members"] = member_aucs(test_rows, y, alpha)
    out["metrics"] = binary_metrics(y, p, thr["threshold"], clusters=patients, n_boot=n_boot, seed=seed, alpha=alpha)
    if val_rows:
        out.update(validation_summary(val_rows, thr["threshold"], alpha, with_metrics=operating_point is None))
    out["brier"] = brier_score(y, p)
    out["reliability"] = reliability_curve(y, p)
    b = [None if r.get("birads") in (None, "") else int(r["birads"]) for r in test_rows]
    has_birads = any(v is not None for v in b)
    out["radiologist"] = None
    if has_birads:
        out["radiologist"] = birads_comparison(
            y, p, b, cut=birads_cut, clusters=patients, n_boot=n_boot, seed=seed, alpha=alpha
        )
        out["radiologist"]["reader"] = reader
    if operating_point is not None:
        out.update(clinical_summary(test_rows, y, p, b if has_birads else None, patients, operating_point, reader,
                                    birads_cut, n_boot, seed))  # fmt: skip
    return out


def clinical_summary(
    test_rows: Sequence[dict],
    y: np.ndarray,
    p: np.ndarray,
    birads: list | None,
    patients: list[str],
    operating_point: dict,
    reader: str,
    birads_cut: int,
    n_boot: int,
    seed: int,
) -> dict:
    """Calibration before/after, decision curve, referral curve and the reader-matched point of :func:`summarize`."""
    out: dict[str, Any] = {"operating_point": operating_point}
    keys = member_keys(test_rows)
    if keys:
        raw = np.array([np.mean([float(r[k]) for k in keys]) for r in test_rows])
        out["calibration"] = {
            "method": operating_point["calibration"].get("method"),
            "before": {"score": "mean of the members' probabilities", "brier": brier_score(y, raw),
                       "reliability": reliability_curve(y, raw)},
            "after": {"score": "calibrated probability", "brier": brier_score(y, p),
                      "reliability": reliability_curve(y, p)},
        }  # fmt: skip
    out["decision_curve"] = decision_curve(y, p, birads, cut=birads_cut, reader=reader)
    if test_rows and all(r.get("uncertainty") not in (None, "") for r in test_rows) and len(keys) > 1:
        u = [float(r["uncertainty"]) for r in test_rows]
        out["referral"] = referral_curve(y, p, u, operating_point["threshold"], seed=seed)
    matched = operating_point.get("reader_matched")
    if birads is not None and matched:
        t = matched["threshold"]
        out["reader_matched"] = {
            "threshold": t,
            "description": matched["description"],
            "target_sensitivity": matched["target_sensitivity"],
            "metrics": binary_metrics(y, p, t, clusters=patients, n_boot=n_boot, seed=seed),
            "biopsies": biopsies_avoided(y, p, birads, t, birads_cut, patients, n_boot=n_boot, seed=seed),
        }
    return out
