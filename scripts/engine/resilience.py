"""Training that survives interruption and bad numerics: resume, atomic checkpoints, guards and preflight checks.

The training config (``configs/train.json``) wires these pieces in:

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` whose files are written to a temporary name and renamed
  (MONAI's own saver passes ``atomic=False`` to ignite's ``DiskSaver``, and with a fixed file name it deletes the old
  file before writing the new one), and whose best-metric record can be saved and restored.
- :class:`LastCheckpointSaver`: the full training state (network, optimiser, scheduler, trainer counters, the
  best-model saver's record and the run's fingerprint) in ``<output_dir>/last.pt`` after every epoch; renamed to
  ``final.pt`` when the run completes, so that ``last.pt`` exists only while a run is unfinished.
- :class:`ResumeHandler`: at ``STARTED``, continue from ``last.pt`` when it was made by the same configuration
  (``resume="auto"``), always (``"true"``: an error when it cannot) or never (``"false"``).
- :class:`ReseedHandler`: reseed every random source from ``seed + epoch`` when an epoch starts, so that an epoch's
  data order and augmentations do not depend on whether the run was interrupted before it.
- :class:`NonFiniteLossGuard`: a NaN/inf loss stops the stage, before the step is applied, with a clear error.
- :func:`check_writable` (config ``initialize``) and :class:`DiskSpaceCheck` (``STARTED``): an unwritable output
  folder or too little free disk is reported before any training.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.engine.config_values import parse_bool

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "true", "false")
_MB = 1024 * 1024


class ResilienceError(RuntimeError):
    """A training run that cannot start or continue safely; the message says why and what to do."""


class OutputNotWritableError(ResilienceError):
    """An output folder that cannot be created or written."""


class InsufficientDiskError(ResilienceError):
    """Too little free disk for the checkpoints a run will write."""


class NonFiniteLossError(ResilienceError, FloatingPointError):
    """A NaN or infinite training loss."""


class CheckpointError(ResilienceError):
    """A checkpoint that cannot be read or does not belong to this run."""


class RunInfo:
    """What a training checkpoint records about the run that wrote it (saved under ``"run"``)."""

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


class _AtomicDiskSaver(BaseSaveHandler):
    """Write ``torch.save`` output to a temporary file in ``dirname`` and rename it onto the final name.

    With a fixed ``filename``, ``remove`` does nothing: the rename replaces the old file in one step, so there is
    never a moment without a complete file under that name.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        from scripts.engine.atomic import torch_save

        path = self.dirname / (self.filename or filename)
        try:
            torch_save(dict(checkpoint), path)
        except OSError as e:
            raise ResilienceError(
                f"cannot write checkpoint {path}: {e}. The previous file under that name (if any) is intact; "
                "free some disk space or choose another output folder, then rerun to resume."
            ) from e

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` with atomic writes (same arguments).

    Extra argument:
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
        if ckpt is None or not ckpt._saved:
            return False
        fixed = getattr(ckpt.save_handler, "filename", None)
        missing = [
            fixed or it.filename for it in ckpt._saved if not (Path(self.save_dir) / (fixed or it.filename)).is_file()
        ]
        if missing:
            logger.warning("best model file(s) %s missing in %s: best-metric record reset", missing, self.save_dir)
            ckpt._saved = []
        return bool(missing)

    def state_dict(self) -> dict:
        ckpt = self._key_metric_checkpoint
        saved = [] if ckpt is None else [[float(item.priority), str(item.filename)] for item in ckpt._saved]
        return {"_saved": saved}


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
    """Load a training checkpoint with ``weights_only=True``; a clear :class:`CheckpointError` naming the file
    when it is truncated, corrupt or not a training checkpoint of this bundle."""
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
    """Normalise the ``resume`` setting to ``"auto"``, ``"true"`` or ``"false"`` (``None``/``"none"`` mean ``"auto"``;
    anything :func:`scripts.engine.config_values.parse_bool` accepts means true or false)."""
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
        fingerprint: this run's fingerprint (``run_fingerprint`` in ``configs/train.json``, :func:`scripts.engine.fingerprint.compute`); a checkpoint with another one is stale.
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


# ---------------------------------------------------------------------------------------------------------------------
# data order, numerics, resources
# ---------------------------------------------------------------------------------------------------------------------


def set_deterministic_algorithms(enabled: bool = False) -> bool:
    """Opt in to PyTorch's deterministic algorithms (for GPU runs; CPU runs are deterministic without it).

    Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by deterministic cuBLAS; it must be set before the first
    CUDA matrix product) and ``torch.use_deterministic_algorithms(True, warn_only=True)``: operations that have a
    deterministic implementation use it, the few that have none warn instead of stopping the run. ``False`` leaves
    PyTorch's setting as it is. Returns ``enabled``.
    """
    if parse_bool(enabled, "deterministic_algorithms"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        logger.info("deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)", os.environ["CUBLAS_WORKSPACE_CONFIG"])
        return True
    return False


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch`` (1-based) in a run seeded with ``seed``."""
    return (int(seed) + int(epoch)) % (2**32)


class ReseedHandler:
    """Reseed every random source from ``seed + epoch`` at ``Events.EPOCH_STARTED``.

    Seeds Python's, NumPy's and torch's global generators, the DataLoader's own ``generator`` (if any), the random
    transforms of its dataset (MONAI ``set_rnd``), then restarts the data iterator so that the shuffling order and
    the worker seeds are drawn after the reseed. An epoch's data order and augmentations are then a function of
    ``(seed, epoch)`` only (and of the rank, in a process group; a ``DistributedSampler`` shuffles from its own
    ``seed + epoch``), the same in a resumed run as in an uninterrupted one.

    Args:
        seed: the run's seed.
        dataloader: the training DataLoader (its dataset's random transforms and generator are reseeded).
        restart_iterator: recreate the data iterator after reseeding (needed with ``num_workers > 0``, whose
            iterator is created, and starts prefetching, at the end of the previous epoch).
    """

    def __init__(self, seed: int, dataloader: Any = None, restart_iterator: bool = True) -> None:
        self.seed = int(seed)
        self.dataloader = dataloader
        self.restart_iterator = restart_iterator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.data.utils import set_rnd

        s = epoch_seed(self.seed, engine.state.epoch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            s = (s + 1_000_003 * torch.distributed.get_rank()) % (2**32)  # other augmentations on each rank
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        dl = self.dataloader
        if dl is not None:
            set_rnd(dl.dataset, s)
            if getattr(dl, "generator", None) is not None:
                dl.generator.manual_seed(s)
        if self.restart_iterator and engine.state.dataloader is not None:
            engine.set_data(engine.state.dataloader)


class NonFiniteLossGuard:
    """Stop training with :class:`NonFiniteLossError` when the loss is NaN or infinite.

    Checks right after the loss is computed (MONAI ``IterationEvents.LOSS_COMPLETED``), before backward and the
    optimiser step, so the weights in memory never take the bad step and no checkpoint is written after it (unlike
    ignite's ``TerminateOnNan``, which ends the run quietly as if it had completed).

    Args:
        stage: the run's name, for the message.
        checkpoints: files that hold the last good state (named in the message when they exist).
        loss_key: key of the loss in ``engine.state.output``.
    """

    def __init__(self, stage: str = "", checkpoints: Sequence[str] = (), loss_key: str = "loss") -> None:
        self.stage = stage
        self.checkpoints = [Path(c) for c in checkpoints]
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        event = IterationEvents.LOSS_COMPLETED
        if not engine.has_registered_events(event):
            event = Events.ITERATION_COMPLETED
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, Mapping) else output
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach()
        if bool(torch.isfinite(loss).all()):
            return
        st = engine.state
        in_epoch = (st.iteration - 1) % st.epoch_length + 1 if st.epoch_length else st.iteration
        kept = [str(c) for c in self.checkpoints if c.is_file()]
        raise NonFiniteLossError(
            f"[{self.stage or 'training'}] non-finite loss ({loss.float().mean().item()}) at epoch "
            f"{st.epoch}/{st.max_epochs}, iteration {st.iteration} (batch {in_epoch}/{st.epoch_length} of the epoch): "
            "training stopped before this step was applied. "
            + (
                f"Last good checkpoints, from before this epoch, kept intact: {', '.join(kept)}. "
                if kept
                else "No checkpoint had been written yet. "
            )
            + "Try a lower learning_rate, amp=False, or check the inputs for NaN/inf values."
        )


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(paths: Sequence[str | os.PathLike], stage: str = "") -> list[Path]:
    """Check that each folder in ``paths`` exists and is writable, or can be created; raise
    :class:`OutputNotWritableError` otherwise. Creates nothing (a probe file is written and removed)."""
    tag = f"[{stage}] " if stage else ""
    checked = []
    for raw in paths:
        path = Path(raw).absolute()
        base = _nearest_existing(path)
        if not base.is_dir():
            raise OutputNotWritableError(
                f"{tag}output folder {path} cannot be created: {base} exists and is not a folder. "
                "Choose another bundle_root/output folder."
            )
        try:
            fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=base)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            where = "" if base == path else f" (it would be created inside {base})"
            raise OutputNotWritableError(
                f"{tag}output folder {path} is not writable{where}: {e}. "
                "Fix its permissions or choose another bundle_root/output folder."
            ) from e
        checked.append(path)
    return checked


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def estimate_checkpoint_bytes(
    network: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, int]:
    """(model-only file, full training checkpoint) sizes in bytes; an optimiser without state yet is counted as
    two tensors per trainable parameter (Adam-family moments)."""
    model = _tensor_bytes(network.state_dict().values())
    opt = 0
    if optimizer is not None:
        state = [t for s in optimizer.state.values() for t in s.values()]
        if state:
            opt = _tensor_bytes(state)
        else:
            opt = 2 * sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    return model, model + opt


class DiskSpaceCheck:
    """At ``Events.STARTED``, check that the checkpoint folders have room for the checkpoints of this run.

    Each atomic save needs room for one new file beside the old one: the model file (``best_dir``) and the full
    training checkpoint (``last_dir``), plus ``reserve_mb``. Folders on one file system are counted together.

    Args:
        network: the trained network (its state dict size).
        best_dir: folder of the best-model file.
        last_dir: folder of the rolling training checkpoint.
        optimizer: its state is part of the training checkpoint.
        reserve_mb: extra free space to require, in MiB.
        stage: the run's name, for messages.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        best_dir: str,
        last_dir: str,
        optimizer: torch.optim.Optimizer | None = None,
        reserve_mb: float = 0.0,
        stage: str = "",
    ) -> None:
        self.network = network
        self.best_dir = Path(best_dir)
        self.last_dir = Path(last_dir)
        self.optimizer = optimizer
        self.reserve = int(float(reserve_mb) * _MB)
        self.stage = stage

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def required(self) -> dict[Path, int]:
        """Bytes needed per existing folder (keyed by the nearest existing folder of each file system)."""
        net = getattr(self.network, "module", self.network)
        model, full = estimate_checkpoint_bytes(net, self.optimizer)
        need: dict[tuple[int, Path], int] = {}
        by_dev: dict[int, Path] = {}
        for folder, size in ((self.best_dir, model), (self.last_dir, full)):
            base = _nearest_existing(folder.absolute())
            dev = os.stat(base).st_dev
            by_dev.setdefault(dev, base)
            key = (dev, by_dev[dev])
            need[key] = need.get(key, 0) + size
        return {base: size + self.reserve for (_, base), size in need.items()}

    def __call__(self, engine: Engine | None = None) -> None:
        tag = f"[{self.stage}] " if self.stage else ""
        for base, need in self.required().items():
            free = shutil.disk_usage(base).free
            if free < need:
                raise InsufficientDiskError(
                    f"{tag}not enough free disk for this run's checkpoints in {base}: {free / _MB:.1f} MiB free, "
                    f"{need / _MB:.1f} MiB needed (model file + training checkpoint"
                    + (f" + reserve {self.reserve / _MB:.0f} MiB" if self.reserve else "")
                    + "). Free some space or choose another bundle_root; nothing has been trained yet."
                )
        logger.info("%sdisk space checked for checkpoints", tag)
