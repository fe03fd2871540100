"""The ablation command at tiny size: arms run on shared data; unavailable ImageNet arms are reported, not faked."""

from __future__ import annotations

import urllib.error

import torchvision

from scripts.ablation import run_ablation
from tests.conftest import tiny_settings


def test_ablation_reports_imagenet_arms_as_not_run_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    base = tiny_settings(n_target_test=12)
    result = run_ablation(tmp_path, sizes=[16], seeds=[0], arms=["scratch", "intermediate", "dtl"], base=base)
    assert set(result["not_run"]) == {"dtl"} and "could not be downloaded" in result["not_run"]["dtl"]
    assert result["table"]["dtl"]["16"] == {"status": "not run"}
    assert {r["arm"] for r in result["runs"]} == {"scratch", "intermediate"}
    for arm in ("scratch", "intermediate"):
        cell = result["table"][arm]["16"]
        assert cell["n"] == 1 and 0.0 <= cell["mean"] <= 1.0
    # the scratch arm trained no intermediate model; the intermediate arm did
    assert not (tmp_path / "runs" / "scratch" / "n16_seed0" / "models" / "intermediate").exists()
    assert (tmp_path / "runs" / "intermediate" / "n16_seed0" / "models" / "intermediate" / "model.pt").is_file()
    md = (tmp_path / "ablation.md").read_text()
    assert "not run" in md and "synthetic" in md
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
