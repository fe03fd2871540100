"""What a decision means clinically: net benefit, biopsies avoided against the reader, and referral of uncertain cases.

- :func:`decision_curve`: net benefit of biopsying when the calibrated probability is at least the threshold
  probability ``pt``, against BI-RADS >= 4, biopsy-all and biopsy-none (Vickers & Elkin, Med Decis Making
  26:565-574, 2006): ``NB = TP/n - FP/n * pt / (1 - pt)``.
- :func:`biopsies_avoided`: at a model threshold, the benign lesions the reader would biopsy (BI-RADS >= cut) that
  the model calls benign, and the cancers the model misses that the reader catches, with patient-clustered
  bootstrap CIs.
- :func:`referral_curve`: error rate and AUC of the cases kept when the most uncertain fraction is referred, beside
  referring the same fraction at random.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from scripts.evaluation.intervals import bootstrap_ci, json_float, roc_auc, wilson_ci

DECISION_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 100))
REFERRAL_FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def net_benefit(labels: np.ndarray, positive: np.ndarray, pt: float) -> float:
    """Net benefit of acting on ``positive`` calls at threshold probability ``pt``.

    Args:
        labels: 0/1 ground truth, one per case.
        positive: the calls, one bool per case (True: act, e.g. biopsy).
        pt: the threshold probability, in (0, 1); a false positive weighs ``pt / (1 - pt)`` of a true positive.

    Returns:
        ``TP/n - FP/n * pt / (1 - pt)``.
    """
    n = labels.size
    tp = float(np.sum(positive & (labels == 1)))
    fp = float(np.sum(positive & (labels == 0)))
    return tp / n - fp / n * pt / (1.0 - pt)


def decision_curve(
    labels: Iterable,
    probs: Iterable,
    birads: Sequence[int | None] | None = None,
    cut: int = 4,
    thresholds: Sequence[float] = DECISION_THRESHOLDS,
    reader: str = "radiologist",
) -> dict:
    """Net benefit against threshold probability for the model, BI-RADS >= ``cut`` (rows with BI-RADS), all, none.

    Args:
        labels: 0/1 ground truth, one per case.
        probs: the model's probabilities of malignancy; they must be calibrated (a threshold probability is a
            statement about risk).
        birads: each case's BI-RADS category or ``None``; the BI-RADS curve uses the rows that carry one.
        cut: BI-RADS at or above which the reader recommends biopsy.
        thresholds: the threshold probabilities of the curve.
        reader: who gave the BI-RADS categories (names the BI-RADS curve).

    Returns:
        ``thresholds``, ``n``, ``prevalence`` and one net benefit per threshold for ``model``, ``biopsy_all``,
        ``biopsy_none`` and ``birads`` (``None`` when no row carries a category, else with ``birads_n`` and
        ``birads_label``).
    """
    y = np.asarray(list(labels), dtype=int)
    p = np.asarray(list(probs), dtype=float)
    out: dict = {"thresholds": [float(t) for t in thresholds], "n": int(y.size), "prevalence": float(y.mean())}
    out["model"] = [net_benefit(y, p >= t, t) for t in thresholds]
    out["biopsy_all"] = [net_benefit(y, np.ones_like(y, dtype=bool), t) for t in thresholds]
    out["biopsy_none"] = [0.0 for _ in thresholds]
    out["birads"] = None
    if birads is not None:
        keep = np.array([b is not None for b in birads])
        if keep.any():
            b = np.array([int(v) for v in np.asarray(birads, dtype=object)[keep]])
            yb = y[keep]
            out["birads"] = [net_benefit(yb, b >= cut, t) for t in thresholds]
            out["birads_n"] = int(keep.sum())
            out["birads_label"] = f"{reader}: BI-RADS >= {cut}"
    return out


def _count(k: int, n: int) -> dict:
    lo, hi = wilson_ci(k, n)
    return {
        "count": int(k),
        "of": int(n),
        "fraction": json_float(k / n) if n else None,
        "ci_low": json_float(lo),
        "ci_high": json_float(hi),
    }


def biopsies_avoided(
    labels: Iterable,
    probs: Iterable,
    birads: Sequence[int | None],
    threshold: float,
    cut: int = 4,
    clusters: Iterable | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Model calls at ``threshold`` against BI-RADS >= ``cut`` on the lesions that carry BI-RADS.

    Args:
        labels: 0/1 ground truth, one per lesion.
        probs: the model's probabilities of malignancy.
        birads: each lesion's BI-RADS category or ``None`` (such lesions are left out).
        threshold: the model calls a lesion malignant when its probability is at least this.
        cut: BI-RADS at or above which the reader recommends biopsy.
        clusters: each lesion's patient, resampled as a unit by the bootstrap (``None``: lesions are resampled).
        n_boot: bootstrap resamples (0: no bootstrap CIs).
        seed: bootstrap seed.

    Returns:
        ``threshold``, ``cut``, ``n``, ``benign_biopsies_by_reader`` and three counts, each with its fraction, Wilson
        CI and (with ``n_boot``) a bootstrap CI of the fraction under ``bootstrap``: ``benign_biopsies_avoided``,
        benign lesions the reader would biopsy that the model calls benign (fraction of the reader's benign
        biopsies); ``cancers_missed_caught_by_reader``, cancers the model calls benign that the reader sends to
        biopsy (fraction of all cancers); ``cancers_caught_missed_by_reader``, the reverse.
    """
    y_all = np.asarray(list(labels), dtype=int)
    p_all = np.asarray(list(probs), dtype=float)
    b_list = list(birads)
    keep = np.array([b is not None for b in b_list])
    y, p = y_all[keep], p_all[keep]
    b = np.array([int(v) for v, k in zip(b_list, keep) if k])
    cl = None if clusters is None else np.asarray(list(clusters)).astype(str)[keep]
    model_pos, reader_pos = p >= threshold, b >= cut
    benign_reader = (y == 0) & reader_pos
    cancers = y == 1
    avoided = benign_reader & ~model_pos
    missed = cancers & ~model_pos & reader_pos
    extra = cancers & model_pos & ~reader_pos
    out = {
        "threshold": float(threshold),
        "cut": int(cut),
        "n": int(y.size),
        "benign_biopsies_by_reader": int(benign_reader.sum()),
        "benign_biopsies_avoided": _count(int(avoided.sum()), int(benign_reader.sum())),
        "cancers_missed_caught_by_reader": _count(int(missed.sum()), int(cancers.sum())),
        "cancers_caught_missed_by_reader": _count(int(extra.sum()), int(cancers.sum())),
    }
    if n_boot and y.size:

        def frac(sel: np.ndarray, of: np.ndarray):
            return lambda w: float(np.sum(w * sel) / np.sum(w * of)) if np.sum(w * of) > 0 else float("nan")

        for key, sel, of in (
            ("benign_biopsies_avoided", avoided, benign_reader),
            ("cancers_missed_caught_by_reader", missed, cancers),
            ("cancers_caught_missed_by_reader", extra, cancers),
        ):
            out[key]["bootstrap"] = bootstrap_ci(frac(sel, of), y.size, cl, n_boot=n_boot, seed=seed)
    return out


def referral_curve(
    labels: Iterable,
    probs: Iterable,
    uncertainty: Iterable,
    threshold: float,
    fractions: Sequence[float] = REFERRAL_FRACTIONS,
    n_random: int = 200,
    seed: int = 0,
) -> dict:
    """Error rate (at ``threshold``) and AUC of the cases kept when the most uncertain ``fraction`` is referred.

    Args:
        labels: 0/1 ground truth, one per case.
        probs: the ensemble's probabilities of malignancy.
        uncertainty: one value per case, the highest referred first; ties are broken by case order (stable sort).
        threshold: the model calls a case malignant when its probability is at least this.
        fractions: the fractions of cases referred, one row each.
        n_random: draws of random referral of the same fraction, averaged.
        seed: seed of the random referral.

    Returns:
        ``threshold``, ``uncertainty`` (what it measures) and ``rows``: per fraction, ``referred``, ``kept``, the
        kept cases' ``error_rate`` and ``auc`` (``None`` with one class kept), ``random_error_rate`` and
        ``random_auc``.
    """
    y = np.asarray(list(labels), dtype=int)
    p = np.asarray(list(probs), dtype=float)
    u = np.asarray(list(uncertainty), dtype=float)
    wrong = (p >= threshold).astype(int) != y
    order = np.argsort(-u, kind="stable")
    rng = np.random.default_rng(seed)
    rows = []
    for f in fractions:
        k = int(round(f * y.size))
        kept = np.sort(order[k:])
        rand_err, rand_auc = [], []
        for _ in range(n_random if k else 1):
            keep_r = rng.permutation(y.size)[k:]
            rand_err.append(wrong[keep_r].mean())
            rand_auc.append(roc_auc(y[keep_r], p[keep_r]) if len(np.unique(y[keep_r])) == 2 else np.nan)
        rows.append(
            {
                "fraction": float(f),
                "referred": k,
                "kept": int(kept.size),
                "error_rate": float(wrong[kept].mean()),
                "auc": json_float(roc_auc(y[kept], p[kept])) if len(np.unique(y[kept])) == 2 else None,
                "random_error_rate": float(np.mean(rand_err)),
                "random_auc": json_float(np.nanmean(rand_auc)),
            }
        )
    return {"threshold": float(threshold), "uncertainty": "SD of the members' malignant probabilities", "rows": rows}
