"""The main job's plan, ``configs/main_job.json``, read with a run's settings: one name per setting, its config id.

A setting ``--<id> <value>`` (as ``python -m monai.bundle run`` takes it) sets an id of the plan (``num_folds``,
``intermediate``, ``init_weights``, ...); ``stage_intermediate#<id>`` / ``stage_target#<id>`` overrides a config id for
that stage's steps only; any other id of the bundle's configs goes to every step whose configs declare it. The main
job (:mod:`scripts.main_job`), the ablation and the fine-tuning command read their steps from here.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from monai.bundle import ConfigParser

from scripts.engine.steps import CONFIGS, Step, config_defaults, config_ids, config_value, declares
from scripts.evaluation.metrics import THRESHOLD_RULES
from scripts.model.inferers import precision_choice

PLAN, QUICK = CONFIGS / "main_job.json", CONFIGS / "main_job_quick.json"
STEP_SETTINGS = ("overrides", "stage_intermediate", "stage_target")  # the plan's dicts of stage-config overrides


def load_plan(settings: Mapping[str, Any] | None = None, quick: bool = False) -> ConfigParser:
    """``configs/main_job.json`` (and, with ``quick``, ``main_job_quick.json``) with ``settings`` applied.

    Args:
        settings: config id -> value. An id of the plan sets it (``num_folds``, ``intermediate``, ...);
            ``stage_target#<id>`` (or ``stage_intermediate#<id>``) overrides ``<id>`` for that stage's steps only;
            any other id of the bundle's configs goes to every step whose configs declare it, as in
            ``python -m monai.bundle run``.

    Raises:
        ValueError: an id no config declares, or a value the plan refuses before any work.
    """
    plan = ConfigParser()
    plan.read_config([str(PLAN)] + ([str(QUICK)] if quick else []))
    known = config_ids()
    for key, value in (settings or {}).items():
        head, _, rest = key.partition("#")
        if head in STEP_SETTINGS and rest and declares(known, rest):
            plan[head] = {**plan[head], rest: value}
        elif key in plan:
            plan[key] = value
        elif declares(known, key):
            plan["overrides"] = {**plan["overrides"], key: value}
        else:
            raise ValueError(
                f"unrecognised argument --{key}: neither a setting of configs/main_job.json nor an id of the "
                "bundle's configs (--help lists them)"
            )
    plan.get_parsed_content("imports")
    rule = plan["overrides"].get("threshold_rule", THRESHOLD_RULES[0])
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"--threshold_rule: invalid choice: {rule!r} (choose from {', '.join(THRESHOLD_RULES)})")
    if plan.get_parsed_content("init") not in ("scratch", "imagenet"):
        raise ValueError(f"--init: stage 1 starts from 'scratch' or 'imagenet', not {plan['init']!r}")
    return plan


def steps_of(plan: ConfigParser, group: str) -> list[Step]:
    """The plan's ``group`` of steps (``data_steps``, ``steps``, ``ensemble_steps``, ...), each with the stage-config
    overrides its configs declare and the ``config`` overlays merged last."""
    overrides, overlays = plan.get_parsed_content("overrides"), plan.get_parsed_content("overlays")
    return [step.with_settings(overrides, overlays) for step in plan.get_parsed_content(group)]


def resolved_settings(plan: ConfigParser) -> dict:
    """The settings a run used, as its steps resolve them (for ``main_job.json`` and the benchmarks that read it)."""
    over = plan.get_parsed_content("overrides")
    configs = plan.get_parsed_content("target_configs") + plan.get_parsed_content("overlays")
    out = {k: config_value(configs, k, over) for k in ("arch", "image_size", "batch_size", "seed")}
    out.update({k: plan.get_parsed_content(k) for k in ("num_folds", "init", "init_weights", "intermediate")})
    out.update(target_datalist=plan.get_parsed_content("target"), saliency=plan.get_parsed_content("saliency"))
    return {**out, "intermediate_datalist": plan.get_parsed_content("intermediate_dl")}


def precision(plan: ConfigParser) -> dict:
    """The precision the training stages ran in: ``amp`` when given, else the machine's default and why."""
    over = plan.get_parsed_content("overrides")
    if "amp" in over:
        return {"amp": bool(over["amp"]), "reason": "--amp given"}
    configs = plan.get_parsed_content("target_configs") + plan.get_parsed_content("overlays")
    arch, image_size, device = (config_value(configs, k, over) for k in ("arch", "image_size", "device"))
    return precision_choice(arch, device, image_size)


def settings_help() -> str:
    """The settings ``--help`` lists, with their defaults read from the configs."""
    plan = load_plan()
    lines = ["settings of the plan (configs/main_job.json), --<id> <value>:"]
    for key in ("bundle_root", "dataset_dir", "target_datalist", "intermediate_datalist", "intermediate", "saliency"):
        lines.append(f"  --{key} (default {plan.get_parsed_content(key)!r})")
    for key in ("num_folds", "init", "init_weights"):
        lines.append(f"  --{key} (default {plan.get_parsed_content(key)!r}, from the stage configs)")
    lines += ["  --stage_intermediate#<id>, --stage_target#<id>: an id of the stage configs, for that stage only", ""]
    lines.append("ids of the stage configs, for every step whose configs declare them (as python -m monai.bundle run):")
    for key, values in config_defaults().items():
        lines.append(f"  --{key} (" + ", ".join(f"{file}: {value!r}" for file, value in values) + ")")
    return "\n".join(lines + ["", "Values are read as JSON, else kept as text (--tta true, --init_weights FILE)."])


def settings_from_words(words: Sequence[str]) -> dict:
    """``--<id> <value>`` pairs (as ``python -m monai.bundle run`` takes them) as settings; a value is read as JSON,
    else kept as text.

    Raises:
        ValueError: a word that is not part of such a pair.
    """
    if len(words) % 2 or not all(flag.startswith("--") for flag in words[::2]):
        raise ValueError(f"unrecognised arguments: {' '.join(words)} (settings are --<id> <value> pairs)")
    settings = {}
    for flag, value in zip(words[::2], words[1::2]):
        try:
            settings[flag[2:]] = json.loads(value)
        except json.JSONDecodeError:
            settings[flag[2:]] = value
    return settings
