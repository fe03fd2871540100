"""Per-case error handling for data preparation: one report of (case, file, reason), stop or skip."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from scripts.engine.atomic import write_json

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("stop", "skip")


def printable(text: str) -> str:
    """``text`` with surrogate-escaped bytes (from non-UTF-8 file names) as ``\\xNN`` escapes: safe to write."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)


class PrepareError(ValueError):
    """A problem with one input case (unreadable file, unsupported format, empty or out-of-image ROI)."""


class PreparationFailed(RuntimeError):
    """Preparation stopped (``on_error="stop"``) or produced nothing; ``report`` holds the per-case errors."""

    def __init__(self, message: str, report: "ErrorReport", report_path: str | os.PathLike | None = None):
        super().__init__(message)
        self.report = report
        self.report_path = report_path


@dataclass
class ErrorReport:
    """Collects per-case failures; with ``on_error="stop"`` the first failure raises :class:`PreparationFailed`."""

    on_error: str = "stop"
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    n_ok: int = 0
    n_reused: int = 0

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")

    def fail(self, case: str, file: str | os.PathLike | None, reason: str) -> None:
        """Record a failed case; raise when stopping on the first error."""
        entry = {"case": case, "file": None if file is None else printable(str(file)), "reason": printable(reason)}
        self.errors.append(entry)
        logger.error("case %s failed (%s): %s", case, entry["file"], reason)
        if self.on_error == "stop":
            raise PreparationFailed(
                f"case {case}: {reason} (file: {entry['file']}). Fix the input, or pass --on-error skip to skip "
                "failing cases and get a summary.",
                self,
            )

    def warn(self, case: str, message: str) -> None:
        """Record a non-fatal remark about a case (e.g. a ROI padded at the image edge)."""
        self.warnings.append({"case": case, "message": message})
        logger.warning("case %s: %s", case, message)

    def summary(self) -> str:
        """One line: counts of prepared, reused, failed and warned cases."""
        return (
            f"{self.n_ok} case(s) prepared ({self.n_reused} reused from an earlier run), "
            f"{len(self.errors)} failed, {len(self.warnings)} warning(s)"
        )

    def as_dict(self) -> dict:
        """JSON-ready report."""
        return {
            "summary": self.summary(),
            "n_ok": self.n_ok,
            "n_reused": self.n_reused,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        return write_json(path, self.as_dict())
