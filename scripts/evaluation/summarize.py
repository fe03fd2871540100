"""The evaluation's last steps, as ``configs/summarize.json`` runs them: case tables -> ``metrics.json`` -> report.

``run``: the out-of-fold validation tables (one per fold, from ``configs/evaluate.json``) are joined into
``cases_validation.csv``; the operating threshold is chosen on them; the test table gives every metric with its CI
(:func:`scripts.evaluation.metrics.summarize`); what the network was trained from and on which data is recorded beside them.

``report``: ``report.html`` from ``metrics.json``, the case tables and, when the saliency step has run, its
``localisation.json`` and gallery.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from scripts.data import schema
from scripts.engine.atomic import write_json
from scripts.evaluation import metrics, report

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike


def network_info(arch: str, init: str, imagenet_weights: str | None, intermediate_stage: bool) -> dict:
    """What the members were trained from: backbone, stage-1 initialisation and the ImageNet weights' source."""
    from scripts.model.network import imagenet_weights_info

    weights = imagenet_weights_info(arch, imagenet_weights) if init == "imagenet" else None
    return {
        "arch": arch,
        "init": init,
        "imagenet_weights": weights.to_dict() if weights else None,
        "intermediate_stage": bool(intermediate_stage),
    }


def validation_cases(results_dir: PathLike, num_folds: int) -> list[dict]:
    """Join ``cases_validation_fold<k>.csv`` (k < ``num_folds``) into ``cases_validation.csv``; returns its rows.

    Each out-of-fold row was scored by one member: its probability is the case's score (the ``member_0`` column
    is dropped)."""
    results_dir = Path(results_dir)
    rows = []
    for k in range(num_folds):
        for r in metrics.read_cases_csv(results_dir / f"cases_validation_fold{k}.csv"):
            r.pop("member_0", None)
            rows.append(r)
    metrics.write_cases_csv(results_dir / "cases_validation.csv", rows)
    return rows


def datalist_source(path: PathLike | None) -> str | None:
    """``metadata.source`` and ``task`` of a datalist, e.g. ``"synthetic film"``; ``None`` for no datalist."""
    if path is None or not Path(path).is_file():
        return None
    meta = schema.read_datalist(path, check_files=False).get("metadata", {})
    return " ".join(str(x) for x in (meta.get("source"), meta.get("task")) if x)


def write_metrics(
    results_dir: PathLike,
    datalist: PathLike,
    intermediate_datalist: PathLike | None,
    network: dict,
    threshold_rule: str = "youden",
    threshold_value: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Path:
    """``<results_dir>/metrics.json`` from the case tables of the ``datalist``'s folds and test split."""
    results_dir = Path(results_dir)
    val_rows = validation_cases(results_dir, schema.num_folds(datalist))
    test_rows = metrics.read_cases_csv(results_dir / "cases_test.csv")
    target = schema.read_datalist(datalist, check_files=False)
    source = target.get("metadata", {}).get("source", "unknown")
    summary = metrics.summarize(
        test_rows,
        val_rows,
        threshold_rule=threshold_rule,
        threshold_value=threshold_value,
        n_boot=n_boot,
        seed=seed,
        data_source=source,
        class_names=schema.class_names(target),
        reference_standard=schema.reference_standard(target),
    )
    summary["network"] = network
    summary["data"] = {
        "source": source,
        "target_datalist": str(datalist),
        "intermediate_datalist": str(intermediate_datalist) if network.get("intermediate_stage") else None,
        "intermediate_source": datalist_source(intermediate_datalist) if network.get("intermediate_stage") else None,
    }
    out = write_json(results_dir / "metrics.json", summary)
    logger.info("AUC %.3f on %d test cases -> %s", summary["auc"]["auc"], len(test_rows), out)
    return out


def dataset_summary(target: dict, intermediate_datalist: PathLike | None) -> dict:
    """Cases per class and split, and patients, of the target datalist (and the intermediate set's size)."""
    out: dict[str, Any] = {"source": target.get("metadata", {}).get("source"), "splits": {}}
    names = schema.class_names(target)
    for split in ("training", "test"):
        items = target.get(split, [])
        out["splits"][split] = {
            "cases": len(items),
            "patients": len({it["patient"] for it in items}),
            **{name: sum(1 for it in items if it["label"] == i) for i, name in enumerate(names)},
        }
    if intermediate_datalist is not None and Path(intermediate_datalist).is_file():
        inter = schema.read_datalist(intermediate_datalist, check_files=False)
        meta = inter.get("metadata", {})
        out["intermediate"] = {
            "cases": len(inter.get("training", [])),
            "classes": schema.class_names(inter),
            "task": meta.get("task"),
            "source": meta.get("source"),
        }
    return out


def read_localisation(results_dir: PathLike) -> dict | None:
    """The saliency step's summary (``saliency/localisation.json``: settings, counts, table, randomisation)."""
    path = Path(results_dir) / "saliency" / "localisation.json"
    if not path.is_file():
        return None
    loc = json.loads(path.read_text())
    return {k: loc[k] for k in ("settings", "counts", "table", "randomisation") if k in loc}


def write_report(results_dir: PathLike, datalist: PathLike) -> Path:
    """``<results_dir>/report.html`` from ``metrics.json``, the case tables and the saliency outputs if present."""
    results_dir = Path(results_dir)
    metrics_file = results_dir / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: run configs/summarize.json (run id 'run') first")
    summary = json.loads(metrics_file.read_text())
    saliency = read_localisation(results_dir)
    if saliency:
        summary["saliency"] = saliency
    gallery = results_dir / "saliency" / "gallery.png"
    inter = (summary.get("data") or {}).get("intermediate_datalist")
    return report.write_report(
        results_dir / "report.html",
        summary,
        metrics.read_cases_csv(results_dir / "cases_test.csv"),
        metrics.read_cases_csv(results_dir / "cases_validation.csv"),
        dataset_summary=dataset_summary(schema.read_datalist(datalist, check_files=False), inter),
        gallery_png=str(gallery) if gallery.is_file() else None,
    )
