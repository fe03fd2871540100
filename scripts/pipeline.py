"""The main job: data -> intermediate stage -> K target folds -> ensemble -> evaluation, as one command.

Every stage is a run of the bundle's own configs (``configs/train.json`` + a stage override, ``configs/evaluate.json``)
through :class:`monai.bundle.ConfigWorkflow`; this module only orders the runs, passes the stage weights on, and
skips runs whose outputs are complete and were made by the same configuration and inputs (a fingerprint file
beside each output).

    python -m scripts.pipeline            # synthetic data, default size (see README for timings)
    python -m scripts.pipeline --quick    # a small run for trying it out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scripts.atomic import file_digest

BUNDLE_DIR = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_DIR / "configs"
logger = logging.getLogger("pipeline")


@dataclass
class Settings:
    """What the main job runs; every field is a command-line flag (``--n-target-train`` for ``n_target_train``)."""

    workdir: str = "."
    dataset_dir: str | None = None
    intermediate_datalist: str | None = None
    target_datalist: str | None = None
    arch: str = "efficientnet_lite0"
    image_size: int = 128
    init: str = "imagenet"
    imagenet_weights: str | None = None
    folds: int = 3
    intermediate: bool = True
    intermediate_task: str = "film"
    n_intermediate: int = 1200
    n_target_train: int = 240
    n_target_test: int = 200
    overlap: float | None = None
    cnr: float | None = None
    epochs_intermediate: int | None = None  # None: configs/stage_intermediate.json's train#trainer#max_epochs
    epochs_target: int | None = None  # None: configs/stage_target.json's
    batch_size: int = 16
    learning_rate: float | None = None  # None: each stage config's own (1e-3 in both)
    backbone_lr_factor: float | None = None  # None: the stage configs' (1.0: the backbone learns at the head's rate)
    amp: bool | None = None  # None: scripts.inferers.default_amp (bf16; fp32 for EfficientNet-Lite on CPU < 224 px)
    seed: int = 0
    threshold_rule: str = "youden"
    threshold_value: float | None = None
    n_boot: int = 1000
    saliency: bool = True
    saliency_method: str = "hirescam"
    extra_overrides: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        """A small setting for trying the pipeline out in a few minutes."""
        base = dict(
            n_intermediate=120, n_target_train=90, n_target_test=60, epochs_intermediate=2, epochs_target=2, n_boot=200
        )
        base.update(kw)
        return cls(**base)


# overrides that only say where files are: their contents enter the fingerprint through ``inputs``, so a moved
# bundle or dataset folder does not make finished stages stale
LOCATION_KEYS = ("bundle_root", "dataset_dir", "datalist", "init_weights", "members", "cases_csv", "output_dir")
# --intermediate-task -> scripts.synthetic task: calcification clusters imaged as digitised screen film, or masses
INTERMEDIATE_TASKS = {"film": "film", "masses": "intermediate"}


def fingerprint(config_files: Sequence[Path], overrides: dict, inputs: Sequence[str | os.PathLike]) -> str:
    """Hash of the config files' text, the overrides (less file locations) and the input files' contents."""
    h = hashlib.sha256()
    for c in config_files:
        h.update(Path(c).read_bytes())
    kept = {k: v for k, v in overrides.items() if k not in LOCATION_KEYS}
    h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for p in inputs:
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _fp_file(output: Path) -> Path:
    return output.with_name(output.name + ".fingerprint")


def is_current(output: Path, fp: str) -> bool:
    """True when ``output`` exists and was recorded as made with fingerprint ``fp``."""
    f = _fp_file(output)
    return output.is_file() and f.is_file() and f.read_text().strip() == fp


def mark_current(output: Path, fp: str) -> None:
    from scripts.atomic import write_text

    write_text(_fp_file(output), fp + "\n")


def run_config(
    config_files: Sequence[Path], overrides: dict, workflow_type: str | None = "train", run_id: str = "run"
) -> None:
    """Run one bundle workflow in this process (``initialize`` -> ``run_id`` -> ``finalize``)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(c) for c in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def run_stage(
    name: str,
    config_files: Sequence[Path],
    overrides: dict,
    output: Path,
    inputs: Sequence[Path],
    **run_kwargs: Any,
) -> tuple[Path, bool]:
    """Run a stage unless ``output`` is current; returns (output, whether it ran)."""
    fp = fingerprint(config_files, overrides, inputs)
    if is_current(output, fp):
        logger.info("[%s] up to date, skipped (%s)", name, output)
        return output, False
    _fp_file(output).unlink(missing_ok=True)
    logger.info("[%s] running ...", name)
    t0 = time.time()
    run_config(config_files, overrides, **run_kwargs)
    if not output.is_file():
        raise RuntimeError(f"[{name}] finished without writing {output}")
    mark_current(output, fp)
    logger.info("[%s] done in %.0f s -> %s", name, time.time() - t0, output)
    return output, True


def prepare_synthetic(s: Settings, dataset_dir: Path) -> tuple[Path, Path]:
    """Generate (or reuse) the synthetic intermediate and target datalists."""
    return prepare_synthetic_intermediate(s, dataset_dir), prepare_synthetic_target(s, dataset_dir)


def prepare_synthetic_target(s: Settings, dataset_dir: Path) -> Path:
    """Generate (or reuse) the synthetic target datalist."""
    from scripts.synthetic import generate_dataset

    target = generate_dataset(
        dataset_dir,
        "target",
        n_train=s.n_target_train,
        n_test=s.n_target_test,
        overlap=s.overlap,
        cnr=s.cnr,
        num_folds=s.folds,
        image_size=s.image_size,
        seed=s.seed,
    )
    return Path(target)


def prepare_synthetic_intermediate(s: Settings, dataset_dir: Path) -> Path:
    """Generate (or reuse) the synthetic intermediate datalist of ``s.intermediate_task``."""
    from scripts.synthetic import generate_dataset

    if s.intermediate_task not in INTERMEDIATE_TASKS:
        raise ValueError(
            f"--intermediate-task must be one of {sorted(INTERMEDIATE_TASKS)}, got {s.intermediate_task!r}"
        )
    task = INTERMEDIATE_TASKS[s.intermediate_task]
    return Path(
        generate_dataset(
            dataset_dir,
            task,
            n_train=s.n_intermediate,
            n_test=0,
            num_folds=s.folds,
            image_size=s.image_size,
            seed=s.seed,
        )
    )


def resolve_datalists(s: Settings, root: Path) -> tuple[Path, Path, bool]:
    """``(intermediate, target, synthetic_target)``: explicit files first, then ``--dataset-dir``, else synthetic.

    A real target without an intermediate datalist gets the synthetic intermediate set (logged), so that an own
    FFDM target can run the full recipe; pass ``--intermediate-datalist`` to use e.g. a prepared CBIS-DDSM set.
    """
    synthetic_dir = root / "data" / "synthetic"
    dataset_dir = Path(s.dataset_dir).resolve() if s.dataset_dir else None
    if s.target_datalist:
        target = Path(s.target_datalist).resolve()
    elif dataset_dir:
        target = find_datalist(dataset_dir, "target")
    else:
        target = prepare_synthetic_target(s, synthetic_dir)
        if s.intermediate_datalist:
            inter = Path(s.intermediate_datalist).resolve()
        else:
            inter = prepare_synthetic_intermediate(s, synthetic_dir) if s.intermediate else None
        return inter, target, True
    if s.intermediate_datalist:
        inter = Path(s.intermediate_datalist).resolve()
    elif dataset_dir and _has_datalist(dataset_dir, "intermediate"):
        inter = find_datalist(dataset_dir, "intermediate")
    elif s.intermediate:
        logger.warning(
            "no intermediate datalist given or found beside the target: stage 1 uses the synthetic %s set "
            "(--intermediate-datalist FILE to use your own, --no-intermediate to skip stage 1)",
            s.intermediate_task,
        )
        inter = prepare_synthetic_intermediate(s, synthetic_dir)
    else:
        inter = None
    return inter, target, False


def _has_datalist(dataset_dir: Path, task: str) -> bool:
    try:
        find_datalist(dataset_dir, task)
    except FileNotFoundError:
        return False
    return True


def find_datalist(dataset_dir: Path, task: str) -> Path:
    """``<dir>/<task>/datalist.json`` (synthetic layout) or ``<dir>/datalist_<task>.json`` (``scripts.prepare``)."""
    for candidate in (dataset_dir / task / "datalist.json", dataset_dir / f"datalist_{task}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{dataset_dir}: no {task} datalist ({task}/datalist.json or datalist_{task}.json); "
        "prepare one with `python -m scripts.prepare` or omit --dataset-dir to use synthetic data"
    )


def run_pipeline(s: Settings) -> Path:
    """Run the whole method; returns the path of ``metrics.json``."""
    from scripts import metrics, report, schema
    from scripts.atomic import write_json
    from scripts.network import imagenet_weights_info, save_ensemble

    t_start = time.time()
    root = Path(s.workdir).resolve()
    results = root / "results"
    models = root / "models"

    # 1. data
    inter_dl, target_dl, synthetic = resolve_datalists(s, root)
    dataset_dir = target_dl.parent if not synthetic else root / "data" / "synthetic"
    logger.info(
        "bundle root: %s; target: %s%s; intermediate: %s", root, target_dl, " (synthetic)" * synthetic, inter_dl
    )
    for dl in (inter_dl, target_dl):
        if dl is not None:
            schema.read_datalist(dl)  # refuses a broken datalist before any training

    common = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "arch": s.arch,
        "image_size": s.image_size,
        "batch_size": s.batch_size,
        **_given(learning_rate=s.learning_rate),
        **_given(amp=s.amp),
        "seed": s.seed,
        **s.extra_overrides,
    }
    train = CONFIGS / "train.json"

    # 2. intermediate stage: ImageNet (or scratch, when chosen) -> intermediate task
    weights = imagenet_weights_info(s.arch, s.imagenet_weights) if s.init == "imagenet" else None
    if weights:
        how = f"ImageNet weights from {weights.source}" + (f" ({weights.file})" if weights.file else "")
    else:
        how = f"{s.init}, as chosen (full d-TL starts from ImageNet: --init imagenet [--imagenet-weights FILE])"
    init_inputs = [Path(weights.file)] if weights and weights.file and Path(weights.file).is_file() else []
    if s.intermediate and inter_dl is None:
        raise ValueError("stage 1 needs an intermediate datalist (--intermediate-datalist FILE) or --no-intermediate")
    if s.intermediate:
        logger.info("stage 1 (intermediate) initialisation: %s", how)
        inter_over = dict(
            common,
            datalist=str(inter_dl),
            init=s.init,
            init_weights=s.imagenet_weights,
            fold=0,
            **_given(**{"train#trainer#max_epochs": s.epochs_intermediate}),
        )
        inter_model, _ = run_stage(
            "intermediate",
            [train, CONFIGS / "stage_intermediate.json"],
            inter_over,
            models / "intermediate" / "model.pt",
            [inter_dl, *init_inputs],
        )
        target_init = {"init_weights": str(inter_model)}
        target_inputs = [target_dl, inter_model]
    else:
        logger.info("no intermediate stage (single transfer / baseline); target initialisation: %s", how)
        target_init = {"init": s.init, "init_weights": s.imagenet_weights}
        target_inputs = [target_dl, *init_inputs]

    # 3. target stage: one member per fold, each initialised from the intermediate model
    members = []
    for k in range(s.folds):
        over = dict(
            common,
            datalist=str(target_dl),
            fold=k,
            **_given(backbone_lr_factor=s.backbone_lr_factor),
            **target_init,
            **_given(**{"train#trainer#max_epochs": s.epochs_target}),
        )
        m, _ = run_stage(
            f"target fold {k + 1}/{s.folds}",
            [train, CONFIGS / "stage_target.json"],
            over,
            models / f"target_fold{k}" / "model.pt",
            target_inputs,
        )
        members.append(m)
    ensemble_file = models / "model.pt"
    fp = fingerprint([], {"arch": s.arch}, members)
    if not is_current(ensemble_file, fp):
        save_ensemble(members, ensemble_file, arch=s.arch)
        mark_current(ensemble_file, fp)
        logger.info("ensemble of %d members -> %s", len(members), ensemble_file)

    # 4. out-of-fold validation predictions (threshold) and test predictions (metrics)
    evaluate = [train, CONFIGS / "evaluate.json"]
    eval_common = dict(common, datalist=str(target_dl), num_folds=s.folds)
    val_csvs = []
    for k, m in enumerate(members):
        csv = results / f"cases_validation_fold{k}.csv"
        over = dict(eval_common, eval_split="validation", eval_fold=k, members=[str(m)], cases_csv=str(csv))
        run_stage(f"validation predictions fold {k + 1}", evaluate, over, csv, [target_dl, m])
        val_csvs.append(csv)
    test_csv = results / "cases_test.csv"
    over = dict(eval_common, eval_split="test", members=[str(m) for m in members], cases_csv=str(test_csv))
    run_stage("test predictions", evaluate, over, test_csv, [target_dl, *members])

    # 5. metrics and report
    val_rows = [r for c in val_csvs for r in metrics.read_cases_csv(c)]
    for r in val_rows:  # out-of-fold rows carry one member: its probability is the case's score
        r.pop("member_0", None)
    test_rows = metrics.read_cases_csv(test_csv)
    metrics.write_cases_csv(results / "cases_validation.csv", val_rows)
    target = schema.read_datalist(target_dl, check_files=False)
    source = target.get("metadata", {}).get("source", "unknown")
    summary = metrics.summarize(
        test_rows,
        val_rows,
        threshold_rule=s.threshold_rule,
        threshold_value=s.threshold_value,
        n_boot=s.n_boot,
        seed=s.seed,
        data_source=source,
    )
    summary["settings"] = {k: v for k, v in asdict(s).items() if k != "extra_overrides"}
    summary["network"] = {
        "arch": s.arch,
        "init": s.init,
        "imagenet_weights": weights.to_dict() if weights else None,
        "intermediate_stage": bool(s.intermediate),
    }
    summary["data"] = {
        "source": source,
        "target_datalist": str(target_dl),
        "intermediate_datalist": str(inter_dl) if inter_dl else None,
        "intermediate_source": _datalist_source(inter_dl),
    }

    # 6. Grad-CAM saliency of the ensemble on the test split, at the chosen operating threshold
    if s.saliency:
        saliency_dir = results / "saliency"
        over = dict(
            common,
            datalist=str(target_dl),
            split="test",
            num_members=s.folds,
            output_dir=str(results),
            **{"saliency#threshold": summary["threshold"]["threshold"], "saliency#method": s.saliency_method},
        )
        loc_file, _ = run_stage(
            "saliency",
            [CONFIGS / "inference.json", CONFIGS / "saliency.json"],
            over,
            saliency_dir / "localisation.json",
            [target_dl, ensemble_file],
            workflow_type=None,
            run_id="saliency",
        )
        loc = json.loads(loc_file.read_text())
        summary["saliency"] = {k: loc[k] for k in ("settings", "counts", "table", "randomisation") if k in loc}

    summary["elapsed_s"] = round(time.time() - t_start, 1)
    metrics_file = write_json(results / "metrics.json", summary)
    gallery = results / "saliency" / "gallery.png"
    report.write_report(
        results / "report.html",
        summary,
        test_rows,
        val_rows,
        dataset_summary=dataset_summary(target, inter_dl),
        gallery_png=str(gallery) if gallery.is_file() else None,
    )
    _print_headline(summary, results)
    return metrics_file


def _given(**overrides: Any) -> dict:
    """The overrides whose value is not ``None`` (``None``: keep the config's own value)."""
    return {k: v for k, v in overrides.items() if v is not None}


def dataset_summary(target: dict, inter_dl: Path | None) -> dict:
    """Cases per class and split, and patients, for the report."""
    from scripts import schema

    out = {"source": target.get("metadata", {}).get("source"), "splits": {}}
    names = schema.class_names(target)
    for split in ("training", "test"):
        items = target.get(split, [])
        out["splits"][split] = {
            "cases": len(items),
            "patients": len({it["patient"] for it in items}),
            **{name: sum(1 for it in items if it["label"] == i) for i, name in enumerate(names)},
        }
    if inter_dl is not None:
        inter = schema.read_datalist(inter_dl, check_files=False)
        meta = inter.get("metadata", {})
        out["intermediate"] = {
            "cases": len(inter.get("training", [])),
            "classes": schema.class_names(inter),
            "task": meta.get("task"),
            "source": meta.get("source"),
        }
    return out


def _datalist_source(path: Path | None) -> str | None:
    """``metadata.source`` and ``task`` of a datalist, e.g. ``"synthetic film"``."""
    if path is None:
        return None
    from scripts import schema

    meta = schema.read_datalist(path, check_files=False).get("metadata", {})
    return " ".join(str(x) for x in (meta.get("source"), meta.get("task")) if x)


def _print_localisation(saliency: dict) -> None:
    """One line per localisation metric of the saliency maps on all masked test ROIs: mean [CI] vs chance."""
    table, st = (saliency.get("table") or {}).get("all") or {}, saliency.get("settings") or {}
    if not table.get("n"):
        return
    print(f"saliency {st.get('method')} at {st.get('layer')} ({table['n']} ROIs with masks):")
    for key, name, d in (("pointing_game", "pointing game", 3), ("energy_in_mask", "energy in mask", 4)):
        lo, hi = table[f"{key}_ci"]
        verdict = "above chance" if table[f"{key}_above_chance"] else "NOT above chance"
        chance = table[key + "_chance"]
        print(f"  {name:15s} {table[key]:.{d}f} (95% CI {lo:.{d}f}-{hi:.{d}f}), chance {chance:.{d}f}: {verdict}")
    if table.get("pointing_game_centre") is not None:
        print(
            f"  {'centre prior':15s} {table['pointing_game_centre']:.3f} (pointing game of a map fixed at the ROI centre)"
        )


def _print_headline(summary: dict, results: Path) -> None:
    auc, thr, m = summary["auc"], summary["threshold"], summary["metrics"]
    print("\n=== ensemble on the test split ===", flush=True)
    print(f"AUC {auc['auc']:.3f} (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f}, DeLong)")
    print(f"threshold {thr['threshold']:.3f}: {thr.get('description', thr['rule'])}")
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        v = m.get(name, {})
        if isinstance(v, dict) and v.get("value") is not None:
            print(f"{name:12s} {v['value']:.3f}")
    net = summary.get("network") or {}
    w = net.get("imagenet_weights")
    if w:
        sha = f", SHA-256 {w['sha256'][:12]}..." if w.get("sha256") else ""
        print(f"network {net.get('arch')}: ImageNet weights from {w['source']}{sha}")
    else:
        print(f"network {net.get('arch')}: initialised {net.get('init')}")
    _print_localisation(summary.get("saliency") or {})
    if summary.get("data", {}).get("source") == "synthetic":
        print("NOTE: synthetic data; these numbers are not clinical evidence.")
    if summary.get("settings", {}).get("init") == "scratch":
        print(
            "NOTE: stage 1 started from random weights, not ImageNet (the full recipe); see README.md, "
            "'What to expect from the default run'."
        )
    print(f"results: {results}/metrics.json, {results}/cases_test.csv, {results}/report.html", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m scripts.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and 2 epochs per stage, for trying it out")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        if name == "extra_overrides":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or name == "amp":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = type(value) if value is not None else str
            if name in ("threshold_value", "overlap", "cnr", "learning_rate", "backbone_lr_factor"):
                typ = float
            elif name in ("epochs_intermediate", "epochs_target"):
                typ = int
            p.add_argument(flag, type=typ, default=None)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ID=JSON",
        help="extra config override, e.g. --override 'train#dataloader#num_workers=2' (repeatable)",
    )
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k not in ("quick", "override")}
    extra = {}
    for o in a.override:
        key, _, val = o.partition("=")
        try:
            extra[key] = json.loads(val)
        except json.JSONDecodeError:
            extra[key] = val
    given["extra_overrides"] = extra
    if given.get("init") not in (None, "scratch", "imagenet"):
        p.error("--init must be 'scratch' or 'imagenet'")
    if given.get("intermediate_task") not in (None, *INTERMEDIATE_TASKS):
        p.error(f"--intermediate-task must be one of {sorted(INTERMEDIATE_TASKS)}")
    return Settings.quick(**given) if a.quick else Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    s = parse_args(argv)
    try:
        run_pipeline(s)
    except Exception as e:  # a clear last line; the traceback above has the details
        logger.exception("pipeline failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
