"""Every workflow config carries the ids MONAI's bundle tools expect, and the metadata is complete."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.data.schema import TARGET_CLASSES
from tests.conftest import REPO

CONFIGS = REPO / "configs"


@pytest.mark.parametrize(
    "files, workflow_type",
    [
        (["train.json"], "train"),
        (["train.json", "stage_intermediate.json"], "train"),
        (["train.json", "stage_target.json"], "train"),
        (["train.json", "stage_target.json", "resilience.json"], "train"),
        (["inference.json"], "infer"),
    ],
)
def test_check_properties_is_empty(files, workflow_type, tiny_data, tmp_path):
    infer = {}
    if workflow_type == "infer":  # inference.json reads the member count from the weights file
        import torch

        from scripts.model.network import Ensemble

        torch.save(Ensemble(2, "resnet18").state_dict(), tmp_path / "model.pt")
        infer = {"model_file": str(tmp_path / "model.pt")}
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        dataset_dir=str(tiny_data),
        arch="resnet18",
        # resolving the ids builds the network: initialisation itself is tested in test_network.py
        **({"init": "scratch"} if workflow_type == "train" else infer),
    )
    wf.initialize()
    assert wf.check_properties() == []
    if infer:
        assert len(wf.network_def.members) == 2


RECIPE_HANDLERS = [
    "scripts.engine.progress.ProgressLogger",
    "LrScheduleHandler",
    "ValidationHandler",
    "StatsHandler",
    "TensorBoardStatsHandler",
]
RESILIENCE_HANDLERS = [
    "scripts.engine.resilience.ReseedHandler",
    "scripts.engine.resilience.DiskSpaceCheck",
    "scripts.engine.checkpoints.ResumeHandler",
    "scripts.engine.resilience.NonFiniteLossGuard",
    "scripts.engine.checkpoints.LastCheckpointSaver",
]


def _merged(*files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser


def test_train_json_alone_is_the_plain_recipe():
    """train.json holds the recipe and MONAI's own handlers; resume, guards and checks are resilience.json's."""
    parser = _merged("train.json")
    assert [h["_target_"] for h in parser["train#handlers"]] == RECIPE_HANDLERS
    assert parser["validate#best_model_saver#_target_"] == "CheckpointSaver"
    assert parser["initialize"] == ["$monai.utils.set_determinism(seed=@seed)"]
    text = (CONFIGS / "train.json").read_text()
    for word in ("scripts.engine.resilience", "scripts.engine.checkpoints", "run_fingerprint", "resume"):
        assert word not in text, word


@pytest.mark.parametrize("stage", ["intermediate", "target"])
@pytest.mark.parametrize("multi_gpu", [False, True])
def test_the_resilience_overlay_appends_its_handlers_after_the_recipe(stage, multi_gpu):
    """Merged after a stage (and before or after multi_gpu_train.json), resilience.json appends its handlers to the
    recipe's, which attach nothing at STARTED: ResumeHandler restores the state at STARTED before any handler reads
    it, after only the disk check; the best-model saver becomes the atomic one whose record is resumed."""
    files = ["train.json", f"stage_{stage}.json", "resilience.json"] + (["multi_gpu_train.json"] * multi_gpu)
    parser = _merged(*files)
    assert [h["_target_"] for h in parser["train#handlers"]] == RECIPE_HANDLERS + RESILIENCE_HANDLERS
    assert parser["validate#best_model_saver#_target_"] == "scripts.engine.checkpoints.AtomicCheckpointSaver"
    assert "check_writable" in parser["initialize"][1] and "set_deterministic_algorithms" in parser["initialize"][2]
    if multi_gpu:  # the overlays commute (up to the order of the imports)
        files[-2:] = files[-1], files[-2]
        a, b = _merged(*files).get(), parser.get()
        assert sorted(a.pop("imports")) == sorted(b.pop("imports")) and a == b


def test_metadata_has_the_mandatory_keys():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in (
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["type"] == "probabilities" and out["format"] == "classes" and out["num_channels"] == 2
    assert out["channel_def"] == {str(i): name for i, name in enumerate(TARGET_CLASSES)}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert "grad-cam" in meta["required_packages_version"]


def test_requirements_match_metadata_versions():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    assert pins["monai"] == meta["monai_version"] and pins["torch"] == meta["pytorch_version"]
    for name, version in meta["required_packages_version"].items():
        assert pins.get(name.lower()) == version, name


def test_summarize_records_the_stage_configs_own_defaults():
    """``summarize.json`` states what stage 1 starts from, under stage 1's own names (``init``, ``init_weights``); its
    defaults are stage_intermediate.json's, not a copy that could drift."""
    summarize = json.loads((CONFIGS / "summarize.json").read_text())
    stage1 = json.loads((CONFIGS / "stage_intermediate.json").read_text())
    assert summarize["init"] == stage1["init"]
    assert summarize["init_weights"] == stage1["init_weights"]
    assert summarize["intermediate_datalist"] == stage1["datalist"]
    synthetic = json.loads((CONFIGS / "synthetic.json").read_text())
    assert stage1["datalist"].endswith(f"'/{synthetic['intermediate_data']['task']}/datalist.json'")


def test_class_names_have_one_definition():
    """The schema's target classes are the definition; the metadata's output channels, the inference config's
    ``class_names`` (a literal: the config is run without the metadata too) and the datalists written by the
    synthetic generator all repeat it."""
    from scripts.data.schema import make_datalist

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    inference = json.loads((CONFIGS / "inference.json").read_text())
    assert [channels[str(i)] for i in range(len(channels))] == list(TARGET_CLASSES)
    assert inference["class_names"] == list(TARGET_CLASSES)
    assert inference["num_classes"] == len(TARGET_CLASSES)
    assert make_datalist([], [], source="synthetic", task="target")["metadata"]["class_names"] == list(TARGET_CLASSES)


def test_every_training_step_merges_the_resilience_overlay_after_its_stage(tmp_path):
    """The main job's and the fine-tuning task's training steps resume, guard and check: the overlay follows the stage
    config (and precedes --config overlays such as paper_resnext, which may override its settings too)."""
    from pathlib import Path

    from scripts import finetune
    from scripts.main_job import parse_args
    from scripts.plan import load_plan, steps_of

    s, _, _ = parse_args(["--bundle_root", str(tmp_path), "--config", "paper_resnext"])
    steps = steps_of(load_plan(s), "steps")
    members = [Path(f"m{k}.pt") for k in range(3)]
    steps += finetune.plan(tmp_path / "datalist.json", members, tmp_path, "resnet18", 64, "youden", None)
    training = [step for step in steps if any(c.startswith("stage_") for c in step.configs)]
    assert len(training) == 1 + load_plan(s).get_parsed_content("num_folds") + len(members)
    for step in training:
        assert step.configs[0] == "train.json" and step.configs[2] == "resilience.json", step
    assert not any("resilience.json" in step.configs for step in steps if step not in training)


def _documented_commands(module: str) -> list[list[str]]:
    """The arguments of every ``python -m <module>`` command in README.md and docs/*.md (code blocks, with their
    ``\\`` continuations, and inline code)."""
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        lines = re.findall(rf"python -m {re.escape(module)}(?: [^`\n]*)?", text)
        commands += [shlex.split(re.split(r"\s#", line)[0])[3:] for line in lines]  # less a trailing comment
    return commands


def test_every_documented_main_job_and_ablation_command_is_accepted(capsys):
    """Each documented command's settings are ids the main job knows (parsed, not run: most train for minutes)."""
    from scripts import ablation
    from scripts.main_job import parse_args

    main_job = _documented_commands("scripts.main_job")
    assert len(main_job) >= 10, main_job
    for words in main_job:
        if "--help" not in words:
            parse_args(words)  # exits with the parser's message on an unknown or malformed setting
    ablation_commands = _documented_commands("scripts.ablation")
    assert len(ablation_commands) >= 2, ablation_commands
    for words in ablation_commands:
        ablation.parse_args(words)
    assert "error" not in capsys.readouterr().err


def test_help_lists_the_settings_with_their_defaults_read_from_the_configs(capsys):
    from scripts.main_job import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    synthetic = json.loads((REPO / "configs" / "synthetic.json").read_text())
    saliency = json.loads((REPO / "configs" / "saliency.json").read_text())
    assert f"--num_folds (default {synthetic['num_folds']}, from the stage configs)" in out
    assert f"--target_data#n_train (synthetic.json: {synthetic['target_data']['n_train']})" in out
    assert f"--saliency#method (saliency.json: {saliency['saliency']['method']!r})" in out
    assert "--stage_intermediate#<id>, --stage_target#<id>" in out and "--intermediate (default True)" in out


def test_the_fold_loop_the_arms_and_the_quick_overlay_come_from_the_plan_config():
    """configs/main_job.json declares the steps: the fold loop follows num_folds, `intermediate false` drops stage 1
    and starts the folds from `init`, `saliency false` drops the maps; configs/main_job_quick.json sets the sizes."""
    from scripts.plan import load_plan, steps_of

    steps = steps_of(load_plan({"num_folds": 5, "intermediate": False, "saliency": False, "init": "scratch"}), "steps")
    names = [step.name for step in steps]
    assert names[:5] == [f"target fold {k}/5" for k in range(1, 6)] and "intermediate" not in names
    assert [n for n in names if n.startswith("validation")] == [f"validation predictions fold {k}" for k in range(1, 6)]
    assert "saliency" not in names and names[-1] == "report"
    assert all(step.overrides["init"] == "scratch" and step.overrides["init_weights"] is None for step in steps[:5])
    default = {step.name: step for step in steps_of(load_plan(), "steps")}
    assert default["target fold 1/3"].overrides["init_weights"] == default["intermediate"].output.as_posix()
    quick = load_plan(quick=True)
    quick_data = steps_of(quick, "data_steps")[0].overrides
    quick_json = json.loads((REPO / "configs" / "main_job_quick.json").read_text())
    assert {k: quick_data[k] for k in ("target_data#n_train", "intermediate_data#n_train")} == {
        k: quick_json["overrides"][k] for k in ("target_data#n_train", "intermediate_data#n_train")
    }
    epochs = {step.name: step.overrides.get("train#trainer#max_epochs") for step in steps_of(quick, "steps")}
    assert epochs["intermediate"] == quick_json["stage_intermediate"]["train#trainer#max_epochs"]
    assert epochs["target fold 3/3"] == quick_json["stage_target"]["train#trainer#max_epochs"]
    assert epochs["ensemble"] is None  # a stage's own setting goes to that stage's steps only
