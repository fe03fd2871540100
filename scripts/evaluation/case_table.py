"""Per-case tables: one row per evaluated case (``case``, ``patient``, ``lesion``, ``label``, ``prob``, ``birads``,
``member_k``), as the evaluation writes them and the report and ablation read them."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scripts.engine.atomic import atomic_path

CASE_COLUMNS = ("case", "patient", "lesion", "label", "prob", "birads")
_MEMBER_RE = re.compile(r"^member_(\d+)$")


def member_keys(rows: Sequence[dict]) -> list[str]:
    """``member_k`` column names with a value in some row, in numeric order."""
    found: set[int] = set()
    for r in rows:
        for k in r:
            m = _MEMBER_RE.match(k)
            if m and r[k] is not None and r[k] != "":
                found.add(int(m.group(1)))
    return [f"member_{i}" for i in sorted(found)]


def _parse_optional_int(v: Any) -> int | None:
    if v is None:
        return None
    v = str(v).strip()
    if v == "" or v.lower() in ("none", "nan", "na"):
        return None
    return int(float(v))


def _parse_optional_float(v: Any) -> float | None:
    if v is None:
        return None
    v = str(v).strip()
    if v == "" or v.lower() in ("none", "na"):
        return None
    return float(v)


def read_cases_csv(path: str | os.PathLike) -> list[dict]:
    """Read a per-case CSV into rows with typed ``label`` (int), ``prob``/``member_k``/``uncertainty`` (float),
    ``birads`` (int|None); other columns (``call``, ...) stay strings."""
    rows: list[dict] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("case", "patient", "label", "prob") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for i, raw in enumerate(reader):
            row: dict[str, Any] = dict(raw)
            try:
                row["label"] = int(float(raw["label"]))
                row["prob"] = float(raw["prob"])
                if "birads" in raw:
                    row["birads"] = _parse_optional_int(raw["birads"])
                if "uncertainty" in raw:
                    row["uncertainty"] = _parse_optional_float(raw["uncertainty"])
                for k in raw:
                    if _MEMBER_RE.match(k):
                        row[k] = _parse_optional_float(raw[k])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: bad value on data row {i + 1}: {e}") from e
            if row["label"] not in (0, 1):
                raise ValueError(f"{path}: label must be 0 or 1 on data row {i + 1}, got {row['label']}")
            rows.append(row)
    return rows


def write_cases_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write rows atomically; columns ``case, patient, lesion, label, prob, birads, member_0..`` then any others.

    ``birads`` is written only when some row has the key; ``None`` is written as an empty cell.
    """
    keys_seen: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys_seen:
                keys_seen.append(k)
    columns = [c for c in ("case", "patient", "lesion", "label", "prob") if c != "lesion" or "lesion" in keys_seen]
    if "birads" in keys_seen:
        columns.append("birads")
    members = member_keys([{k: 1 for k in keys_seen}])
    columns += members
    columns += [k for k in keys_seen if k not in columns]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return repr(float(v))
        if isinstance(v, (np.integer,)):
            return str(int(v))
        return str(v)

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([cell(r.get(c)) for c in columns])
    return Path(path)
