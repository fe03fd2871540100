"""Interruption, resume, atomic checkpoints, numerics and resource checks, determinism, idempotent pipeline.

Tiny runs only: resnet18 at 64 px on the ``tiny_data`` synthetic set (fold 0: 16 training ROIs, 2 batches/epoch).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.engine import checkpoints, resilience
from scripts.engine.checkpoints import ResumeHandler
from scripts.main_job import run_pipeline
from scripts.model.network import WeightsError, load_state_dict_file
from tests.conftest import REPO, tiny_settings

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

CONFIGS = REPO / "configs"
STAGE = [str(CONFIGS / f) for f in ("train.json", "stage_target.json", "resilience.json")]
TINY = {"init": "scratch", "arch": "resnet18", "image_size": 64, "batch_size": 8}


def run_dir(root: Path) -> Path:
    return root / "runs" / "target_fold0"


def model_file(root: Path) -> Path:
    return root / "models" / "target_fold0" / "model.pt"


def cli(root: Path, data: Path, epochs: int = 3, *extra: str) -> list[str]:
    """The ``python -m monai.bundle run`` command of a tiny target stage."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(STAGE)]
    cmd += ["--meta_file", str(CONFIGS / "metadata.json")]
    for k, v in TINY.items():
        cmd += [f"--{k}", str(v)]
    cmd += ["--bundle_root", str(root), "--dataset_dir", str(data), "--train#trainer#max_epochs", str(epochs)]
    return cmd + list(extra)


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def workflow(root: Path, data: Path, epochs: int = 2, **overrides) -> ConfigWorkflow:
    """The tiny target stage as an in-process workflow (initialised, not run)."""
    wf = ConfigWorkflow(
        config_file=STAGE,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(data),
        **TINY,
        **{"train#trainer#max_epochs": epochs},
        **overrides,
    )
    wf.initialize()
    return wf


def train(root: Path, data: Path, epochs: int = 2, **overrides) -> ConfigWorkflow:
    wf = workflow(root, data, epochs, **overrides)
    wf.run()
    wf.finalize()
    return wf


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epochs_done(ckpt: dict) -> int:
    """Completed epochs recorded in a training checkpoint (ignite saves the iteration count)."""
    return ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=lambda m: f"{k}: {m}")


def raised(exc_type: type[BaseException], fn, *args, **kwargs) -> BaseException:
    """Call ``fn`` and return the ``exc_type`` it raised (MONAI's config layer wraps errors in ``RuntimeError``)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    e: BaseException | None = info.value
    while e is not None and not isinstance(e, exc_type):
        e = e.__cause__ or e.__context__
    assert e is not None, f"expected {exc_type.__name__}, got {info.value!r}"
    return e


class NanAfter(torch.nn.Module):
    """Cross-entropy that turns NaN from its ``n``-th call on (a planted numerical failure)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ce(pred, target)
        return loss * float("nan") if self.calls >= self.n else loss


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 and resume, determinism: bundle runs in subprocesses, as a user runs them
# ---------------------------------------------------------------------------------------------------------------------

VAL_AUC = re.compile(r"Epoch\[(\d+)\] Metrics -- val_auc: ([0-9.]+)")


@pytest.fixture(scope="module")
def cli_runs(tiny_data, tmp_path_factory) -> dict:
    """Three 3-epoch runs started together with the same seed: "full" and "again" run to the end; "killed" gets
    SIGKILL as soon as its first "last" checkpoint appears, then is rerun with the same command."""
    base = tmp_path_factory.mktemp("cli")
    env = subprocess_env()
    roots = {name: base / name for name in ("full", "again", "killed")}
    logs = {name: base / f"{name}.log" for name in roots}
    procs = {}
    for name, root in roots.items():
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen(
                cli(root, tiny_data), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
    last = run_dir(roots["killed"]) / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and procs["killed"].poll() is None and time.time() < deadline:
        time.sleep(0.02)
    procs["killed"].send_signal(signal.SIGKILL)
    procs["killed"].wait(timeout=60)
    info = {
        "roots": roots,
        "kill_returncode": procs["killed"].returncode,
        "finished_before_kill": (run_dir(roots["killed"]) / "final.pt").exists(),
        "epochs_at_kill": epochs_done(load(last)) if last.exists() else None,  # an atomic file: always complete
        "kill_log": logs["killed"].read_text(),
    }
    for name in ("full", "again"):
        assert procs[name].wait(timeout=300) == 0, logs[name].read_text()[-3000:]
    out = subprocess.run(
        cli(roots["killed"], tiny_data), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    info["resume_log"] = out.stdout + out.stderr
    info["logs"] = {name: logs[name].read_text() for name in ("full", "again")}
    return info


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(cli_runs):
    full, killed = cli_runs["roots"]["full"], cli_runs["roots"]["killed"]
    assert cli_runs["kill_returncode"] == -signal.SIGKILL, cli_runs["kill_log"][-3000:]
    assert not cli_runs["finished_before_kill"], "the run finished before it could be killed"
    assert 1 <= cli_runs["epochs_at_kill"] < 3
    assert "resuming from" in cli_runs["resume_log"] and "no checkpoint to resume from" not in cli_runs["resume_log"]
    assert (run_dir(full) / "final.pt").is_file() and not (run_dir(full) / "last.pt").exists()
    assert not (run_dir(killed) / "last.pt").exists()

    a, b = load(run_dir(full) / "final.pt"), load(run_dir(killed) / "final.pt")
    assert a["trainer"] == b["trainer"] and epochs_done(a) == 3
    assert_same_tensors(a["network"], b["network"], atol=1e-6)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][k], b["optimizer"]["state"][k], atol=1e-6)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert a["best_model_saver"] == b["best_model_saver"]
    assert_same_tensors(load(model_file(full)), load(model_file(killed)), atol=1e-6)


def test_same_seed_on_cpu_gives_the_same_weights_and_metrics(cli_runs):
    r1, r2 = cli_runs["roots"]["full"], cli_runs["roots"]["again"]
    a, b = load(run_dir(r1) / "final.pt"), load(run_dir(r2) / "final.pt")
    assert_same_tensors(a["network"], b["network"])  # bitwise
    assert_same_tensors(load(model_file(r1)), load(model_file(r2)))
    m1, m2 = (VAL_AUC.findall(cli_runs["logs"][k]) for k in ("full", "again"))
    assert len(m1) == 3 and m1 == m2
    assert a["best_model_saver"] == b["best_model_saver"]
    assert a["run"]["seed"] == 0 and a["run"]["stage"] == "target_fold0"


# ---------------------------------------------------------------------------------------------------------------------
# truncated checkpoints, stale checkpoints, NaN loss (in process)
# ---------------------------------------------------------------------------------------------------------------------


def test_truncated_checkpoints_are_refused_with_a_clear_error(cli_runs, tiny_data, tmp_path):
    good = (run_dir(cli_runs["roots"]["full"]) / "final.pt").read_bytes()
    # a truncated rolling checkpoint: resume refuses it, naming the file and the remedies
    root = tmp_path / "bundle"
    last = run_dir(root) / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(good[: len(good) // 2])
    err = raised(resilience.CheckpointError, workflow(root, tiny_data, epochs=2).run)
    assert re.search(r"cannot read checkpoint .*last\.pt \(truncated.*--resume false", str(err))
    assert last.stat().st_size == len(good) // 2  # left as found, for inspection
    assert not model_file(root).exists()
    # resume=false starts over and replaces it
    train(root, tiny_data, epochs=1, resume=False)
    assert not last.exists() and epochs_done(load(run_dir(root) / "final.pt")) == 1
    # a truncated stage output (the next stage's init weights) is refused by name, with weights_only loading
    model = model_file(cli_runs["roots"]["full"]).read_bytes()
    bad = tmp_path / "intermediate" / "model.pt"
    bad.parent.mkdir()
    bad.write_bytes(model[: len(model) // 3])
    with pytest.raises(WeightsError, match=r"cannot read weights file .*intermediate/model\.pt"):
        load_state_dict_file(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"optimizer": {"lr": 0.1}}, foreign)
    with pytest.raises(resilience.CheckpointError, match="not a training checkpoint"):
        checkpoints.read_checkpoint(foreign)


# ---------------------------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------------------------


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, caplog):
    root = tmp_path / "bundle"
    wf = workflow(root, tiny_data, epochs=3, loss=NanAfter(4))  # 2 batches/epoch: NaN at epoch 2, batch 2
    msg = str(raised(resilience.NonFiniteLossError, wf.run))
    assert "[target_fold0]" in msg and "epoch 2/3, iteration 4 (batch 2/2" in msg and "nan" in msg
    assert str(run_dir(root) / "last.pt") in msg
    ckpt = load(run_dir(root) / "last.pt")
    assert epochs_done(ckpt) == 1 and ckpt["trainer"]["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["network"].values())
    assert all(torch.isfinite(t).all() for t in load(model_file(root)).values())
    assert not (run_dir(root) / "final.pt").exists()
    # the bad step was never applied: the weights in memory are finite too
    net = wf.parser.get_parsed_content("network")
    assert all(torch.isfinite(p).all() for p in net.parameters())

    # rerun in the same bundle with another configuration (the normal loss): the checkpoint is stale, not resumed
    wf = workflow(root, tiny_data, epochs=3)
    trainer = wf.parser.get_parsed_content("train#trainer")
    resume = next(h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, ResumeHandler))
    with caplog.at_level(logging.INFO, logger="scripts.engine.resilience"):
        resume(trainer)  # what happens at Events.STARTED
    assert "written by a different configuration" in caplog.text and "starting from epoch 1" in caplog.text
    assert resume.resumed_from is None and trainer.state.epoch == 0
    # ... and with resume=true the run refuses to start
    err = raised(resilience.CheckpointError, workflow(root, tiny_data, epochs=3, resume="true").run)
    assert "different configuration" in str(err)


# ---------------------------------------------------------------------------------------------------------------------
# resources, before any training
# ---------------------------------------------------------------------------------------------------------------------


def test_unwritable_output_folder_is_reported_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the bundle root should be")
    err = raised(resilience.OutputNotWritableError, workflow, blocker / "bundle", tiny_data)  # in ``initialize``
    assert re.search(r"\[target_fold0\] output folder .* cannot be created: .*not_a_folder exists and is not", str(err))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert "is not writable" in str(raised(resilience.OutputNotWritableError, workflow, ro, tiny_data))
        finally:
            ro.chmod(0o700)


def test_too_little_free_disk_is_reported_before_training(tiny_data, tmp_path):
    root = tmp_path / "bundle"
    wf = workflow(root, tiny_data, epochs=1, disk_reserve_mb=1e12)  # more than any disk has free
    err = raised(resilience.InsufficientDiskError, wf.run)
    assert re.search(r"\[target_fold0\] not enough free disk .* MiB free", str(err))
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 0
    assert not model_file(root).exists() and not (run_dir(root) / "last.pt").exists()


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    saver = checkpoints._AtomicDiskSaver(tmp_path, "model.pt")
    saver({"model": net.state_dict()}, "ignored.pt")
    before = (tmp_path / "model.pt").read_bytes()

    def disk_full(obj, f, *a, **k):  # ignite's atomic DiskSaver passes an open temporary file
        f.write(b"partial") if hasattr(f, "write") else Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        resilience.ResilienceError, match=r"cannot write checkpoint .*model\.pt.*previous file .* intact"
    ):
        saver({"model": net.state_dict()}, "ignored.pt")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline: only what a change affects reruns; a stage left without its fingerprint resumes
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_reruns_exactly_the_affected_stages_and_resumes_a_killed_one(tmp_path, caplog):
    s = tiny_settings(bundle_root=str(tmp_path), saliency=False)
    run_pipeline(s)
    models = tmp_path / "models"
    inter = models / "intermediate" / "model.pt"
    inter_mtime = inter.stat().st_mtime_ns

    s["stage_target#train#trainer#max_epochs"] = (
        2  # one value changed: the target folds and what depends on them rerun, not stage 1
    )
    with caplog.at_level(logging.INFO):
        run_pipeline(s)
    assert "[intermediate] up to date, skipped" in caplog.text
    for k in (1, 2):  # and the log says why
        assert f"[target fold {k}/2] running (setting train#trainer#max_epochs 1 -> 2)" in caplog.text
    assert "[test predictions] running" in caplog.text
    assert inter.stat().st_mtime_ns == inter_mtime
    assert epochs_done(load(tmp_path / "runs" / "target_fold1" / "final.pt")) == 2

    # fold 2 killed after its last epoch's checkpoint but before the pipeline recorded its fingerprint
    fold = models / "target_fold1" / "model.pt"
    fold_mtime = fold.stat().st_mtime_ns
    (tmp_path / "runs" / "target_fold1" / "final.pt").rename(tmp_path / "runs" / "target_fold1" / "last.pt")
    fold.with_name("model.pt.fingerprint").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_pipeline(s)
    assert "[target fold 2/2] running" in caplog.text and "[target fold 1/2] up to date, skipped" in caplog.text
    assert "resuming from" in caplog.text and "epoch 2/2 done" in caplog.text
    assert fold.stat().st_mtime_ns == fold_mtime  # nothing retrained
    assert "[test predictions] up to date, skipped" in caplog.text  # same member weights: evaluation still current


def test_a_resumed_best_model_record_without_its_file_is_reset(tmp_path):
    saver = checkpoints.AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": torch.nn.Linear(3, 2)},
        save_key_metric=True,
        key_metric_filename="model.pt",
    )
    record = {"_saved": [[0.875, "model_key_metric=0.8750.pt"]]}
    saver.load_state_dict(record)
    (tmp_path / "model.pt").write_bytes(b"present")
    assert not saver.forget_missing_best_models() and saver.state_dict() == record
    (tmp_path / "model.pt").unlink()
    assert saver.forget_missing_best_models() and saver.state_dict() == {"_saved": []}


def test_the_monai_checkpoint_saver_internals_the_atomic_savers_rely_on_are_still_there(tmp_path):
    """AtomicCheckpointSaver swaps the save handler of MONAI CheckpointSaver's inner ignite checkpoints (MONAI gives
    them no public accessor) and reads the best-metric record of one through ignite's public state_dict/reset. A
    MONAI or ignite release that renames them fails here, by name, instead of silently losing atomic saves or the
    best-metric record on resume."""
    net = torch.nn.Linear(1, 1)
    saver = checkpoints.AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"net": net}, save_final=True, save_key_metric=True, key_metric_n_saved=1
    )
    for attr in ("_final_filename", "_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
        assert hasattr(
            saver, attr
        ), f"monai.handlers.CheckpointSaver no longer has {attr}: update AtomicCheckpointSaver"
    assert hasattr(
        saver._key_metric_checkpoint, "save_handler"
    ), "ignite's Checkpoint no longer has save_handler: update AtomicCheckpointSaver"
    assert isinstance(saver._key_metric_checkpoint.save_handler, checkpoints._AtomicDiskSaver)
    assert isinstance(saver._final_checkpoint.save_handler, checkpoints._AtomicDiskSaver)
