"""Ignite handlers the training configs attach to MONAI engines (the per-case table writers: evaluation/handlers.py)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointSaver, MLFlowHandler, TensorBoardHandler


class BufferSyncHandler:
    """Make the network's buffers (BatchNorm running statistics) identical on every rank at each epoch end.

    DistributedDataParallel keeps parameters in step but lets each rank update its BatchNorm running statistics
    from its own batches. At ``EPOCH_COMPLETED`` (attach it before the ``ValidationHandler``) the floating-point
    buffers of the state dict are averaged over the ranks and integer ones (``num_batches_tracked``) are copied from
    rank 0; constant non-persistent buffers are left alone. Validation, the saved
    checkpoint and every rank use the same model. Does nothing outside an initialised process group.

    Args:
        network: the (DDP-wrapped or plain) network.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        world = dist.get_world_size()
        module = getattr(self.network, "module", self.network)
        persistent = set(module.state_dict())  # skips constant, non-persistent buffers (normalisation mean/std)
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name not in persistent:
                    continue
                if buf.is_floating_point():
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)
                else:
                    dist.broadcast(buf, src=0)


# the handlers that write files (rank0_only keeps them off the other ranks)
FILE_WRITER_TYPES = (CheckpointSaver, Checkpoint, TensorBoardHandler, MLFlowHandler)


def rank0_only(handlers: Sequence | None, rank: int | None = None) -> list:
    """The handlers an engine of process ``rank`` attaches: on ranks other than 0, drop those that write files.

    File writers are MONAI's ``CheckpointSaver`` (and subclasses), ignite's ``Checkpoint``, the TensorBoard and
    MLflow handlers. Dropped handlers are still created, so objects other handlers refer to (e.g. a best-model
    saver whose state is part of a resumable checkpoint) exist on every rank; handlers that write when they are
    *created* (TensorBoard's event file) must be disabled in the config instead (``_disabled_``).

    Args:
        handlers: the config's handler list (``None`` entries are dropped).
        rank: the process's rank; ``None`` reads it from the initialised process group (0 without one).
    """
    handlers = [h for h in (handlers or []) if h is not None]
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        return handlers
    return [h for h in handlers if not isinstance(h, FILE_WRITER_TYPES)]
