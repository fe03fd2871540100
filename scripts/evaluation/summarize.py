"""The evaluation's last steps, as ``configs/summarize.json`` runs them: case tables -> ``metrics.json`` -> report.

``operating_point``: the out-of-fold validation tables (one per fold, from ``configs/evaluate.json``) are joined into
``cases_validation.csv``; the calibration and the decision threshold are chosen on them and saved beside the
ensemble (:mod:`scripts.evaluation.operating_point`, ``models/operating_point.json``).

``run``: the test table (scored by the calibrated ensemble) gives every metric with its CI at that operating point
(:func:`scripts.evaluation.metrics.summarize`); what the network was trained from and on which data is recorded
beside them.

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
from scripts.model.calibration import read_operating_point
from scripts.model.network import imagenet_weights_info

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike


def network_info(arch: str, init: str, imagenet_weights: str | None, intermediate_stage: bool) -> dict:
    """What the members were trained from: backbone, stage-1 initialisation and the ImageNet weights' source."""
    weights = imagenet_weights_info(arch, imagenet_weights) if init == "imagenet" else None
    return {
        "arch": arch,
        "init": init,
        "imagenet_weights": weights.to_dict() if weights else None,
        "intermediate_stage": bool(intermediate_stage),
    }


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
    model_file: PathLike,
    n_boot: int = 1000,
    seed: int = 0,
) -> Path:
    """``<results_dir>/metrics.json`` from the test case table at the operating point saved beside ``model_file``
    (``cases_validation.csv``, joined by the operating-point step, gives the validation AUC)."""
    results_dir = Path(results_dir)
    operating_point = read_operating_point(model_file, required=True)
    val_rows = metrics.read_cases_csv(results_dir / "cases_validation.csv")
    test_rows = metrics.read_cases_csv(results_dir / "cases_test.csv")
    target = schema.read_datalist(datalist, check_files=False)
    source = target.get("metadata", {}).get("source", "unknown")
    summary = metrics.summarize(
        test_rows,
        val_rows,
        n_boot=n_boot,
        seed=seed,
        data_source=source,
        class_names=schema.class_names(target),
        reference_standard=schema.reference_standard(target),
        operating_point=operating_point,
        reader=schema.reader_label(target),
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
