"""CBIS-DDSM's case tables: reading them, and choosing which rows become the target and the intermediate set.

The rules (labels, splits, which patients are kept out of the intermediate set) are in
:mod:`scripts.data.prepare.cbis_ddsm`'s docstring; this module decides them from the tables alone, before any image
is read, so a selection can be checked (``--dry-run``) without the DICOM tree.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scripts.data.prepare.errors import PrepareError

TABLES = {
    ("calc", "training"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
    ("mass", "training"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
}
TARGET_CHOICES = ("calc", "none")
INTERMEDIATE_CHOICES = ("mass", "calc", "both", "none")
INTERMEDIATE_KINDS = {"mass": ("mass",), "calc": ("calc",), "both": ("calc", "mass"), "none": ()}
KIND_NAMES = {"calc": "calcification", "mass": "mass"}


def _clean(v: str | None) -> str:
    return (v or "").strip().strip('"').strip()


def read_table(path: str | Path) -> list[dict]:
    """Rows of one case table, keys normalised (lower case, spaces -> underscores), cells stripped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [
            {re.sub(r"\s+", "_", k.strip().lower()): _clean(v) for k, v in r.items() if k} for r in csv.DictReader(f)
        ]
    need = ("patient_id", "pathology", "image_file_path", "roi_mask_file_path", "cropped_image_file_path")
    if rows and any(k not in rows[0] for k in need):
        raise PrepareError(f"{path}: not a CBIS-DDSM case table (need columns {', '.join(need)})")
    return rows


def find_tables(folder: str | Path, kinds: tuple[str, ...] = ("calc",)) -> dict[tuple[str, str], Path]:
    """The case tables present in ``folder`` (searched recursively), keyed by (kind, split). At least one table of
    ``kinds`` must be there (by default a calcification table)."""
    found = {}
    for key, name in TABLES.items():
        hits = sorted(Path(folder).rglob(name))
        if hits:
            found[key] = hits[0]
    if not any(k[0] in kinds for k in found):
        names = ", ".join(TABLES[(k, s)] for k in kinds for s in ("training", "test"))
        raise PrepareError(f"{folder}: no {' or '.join(KIND_NAMES[k] for k in kinds)} case table ({names}) found")
    return found


def resolve_selection(target: str = "calc", intermediate: str = "mass") -> tuple[str, tuple[str, ...]]:
    """Check a target / intermediate choice; returns ``(target, kinds of the intermediate rows)``.

    Raises ``ValueError`` for an unknown choice, for nothing to prepare, and for ``target=calc`` with
    ``intermediate=calc``: every calcification row is then a target row, so no calcification row could enter the
    intermediate set (target patients are kept out of it)."""
    if target not in TARGET_CHOICES:
        raise ValueError(f"target must be one of {TARGET_CHOICES}, got {target!r}")
    if intermediate not in INTERMEDIATE_CHOICES:
        raise ValueError(f"intermediate must be one of {INTERMEDIATE_CHOICES}, got {intermediate!r}")
    kinds = INTERMEDIATE_KINDS[intermediate]
    if target == "none" and not kinds:
        raise ValueError("target=none with intermediate=none: nothing to prepare")
    if target == "calc" and kinds == ("calc",):
        raise ValueError(
            "target=calc with intermediate=calc gives an empty intermediate set: every calcification row belongs to a "
            "target patient, and target patients are kept out of the intermediate set. Use target=none to prepare "
            "the calcifications as intermediate data for your own target set, or intermediate=mass or both"
        )
    return target, kinds


@dataclass
class PlannedRow:
    """One case-table row and where it goes: ``task`` (target / intermediate) and ``split`` (training / test)."""

    kind: str
    table_split: str
    table: Path
    row: dict
    task: str
    split: str


@dataclass
class RowSelection:
    """The rows to prepare, and ``summary``: counts of the target and intermediate rows, exclusions and split
    merges (JSON-ready; it goes to ``prepare_report.json`` as ``row_selection``)."""

    target: str
    intermediate_kinds: tuple[str, ...]
    rows: list[PlannedRow] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _count(rows: list[PlannedRow]) -> dict:
    return {
        "rows": len(rows),
        "patients": len({p.row["patient_id"] for p in rows}),
        "rows_by_kind": dict(sorted(Counter(p.kind for p in rows).items())),
    }


def select_rows(tables: dict[tuple[str, str], Path], target: str = "calc", intermediate: str = "mass") -> RowSelection:
    """Read the case tables and decide, row by row, target / intermediate / excluded (see the module docstring).

    Exclusion (by patient, from the tables, before any image is read): with calcification rows in both sets,
    every patient of the target set (training and test); otherwise the patients of the target test set; nothing
    when there is no target set. Intermediate split: a patient with a test row in any included table is test
    (calc and mass tables split their patients independently; the datalist needs one split per patient)."""
    target, kinds = resolve_selection(target, intermediate)
    read: dict[tuple[str, str], list[dict]] = {}
    for key, path in sorted(tables.items()):
        if (key[0] == "calc" and target == "calc") or key[0] in kinds:
            rows = read_table(path)
            rows.sort(key=lambda r: r["image_file_path"])  # one full image decoded once for all its abnormalities
            read[key] = rows
    planned = [
        PlannedRow(kind, split, tables[(kind, split)], row, "target", split)
        for (kind, split), rows in read.items()
        if kind == "calc" and target == "calc"
        for row in rows
    ]
    target_patients = {p.row["patient_id"] for p in planned}
    target_test_patients = {p.row["patient_id"] for p in planned if p.split == "test"}
    if target == "none":
        banned, rule = set(), "none (no target set)"
    elif "calc" in kinds:
        banned, rule = target_patients, "every patient of the target set (calcification rows are in both sets)"
    else:
        banned, rule = target_test_patients, "patients of the target test set"
    candidates = [
        PlannedRow(kind, split, tables[(kind, split)], row, "intermediate", split)
        for (kind, split), rows in read.items()
        if kind in kinds
        for row in rows
    ]
    kept = [p for p in candidates if p.row["patient_id"] not in banned]
    excluded = [p for p in candidates if p.row["patient_id"] in banned]
    test_patients = {p.row["patient_id"] for p in kept if p.table_split == "test"}
    moved = [p for p in kept if p.table_split == "training" and p.row["patient_id"] in test_patients]
    for p in moved:
        p.split = "test"
    requested = ([("calc", "target")] if target == "calc" else []) + [(k, "intermediate") for k in kinds]
    missing = sorted({TABLES[(k, s)] for k, _ in requested for s in ("training", "test") if (k, s) not in tables})
    summary = {
        "target": {"kinds": ["calc"] if target == "calc" else [], **_count(planned)},
        "intermediate": {
            "kinds": list(kinds),
            **_count(kept),
            "exclusion": {"rule": rule, **_count(excluded)},
            "moved_to_test": {
                "rule": "a patient with a test row in any included table is test",
                "rows": len(moved),
                "patients": len({p.row["patient_id"] for p in moved}),
            },
        },
        "missing_tables": missing,
    }
    return RowSelection(target, kinds, planned + kept, summary)


def describe_selection(summary: dict) -> list[str]:
    """Human-readable lines of a :func:`select_rows` summary (counts are case-table rows, before any image is read)."""

    def kinds(names: list[str]) -> str:
        return " + ".join(KIND_NAMES[k] for k in names) + " rows"

    lines = []
    t, i = summary["target"], summary["intermediate"]
    if t["kinds"]:
        lines.append(f"target set: {kinds(t['kinds'])}, {t['rows']} table row(s) of {t['patients']} patient(s)")
    else:
        lines.append("target set: none")
    if i["kinds"]:
        by_kind = ", ".join(f"{k} {n}" for k, n in i["rows_by_kind"].items()) or "none"
        lines.append(
            f"intermediate set: {kinds(i['kinds'])}, {i['rows']} table row(s) ({by_kind}) of {i['patients']} patient(s)"
        )
        ex = i["exclusion"]
        if ex["rows"]:
            by_kind = ", ".join(f"{k} {n}" for k, n in ex["rows_by_kind"].items())
            lines.append(
                f"intermediate set: excluded {ex['rows']} row(s) ({by_kind}) of {ex['patients']} patient(s): "
                f"{ex['rule']}"
            )
        elif not t["kinds"]:
            lines.append("intermediate set: nothing excluded (there is no target set)")
        else:
            lines.append(f"intermediate set: nothing excluded (rule: {ex['rule']})")
        mv = i["moved_to_test"]
        if mv["rows"]:
            lines.append(
                f"intermediate set: {mv['rows']} training-table row(s) of {mv['patients']} patient(s) moved to test "
                f"({mv['rule']})"
            )
    else:
        lines.append("intermediate set: none")
    if summary["missing_tables"]:
        lines.append(f"case table(s) not found: {', '.join(summary['missing_tables'])}")
    return lines
