"""The main job end to end on real images: mini-MIAS calcification ROIs (tiny epochs; the set is small)."""

from __future__ import annotations

import json

import pytest

from scripts.evaluation.metrics import read_cases_csv
from scripts.main_job import run_pipeline
from tests.conftest import SHARED_DATA, tiny_settings

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

MIAS = SHARED_DATA / "mini-mias"


@pytest.mark.skipif(not (MIAS / "Info.txt").is_file(), reason=f"mini-MIAS not found at {MIAS}")
def test_pipeline_trains_and_evaluates_on_prepared_mini_mias(tmp_path):
    from scripts.data.prepare.mini_mias import prepare_mini_mias

    prepare_mini_mias(MIAS, tmp_path / "mias", num_folds=2)
    s = tiny_settings(bundle_root=str(tmp_path / "run"), dataset_dir=str(tmp_path / "mias"), n_boot=50)
    summary = json.loads(run_pipeline(s).read_text())
    assert summary["data"]["source"] != "synthetic"
    rows = read_cases_csv(tmp_path / "run" / "results" / "cases_test.csv")
    assert len(rows) == summary["counts"]["test"]["cases"] > 0
    assert all(r["case"].startswith("mias_") for r in rows)
    # the annotated circle is the coarse region the saliency maps are scored against
    localisation = json.loads((tmp_path / "run" / "results" / "saliency" / "localisation.json").read_text())
    assert localisation["table"]["all"]["n"] == len(rows)
