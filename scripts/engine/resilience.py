"""Training that survives bad numerics and bad machines: the errors, reseeding, guards and preflight checks.

The overlay ``configs/resilience.json``, merged after a stage config, wires these pieces into the training recipe
(``configs/train.json``; checkpoints and resume: :mod:`scripts.engine.checkpoints`):

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
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents

from scripts.engine.config_values import parse_bool

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------------
# data order, numerics, resources
# ---------------------------------------------------------------------------------------------------------------------


def set_deterministic_algorithms(enabled: bool = False) -> bool:
    """Opt in to PyTorch's deterministic algorithms (for GPU runs; CPU runs are deterministic without it).

    Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by deterministic cuBLAS; it must be set before the first
    CUDA matrix product) and ``torch.use_deterministic_algorithms(True, warn_only=True)``: operations that have a
    deterministic implementation use it, the few that have none warn instead of stopping the run.

    Args:
        enabled: turn them on; ``False`` leaves PyTorch's setting as it is. Any value
            :func:`~scripts.engine.config_values.parse_bool` accepts.

    Returns:
        Whether they were turned on.
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
    """Check that each folder in ``paths`` exists and is writable, or can be created. Creates nothing (a probe
    file is written and removed).

    Args:
        paths: the output folders.
        stage: prefixes the error message (``[stage]``).

    Returns:
        The folders as absolute paths.

    Raises:
        OutputNotWritableError: a folder cannot be created or written to.
    """
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
    """Estimated sizes of the checkpoints of ``network``, in bytes.

    Args:
        network: the network whose ``state_dict`` is saved.
        optimizer: the training optimiser (``None``: not counted); one without state yet is counted as two tensors
            per trainable parameter (Adam-family moments).

    Returns:
        ``(model-only file, full training checkpoint)``.
    """
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
