"""The main job: the runs that ``configs/main_job.json`` declares, in order, each skipped while its output is current.

The recipe (data, stage 1, the K target folds, the ensemble, its operating point, the test evaluation, saliency and
the report) is ``configs/main_job.json``: every step is one ``python -m monai.bundle run`` of files in ``configs/``.
This module only reads that plan with the command line's settings, runs the steps in-process
(:func:`scripts.engine.steps.run_step`: a step reruns when its fingerprint changed, and the log says why) and prints
the headline. ``--dry-run`` prints the steps as commands; README.md ("The pipeline, as configs") gives the default
sequence.

    python -m scripts.main_job            # synthetic data, default size (see README for timings)
    python -m scripts.main_job --quick    # configs/main_job_quick.json: a small run for trying it out
    python -m scripts.main_job --dry-run  # the bundle commands it would run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.data import schema
from scripts.engine.atomic import write_json
from scripts.engine.steps import CONFIGS, run_step
from scripts.evaluation.headline import print_headline
from scripts.evaluation.summarize import read_localisation
from scripts.model.inferers import environment
from scripts.plan import load_plan, precision, resolved_settings, settings_from_words, settings_help, steps_of

BUNDLE_DIR = CONFIGS.parent
logger = logging.getLogger("main_job")


def run_pipeline(settings: Mapping[str, Any] | None = None, quick: bool = False) -> Path:
    """Run the whole method with ``settings`` (:func:`load_plan`); returns the path of ``metrics.json``."""
    t_start = time.time()
    plan = load_plan(settings, quick)
    log = [run_step(step) for step in steps_of(plan, "data_steps")]
    target, inter = plan.get_parsed_content("target"), plan.get_parsed_content("intermediate_dl")
    if plan.get_parsed_content("synthetic_intermediate") and not plan.get_parsed_content("synthetic_target"):
        logger.warning(
            "no intermediate datalist given or found beside the target: stage 1 uses the synthetic %s set "
            "(--intermediate_datalist FILE to use your own, --intermediate false to skip stage 1)",
            plan.get_parsed_content("intermediate_task"),
        )
    logger.info("bundle root: %s; target: %s; intermediate: %s", plan.get_parsed_content("root"), target, inter)
    for datalist in (inter, target):
        if datalist is not None:
            schema.read_datalist(datalist)  # refuses a broken datalist before any training
    log += [run_step(step) for step in steps_of(plan, "steps")]
    results = Path(plan.get_parsed_content("results_dir"))
    record = {
        "settings": {**resolved_settings(plan), **(settings or {})},
        "given": dict(settings or {}),
        "quick": quick,
    }
    record.update(steps=log, elapsed_s=round(time.time() - t_start, 1), environment=environment())
    write_json(results / "main_job.json", {**record, "precision": precision(plan)})
    metrics_file = results / "metrics.json"
    print_headline(json.loads(metrics_file.read_text()), read_localisation(results) or {}, results)
    return metrics_file


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict, bool, bool]:
    """``(settings, quick, dry_run)`` from the command line; ``--<id> <value>`` pairs as :func:`load_plan` takes
    them, each checked before any work."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.main_job",
        description=__doc__.splitlines()[0],
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a shortened option would hide a config id of the same start
    )
    p.add_argument("--quick", action="store_true", help="configs/main_job_quick.json: small sizes, 2 epochs a stage")
    p.add_argument("--dry-run", action="store_true", help="print the bundle commands of each step, run nothing")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME",
        help="a config overlay, configs/NAME.json, merged after every step's configs (paper_resnext: the paper's "
        "ResNeXt50 recipe) (repeatable)",
    )
    a, rest = p.parse_known_args(argv)
    try:
        settings = {**({"config": a.config} if a.config else {}), **settings_from_words(rest)}
        load_plan(settings, a.quick)
    except ValueError as e:
        p.error(str(e))
    return settings, a.quick, a.dry_run


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    settings, quick, dry_run = parse_args(argv)
    try:
        if dry_run:
            plan = load_plan(settings, quick)
            root = Path(plan.get_parsed_content("root"))
            for step in steps_of(plan, "data_steps") + steps_of(plan, "steps"):
                print(f"# {step.name}\n{step.command(root, compact=True)}")
            return 0
        run_pipeline(settings, quick)
    except Exception as e:  # a clear last line; the traceback above has the details
        logger.exception("pipeline failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
