"""Progress output on long steps, and no warnings of the bundle's own making in a real training run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow

from scripts.engine.progress import ProgressLogger
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_log_lines_give_done_total_rate_and_time_left(caplog):
    engine = Engine(lambda e, b: None)
    ProgressLogger("demo training", interval_s=0.0, interactive=False).attach(engine)
    with caplog.at_level(logging.INFO, logger="scripts.engine.progress"):
        engine.run(range(4), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.engine.progress"]
    assert len(lines) == 8
    assert lines[0].startswith("demo training epoch 1/2: 1/4 iterations, ") and "it/s, about" in lines[0]
    assert lines[-1].startswith("demo training epoch 2/2: 4/4 iterations") and lines[-1].endswith("about 0 s left")


def test_log_lines_are_rate_limited(caplog):
    progress = ProgressLogger("saliency", interval_s=3600.0, interactive=False)
    progress.start(100, ": ")
    with caplog.at_level(logging.INFO, logger="scripts.engine.progress"):
        for done in range(1, 101):
            progress.update(done)
    assert not [r for r in caplog.records if r.name == "scripts.engine.progress"]


def test_a_terminal_gets_ignites_progress_bar(capsys):
    engine = Engine(lambda e, b: None)
    ProgressLogger("demo", interactive=True).attach(engine)
    engine.run(range(3), max_epochs=1)
    assert "demo" in capsys.readouterr().err  # tqdm draws on stderr


@pytest.mark.slow
def test_a_training_stage_logs_progress_and_warns_nothing_of_our_own(tiny_data: Path, tmp_path: Path, caplog):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ("train.json", "stage_target.json", "resilience.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(tiny_data),
        init="scratch",
        arch="resnet18",
        image_size=64,
        batch_size=8,
        **{"train#trainer#max_epochs": 1, "train#handlers#0#interval_s": 0.0},
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        wf.initialize()
        wf.run()
        wf.finalize()
    ours = [str(w.message) for w in caught if "monai/handlers" in w.filename or "scripts" in w.filename]
    assert not ours, ours
    progress = [r.getMessage() for r in caplog.records if r.name == "scripts.engine.progress"]
    assert any(m.startswith("target_fold0 training: 2/2 iterations") for m in progress), progress
