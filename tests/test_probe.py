"""The learnability / shortcut probe on the tiny synthetic data, and on data with a planted brightness shortcut."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.data.imageio import read_roi_png, write_roi_png
from scripts.data.probe import format_summary, main, run_probe


def test_probe_runs_and_reports(tiny_data, tmp_path, capsys):
    datalist = tiny_data / "target" / "datalist.json"
    out = tmp_path / "probe.json"
    assert main(["--datalist", str(datalist), "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n_training"] == 24 and summary["n_test"] == 12
    assert set(summary["shortcut_auc"]) == {"mean", "std", "max"}
    # the shortcut AUCs, recomputed from the raw PNG pixels (a linear scale away from the probe's [0, 1] ROIs, which
    # leaves every statistic's AUC unchanged) with scikit-learn
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from scripts.data.schema import load_split

    for split in ("training", "test"):
        items = load_split(datalist, split)
        pixels = np.stack([np.asarray(Image.open(it["image"]), dtype=np.float64) for it in items])
        labels = [it["label"] for it in items]
        for name, stat in (("mean", np.mean), ("std", np.std), ("max", np.max)):
            expected = roc_auc_score(labels, stat(pixels, axis=(1, 2)))
            assert summary["shortcut_auc"][name][split] == pytest.approx(expected, abs=1e-6), (name, split)
    cnn = summary["cnn"]
    assert cnn["ci_low"] <= cnn["auc"] <= cnn["ci_high"] and cnn["ci_high"] > cnn["ci_low"]
    assert "small CNN from scratch" in capsys.readouterr().out


def test_planted_brightness_shortcut_is_reported(tiny_data, tmp_path):
    """Brighten the training split's malignant ROIs only: the mean-intensity AUC must show it there, not in test."""
    src = tiny_data / "target"
    data = json.loads((src / "datalist.json").read_text())
    (tmp_path / "images").mkdir()
    for split in ("training", "test"):
        for it in data[split]:
            roi = read_roi_png(src / it["image"])
            if split == "training" and it["label"] == 1:
                roi = np.clip(roi + 0.3, 0.0, 1.0)
            it["image"] = f"images/{it['case']}.png"
            it["mask"] = None
            write_roi_png(tmp_path / it["image"], roi)
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    summary = run_probe(tmp_path / "datalist.json", epochs=1)
    assert summary["shortcut_auc"]["mean"]["training"] == pytest.approx(1.0)
    assert summary["shortcut_auc"]["mean"]["test"] < 0.95
    assert "mean intensity" in format_summary(summary)


def test_probe_refuses_a_split_with_one_class(tiny_data, tmp_path):
    data = json.loads((tiny_data / "target" / "datalist.json").read_text())
    base = tiny_data / "target"
    for split in ("training", "test"):
        for it in data[split]:
            it["image"] = str(base / it["image"])
            it["mask"] = str(base / it["mask"]) if it.get("mask") else None
    data["test"] = [it for it in data["test"] if it["label"] == 0]
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="test split needs both classes"):
        run_probe(tmp_path / "datalist.json", epochs=1)
