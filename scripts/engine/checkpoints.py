"""Checkpoints that survive interruption: atomic saves, the full training state after every epoch, and resume.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` whose files are written to a temporary name and renamed
  (ignite's ``DiskSaver(atomic=True)``; MONAI's own saver passes ``atomic=False``, and with a fixed file name it
  deletes the old file before writing the new one), and whose best-metric record can be saved and restored.
- :class:`LastCheckpointSaver`: the full training state (network, optimiser, scheduler, trainer counters, the
  best-model saver's record and the run's fingerprint) in ``<output_dir>/last.pt`` after every epoch; renamed to
  ``final.pt`` when the run completes, so that ``last.pt`` exists only while a run is unfinished.
- :class:`ResumeHandler`: at ``STARTED``, continue from ``last.pt`` when it was made by the same configuration
  (``resume="auto"``), always (``"true"``: an error when it cannot) or never (``"false"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.engine.config_values import parse_bool
from scripts.engine.resilience import CheckpointError, ResilienceError

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "true", "false")


class RunInfo:
    """What a training checkpoint records about the run that wrote it (saved under ``"run"``).

    Args:
        fingerprint: the digest of the run's configs, settings and inputs (:mod:`scripts.engine.fingerprint`);
            :class:`ResumeHandler` resumes only a checkpoint with the same one.
        stage: the name of the run that wrote the checkpoint, recorded for messages.
        seed: the run's seed.
    """

    def __init__(self, fingerprint: str, stage: str = "", seed: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.stage = stage
        self.seed = seed

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "stage": self.stage, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Nothing to restore: :class:`ResumeHandler` compares the fingerprint before loading."""


# ---------------------------------------------------------------------------------------------------------------------
# atomic checkpoints
# ---------------------------------------------------------------------------------------------------------------------


class _AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` with ``atomic=True`` (``torch.save`` to a temporary file in ``dirname``, renamed onto
    the final name), saving under a fixed ``filename`` when one is given.

    With a fixed ``filename``, ``remove`` does nothing: ignite's ``Checkpoint`` removes the old file before it saves
    the new one, whereas the rename replaces it in one step, so there is never a moment without a complete file under
    that name. A failed write raises :class:`~scripts.engine.resilience.ResilienceError` naming the file.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        path = self.dirname / name
        try:
            super().__call__(dict(checkpoint), name, metadata)
        except OSError as e:
            raise ResilienceError(
                f"cannot write checkpoint {path}: {e}. The previous file under that name (if any) is intact; "
                "free some disk space or choose another output folder, then rerun to resume."
            ) from e

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` with atomic writes; the other arguments are MONAI's.

    Args:
        interval_filename: a fixed file name for the ``save_interval`` checkpoints (one file, replaced each time).

    ``state_dict()`` returns the best-metric record (the scores and names of the kept best models), so that a
    resumed run keeps comparing against the best score seen before the interruption; ``load_state_dict`` is
    MONAI's.
    """

    def __init__(self, *args: Any, interval_filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fixed = {
            "_final_checkpoint": self._final_filename,
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": interval_filename,
        }
        for attr, filename in fixed.items():
            ckpt = getattr(self, attr, None)
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(self.save_dir, filename)

    def forget_missing_best_models(self) -> bool:
        """Drop a (restored) best-metric record whose model file is gone, e.g. deleted by hand, so that the next
        validation writes a best model again instead of never writing one. Returns whether it was dropped."""
        ckpt = self._key_metric_checkpoint
        if ckpt is None:
            return False
        saved = ckpt.state_dict()["_saved"]  # ignite's public record: (priority, filename) pairs
        fixed = getattr(ckpt.save_handler, "filename", None)
        missing = [fixed or name for _, name in saved if not (Path(self.save_dir) / (fixed or name)).is_file()]
        if missing:
            logger.warning("best model file(s) %s missing in %s: best-metric record reset", missing, self.save_dir)
            ckpt.reset()
        return bool(missing)

    def state_dict(self) -> dict:
        ckpt = self._key_metric_checkpoint
        saved = [] if ckpt is None else ckpt.state_dict()["_saved"]
        return {"_saved": [[float(priority), str(name)] for priority, name in saved]}


class LastCheckpointSaver(AtomicCheckpointSaver):
    """Save the full training state to ``save_dir/filename`` after every ``save_interval`` epochs.

    When the run completes, the file is renamed to ``final_filename``: ``last.pt`` on disk therefore always means
    "an unfinished run that can be resumed", and ``final.pt`` is the state at the end of training.

    Args:
        save_dir: folder of the checkpoint (the run's output folder).
        save_dict: objects with ``state_dict``; include the trainer and a :class:`RunInfo` under ``"run"``.
        filename: name of the rolling checkpoint.
        final_filename: its name once training has completed (``None`` keeps ``filename``).
        save_interval: epochs between saves.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        filename: str = "last.pt",
        final_filename: str | None = "final.pt",
        save_interval: int = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            name=name,
            epoch_level=True,
            save_interval=save_interval,
            n_saved=1,
            interval_filename=filename,
        )
        self.path = Path(save_dir) / filename
        self.final_path = Path(save_dir) / final_filename if final_filename else None

    def attach(self, engine: Engine) -> None:
        """Add the engine itself to the saved objects (as ``"trainer"``: a config cannot reference the trainer from
        one of its own handlers) and save at the end of every ``save_interval`` epochs."""
        self.save_dict.setdefault("trainer", engine)
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.to_save = self.save_dict
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._finalise)

    def _finalise(self, engine: Engine) -> None:
        if self.final_path is not None and self.path.is_file():
            os.replace(self.path, self.final_path)
            logger.info("training completed: %s -> %s", self.path, self.final_path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint with ``weights_only=True``, on the CPU.

    Returns:
        The checkpoint's dict (with ``run`` and ``trainer`` entries).

    Raises:
        CheckpointError: the file is truncated, corrupt or not a training checkpoint of this bundle (names it).
    """
    path = Path(path)
    remedy = "Delete it (or move it away) to start the stage over, or rerun with --resume false."
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt or not a PyTorch file): {str(e).rstrip('. ')}. {remedy}"
        ) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("run"), dict) or "trainer" not in ckpt:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this bundle (no 'run'/'trainer' entries). {remedy}"
        )
    return ckpt


def parse_resume(value: Any) -> str:
    """Normalise the ``resume`` setting.

    Args:
        value: ``"auto"``, ``None`` or ``"none"`` (all mean ``"auto"``), or anything
            :func:`scripts.engine.config_values.parse_bool` accepts.

    Returns:
        ``"auto"``, ``"true"`` or ``"false"``.

    Raises:
        ValueError: any other value.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "none")):
        return "auto"
    try:
        return "true" if parse_bool(value, "resume") else "false"
    except ValueError:
        raise ValueError(f"resume must be one of {RESUME_MODES} (or a bool), got {value!r}") from None


class ResumeHandler:
    """At ``Events.STARTED``, restore the training state from ``checkpoint`` (MONAI's ``CheckpointLoader``).

    Args:
        checkpoint: the rolling checkpoint written by :class:`LastCheckpointSaver`.
        load_dict: the objects to restore (network, optimizer, lr_scheduler, trainer, best-model saver).
        fingerprint: this run's fingerprint (``run_fingerprint`` in ``configs/resilience.json``,
            :func:`scripts.engine.fingerprint.compute`); a checkpoint with another one is stale.
        mode: ``"auto"`` resumes when the checkpoint exists and is current (a stale one is ignored, with a warning,
            and overwritten after the first epoch); ``"true"`` requires a current checkpoint; ``"false"`` starts
            over. A checkpoint that cannot be read is an error in every mode but ``"false"``.
        stage: the run's name, for messages.
    """

    def __init__(self, checkpoint: str, load_dict: dict, fingerprint: str, mode: Any = "auto", stage: str = "") -> None:
        self.checkpoint = Path(checkpoint)
        self.load_dict = load_dict
        self.fingerprint = fingerprint
        self.mode = parse_resume(mode)
        self.stage = stage
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        """Restore into the engine too (as ``"trainer"``), at ``Events.STARTED``."""
        self.load_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        tag = f"[{self.stage}] " if self.stage else ""
        if self.mode == "false":
            if self.checkpoint.exists():
                logger.info("%sresume=false: starting over; %s will be overwritten", tag, self.checkpoint)
            return
        if not self.checkpoint.is_file():
            if self.mode == "true":
                raise CheckpointError(f"{tag}resume=true but there is no checkpoint {self.checkpoint} to resume from")
            logger.info("%sno checkpoint to resume from (%s): starting from epoch 1", tag, self.checkpoint)
            return
        ckpt = read_checkpoint(self.checkpoint)
        if ckpt["run"].get("fingerprint") != self.fingerprint:
            msg = (
                f"{tag}{self.checkpoint} was written by a different configuration or different inputs "
                f"(stage {ckpt['run'].get('stage')!r})"
            )
            if self.mode == "true":
                raise CheckpointError(msg + "; refusing to resume from it (rerun with --resume false to start over)")
            logger.warning("%s: not resuming from it; starting from epoch 1 (it is replaced after epoch 1)", msg)
            return
        del ckpt
        CheckpointLoader(load_path=str(self.checkpoint), load_dict=self.load_dict, map_location="cpu")(engine)
        self.resumed_from = int(engine.state.epoch)
        self._forget_missing_best_models()
        logger.info(
            "%sresuming from %s: epoch %d/%s done (iteration %d)",
            tag,
            self.checkpoint,
            engine.state.epoch,
            engine.state.max_epochs,
            engine.state.iteration,
        )

    def _forget_missing_best_models(self) -> None:
        for obj in self.load_dict.values():
            if isinstance(obj, AtomicCheckpointSaver):
                obj.forget_missing_best_models()
