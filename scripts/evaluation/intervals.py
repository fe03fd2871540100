"""AUC and confidence intervals: ROC AUC, DeLong variance/CI and paired test (DeLong et al., Biometrics
44:837-845, 1988, with the midrank algorithm of Sun & Xu, IEEE Signal Process. Lett. 21:1389-1393, 2014), the
patient-clustered percentile bootstrap and the Wilson score interval. Plain numpy/scipy."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import stats


def json_float(x: Any) -> float | None:
    """Python float for JSON; NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def as_labels(labels: Iterable) -> np.ndarray:
    """Binary labels as a 1-D array (0 = benign, 1 = malignant); anything else is refused."""
    y = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels)
    if y.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if y.size and not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"labels must be 0/1, got values {sorted(set(np.unique(y).tolist()))}")
    return y.astype(int)


def as_scores(scores: Iterable, n: int) -> np.ndarray:
    """Scores as a float array of shape ``(n,)``; another shape is refused."""
    s = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=float)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def has_both_classes(y: np.ndarray) -> bool:
    """Whether the labels hold both benign and malignant cases (an AUC needs both)."""
    return bool(y.size) and 0 < int(y.sum()) < y.size


# ----------------------------------------------------------------------------------------------------------------------
# ROC and DeLong
# ----------------------------------------------------------------------------------------------------------------------
def roc_auc(labels: Iterable, scores: Iterable) -> float:
    """Area under the empirical ROC curve (ties count 1/2); NaN when one class is absent."""
    y = as_labels(labels)
    s = as_scores(scores, y.size)
    if not has_both_classes(y):
        return float("nan")
    m = int(y.sum())
    n = y.size - m
    ranks = stats.rankdata(s)  # midranks
    return float((ranks[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def roc_curve_points(labels: Iterable, scores: Iterable) -> dict:
    """Empirical ROC: ``fpr``, ``tpr``, ``thresholds`` (descending; the first is +inf = nothing positive)."""
    y = as_labels(labels)
    s = as_scores(scores, y.size)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.where(np.diff(s_sorted) != 0)[0], y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    p, n = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    tpr = np.r_[0.0, tps / p]
    fpr = np.r_[0.0, fps / n]
    thr = np.r_[np.inf, s_sorted[last_of_group]]
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def _delong_components(y: np.ndarray, score_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and structural components V10 (k x m, positives) and V01 (k x n, negatives), by midranks."""
    pos, neg = score_matrix[:, y == 1], score_matrix[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = score_matrix.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    aucs = np.empty(k)
    for r in range(k):
        tz = stats.rankdata(np.r_[pos[r], neg[r]])  # midranks in the pooled sample
        tx = stats.rankdata(pos[r])  # midranks among positives
        ty = stats.rankdata(neg[r])  # midranks among negatives
        # V10_i = fraction of negatives below positive i (ties 1/2); V01_j = fraction of positives above negative j
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
        aucs[r] = v10[r].mean()
    return aucs, v10, v01


def delong_covariance(labels: Iterable, score_list: Sequence[Iterable]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for several scores on the same cases."""
    y = as_labels(labels)
    if not has_both_classes(y):
        raise ValueError("DeLong needs at least one positive and one negative case")
    mat = np.vstack([as_scores(s, y.size) for s in score_list])
    aucs, v10, v01 = _delong_components(y, mat)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_variance(labels: Iterable, scores: Iterable) -> tuple[float, float]:
    """``(auc, variance)`` of the empirical AUC by DeLong's method."""
    aucs, cov = delong_covariance(labels, [scores])
    return float(aucs[0]), float(cov[0, 0])


def delong_ci(labels: Iterable, scores: Iterable, alpha: float = 0.05) -> dict:
    """AUC with a normal-approximation (1-alpha) CI from the DeLong variance, clipped to [0, 1]."""
    y = as_labels(labels)
    if not has_both_classes(y):
        return {"auc": None, "se": None, "ci_low": None, "ci_high": None, "method": "DeLong", "alpha": alpha}
    auc, var = delong_variance(y, scores)
    se = math.sqrt(max(var, 0.0))
    z = stats.norm.ppf(1 - alpha / 2)
    return {
        "auc": auc,
        "se": se,
        "ci_low": float(max(0.0, auc - z * se)),
        "ci_high": float(min(1.0, auc + z * se)),
        "method": "DeLong",
        "alpha": alpha,
    }


def delong_paired_test(labels: Iterable, scores_a: Iterable, scores_b: Iterable, alpha: float = 0.05) -> dict:
    """DeLong's test of AUC(a) == AUC(b) for two scores on the same cases (two-sided)."""
    aucs, cov = delong_covariance(labels, [scores_a, scores_b])
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    zc = stats.norm.ppf(1 - alpha / 2)
    if se <= 1e-15:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se_diff": se,
        "z": float(z),
        "p": p,
        "ci_diff": [float(diff - zc * se), float(diff + zc * se)],
        "alpha": alpha,
        "method": "DeLong paired test (two-sided)",
    }


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------------------------------
def cluster_index(n: int, clusters: Iterable | None) -> tuple[np.ndarray, int]:
    """Cluster number of each row (rows are their own clusters when ``clusters`` is None) and the cluster count."""
    if clusters is None:
        return np.arange(n), n
    c = np.asarray(list(clusters) if not isinstance(clusters, np.ndarray) else clusters).astype(str)
    if c.shape != (n,):
        raise ValueError(f"clusters must have shape ({n},), got {c.shape}")
    _, inv = np.unique(c, return_inverse=True)
    return inv.ravel(), int(inv.max()) + 1 if n else 0


def bootstrap_weights(rng: np.random.Generator, inv: np.ndarray, n_clusters: int) -> np.ndarray:
    """Row weights of one cluster-bootstrap resample: how often each row's cluster was drawn."""
    counts = np.bincount(rng.integers(0, n_clusters, size=n_clusters), minlength=n_clusters)
    return counts[inv].astype(float)


def _weighted_auc(y: np.ndarray, level: np.ndarray, n_levels: int, w: np.ndarray) -> float:
    """Mann-Whitney AUC with case weights (ties 1/2); ``level`` is the rank of each score among distinct scores."""
    wp = np.bincount(level, weights=w * (y == 1), minlength=n_levels)
    wn = np.bincount(level, weights=w * (y == 0), minlength=n_levels)
    tot_p, tot_n = wp.sum(), wn.sum()
    if tot_p <= 0 or tot_n <= 0:
        return float("nan")
    below = np.cumsum(wn) - wn
    return float(np.sum(wp * (below + 0.5 * wn)) / (tot_p * tot_n))


def bootstrap_ci(
    stat_fn: Callable[[np.ndarray], Any],
    n: int,
    clusters: Iterable | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Percentile bootstrap CI of ``stat_fn(weights)``, resampling clusters (rows when ``clusters`` is None).

    ``weights`` (length ``n``) says how many times each row was drawn, which is equivalent to resampling rows with
    their cluster. Replicates where ``stat_fn`` gives None/NaN (e.g. no positives drawn) are dropped and counted.
    """
    inv, n_clusters = cluster_index(n, clusters)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        v = stat_fn(bootstrap_weights(rng, inv, n_clusters))
        if v is None or not np.all(np.isfinite(v)):
            continue
        values.append(v)
    base = {
        "n_boot": int(n_boot),
        "n_valid": len(values),
        "n_clusters": n_clusters,
        "clustered": clusters is not None,
        "method": "percentile bootstrap" + (" (resampling patients)" if clusters is not None else ""),
    }
    if not values:
        return {"ci_low": None, "ci_high": None, **base}
    lo, hi = np.percentile(np.asarray(values, dtype=float), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return {
        "ci_low": json_float(lo) if np.ndim(lo) == 0 else [json_float(x) for x in lo],
        "ci_high": json_float(hi) if np.ndim(hi) == 0 else [json_float(x) for x in hi],
        **base,
    }


def bootstrap_auc_ci(labels: Iterable, scores: Iterable, clusters: Iterable | None = None, **options: Any) -> dict:
    """Percentile bootstrap CI of the AUC, resampling patients (``clusters``) with replacement when given;
    ``options``: ``n_boot``, ``seed``, ``alpha`` of :func:`bootstrap_ci` (same defaults)."""
    y = as_labels(labels)
    s = as_scores(scores, y.size)
    uniq, level = np.unique(s, return_inverse=True)
    level = level.ravel()
    out = bootstrap_ci(lambda w: _weighted_auc(y, level, uniq.size, w), y.size, clusters=clusters, **options)
    out["auc"] = json_float(roc_auc(y, s))
    return out


def wilson_ci(successes: int, total: int, alpha: float = 0.05) -> tuple[float | None, float | None]:
    """Wilson score interval for a binomial proportion; ``(None, None)`` when ``total`` is 0."""
    if total <= 0:
        return None, None
    z = stats.norm.ppf(1 - alpha / 2)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
