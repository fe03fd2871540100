"""The ablation command at tiny size: nested paired subsets, stage 1 trained once per arm and seed, unavailable
ImageNet arms reported, not faked."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision

from scripts.ablation import nested_subset, run_ablation
from tests.conftest import tiny_settings

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps


def test_nested_subsets_are_balanced_patient_grouped_and_nested():
    items = [{"case": f"c{i}", "patient": f"p{i // 2}", "label": (i // 2) % 2, "image": f"{i}.png"} for i in range(40)]
    small, large = nested_subset(items, 8, 2, seed=3), nested_subset(items, 20, 2, seed=3)
    assert {it["case"] for it in small} < {it["case"] for it in large}
    for subset, n in ((small, 8), (large, 20)):
        assert len(subset) == n and sum(it["label"] for it in subset) == n // 2
        patients = {it["patient"] for it in subset}
        assert all(sum(it["patient"] == p for it in subset) == 2 for p in patients)  # whole patients only
        assert {it["fold"] for it in subset} == {0, 1}
    assert {it["case"] for it in nested_subset(items, 8, 2, seed=4)} != {it["case"] for it in small}


def test_ablation_shares_data_and_stage1_and_reports_unavailable_imagenet_arms(tmp_path, monkeypatch, caplog):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    base = tiny_settings(**{"target_data#n_train": 24, "target_data#n_test": 12})
    with caplog.at_level(logging.INFO, logger="main_job"):
        result = run_ablation(
            tmp_path, sizes=[12, "full"], seeds=[0], arms=["scratch", "intermediate", "dtl"], base=base
        )
    assert set(result["not_run"]) == {"dtl"} and "could not be downloaded" in result["not_run"]["dtl"]
    assert result["table"]["dtl"]["12"] == {"status": "not run"}
    assert {r["arm"] for r in result["runs"]} == {"scratch", "intermediate"}
    assert result["table"]["scratch"]["12"]["n_train"] == 12
    assert result["table"]["scratch"]["full"]["n_train"] == result["table"]["intermediate"]["full"]["n_train"] > 12
    # the scratch arm trained no intermediate model; the intermediate arm trained one, once, for both sizes
    assert not (tmp_path / "runs" / "scratch" / "n12_seed0" / "models" / "intermediate").exists()
    assert caplog.text.count("[intermediate] running") == 1
    assert "[intermediate] up to date, skipped" in caplog.text
    for size in ("12", "full"):
        assert (
            tmp_path / "runs" / "intermediate" / f"n{size}_seed0" / "models" / "intermediate" / "model.pt"
        ).is_file()
    # every arm and size is tested on the same cases
    tests = {r["cases_csv"]: Path(r["cases_csv"]).read_text().count("\n") for r in result["runs"]}
    assert len(set(tests.values())) == 1
    md = (tmp_path / "ablation.md").read_text()
    assert "not run" in md and "synthetic" in md
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _paired_delong_p(csv_a: str, csv_b: str) -> float:
    """Two-sided p of DeLong's paired test on the cases two runs share, from the pairwise definition of the
    structural components (O(positives x negatives), independent of the midrank algorithm the bundle uses)."""
    from scipy import stats

    from scripts.evaluation.metrics import read_cases_csv

    a = {r["case"]: r for r in read_cases_csv(csv_a)}
    b = {r["case"]: r for r in read_cases_csv(csv_b)}
    cases = sorted(set(a) & set(b))
    y = np.array([a[c]["label"] for c in cases])
    scores = np.array([[a[c]["prob"] for c in cases], [b[c]["prob"] for c in cases]])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (2, m, n)
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    s10, s01 = np.cov(v10), np.cov(v01)
    contrast = np.array([1.0, -1.0])
    var = contrast @ s10 @ contrast / pos.shape[1] + contrast @ s01 @ contrast / neg.shape[1]
    diff = psi.mean(axis=(1, 2)) @ contrast
    return float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))


def test_paired_p_values_against_dtl(tmp_path):
    base = tiny_settings(
        arch="efficientnet_lite0", num_folds=2, **{"target_data#n_train": 24, "target_data#n_test": 12}
    )
    result = run_ablation(tmp_path, sizes=["full"], seeds=[0], arms=["imagenet", "dtl"], base=base)
    (run,) = [r for r in result["runs"] if r["arm"] == "imagenet"]
    (dtl,) = [r for r in result["runs"] if r["arm"] == "dtl"]
    assert run["vs_dtl"]["p"] == pytest.approx(_paired_delong_p(dtl["cases_csv"], run["cases_csv"]), rel=1e-6)
    assert run["vs_dtl"]["diff"] == next(r["auc"] for r in result["runs"] if r["arm"] == "dtl") - run["auc"]
    assert "p vs d-TL" in (tmp_path / "ablation.md").read_text()
