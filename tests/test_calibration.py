"""From score to decision: the calibrated ensemble probability, the operating point chosen on out-of-fold
predictions and saved beside the weights, the threshold rules, and the clinical summaries (decision curve,
biopsies avoided against the reader, referral of uncertain cases)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.data.schema import make_datalist, make_item, write_datalist
from scripts.engine.steps import run_config
from scripts.evaluation import clinical
from scripts.evaluation import metrics as M
from scripts.evaluation.case_table import write_cases_csv
from scripts.evaluation.operating_point import choose_operating_point, fit_calibration
from scripts.model.calibration import (
    CalibratedEnsembled,
    Calibration,
    operating_point_name,
    read_operating_point,
    threshold_of,
    write_operating_point,
)
from scripts.model.network import Ensemble
from tests.app_bundle import run_inference_workflow
from tests.conftest import REPO


def test_platt_fit_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)  # member log-odds, over-confident by a factor 2.5
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.4 * z - 0.3)))).astype(int)
    cal = fit_calibration(y, 1 / (1 + np.exp(-z)))
    assert cal.scale == pytest.approx(0.4, abs=0.03) and cal.bias == pytest.approx(-0.3, abs=0.06)
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration(np.ones(5, int), np.full(5, 0.7))


def test_platt_fit_never_reverses_the_members_ranking(caplog):
    # out-of-fold scores that rank the cases backwards (few labels, an unlucky fold): a fitted slope would be
    # negative and turn every call around; the calibration stays the identity and says why
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.9, 0.8, 0.6, 0.3, 0.2, 0.4])
    with caplog.at_level("WARNING"):
        cal = fit_calibration(y, probs)
    assert (cal.scale, cal.bias) == (1.0, 0.0)
    assert cal.method.startswith("none") and "slope" in caplog.text


def test_network_transform_and_calibration_give_the_same_probability():
    torch.manual_seed(0)
    cal = {"scale": 0.6, "bias": -0.4}
    plain = Ensemble(3, "resnet18").eval()
    net = Ensemble(3, "resnet18", calibration=cal).eval()
    net.load_state_dict(plain.state_dict())  # the calibration is not in the state dict (models/model.pt unchanged)
    assert set(net.state_dict()) == set(plain.state_dict())
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        member = net.member_probabilities(x)
        out, raw, scripted = net(x), plain(x), torch.jit.script(net)(x)
    torch.testing.assert_close(raw, member.mean(0))
    expected = Calibration(0.6, -0.4).probability(member[:, :, 1]).float()
    torch.testing.assert_close(out[:, 1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sum(1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(scripted, out, atol=1e-6, rtol=0)
    t = CalibratedEnsembled([f"m{k}" for k in range(3)], calibration=cal)
    for b in range(4):
        d = t({f"m{k}": member[k, b] for k in range(3)})
        assert float(d["pred"][1]) == pytest.approx(float(out[b, 1]), abs=1e-6)
        assert float(d["uncertainty"]) == pytest.approx(float(member[:, b, 1].std(unbiased=False)), abs=1e-6)
    uncal = CalibratedEnsembled([f"m{k}" for k in range(3)])({f"m{k}": member[k, 0] for k in range(3)})
    assert float(uncal["pred"][1]) == pytest.approx(float(raw[0, 1]), abs=1e-6)
    with pytest.raises(ValueError, match="binary"):
        Ensemble(2, "resnet18", num_classes=3, calibration=cal)


def test_specificity_rule_and_unknown_rules():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = M.choose_threshold(y, p, "specificity", 0.75)
    assert t["tuning_specificity"] == 0.75 and t["tuning_sensitivity"] == 1.0 and 0.3 < t["threshold"] <= 0.4
    t = M.choose_threshold(y, p, "specificity", 1.0)
    assert t["tuning_specificity"] == 1.0 and t["tuning_sensitivity"] == 0.75 and 0.6 < t["threshold"] <= 0.7
    with pytest.raises(ValueError, match="radiologist"):
        M.choose_threshold(y, p, "best-on-test")


def _bundle(tmp_path: Path, n: int = 240, folds: int = 3, birads: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """A datalist and out-of-fold case tables whose member scores are over-confident (log-odds x 2.7)."""
    rng = np.random.default_rng(seed)
    items, tables = [], {k: [] for k in range(folds)}
    for i in range(n):
        y = int(rng.integers(0, 2))
        z = 6.0 * (1.1 * (2 * y - 1) + rng.normal())  # the true log-odds are 2.2 x: over-confident by 6 / 2.2
        b = int(rng.choice([2, 3, 4, 5], p=[0.5, 0.1, 0.38, 0.02] if y == 0 else [0.02, 0.08, 0.55, 0.35]))
        fold = i % folds
        items.append(make_item(image=f"x{i}.png", label=y, patient=f"p{i}", case=f"c{i}", fold=fold))
        row = {"case": f"c{i}", "patient": f"p{i}", "label": y, "prob": float(1 / (1 + np.exp(-z)))}
        row["birads"] = b if birads else None
        row["member_0"] = row["prob"]
        tables[fold].append(row)
    datalist = tmp_path / "datalist.json"
    write_datalist(datalist, make_datalist(items, [], source="test", task="target", num_folds=folds), check_files=False)
    results = tmp_path / "results"
    for k, rows in tables.items():
        write_cases_csv(results / f"cases_validation_fold{k}.csv", rows)
    (tmp_path / "models").mkdir()
    return datalist, results


def test_operating_point_is_chosen_on_out_of_fold_predictions_and_saved_beside_the_weights(tmp_path):
    datalist, results = _bundle(tmp_path)
    model = tmp_path / "models" / "model.pt"
    assert read_operating_point(model) is None and threshold_of(None) == 0.5
    path = choose_operating_point(results, datalist, model, rule="sensitivity", value=0.9, n_boot=50)
    assert path == tmp_path / "models" / "operating_point.json"
    op = read_operating_point(model, required=True)
    assert 0.25 < op["calibration"]["scale"] < 0.5  # undoes the over-confidence (true 2.2 / 6 = 0.37)
    assert op["validation"]["sensitivity"]["value"] >= 0.9 and op["rule"] == "sensitivity"
    assert op["reader"] == "radiologist" and op["reader_matched"]["target_sensitivity"] == pytest.approx(
        op["reader_sensitivity"]["sensitivity"]
    )
    assert (results / "cases_validation.csv").is_file()
    assert threshold_of(op) == op["threshold"] and threshold_of(op, 0.3) == 0.3
    assert "calibrated probability >=" in operating_point_name(op) and "0.3" in operating_point_name(op, 0.3)

    reader = choose_operating_point(results, datalist, model, rule="radiologist", n_boot=0)
    op = json.loads(reader.read_text())
    assert op["rule"] == "radiologist" and op["value"] is None
    assert op["validation"]["sensitivity"]["value"] >= op["reader_sensitivity"]["sensitivity"]
    assert "radiologist's sensitivity (BI-RADS >= 4) matched on validation" in op["rule_description"]


def test_radiologist_rule_needs_birads_and_broken_files_are_named(tmp_path):
    datalist, results = _bundle(tmp_path, birads=False)
    model = tmp_path / "models" / "model.pt"
    with pytest.raises(ValueError, match="needs BI-RADS"):
        choose_operating_point(results, datalist, model, rule="radiologist", n_boot=0)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_operating_point(results, datalist, model, rule="median", n_boot=0)
    (tmp_path / "models" / "operating_point.json").write_text("{}")
    with pytest.raises(ValueError, match="operating_point.json: not a valid operating point"):
        read_operating_point(model)


def test_decision_curve_net_benefit_by_hand():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    dc = clinical.decision_curve(y, p, birads=[5, 4, 4, 2, None], thresholds=[0.25, 0.5])
    # pt 0.25: model calls 0.9, 0.4, 0.6 -> TP 2, FP 1: 2/5 - 1/5 * 1/3
    assert dc["model"] == pytest.approx([2 / 5 - 1 / 15, 1 / 5 - 1 / 5])
    assert dc["biopsy_all"] == pytest.approx([2 / 5 - 3 / 5 / 3, 2 / 5 - 3 / 5])
    # BI-RADS >= 4 on the 4 rated rows: TP 2, FP 1
    assert dc["birads"] == pytest.approx([2 / 4 - 1 / 4 / 3, 2 / 4 - 1 / 4]) and dc["birads_n"] == 4
    assert dc["biopsy_none"] == [0.0, 0.0]


def test_biopsies_avoided_counts():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.8, 0.3, 0.9, 0.2, 0.7, 0.6]
    birads = [4, 4, 4, 2, 5, 4, 3, None]
    out = clinical.biopsies_avoided(y, p, birads, threshold=0.5, clusters=list("aabbccdd"), n_boot=200)
    assert out["benign_biopsies_by_reader"] == 3
    assert out["benign_biopsies_avoided"]["count"] == 2  # 0.1 and 0.2 at BI-RADS 4
    assert out["cancers_missed_caught_by_reader"]["count"] == 1  # 0.2 at BI-RADS 4
    assert out["cancers_caught_missed_by_reader"]["count"] == 1  # 0.7 at BI-RADS 3
    assert out["cancers_missed_caught_by_reader"]["of"] == 3  # the unrated cancer is left out
    boot = out["benign_biopsies_avoided"]["bootstrap"]
    assert 0 <= boot["ci_low"] <= 2 / 3 <= boot["ci_high"] <= 1 and boot["n_clusters"] == 4


def test_referral_of_the_uncertain_cases_removes_the_errors_they_carry():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(y == 1, 0.8, 0.2)
    wrong = rng.random(200) < 0.1
    p[wrong] = 1 - p[wrong]
    u = wrong.astype(float) + 0.01 * rng.random(200)  # the members disagree exactly on the errors
    ref = clinical.referral_curve(y, p, u, threshold=0.5, fractions=(0.0, wrong.mean(), 0.3), n_random=50)
    rows = ref["rows"]
    assert rows[0]["error_rate"] == pytest.approx(wrong.mean())
    assert rows[1]["error_rate"] == 0.0 and rows[1]["random_error_rate"] == pytest.approx(wrong.mean(), abs=0.03)
    assert rows[2]["kept"] == 140 and rows[2]["auc"] == 1.0


def test_summary_with_an_operating_point_reports_calibration_decisions_and_the_reader(tmp_path):
    from tests.test_metrics import _rows

    datalist, results = _bundle(tmp_path)
    op = json.loads(choose_operating_point(results, datalist, tmp_path / "models" / "model.pt", n_boot=0).read_text())
    test = _rows(120, 5, "t")
    cal = Calibration.from_dict(op["calibration"])
    for r in test:
        member = torch.tensor([r[f"member_{k}"] for k in range(3)])
        r["prob"] = float(cal.probability(member))
        r["uncertainty"] = float(member.std(unbiased=False))
    s = M.summarize(test, None, n_boot=50, operating_point=op, reader="simulated reader")
    assert s["threshold"]["threshold"] == op["threshold"] and s["operating_point"] == op
    assert s["calibration"]["before"]["brier"] == pytest.approx(
        M.brier_score([r["label"] for r in test], [np.mean([r[f"member_{k}"] for k in range(3)]) for r in test])
    )
    assert s["radiologist"]["reader"] == "simulated reader"
    assert s["reader_matched"]["threshold"] == op["reader_matched"]["threshold"]
    assert s["reader_matched"]["biopsies"]["n"] == sum(r["birads"] is not None for r in test)
    assert len(s["decision_curve"]["model"]) == 99 and s["referral"]["rows"][0]["fraction"] == 0.0


@pytest.mark.slow
def test_evaluation_inference_and_the_network_give_the_same_probability_and_call(tiny_data, tmp_path):
    """The same ROI through the test evaluation's case table (configs/evaluate.json), configs/inference.json's
    predictions.csv and the exported network definition: one calibrated probability (<= 1e-4) and one call."""

    root = tmp_path / "bundle"
    torch.manual_seed(0)
    ens = Ensemble(3, "resnet18").eval()
    for k, member in enumerate(ens.members):
        (root / "models" / f"target_fold{k}").mkdir(parents=True)
        torch.save(member.state_dict(), root / "models" / f"target_fold{k}" / "model.pt")
    torch.save(ens.state_dict(), root / "models" / "model.pt")
    # a threshold near the median of the calibrated test probabilities, so that both calls occur
    op = {"threshold": 0.5, "rule": "fixed", "rule_description": "test", "calibration": {"scale": 0.7, "bias": 0.2}}
    write_operating_point(root / "models" / "model.pt", op)
    common = dict(bundle_root=str(root), dataset_dir=str(tiny_data), arch="resnet18", image_size=64, amp=False)
    run_config(("train.json", "evaluate.json"), common)
    cases = {r["case"]: r for r in M.read_cases_csv(root / "results" / "cases_test.csv")}
    median = float(np.median([r["prob"] for r in cases.values()]))
    op["threshold"] = median
    write_operating_point(root / "models" / "model.pt", op)
    run_config(("train.json", "evaluate.json"), common)
    cases = {r["case"]: r for r in M.read_cases_csv(root / "results" / "cases_test.csv")}
    rows = run_inference_workflow(REPO / "configs", tmp_path / "eval", **common, roi_size=64, batch_size=4)
    assert len(rows) == len(cases) > 4
    assert {r["call"] for r in cases.values()} == {"benign", "malignant"}
    calibrated = Ensemble(3, "resnet18", calibration=op["calibration"]).eval()
    calibrated.load_state_dict(ens.state_dict())
    scripted = torch.jit.script(calibrated)
    from scripts.data.schema import load_split
    from scripts.data.transforms import LoadROId

    items = {it["case"]: it for it in load_split(tiny_data / "target" / "datalist.json", "test")}
    load = LoadROId("image", image_size=64)
    for r in rows:
        case = cases[r["case"]]
        x = load({"image": items[r["case"]]["image"]})["image"].as_tensor()[None]
        with torch.no_grad():
            p_net = float(calibrated(x)[0, 1])
            p_ts = float(scripted(x)[0, 1])
        assert float(r["prob_malignant"]) == pytest.approx(case["prob"], abs=1e-4)
        assert p_net == pytest.approx(case["prob"], abs=1e-4) and p_ts == pytest.approx(case["prob"], abs=1e-4)
        assert r["pred_label"] == case["call"]
        assert float(r["uncertainty"]) == pytest.approx(case["uncertainty"], abs=1e-4)
        assert float(r["threshold"]) == pytest.approx(median, rel=1e-5) and "test" in r["operating_point"]


def test_the_main_job_refuses_an_unknown_rule_before_any_work(capsys):
    from scripts.main_job import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--threshold_rule", "median"])
    assert e.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err
    settings, _, _ = parse_args(["--threshold_rule", "radiologist"])
    assert settings["threshold_rule"] == "radiologist"
