"""Tests of scripts.evaluation.metrics: agreement with scikit-learn, DeLong vs bootstrap, threshold hygiene, summarize."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scripts.evaluation import metrics as M

sk = pytest.importorskip("sklearn.metrics")


def _example(n: int = 150, shift: float = 1.0, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = shift * y + rng.normal(size=n)
    if ties:
        s = np.round(s, 1)
    return y, s


def _naive_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Direct O(mn) DeLong structural components, independent of the midrank implementation."""
    pos, neg = y == 1, y == 0
    v10s, v01s, aucs = [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = pos.sum(), neg.sum()
    cov = np.atleast_2d(np.cov(np.vstack(v10s))) / m + np.atleast_2d(np.cov(np.vstack(v01s))) / n
    return np.array(aucs), cov


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_roc_match_sklearn(ties):
    y, s = _example(ties=ties)
    assert M.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    roc = M.roc_curve_points(y, s)
    fpr, tpr, thr = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    np.testing.assert_allclose(roc["thresholds"][1:], thr[1:])
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_binary_metrics_match_sklearn():
    y, s = _example(seed=1)
    thr = 0.4
    pred = (s >= thr).astype(int)
    out = M.binary_metrics(y, s, thr)
    tn, fp, fn, tp = sk.confusion_matrix(y, pred).ravel()
    assert out["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert out["sensitivity"]["value"] == pytest.approx(sk.recall_score(y, pred))
    assert out["specificity"]["value"] == pytest.approx(sk.recall_score(1 - y, 1 - pred))
    assert out["ppv"]["value"] == pytest.approx(sk.precision_score(y, pred))
    assert out["npv"]["value"] == pytest.approx(sk.precision_score(1 - y, 1 - pred))
    assert out["accuracy"]["value"] == pytest.approx(sk.accuracy_score(y, pred))
    assert out["f1"]["value"] == pytest.approx(sk.f1_score(y, pred))
    # hard predictions give the same numbers
    assert M.binary_metrics(y, pred, None)["confusion"] == out["confusion"]
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        e = out[name]
        assert e["ci_low"] <= e["value"] <= e["ci_high"]


def test_wilson_reference_values():
    # Newcombe (Stat Med 1998) worked example 81/263: Wilson interval 0.2553-0.3662
    lo, hi = M.wilson_ci(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-5) and hi == pytest.approx(0.3662, abs=5e-5)
    lo, hi = M.wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=5e-5) and hi == pytest.approx(0.9433, abs=5e-5)
    lo, hi = M.wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    assert M.wilson_ci(0, 0) == (None, None)


def test_binary_metrics_bootstrap_ci():
    y, s = _example(seed=2)
    out = M.binary_metrics(y, s, 0.5, clusters=np.arange(y.size) // 2, n_boot=300, seed=1)
    assert out["boot"]["n_clusters"] == y.size // 2
    for name in M.METRIC_NAMES:
        lo, hi = out[name]["boot_ci"]
        assert lo <= out[name]["value"] <= hi


def test_calibration_matches_sklearn():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    p = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p).astype(int)
    assert M.brier_score(y, p) == pytest.approx(sk.brier_score_loss(y, p))
    rel = M.reliability_curve(y, p, n_bins=10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([b["frac_pos"] for b in rel["bins"]], frac)
    np.testing.assert_allclose([b["mean_pred"] for b in rel["bins"]], mean)
    assert sum(b["n"] for b in rel["bins"]) == 300


@pytest.mark.parametrize("ties", [False, True])
def test_delong_fast_matches_direct_definition(ties):
    y, s = _example(n=120, seed=4, ties=ties)
    s2 = 0.5 * s + np.random.default_rng(5).normal(size=y.size)
    aucs, cov = M.delong_covariance(y, [s, s2])
    a_ref, c_ref = _naive_delong(y, [s, s2])
    np.testing.assert_allclose(aucs, a_ref, atol=1e-12)
    np.testing.assert_allclose(cov, c_ref, rtol=1e-9, atol=1e-15)


def test_delong_variance_agrees_with_bootstrap():
    y, s = _example(n=200, shift=1.0, seed=6)
    auc, var = M.delong_variance(y, s)
    # stratified bootstrap (positives and negatives resampled separately), the sampling model DeLong estimates
    rng = np.random.default_rng(0)
    pos, neg = s[y == 1], s[y == 0]
    yy = np.r_[np.ones(pos.size), np.zeros(neg.size)].astype(int)
    boots = [M.roc_auc(yy, np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(2000)]
    assert math.sqrt(var) == pytest.approx(np.std(boots, ddof=1), rel=0.12)
    ci = M.delong_ci(y, s)
    boot = M.bootstrap_auc_ci(y, s, n_boot=2000, seed=0)
    assert ci["ci_low"] == pytest.approx(boot["ci_low"], abs=0.02)
    assert ci["ci_high"] == pytest.approx(boot["ci_high"], abs=0.02)
    assert ci["ci_low"] < auc < ci["ci_high"]


def test_paired_test_detects_planted_difference_and_not_null():
    rng = np.random.default_rng(7)
    n = 300
    y = rng.integers(0, 2, n)
    signal = y + 0.0
    strong = 2.0 * signal + rng.normal(size=n)
    weak = 0.4 * signal + rng.normal(size=n)
    planted = M.delong_paired_test(y, strong, weak)
    assert planted["diff"] > 0.1 and planted["p"] < 0.05
    assert planted["ci_diff"][0] > 0
    same = M.delong_paired_test(y, strong, strong)
    assert same["diff"] == 0 and same["p"] == 1.0
    # same monotone information: identical ranks, so no difference
    assert M.delong_paired_test(y, strong, np.exp(strong))["p"] == pytest.approx(1.0)
    common = signal + rng.normal(size=n)
    copy_a = common + 0.3 * rng.normal(size=n)
    copy_b = common + 0.3 * rng.normal(size=n)
    null = M.delong_paired_test(y, copy_a, copy_b)
    assert null["p"] > 0.05


def test_paired_test_type_one_error_is_nominal():
    rng = np.random.default_rng(11)
    p_values = []
    for _ in range(200):
        y = rng.integers(0, 2, 120)
        common = y + rng.normal(size=y.size)
        a = common + 0.5 * rng.normal(size=y.size)
        b = common + 0.5 * rng.normal(size=y.size)
        p_values.append(M.delong_paired_test(y, a, b)["p"])
    rate = np.mean(np.array(p_values) < 0.05)
    assert 0.01 <= rate <= 0.10


def test_clustered_bootstrap_is_wider_for_duplicated_patients():
    y, s = _example(n=100, seed=8)
    # every patient contributes two identical views: the row bootstrap is over-confident, the patient one is not
    y2, s2 = np.repeat(y, 2), np.repeat(s, 2)
    patients = np.repeat(np.arange(100), 2)
    row = M.bootstrap_auc_ci(y2, s2, n_boot=500, seed=0)
    clustered = M.bootstrap_auc_ci(y2, s2, clusters=patients, n_boot=500, seed=0)
    assert clustered["n_clusters"] == 100 and clustered["clustered"]
    assert (clustered["ci_high"] - clustered["ci_low"]) > 1.2 * (row["ci_high"] - row["ci_low"])


def test_choose_threshold_rules():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = M.choose_threshold(y, p, "youden")
    # J is maximal (0.75) at "p >= 0.7" and at "p >= 0.4"; ties go to the highest threshold, midway 0.6..0.7
    assert t["threshold"] == pytest.approx(0.65) and t["rule"] == "youden"
    assert "Youden" in t["description"] and "n=8" in t["description"]
    t = M.choose_threshold(y, p, "sensitivity", 1.0)
    assert t["threshold"] == pytest.approx(0.35) and t["tuning_sensitivity"] == 1.0
    t = M.choose_threshold(y, p, "fixed", 0.5)
    assert t["threshold"] == 0.5 and "fixed" in t["description"]
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, "fixed")
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, "best-on-test")
    # the brute-force Youden optimum over all cut points is reached
    y, s = _example(n=80, seed=9)
    t = M.choose_threshold(y, s)
    j = max(((s[y == 1] >= c).mean() + (s[y == 0] < c).mean() - 1) for c in s)
    assert t["tuning_sensitivity"] + t["tuning_specificity"] - 1 == pytest.approx(j)


def test_operating_point_at_sensitivity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    op = M.operating_point_at_sensitivity(y, p, 1.0)
    assert op["sensitivity"] == 1.0 and op["specificity"] == 0.75 and op["threshold"] == pytest.approx(0.4)
    op = M.operating_point_at_sensitivity(y, p, 0.5)
    assert op["sensitivity"] == 0.5 and op["specificity"] == 1.0
    op = M.operating_point_at_sensitivity(y, p, 0.8)  # next attainable point is sensitivity 1.0
    assert op["sensitivity"] == 1.0 and op["specificity"] == 0.75 and op["specificity_interpolated"] == 0.75
    # a tie makes a diagonal ROC segment (0, .5) -> (.5, 1): interpolation at sensitivity .75 gives specificity .75
    op = M.operating_point_at_sensitivity([0, 1, 0, 1], [0.1, 0.5, 0.5, 0.9], 0.75)
    assert op["specificity"] == 0.5 and op["specificity_interpolated"] == pytest.approx(0.75)
    sp = M.operating_point_at_specificity(y, p, 0.75)
    assert sp["specificity"] == 0.75 and sp["sensitivity"] == 1.0


def _rows(n: int, seed: int, prefix: str, with_birads: bool = True, members: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.integers(0, 2))
        logit = 1.2 * (2 * y - 1) + rng.normal()
        mem = [float(1 / (1 + np.exp(-(logit + 0.5 * rng.normal())))) for _ in range(members)]
        row = {
            "case": f"{prefix}{i}",
            "patient": f"{prefix}p{i // 2}",
            "lesion": f"{prefix}l{i // 2}",
            "label": y,
            "prob": float(np.mean(mem)),
        }
        if with_birads:
            row["birads"] = int(np.clip(round(3 + y + rng.normal()), 1, 5)) if i % 5 else None
        row.update({f"member_{k}": m for k, m in enumerate(mem)})
        rows.append(row)
    return rows


def test_cases_csv_roundtrip(tmp_path):
    rows = _rows(20, 0, "c")
    rows[0]["extra"] = "x"
    path = M.write_cases_csv(tmp_path / "cases.csv", rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header == [
        "case",
        "patient",
        "lesion",
        "label",
        "prob",
        "birads",
        "member_0",
        "member_1",
        "member_2",
        "extra",
    ]
    back = M.read_cases_csv(path)
    for a, b in zip(rows, back):
        for k in ("case", "patient", "lesion", "label", "prob", "birads", "member_0", "member_2"):
            assert a[k] == b[k]
    assert back[0]["birads"] is None and isinstance(back[1]["birads"], int)
    assert not list(tmp_path.glob(".*tmp"))


def test_threshold_comes_from_validation_only():
    val, test = _rows(60, 1, "v"), _rows(80, 2, "t")
    s1 = M.summarize(test, val, n_boot=50)
    flipped = [dict(r, label=1 - r["label"]) for r in test]
    s2 = M.summarize(flipped, val, n_boot=50)
    assert s1["threshold"] == s2["threshold"]
    assert s1["metrics"]["confusion"] != s2["metrics"]["confusion"]
    assert (
        s1["threshold"]["threshold"]
        == M.choose_threshold([r["label"] for r in val], [r["prob"] for r in val])["threshold"]
    )
    # and changing validation labels can change it
    val2 = [dict(r, label=1 - r["label"]) for r in val]
    assert M.summarize(test, val2, n_boot=0)["threshold"] != s1["threshold"]


def test_summarize_refuses_tuning_without_validation():
    test = _rows(40, 3, "t")
    with pytest.raises(ValueError, match="never tuned on the test set"):
        M.summarize(test, None)
    with pytest.raises(ValueError, match="validation"):
        M.summarize(test, [], threshold_rule="sensitivity", threshold_value=0.9)
    out = M.summarize(test, None, threshold_rule="fixed", threshold_value=0.5, n_boot=0)
    assert out["threshold"]["threshold"] == 0.5


def test_summarize_contents_and_json():
    val, test = _rows(60, 4, "v"), _rows(90, 5, "t")
    s = M.summarize(test, val, n_boot=100, data_source="synthetic")
    json.dumps(s, allow_nan=False)
    assert s["auc"]["auc"] == pytest.approx(sk.roc_auc_score([r["label"] for r in test], [r["prob"] for r in test]))
    assert s["auc"]["bootstrap"]["n_clusters"] == 45
    assert sorted(s["members"]) == ["member_0", "member_1", "member_2"]
    assert s["counts"]["test"] == {
        "cases": 90,
        "patients": 45,
        "lesions": 45,
        "benign": sum(r["label"] == 0 for r in test),
        "malignant": sum(r["label"] == 1 for r in test),
    }
    rad = s["radiologist"]
    assert rad["n"] == sum(r["birads"] is not None for r in test) and rad["cut"] == 4
    assert {"birads_auc", "model_auc", "birads_at_cut", "paired_delong", "model_at_radiologist_sensitivity"} <= set(rad)
    assert M.summarize(_rows(40, 6, "t", with_birads=False), val, n_boot=0)["radiologist"] is None


def test_birads_comparison_at_cut():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    b = [2, 3, 4, 2, 4, 5, 4, 3, 5, None]
    p = np.linspace(0.1, 0.9, 10)
    out = M.birads_comparison(y, p, b, cut=4)
    assert out["n"] == 9 and out["n_excluded_missing_birads"] == 1
    m = out["birads_at_cut"]
    assert m["sensitivity"]["value"] == pytest.approx(4 / 5)
    assert m["specificity"]["value"] == pytest.approx(3 / 4)
    assert out["birads_auc"]["auc"] == pytest.approx(sk.roc_auc_score(y[:9], b[:9]))
    assert out["paired_delong"]["auc_b"] == pytest.approx(out["birads_auc"]["auc"])
