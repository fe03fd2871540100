"""Progress a person can read on long steps: iterations done/total, rate and time left.

On a terminal an engine gets ignite's ``ProgressBar`` (tqdm); elsewhere (CI logs, files, the main job's log) a
plain log line at most every ``interval_s`` seconds, so short runs stay quiet and long ones show they are working.
Loops that are not ignite engines (saliency) call :meth:`ProgressLogger.update` themselves.
"""

from __future__ import annotations

import logging
import sys
import time

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

logger = logging.getLogger(__name__)


class ProgressLogger:
    """Report the progress of an engine's epochs (``attach``) or of any loop (``start`` / ``update``).

    Args:
        name: what is running, as the log line names it (e.g. ``"target_fold0 training"``).
        interval_s: the least number of seconds between two log lines (non-terminal output only).
        interactive: ``True`` for a tqdm bar, ``False`` for log lines; ``None`` picks a bar when stderr is a terminal.
    """

    def __init__(self, name: str = "", interval_s: float = 30.0, interactive: bool | None = None) -> None:
        self.name = name
        self.interval_s = float(interval_s)
        self.interactive = sys.stderr.isatty() if interactive is None else bool(interactive)
        self.total = 0
        self.prefix = ""
        self._t0 = self._last = 0.0

    def attach(self, engine: Engine) -> None:
        """Show the progress of every epoch of ``engine``."""
        if self.interactive:
            ProgressBar(persist=False, desc=self.name or None).attach(engine)
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def start(self, total: int, prefix: str = "") -> None:
        """Begin a loop of ``total`` iterations (``prefix``, e.g. ``"epoch 2/5: "``, starts each line)."""
        self.total, self.prefix = int(total), prefix
        self._t0 = self._last = time.monotonic()

    def update(self, done: int) -> None:
        """``done`` of ``total`` iterations are finished: log a line if ``interval_s`` has passed since the last."""
        now = time.monotonic()
        if now - self._last < self.interval_s or done <= 0:
            return
        self._last = now
        rate = done / max(now - self._t0, 1e-9)
        left = max(self.total - done, 0) / rate
        logger.info(
            "%s%s%d/%d iterations, %.2f it/s, about %.0f s left", self.name, self.prefix, done, self.total, rate, left
        )

    def _epoch_started(self, engine: Engine) -> None:
        epochs = engine.state.max_epochs
        self.start(engine.state.epoch_length or 0, f" epoch {engine.state.epoch}/{epochs}: " if epochs > 1 else ": ")

    def _iteration_completed(self, engine: Engine) -> None:
        self.update((engine.state.iteration - 1) % (engine.state.epoch_length or 1) + 1)
