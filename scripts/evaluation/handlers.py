"""Ignite handlers that write the per-case tables: the evaluator's case table and the inference predictions."""

from __future__ import annotations

import csv
import logging
import os
from typing import Sequence

import torch
from ignite.engine import Engine, Events

from scripts.data.schema import TARGET_CLASSES
from scripts.engine.atomic import atomic_path
from scripts.evaluation.case_table import write_cases_csv

logger = logging.getLogger(__name__)


class _RowTable:
    """Collects one row per case during a run (``_collect``) and writes the table when it completes (``_write``)."""

    rows: list[dict]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class CaseTableHandler(_RowTable):
    """Collect one row per case from an evaluator and write the per-case CSV when the run completes.

    Each row holds the case's datalist fields (``case``, ``patient``, ``lesion``, ``label``, ``birads``), every
    member's probability of ``class_index`` (``member_0`` ... from ``member_keys``) and the ensemble probability
    (``prob``, from ``pred_key``). The engine's decollated batches must carry the ``case`` key.

    Args:
        items: the datalist items being evaluated (to look up patient, lesion, label and BI-RADS by case id).
        output_csv: where to write the table (atomically).
        member_keys: output keys holding each member's class probabilities ``(num_classes,)``.
        pred_key: output key holding the ensemble's class probabilities.
        class_index: the positive class (1 = malignant).
        uncertainty_key: output key holding the members' disagreement (column ``uncertainty``); ``None``: none.
        threshold: when given, column ``call`` holds ``class_names[class_index]`` for ``prob >= threshold``, else the
            other class (the decision at the saved operating point).
        class_names: the names ``call`` uses.
    """

    def __init__(
        self,
        items: Sequence[dict],
        output_csv: str | os.PathLike,
        member_keys: Sequence[str] = (),
        pred_key: str = "pred",
        class_index: int = 1,
        uncertainty_key: str | None = None,
        threshold: float | None = None,
        class_names: Sequence[str] = TARGET_CLASSES,
    ) -> None:
        self.by_case = {str(it["case"]): it for it in items}
        self.output_csv = output_csv
        self.member_keys = list(member_keys)
        self.pred_key = pred_key
        self.class_index = class_index
        self.uncertainty_key = uncertainty_key
        self.threshold = None if threshold is None else float(threshold)
        self.class_names = [str(c) for c in class_names]
        self.rows: list[dict] = []

    def _prob(self, value: torch.Tensor) -> float:
        return float(torch.as_tensor(value).flatten()[self.class_index])

    def _collect(self, engine: Engine) -> None:
        for batch, out in zip(engine.state.batch, engine.state.output):
            case = str(batch["case"])
            item = self.by_case[case]
            row = {
                "case": case,
                "patient": item["patient"],
                "lesion": item.get("lesion") or case,
                "label": int(item["label"]),
                "birads": item.get("birads"),
            }
            for k, key in enumerate(self.member_keys):
                row[f"member_{k}"] = self._prob(out[key])
            row["prob"] = self._prob(out[self.pred_key])
            if self.uncertainty_key and len(self.member_keys) > 1:
                row["uncertainty"] = float(out[self.uncertainty_key])
            if self.threshold is not None:
                positive = row["prob"] >= self.threshold
                row["call"] = self.class_names[self.class_index if positive else 1 - self.class_index]
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        write_cases_csv(self.output_csv, self.rows)
        logger.info("wrote %d cases to %s", len(self.rows), self.output_csv)


class PredictionTableHandler(_RowTable):
    """Write the inference table: one row per case with each class probability, the predicted class, or an error.

    Columns: ``case``, ``status`` (``ok`` or ``error``), ``prob_<class name>`` for every class, ``pred_class``
    (index), ``pred_label`` (name), ``uncertainty`` (the members' disagreement, with ``uncertainty_key``),
    ``threshold`` and ``operating_point`` (the decision rule in use) and ``error`` (why the input could not be
    used; empty when ``ok``). Rows keep
    the input order. Cases whose batch item carries a non-empty ``error_key`` get an error row and no probabilities,
    so one unreadable file never loses the other results. The table is written atomically when the run completes;
    if every input failed, a :class:`RuntimeError` follows (after the table is written) so that scripts notice.

    Args:
        output_csv: where to write the table.
        class_names: one name per output channel (``network_data_format.outputs.pred.channel_def`` order).
        pred_key: output key holding the class probabilities ``(num_classes,)``.
        case_key: batch key holding the case id.
        error_key: batch key holding the input error text ("" when fine).
        threshold: ``None`` predicts the most probable class; a number predicts ``positive_index`` when its
            probability is at least ``threshold`` (binary tasks; e.g. the threshold chosen on validation data).
        positive_index: the positive class for ``threshold`` (1 = malignant).
        fail_if_all_errors: raise after writing when no input could be used.
        operating_point: a description of the decision rule (``models/operating_point.json``), written in each row.
        uncertainty_key: output key holding the members' disagreement; ``None``: no ``uncertainty`` column.
    """

    def __init__(
        self,
        output_csv: str | os.PathLike,
        class_names: Sequence[str] = TARGET_CLASSES,
        pred_key: str = "pred",
        case_key: str = "case",
        error_key: str = "error",
        threshold: float | None = None,
        positive_index: int = 1,
        fail_if_all_errors: bool = True,
        operating_point: str = "",
        uncertainty_key: str | None = None,
    ) -> None:
        self.output_csv = output_csv
        self.operating_point = str(operating_point)
        self.uncertainty_key = uncertainty_key
        self.class_names = [str(c) for c in class_names]
        self.pred_key = pred_key
        self.case_key = case_key
        self.error_key = error_key
        self.threshold = None if threshold is None else float(threshold)
        self.positive_index = int(positive_index)
        self.fail_if_all_errors = fail_if_all_errors
        self.rows: list[dict] = []

    @property
    def columns(self) -> list[str]:
        """The table's header."""
        extra = ["uncertainty"] if self.uncertainty_key else []
        extra += ["threshold", "operating_point"] if self.threshold is not None else []
        return ["case", "status", *[f"prob_{c}" for c in self.class_names], "pred_class", "pred_label", *extra, "error"]

    def _decide(self, probs: list[float]) -> int:
        if self.threshold is None:
            return int(max(range(len(probs)), key=probs.__getitem__))
        return self.positive_index if probs[self.positive_index] >= self.threshold else 1 - self.positive_index

    def row(self, case: str, probs: torch.Tensor | None, error: str = "", uncertainty: float | None = None) -> dict:
        """One table row (``probs`` and ``uncertainty`` are ignored when ``error`` is set)."""
        row = {c: "" for c in self.columns}
        row["case"] = case
        if error:
            row.update(status="error", error=error)
            return row
        values = [float(v) for v in torch.as_tensor(probs, dtype=torch.float32).flatten().tolist()]
        if len(values) != len(self.class_names):
            raise ValueError(f"{len(values)} probabilities for {len(self.class_names)} class names ({case})")
        pred = self._decide(values)
        row.update(status="ok", pred_class=pred, pred_label=self.class_names[pred])
        for name, v in zip(self.class_names, values):
            row[f"prob_{name}"] = f"{v:.6f}"
        if self.uncertainty_key and uncertainty is not None:
            row["uncertainty"] = f"{float(uncertainty):.6f}"
        if self.threshold is not None:
            row.update(threshold=f"{self.threshold:.6g}", operating_point=self.operating_point)
        return row

    def attach(self, engine: Engine) -> None:
        """Collect per iteration, write on completion, and write the rows collected so far if the run fails.

        Ignite calls only the first ``EXCEPTION_RAISED`` handler: attach this one before ``StatsHandler``."""
        super().attach(engine)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._write_partial)

    def _collect(self, engine: Engine) -> None:
        for batch, out in zip(engine.state.batch, engine.state.output):
            error = str(batch.get(self.error_key) or "")
            probs = None if error else out[self.pred_key]
            u = out.get(self.uncertainty_key) if self.uncertainty_key and not error else None
            self.rows.append(self.row(str(batch[self.case_key]), probs, error, None if u is None else float(u)))

    def _write_partial(self, engine: Engine, e: BaseException) -> None:
        """The run stopped: write the rows it has (the table says so in the log), then re-raise."""
        try:
            if getattr(self, "rows", None):
                self._save()
                logger.error(
                    "run stopped (%s) after %d case(s): %s holds their rows only", type(e).__name__, len(self.rows),
                    self.output_csv,
                )  # fmt: skip
        finally:
            raise e

    def _save(self) -> None:
        with atomic_path(self.output_csv) as tmp:
            # case ids from non-UTF-8 file names carry surrogates: written as backslash escapes, never a crash
            with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                w.writerows(self.rows)

    def _write(self, engine: Engine) -> None:
        self._save()
        n_err = sum(r["status"] == "error" for r in self.rows)
        logger.info("wrote %d predictions (%d input errors) to %s", len(self.rows) - n_err, n_err, self.output_csv)
        if n_err and n_err == len(self.rows) and self.fail_if_all_errors:
            raise RuntimeError(
                f"none of the {n_err} inputs could be used (first error: case {self.rows[0]['case']}: "
                f"{self.rows[0]['error']}); see {self.output_csv}"
            )
