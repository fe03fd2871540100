"""The main job: the bundle's config runs in order, each skipped while its output is current.

Every step (:class:`scripts.engine.steps.Step`) is one ``python -m monai.bundle run`` of files in ``configs/``, run here
in-process; :func:`plan` lists them, ``--dry-run`` prints them as commands, and README.md ("The pipeline, as
configs") gives the default sequence. This module only chooses the configs,
their order and the overrides that the command-line flags give; each step's fingerprint
(:mod:`scripts.engine.fingerprint`: its config files, overrides and input files) decides whether it reruns, and the log says why.

    python -m scripts.main_job            # synthetic data, default size (see README for timings)
    python -m scripts.main_job --quick    # a small run for trying it out
    python -m scripts.main_job --dry-run  # the bundle commands it would run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import monai
import torch

from scripts.data import schema
from scripts.engine.atomic import write_json
from scripts.engine.steps import Step, run_config, run_step
from scripts.evaluation.headline import print_headline
from scripts.evaluation.metrics import THRESHOLD_RULES
from scripts.evaluation.summarize import read_localisation
from scripts.model.calibration import OPERATING_POINT_FILE
from scripts.model.inferers import native_cpu_bf16, precision_choice

BUNDLE_DIR = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_DIR / "configs"
logger = logging.getLogger("main_job")


def config_default(config: str, key: str) -> Any:
    """The literal value of ``key`` (``a#b`` for nested) in ``configs/<config>``: the one place a default lives."""
    value: Any = json.loads((CONFIGS / config).read_text())
    for part in key.split("#"):
        value = value[part]
    return value


def _default(config: str, key: str) -> Any:
    return field(default_factory=lambda: config_default(config, key))


@dataclass
class Settings:
    """What the main job runs; every field is a command-line flag (``--n-target-train`` for ``n_target_train``).

    Defaults are read from the configs; ``None`` keeps each stage config's own value (e.g. its epochs)."""

    workdir: str = "."
    dataset_dir: str | None = None
    intermediate_datalist: str | None = None
    target_datalist: str | None = None
    arch: str = _default("train.json", "arch")
    image_size: int = _default("train.json", "image_size")
    init: str = _default("stage_intermediate.json", "init")
    imagenet_weights: str | None = None
    folds: int = _default("synthetic.json", "num_folds")
    intermediate: bool = True
    intermediate_task: str = "film"
    n_intermediate: int = _default("synthetic.json", "intermediate_data#n_train")
    n_target_train: int = _default("synthetic.json", "target_data#n_train")
    n_target_test: int = _default("synthetic.json", "target_data#n_test")
    overlap: float | None = None
    cnr: float | None = None
    epochs_intermediate: int | None = None  # None: configs/stage_intermediate.json's train#trainer#max_epochs
    epochs_target: int | None = None  # None: configs/stage_target.json's
    batch_size: int = _default("train.json", "batch_size")
    learning_rate: float | None = None  # None: each stage config's own
    backbone_lr_factor: float | None = None  # None: the stage configs'
    amp: bool | None = (
        None  # None: scripts.model.inferers.default_amp (bf16 on CUDA and on CPUs with native bf16, else fp32)
    )
    seed: int = _default("train.json", "seed")
    threshold_rule: str = _default("summarize.json", "threshold_rule")
    threshold_value: float | None = None
    n_boot: int = _default("summarize.json", "n_boot")
    saliency: bool = True
    saliency_method: str = _default("saliency.json", "saliency#method")
    config: tuple[str, ...] = ()  # overlays configs/<name>.json, merged after each step's own configs
    extra_overrides: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        """A small setting for trying the pipeline out in a few minutes."""
        base = dict(
            n_intermediate=120, n_target_train=90, n_target_test=60, epochs_intermediate=2, epochs_target=2, n_boot=200
        )
        base.update(kw)
        return cls(**base)


# --intermediate-task -> scripts.data.synthetic task: calcification clusters imaged as digitised screen film, or masses
INTERMEDIATE_TASKS = {"film": "film", "masses": "intermediate"}


def _given(**overrides: Any) -> dict:
    """The overrides whose value is not ``None`` (``None``: keep the config's own value)."""
    return {k: v for k, v in overrides.items() if v is not None}


def data_steps(
    s: Settings, root: Path, synthetic_dir: Path | None = None
) -> tuple[list[Step], Path | None, Path, bool]:
    """Where the data come from: ``(steps that make synthetic data, intermediate, target, synthetic target)``.

    Explicit files first, then ``--dataset-dir``, else the synthetic generator (``configs/synthetic.json``). A real
    target without an intermediate datalist gets the synthetic intermediate set (logged)."""
    if s.intermediate_task not in INTERMEDIATE_TASKS:
        raise ValueError(
            f"--intermediate-task must be one of {sorted(INTERMEDIATE_TASKS)}, got {s.intermediate_task!r}"
        )
    synthetic_dir = synthetic_dir or root / "data" / "synthetic"
    task = INTERMEDIATE_TASKS[s.intermediate_task]
    over = {
        "bundle_root": str(root),
        "dataset_dir": str(synthetic_dir),
        "image_size": s.image_size,
        "seed": s.seed,
        "num_folds": s.folds,
        "target_data#n_train": s.n_target_train,
        "target_data#n_test": s.n_target_test,
        **_given(**{"target_data#overlap": s.overlap, "target_data#cnr": s.cnr}),
        "intermediate_data#task": task,
        "intermediate_data#n_train": s.n_intermediate,
    }
    configs = ("train.json", "synthetic.json")
    make_target = Step(
        "synthetic target data", configs, over, synthetic_dir / "target" / "datalist.json", {}, "make_target", True
    )
    make_inter = Step(
        f"synthetic {task} data", configs, over, synthetic_dir / task / "datalist.json", {}, "make_intermediate", True
    )
    dataset_dir = Path(s.dataset_dir).resolve() if s.dataset_dir else None
    steps = []
    if s.target_datalist or dataset_dir:
        target = Path(s.target_datalist).resolve() if s.target_datalist else find_datalist(dataset_dir, "target")
        synthetic = False
    else:
        steps.append(make_target)
        target, synthetic = make_target.output, True
    inter = None
    if s.intermediate_datalist:
        inter = Path(s.intermediate_datalist).resolve()
    elif s.intermediate:
        if dataset_dir and _has_datalist(dataset_dir, "intermediate"):
            inter = find_datalist(dataset_dir, "intermediate")
        else:
            if not synthetic:
                logger.warning(
                    "no intermediate datalist given or found beside the target: stage 1 uses the synthetic %s set "
                    "(--intermediate-datalist FILE to use your own, --no-intermediate to skip stage 1)",
                    s.intermediate_task,
                )
            steps.append(make_inter)
            inter = make_inter.output
    return steps, inter, target, synthetic


def prepare_synthetic(s: Settings, dataset_dir: Path) -> tuple[Path, Path]:
    """Generate (or reuse) the synthetic intermediate and target datalists under ``dataset_dir``."""
    no_files = Settings(**{**asdict(s), "dataset_dir": None, "target_datalist": None, "intermediate_datalist": None})
    steps, inter, target, _ = data_steps(no_files, Path(s.workdir).resolve(), synthetic_dir=dataset_dir)
    for step in steps:
        run_config(step.configs, step.overrides, step.run_id)
    return inter, target


def _has_datalist(dataset_dir: Path, task: str) -> bool:
    try:
        find_datalist(dataset_dir, task)
    except FileNotFoundError:
        return False
    return True


def find_datalist(dataset_dir: Path, task: str) -> Path:
    """``<dir>/<task>/datalist.json`` (synthetic layout) or ``<dir>/datalist_<task>.json`` (``scripts.data.prepare``)."""
    for candidate in (dataset_dir / task / "datalist.json", dataset_dir / f"datalist_{task}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{dataset_dir}: no {task} datalist ({task}/datalist.json or datalist_{task}.json); "
        "prepare one with `python -m scripts.data.prepare` or omit --dataset-dir to use synthetic data"
    )


def plan(s: Settings, data: tuple[list[Step], Path | None, Path, bool]) -> list[Step]:
    """Every step of the main job after the data, in order, with the overrides ``s`` gives: the training stages
    (:func:`training_steps`), then the ensemble, its operating point and the evaluation (:func:`evaluation_steps`),
    each with the ``--config`` overlays merged last."""
    root = Path(s.workdir).resolve()
    _, inter_dl, target_dl, synthetic = data
    dataset_dir = root / "data" / "synthetic" if synthetic else target_dl.parent
    common = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "datalist": str(target_dl),
        "arch": s.arch,
        "image_size": s.image_size,
        "batch_size": s.batch_size,
        "seed": s.seed,
        **_given(learning_rate=s.learning_rate, amp=s.amp),
        **s.extra_overrides,
    }
    num_folds = s.folds if synthetic else schema.num_folds(target_dl)
    steps, members = training_steps(s, common, root, inter_dl, target_dl, num_folds)
    steps += evaluation_steps(s, common, root, inter_dl, target_dl, members)
    overlays = tuple(f"{name}.json" for name in s.config)
    return [dataclasses.replace(step, configs=step.configs + overlays) for step in steps]


def training_steps(
    s: Settings, common: dict, root: Path, inter_dl: Path | None, target_dl: Path, num_folds: int
) -> tuple[list[Step], list[Path]]:
    """Stage 1 on the intermediate task (unless ``--no-intermediate``) and the ``num_folds`` target folds, each
    initialised from the stage-1 model (or from ``--init`` without stage 1). Returns the steps and the folds' weight
    files (the ensemble's members).

    Raises:
        ValueError: stage 1 asked for without an intermediate datalist.
    """
    models = root / "models"
    steps = []
    init = {"init": s.init, **_given(init_weights=s.imagenet_weights)}
    if s.intermediate:
        if inter_dl is None:
            raise ValueError(
                "stage 1 needs an intermediate datalist (--intermediate-datalist FILE) or --no-intermediate"
            )
        over = dict(
            common, datalist=str(inter_dl), **init, **_given(**{"train#trainer#max_epochs": s.epochs_intermediate})
        )
        stage1 = models / "intermediate" / "model.pt"
        inputs = {"datalist": inter_dl, "init_weights": s.imagenet_weights}
        steps.append(
            Step("intermediate", ("train.json", "stage_intermediate.json", "resilience.json"), over, stage1, inputs)
        )
        target_init, init_file = {"init_weights": str(stage1)}, stage1
    else:  # init_weights given even when None: stage_target.json's default is the stage-1 model
        target_init, init_file = {"init": s.init, "init_weights": s.imagenet_weights}, s.imagenet_weights
    members = [models / f"target_fold{k}" / "model.pt" for k in range(num_folds)]
    for k, member in enumerate(members):
        over = dict(
            common,
            fold=k,
            **_given(backbone_lr_factor=s.backbone_lr_factor),
            **target_init,
            **_given(**{"train#trainer#max_epochs": s.epochs_target}),
        )
        inputs = {"datalist": target_dl, "init_weights": init_file}
        configs = ("train.json", "stage_target.json", "resilience.json")
        steps.append(Step(f"target fold {k + 1}/{num_folds}", configs, over, member, inputs))
    return steps, members


def evaluation_steps(
    s: Settings, common: dict, root: Path, inter_dl: Path | None, target_dl: Path, members: Sequence[Path]
) -> list[Step]:
    """The ensemble of ``members`` and its operating point (:func:`ensemble_steps`), the test predictions, the
    metrics, the saliency maps (unless ``--no-saliency``) and the report."""
    models, results = root / "models", root / "results"
    member_inputs = {f"member {k}": m for k, m in enumerate(members)}
    ensemble, operating_point = models / "model.pt", models / OPERATING_POINT_FILE
    summarize = ("train.json", "summarize.json")
    over = dict(
        common,
        init=s.init,
        intermediate_stage=bool(s.intermediate),
        threshold_rule=s.threshold_rule,
        n_boot=s.n_boot,
        **_given(init_weights=s.imagenet_weights, threshold_value=s.threshold_value),
        **_given(intermediate_datalist=str(inter_dl) if inter_dl else None),
    )
    steps, csvs = ensemble_steps(common, over, members, target_dl, root)
    evaluate = ("train.json", "evaluate.json")
    deployed = {"ensemble": ensemble, "operating point": operating_point}
    csvs["test"] = results / "cases_test.csv"
    test = dict(common, eval_split="test")
    steps.append(
        Step("test predictions", evaluate, test, csvs["test"], {"datalist": target_dl, **member_inputs, **deployed})
    )
    metrics_file = results / "metrics.json"
    steps.append(Step("metrics", summarize, over, metrics_file, {"datalist": target_dl, **csvs, **deployed}))
    report_inputs = {"metrics": metrics_file}
    if s.saliency:
        loc = results / "saliency" / "localisation.json"
        sal = dict(
            {k: v for k, v in common.items() if k not in ("batch_size", "seed")},  # not inference.json's to set
            split="test",
            output_dir=str(results),
            **{"saliency#method": s.saliency_method},
        )
        inputs = {"datalist": target_dl, **deployed}
        steps.append(Step("saliency", ("inference.json", "saliency.json"), sal, loc, inputs, run_id="saliency"))
        report_inputs["localisation"] = loc
    steps.append(Step("report", summarize, over, results / "report.html", report_inputs, run_id="report"))
    return steps


def ensemble_steps(
    common: dict, summarize_over: dict, members: Sequence[Path], target_dl: Path, root: Path
) -> tuple[list[Step], dict[str, Path]]:
    """The steps between the folds' training and the test: the ensemble of the fold ``members``
    (``<root>/models/model.pt``), each member's out-of-fold validation predictions and the operating point chosen on
    them (``models/operating_point.json``). Returns the steps and the validation tables by role.

    Args:
        common: the overrides every step takes (``bundle_root``, ``datalist``, ``arch``, ...).
        summarize_over: ``common`` plus the operating point's settings (``threshold_rule``, ``n_boot``, ...).
        members: the fold members' weight files, fold by fold.
        target_dl: the target datalist, whose folds the members were trained on.
        root: the bundle root the steps write under.
    """
    models, results = root / "models", root / "results"
    member_inputs = {f"member {k}": m for k, m in enumerate(members)}
    ensemble = models / "model.pt"
    steps = [Step("ensemble", ("train.json", "ensemble.json"), common, ensemble, member_inputs)]
    csvs = {}
    for k, member in enumerate(members):
        csv = results / f"cases_validation_fold{k}.csv"
        over = dict(common, eval_split="validation", eval_fold=k)
        inputs = {"datalist": target_dl, "member": member}
        steps.append(Step(f"validation predictions fold {k + 1}", ("train.json", "evaluate.json"), over, csv, inputs))
        csvs[f"validation {k}"] = csv
    op_inputs = {"datalist": target_dl, "ensemble": ensemble, **csvs}
    summarize = ("train.json", "summarize.json")
    operating_point = models / OPERATING_POINT_FILE
    steps.append(
        Step("operating point", summarize, summarize_over, operating_point, op_inputs, run_id="operating_point")
    )
    return steps, csvs


def read_overlay(name: str) -> dict:
    """``configs/<name>.json``, a config overlay of top-level settings (e.g. ``paper_resnext``)."""
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise ValueError(f"--config {name}: {path} not found (configs: {', '.join(known)})")
    overlay = json.loads(path.read_text())
    nested = [k for k in overlay if "#" in k]
    if nested:
        raise ValueError(f"{path}: an overlay sets top-level ids only (every step's configs must have them): {nested}")
    return overlay


def environment() -> dict:
    """What the figures depend on beyond code and data: library versions and the floating-point kernels in use.

    Weights are reproducible bit for bit on the same CPU capability and thread count, not across them (AVX2 and
    AVX-512 kernels round differently; docs/README.md gives the measured difference)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        # variables that hold the kernels below what the CPU offers (e.g. AVX2 on an AVX-512 machine)
        "kernel_limits": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_cpu_bf16": dict(zip(("native", "reason"), native_cpu_bf16())),
    }


def precision(s: Settings) -> dict:
    """The precision the training stages ran in: ``--amp`` when given, else the machine's default and why."""
    if s.amp is not None:
        return {"amp": bool(s.amp), "reason": "--amp given"}
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return precision_choice(s.arch, device, s.image_size)


def run_pipeline(s: Settings) -> Path:
    """Run the whole method; returns the path of ``metrics.json``."""
    t_start = time.time()
    root = Path(s.workdir).resolve()
    data = data_steps(s, root)
    log = [run_step(step) for step in data[0]]
    _, inter_dl, target_dl, synthetic = data
    logger.info(
        "bundle root: %s; target: %s%s; intermediate: %s", root, target_dl, " (synthetic)" * synthetic, inter_dl
    )
    for dl in (inter_dl, target_dl):
        if dl is not None:
            schema.read_datalist(dl)  # refuses a broken datalist before any training
    steps = plan(s, data)
    log += [run_step(step) for step in steps]
    results = root / "results"
    write_json(
        results / "main_job.json",
        {
            "settings": {k: v for k, v in asdict(s).items() if k != "extra_overrides"},
            "extra_overrides": s.extra_overrides,
            "steps": log,
            "elapsed_s": round(time.time() - t_start, 1),
            "environment": environment(),
            "precision": precision(s),
        },
    )
    metrics_file = results / "metrics.json"
    print_headline(json.loads(metrics_file.read_text()), read_localisation(results) or {}, results)
    return metrics_file


def config_ids() -> set[str]:
    """Every id of the bundle's configs (``configs/*.json``; nested ones as ``a#b``)."""
    ids: set[str] = set()

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                key = key.lstrip("+")  # a "+key" merge in an overlay names the key it extends
                ids.add(prefix + key)
                walk(item, prefix + key + "#")

    for path in CONFIGS.glob("*.json"):
        walk(json.loads(path.read_text()), "")
    return ids


def config_overrides(words: Sequence[str]) -> dict:
    """``--<config id> <value>`` pairs (as ``monai.bundle run`` takes them) as overrides; a value is read as JSON,
    else kept as text.

    Raises:
        ValueError: a word that is not such a pair, or an id no config has (a mistyped flag is not passed on).
    """
    known = config_ids()
    out: dict = {}
    if len(words) % 2:
        raise ValueError(f"unrecognised arguments: {' '.join(words)} (config overrides are --<id> <value> pairs)")
    for flag, value in zip(words[::2], words[1::2]):
        key = flag[2:] if flag.startswith("--") else ""
        parts = key.split("#")
        n = next((n for n in range(len(parts), 0, -1) if "#".join(parts[:n]) in known), 0)
        if not key or n == 0 or (n < len(parts) and not parts[n].isdigit()):  # past a known id: only a list index
            raise ValueError(
                f"unrecognised argument {flag}: neither an option of this job (see --help) nor an id of the "
                "bundle's configs"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, bool]:
    """``(settings, dry_run)`` from the command line."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.main_job",
        description=__doc__.splitlines()[0],
        epilog="Any id of the bundle's configs is overridden as in `python -m monai.bundle run`, for every step whose "
        "configs use it: --<id> <value>, e.g. --tta true or --train#dataloader#num_workers 2 (values as JSON, else "
        "text).",
        allow_abbrev=False,  # a shortened option would hide a config id of the same start
    )
    p.add_argument("--quick", action="store_true", help="small sizes and 2 epochs per stage, for trying it out")
    p.add_argument("--dry-run", action="store_true", help="print the bundle commands of each step, run nothing")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        if name in ("extra_overrides", "config"):
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
            choices = THRESHOLD_RULES if name == "threshold_rule" else None  # checked before any training
            p.add_argument(flag, type=typ, default=None, choices=choices)
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME",
        help="a config overlay, configs/NAME.json, merged after every step's configs; its settings become this job's "
        "defaults (paper_resnext: the paper's ResNeXt50 recipe) (repeatable)",
    )
    a, rest = p.parse_known_args(argv)
    try:
        extra = config_overrides(rest)
    except ValueError as e:
        p.error(str(e))
    given = {k: v for k, v in vars(a).items() if v is not None and k not in ("quick", "dry_run", "config")}
    overlaid: dict = {}
    for name in a.config:  # a later overlay wins, as in a config_file list
        try:
            overlaid.update(read_overlay(name))
        except ValueError as e:
            p.error(str(e))
    # an overlay's settings are the defaults of this job's flags of the same name; a flag given still wins
    fields = set(asdict(defaults)) - {"config", "extra_overrides"}
    given = {**{k: v for k, v in overlaid.items() if k in fields}, **given, "config": tuple(a.config)}
    given["extra_overrides"] = extra
    if given.get("init") not in (None, "scratch", "imagenet"):
        p.error("--init must be 'scratch' or 'imagenet'")
    if given.get("intermediate_task") not in (None, *INTERMEDIATE_TASKS):
        p.error(f"--intermediate-task must be one of {sorted(INTERMEDIATE_TASKS)}")
    return (Settings.quick(**given) if a.quick else Settings(**given)), a.dry_run


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    s, dry_run = parse_args(argv)
    try:
        if dry_run:
            data = data_steps(s, Path(s.workdir).resolve())
            for step in data[0] + plan(s, data):
                print(f"# {step.name}\n{step.command(Path(s.workdir).resolve(), compact=True)}")
            return 0
        run_pipeline(s)
    except Exception as e:  # a clear last line; the traceback above has the details
        logger.exception("pipeline failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
