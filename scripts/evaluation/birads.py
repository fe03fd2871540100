"""The radiologists' BI-RADS baseline on CBIS-DDSM, computed from the public case-description tables alone.

CBIS-DDSM (Sawyer-Lee et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.7O02S9CY, CC BY 3.0; Lee et al., Sci Data
4:170177, 2017) gives each abnormality a BI-RADS ``assessment`` and a verified ``pathology``. This module maps
MALIGNANT -> 1 and BENIGN / BENIGN_WITHOUT_CALLBACK -> 0 and reports how well the assessment separates them:
AUC with BI-RADS as an ordinal score (DeLong and patient-clustered bootstrap CIs), and sensitivity, specificity,
PPV, NPV and accuracy of ``BI-RADS >= cut`` (Wilson and patient-clustered bootstrap CIs), per table row (one
image view) and per lesion (both views of a lesion counted once).

Usage::

    python -m scripts.evaluation.birads [--data-dir ../shared/data/cbis-ddsm] [--table calc|mass] [--cut 4]
                                      [--birads0 keep|exclude] [--without-callback benign|exclude]
                                      [--n-boot 2000] [--seed 0] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from scripts.engine.atomic import write_json
from scripts.evaluation.metrics import binary_metrics, bootstrap_auc_ci, delong_ci

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbis-ddsm"
PATHOLOGY_LABELS = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
TABLES = {"calc": "calc_case_description_{split}_set.csv", "mass": "mass_case_description_{split}_set.csv"}
SPLITS = ("train", "test")


def table_path(data_dir: str | os.PathLike, table: str, split: str) -> Path:
    """Path of one CBIS-DDSM case-description table."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; use one of {sorted(TABLES)}")
    return Path(data_dir) / TABLES[table].format(split=split)


def load_case_table(path: str | os.PathLike, split: str = "") -> list[dict]:
    """Rows of one case-description CSV: ``patient, side, view, abnormality, birads, label, pathology, split``."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = ("patient_id", "left or right breast", "image view", "abnormality id", "assessment", "pathology")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for i, r in enumerate(reader):
            pathology = r["pathology"].strip().upper()
            if pathology not in PATHOLOGY_LABELS:
                raise ValueError(f"{path}: unknown pathology {r['pathology']!r} on data row {i + 1}")
            rows.append(
                {
                    "patient": r["patient_id"].strip(),
                    "side": r["left or right breast"].strip().upper(),
                    "view": r["image view"].strip().upper(),
                    "abnormality": r["abnormality id"].strip(),
                    "birads": int(r["assessment"]),
                    "label": PATHOLOGY_LABELS[pathology],
                    "pathology": pathology,
                    "split": split,
                }
            )
    return rows


def lesion_rows(rows: Sequence[dict]) -> tuple[list[dict], dict]:
    """Merge the views of each lesion (key: patient, side, abnormality id; within one split).

    A lesion's BI-RADS is the maximum over its views and its label is malignant if any view's pathology is
    malignant. Returns the lesions and counts of lesions whose views disagree.
    """
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["split"], r["patient"], r["side"], r["abnormality"]), []).append(r)
    lesions = []
    disagree = {"birads": 0, "pathology": 0, "multi_view": 0}
    for (split, patient, side, abn), views in groups.items():
        birads = {v["birads"] for v in views}
        labels = {v["label"] for v in views}
        disagree["birads"] += len(birads) > 1
        disagree["pathology"] += len(labels) > 1
        disagree["multi_view"] += len(views) > 1
        lesions.append(
            {
                "patient": patient,
                "side": side,
                "abnormality": abn,
                "split": split,
                "views": "+".join(sorted(v["view"] for v in views)),
                "birads": max(birads),
                "label": max(labels),
            }
        )
    return lesions, disagree


def baseline_metrics(rows: Sequence[dict], cut: int = 4, n_boot: int = 2000, seed: int = 0) -> dict:
    """BI-RADS AUC (ordinal) and metrics of ``BI-RADS >= cut`` for rows with ``patient``, ``birads``, ``label``."""
    labels = [r["label"] for r in rows]
    birads = [r["birads"] for r in rows]
    patients = [r["patient"] for r in rows]
    counts: dict[str, int] = {}
    for b in sorted(set(birads)):
        counts[str(b)] = birads.count(b)
    auc = delong_ci(labels, birads)
    auc["bootstrap"] = bootstrap_auc_ci(labels, birads, clusters=patients, n_boot=n_boot, seed=seed)
    return {
        "n": len(rows),
        "patients": len(set(patients)),
        "malignant": sum(labels),
        "benign": len(labels) - sum(labels),
        "birads_counts": counts,
        "auc": auc,
        "at_cut": binary_metrics(labels, birads, threshold=cut, clusters=patients, n_boot=n_boot, seed=seed),
    }


def cbis_birads_baseline(
    data_dir: str | os.PathLike | None = None,
    table: str = "calc",
    cut: int = 4,
    n_boot: int = 2000,
    seed: int = 0,
    birads0: str = "keep",
    without_callback: str = "benign",
) -> dict:
    """BI-RADS baseline for train, test and all, per row and per lesion.

    ``birads0="keep"`` uses assessment 0 (incomplete: needs additional imaging) as the lowest ordinal value and a
    negative call; ``"exclude"`` drops those rows before lesions are formed. ``without_callback="exclude"`` drops
    BENIGN_WITHOUT_CALLBACK rows (never worked up), leaving the lesions with a biopsy or follow-up verdict.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    paths = {s: table_path(data_dir, table, s) for s in SPLITS}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"CBIS-DDSM case-description table(s) not found: {', '.join(absent)}. Download the CSVs of the "
            "CBIS-DDSM collection from The Cancer Imaging Archive (doi:10.7937/K9/TCIA.2016.7O02S9CY) and pass "
            "their folder with --data-dir."
        )
    if birads0 not in ("keep", "exclude"):
        raise ValueError("birads0 must be 'keep' or 'exclude'")
    if without_callback not in ("benign", "exclude"):
        raise ValueError("without_callback must be 'benign' or 'exclude'")
    rows_by_split = {s: load_case_table(p, split=s) for s, p in paths.items()}
    n_birads0 = {s: sum(r["birads"] == 0 for r in rows) for s, rows in rows_by_split.items()}
    n_without_callback = {
        s: sum(r["pathology"] == "BENIGN_WITHOUT_CALLBACK" for r in rows) for s, rows in rows_by_split.items()
    }
    if without_callback == "exclude":
        rows_by_split = {
            s: [r for r in rows if r["pathology"] != "BENIGN_WITHOUT_CALLBACK"] for s, rows in rows_by_split.items()
        }
    if birads0 == "exclude":
        rows_by_split = {s: [r for r in rows if r["birads"] != 0] for s, rows in rows_by_split.items()}
    rows_by_split["all"] = [r for s in SPLITS for r in rows_by_split[s]]
    result: dict[str, Any] = {
        "dataset": "CBIS-DDSM",
        "table": table,
        "files": {s: p.name for s, p in paths.items()},
        "cut": cut,
        "birads0": birads0,
        "birads0_rows": n_birads0,
        "without_callback": without_callback,
        "without_callback_rows": n_without_callback,
        "n_boot": n_boot,
        "seed": seed,
        "label_map": dict(PATHOLOGY_LABELS),
        "lesion_rule": (
            "lesion = (split, patient_id, left or right breast, abnormality id); BI-RADS = max over views; "
            "malignant if any view is malignant"
        ),
        "results": {},
    }
    for split, rows in rows_by_split.items():
        lesions, disagree = lesion_rows(rows)
        result["results"][split] = {
            "row": baseline_metrics(rows, cut, n_boot, seed),
            "lesion": {**baseline_metrics(lesions, cut, n_boot, seed), "views_disagree": disagree},
        }
    return result


def _ci(lo: float | None, hi: float | None) -> str:
    return "n/a" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"


def format_table(result: dict) -> str:
    """Plain-text tables of a :func:`cbis_birads_baseline` result."""
    cut = result["cut"]
    lines = [
        f"CBIS-DDSM {result['table']} BI-RADS baseline (assessment as ordinal score; positive call BI-RADS >= {cut}; "
        f"BI-RADS 0 {result['birads0']}; BENIGN_WITHOUT_CALLBACK {result.get('without_callback', 'benign')}; "
        f"{result['n_boot']} patient-clustered bootstrap resamples, seed "
        f"{result['seed']})",
        "",
        f"{'split':<6} {'level':<7} {'n':>5} {'pat':>4} {'mal':>4} {'ben':>4}  {'AUC':>5}  {'DeLong 95% CI':<13}  "
        f"{'patient-boot 95% CI':<13}",
    ]
    for split, by_level in result["results"].items():
        for level, r in by_level.items():
            a = r["auc"]
            lines.append(
                f"{split:<6} {level:<7} {r['n']:>5} {r['patients']:>4} {r['malignant']:>4} {r['benign']:>4}  "
                f"{a['auc']:.3f}  {_ci(a['ci_low'], a['ci_high']):<13}  "
                f"{_ci(a['bootstrap']['ci_low'], a['bootstrap']['ci_high']):<13}"
            )
    lines += ["", f"At BI-RADS >= {cut}: value (patient-clustered bootstrap 95% CI)"]
    names = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
    lines.append(f"{'split':<6} {'level':<7}  " + "  ".join(f"{n.upper() if len(n) == 3 else n:<19}" for n in names))
    for split, by_level in result["results"].items():
        for level, r in by_level.items():
            m = r["at_cut"]
            cells = [f"{m[n]['value']:.3f} ({_ci(*m[n]['boot_ci'])})" for n in names]
            lines.append(f"{split:<6} {level:<7}  " + "  ".join(f"{c:<19}" for c in cells))
    lines += ["", "Lesions whose views disagree (max BI-RADS taken; malignant if any view malignant):"]
    for split, by_level in result["results"].items():
        d = by_level["lesion"]["views_disagree"]
        lines.append(
            f"  {split}: {d['multi_view']} lesions with 2+ views; BI-RADS differs in {d['birads']}, "
            f"pathology in {d['pathology']}"
        )
    n0 = ", ".join(f"{k} {v}" for k, v in result["birads0_rows"].items())
    lines.append(f"BI-RADS 0 (incomplete) rows in the tables: {n0} ({result['birads0']})")
    if "without_callback_rows" in result:
        nw = ", ".join(f"{k} {v}" for k, v in result["without_callback_rows"].items())
        lines.append(f"BENIGN_WITHOUT_CALLBACK rows in the tables: {nw} ({result['without_callback']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with the case-description CSVs")
    ap.add_argument("--table", choices=sorted(TABLES), default="calc", help="calcification or mass tables")
    ap.add_argument("--cut", type=int, default=4, help="BI-RADS >= cut is a positive (malignant) call")
    ap.add_argument("--birads0", choices=("keep", "exclude"), default="keep", help="how to treat assessment 0")
    ap.add_argument(
        "--without-callback",
        choices=("benign", "exclude"),
        default="benign",
        help="BENIGN_WITHOUT_CALLBACK as benign (default) or dropped (lesions with a worked-up verdict only)",
    )
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (patients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the full result as JSON here")
    args = ap.parse_args(argv)
    try:
        result = cbis_birads_baseline(
            args.data_dir, args.table, args.cut, args.n_boot, args.seed, args.birads0, args.without_callback
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        write_json(args.out, result)
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
