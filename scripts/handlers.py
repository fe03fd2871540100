"""Ignite handlers the workflow configs attach to MONAI engines."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class CaseTableHandler:
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
    """

    def __init__(
        self,
        items: Sequence[dict],
        output_csv: str | os.PathLike,
        member_keys: Sequence[str] = (),
        pred_key: str = "pred",
        class_index: int = 1,
    ) -> None:
        self.by_case = {str(it["case"]): it for it in items}
        self.output_csv = output_csv
        self.member_keys = list(member_keys)
        self.pred_key = pred_key
        self.class_index = class_index
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

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
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        from scripts.metrics import write_cases_csv

        write_cases_csv(self.output_csv, self.rows)
        logger.info("wrote %d cases to %s", len(self.rows), self.output_csv)
