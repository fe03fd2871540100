"""Fine-tune a trained ensemble on newly labelled ROIs with the bundle's own target-stage recipe.

Member k of the ensemble in ``--from`` starts from its own weights and trains as fold k of the labelled set
(``configs/train.json`` + ``configs/stage_target.json`` + ``configs/resilience.json``, as the main job trains its
folds); then the new ensemble, its members' out-of-fold validation predictions and its operating point (fitted
calibration and threshold, by the rule the ``--from`` model was deployed with) are made by the main job's own steps.
The new model is ``<bundle_root>/models/model.pt`` with ``operating_point.json`` beside it; the MONAI Label app's train
task publishes it.

    python -m scripts.finetune --input-csv labels.csv --from models/model.pt --bundle_root runs/finetune

``labels.csv`` has an inference input CSV's columns (``image``; optional ``spacing_mm``, ``x``, ``y``, ``unit``:
``scripts.data.inputs``) and ``label`` (``benign``/``malignant`` or 0/1). Each image is read as inference reads it
(``configs/inference.json``'s preprocessing: a ROI PNG as it is, any other image cropped at the training pitch), and
written as a ROI at the network input's size under ``<bundle_root>/data/``. Each image counts as its own patient; the
folds are stratified by label, so each class needs at least as many images as the ensemble has members.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from monai.bundle import ConfigParser

from scripts.data import schema
from scripts.data.imageio import write_roi_png
from scripts.data.inputs import items_from_csv
from scripts.data.prepare.csv_source import read_csv_rows
from scripts.engine.atomic import torch_save
from scripts.engine.steps import CONFIGS, Step, run_step
from scripts.model.calibration import read_operating_point
from scripts.model.network import count_members, load_state_dict_file
from scripts.plan import load_plan, steps_of

logger = logging.getLogger("finetune")
SOURCE = "labelled"  # the datalist's metadata.source


class LabelError(ValueError):
    """A labelled set that cannot fine-tune the ensemble; the message says which file or row and why."""


def inference_config(arch: str | None = None, image_size: int | None = None) -> ConfigParser:
    """``configs/inference.json``, parsed, with ``arch`` and ``image_size`` when given (as a main job run with
    ``--arch``/``--image-size`` is served): the network and the reading of images a fine-tuned model must share."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    for key, value in (("arch", arch), ("image_size", image_size)):
        if value is not None:
            parser[key] = value
    return parser


def read_labelled_csv(csv_path: str | Path, class_names: Sequence[str] = schema.TARGET_CLASSES) -> list[dict]:
    """The inference items of ``csv_path`` (:func:`scripts.data.inputs.items_from_csv`), each with its ``label`` (the
    class index of the ``label`` column: a class name or an index).

    Raises:
        LabelError: a row without a valid label, or a row the inference reader refuses (naming the line).
    """
    rows = read_csv_rows(csv_path, LabelError, required=("image", "label"))
    items = items_from_csv(csv_path)
    for (line, row), item in zip(rows, items):
        text = (row.get("label") or "").strip().lower()
        names = [c.lower() for c in class_names]
        if text in names:
            item["label"] = names.index(text)
        elif text.isdigit() and int(text) < len(names):
            item["label"] = int(text)
        else:
            raise LabelError(f"{Path(csv_path).name} line {line}: label {text!r} is not one of {list(class_names)}")
        if item.get("error"):
            raise LabelError(item["error"])
    return items


def stratified_folds(
    labels: Sequence[int], num_folds: int, class_names: Sequence[str] = schema.TARGET_CLASSES
) -> list[int]:
    """A fold per item: the items of each class dealt round-robin in their order, so that every fold validates on
    every class.

    Raises:
        LabelError: a class with fewer items than folds.
    """
    counts = {c: list(labels).count(c) for c in range(len(class_names))}
    if any(n < num_folds for n in counts.values()):
        named = {class_names[c]: n for c, n in counts.items()}
        raise LabelError(
            f"fine-tuning a {num_folds}-member ensemble needs at least {num_folds} labelled images of each class (one "
            f"per fold to validate on); labelled per class: {named}"
        )
    seen = {c: 0 for c in counts}
    folds = []
    for c in labels:
        folds.append(seen[c] % num_folds)
        seen[c] += 1
    return folds


def write_labelled_datalist(
    items: Sequence[dict], out_dir: str | Path, num_folds: int, parser: ConfigParser | None = None
) -> Path:
    """Read each labelled item as inference does (``parser``: :func:`inference_config`) and write it as a ROI PNG
    with a datalist (its training split, in ``num_folds`` stratified folds) under ``out_dir``; returns the
    datalist's path.

    Raises:
        LabelError: an image the inference reader cannot use (its reason), or too few images of a class.
    """
    out_dir = Path(out_dir)
    parser = parser or inference_config()
    parser["on_input_error"] = "record"
    preprocessing = parser.get_parsed_content("preprocessing")
    folds = stratified_folds([int(it["label"]) for it in items], num_folds)
    training = []
    for i, (item, fold) in enumerate(zip(items, folds)):
        case = f"label{i:04d}"  # anonymous: an image's own name may carry identifiers
        out = preprocessing({k: v for k, v in item.items() if k != "label"})
        if out.get("error"):
            raise LabelError(f"labelled image {i + 1} ({item['case']}): {out['error']}")
        write_roi_png(out_dir / "rois" / f"{case}.png", out["image"][0].numpy())
        training.append(schema.make_item(f"rois/{case}.png", int(item["label"]), case, case, fold=fold))
    image_size = int(parser.get_parsed_content("image_size"))
    roi_size = int(parser.get_parsed_content("roi_size") or image_size)
    pitch = float(parser.get_parsed_content("roi_pitch_mm")) * roi_size / image_size  # the ROI files' pitch
    datalist = schema.make_datalist(training, [], SOURCE, "target", pixel_spacing_mm=pitch, num_folds=num_folds)
    return schema.write_datalist(out_dir / "datalist.json", datalist)


def split_members(model_file: str | Path, out_dir: str | Path) -> list[Path]:
    """Each member's state dict of the ensemble in ``model_file``, written as ``<out_dir>/member_<k>.pt``."""
    state = load_state_dict_file(model_file)
    files = []
    for k in range(count_members(model_file)):
        prefix = f"members.{k}."
        member = {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
        files.append(torch_save(member, Path(out_dir) / f"member_{k}.pt"))
    return files


def plan(
    datalist: Path,
    member_weights: Sequence[Path],
    root: Path,
    arch: str,
    image_size: int,
    threshold_rule: str,
    threshold_value: float | None,
    epochs: int | None = None,
    seed: int = 0,
    n_boot: int = 200,
) -> list[Step]:
    """The fine-tuning steps: member k trains from ``member_weights[k]`` as fold k of ``datalist`` (the target stage's
    config), then the main job's ``ensemble_steps`` (``configs/main_job.json``: ensemble, out-of-fold predictions,
    operating point).

    Args:
        datalist: the labelled datalist (:func:`write_labelled_datalist`).
        member_weights: the current members' weights (:func:`split_members`), one per fold.
        root: the bundle root the steps write under (``models/``, ``results/``, ``runs/``).
        arch: the members' architecture; image_size: the network input's size.
        threshold_rule: threshold_value: the operating point's rule and its value.
        epochs: training epochs per member; ``None`` keeps ``configs/stage_target.json``'s.
        seed: the training and bootstrap seed.
        n_boot: bootstrap resamples for the operating point's validation intervals.
    """
    common = {
        "bundle_root": str(root),
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "arch": arch,
        "image_size": int(image_size),
        "seed": int(seed),
    }
    members = [root / "models" / f"target_fold{k}" / "model.pt" for k in range(len(member_weights))]
    steps = []
    for k, (init, member) in enumerate(zip(member_weights, members)):
        over = dict(common, fold=k, init="checkpoint", init_weights=str(init))
        if epochs is not None:
            over["train#trainer#max_epochs"] = int(epochs)
        inputs = {"datalist": datalist, "init_weights": init}
        name = f"fine-tune member {k + 1}/{len(members)}"
        steps.append(Step(name, ("train.json", "stage_target.json", "resilience.json"), over, member, inputs))
    settings = {"bundle_root": str(root), "target_datalist": str(datalist), "members": [str(m) for m in members]}
    settings.update(intermediate=False, arch=arch, image_size=int(image_size), seed=int(seed), n_boot=int(n_boot))
    settings.update(threshold_rule=threshold_rule, threshold_value=threshold_value)
    return steps + steps_of(load_plan(settings), "ensemble_steps")


def finetune(
    input_csv: str | Path,
    base_model: str | Path,
    bundle_root: str | Path,
    epochs: int | None = None,
    seed: int = 0,
    threshold_rule: str | None = None,
    threshold_value: float | None = None,
    arch: str | None = None,
    image_size: int | None = None,
) -> Path:
    """Fine-tune the ensemble ``base_model`` on the labelled images of ``input_csv`` (module docstring); returns the
    new ``<bundle_root>/models/model.pt``. The operating point's rule defaults to ``base_model``'s (else the summary
    config's); ``arch`` and ``image_size`` default to ``configs/inference.json``'s."""
    root = Path(bundle_root).resolve()
    base = Path(base_model).resolve()
    network = inference_config(arch, image_size)
    num_members = count_members(base)
    datalist = write_labelled_datalist(read_labelled_csv(input_csv), root / "data", num_members, network)
    weights = split_members(base, root / "models" / "from")
    deployed = read_operating_point(base) or {}
    summarize = ConfigParser.load_config_file(str(CONFIGS / "summarize.json"))
    rule = threshold_rule or deployed.get("rule") or summarize["threshold_rule"]
    value = threshold_value if threshold_value is not None else deployed.get("value", summarize["threshold_value"])
    logger.info("fine-tuning %d members on %s; operating point: %s %s", num_members, datalist, rule, value)
    steps = plan(
        datalist,
        weights,
        root,
        *(network.get_parsed_content(k) for k in ("arch", "image_size")),
        rule,
        value,
        epochs,
        seed,
    )
    for step in steps:
        run_step(step)
    return root / "models" / "model.pt"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.finetune",
        description=__doc__.splitlines()[0],
        epilog="Settings of the bundle's configs keep their config ids, as in the main job.",
        allow_abbrev=False,
    )
    p.add_argument("--input-csv", required=True, help="labelled images: image, label[, spacing_mm, x, y, unit]")
    p.add_argument("--from", dest="base", default="models/model.pt", help="the ensemble to start from")
    p.add_argument("--bundle_root", required=True, help="where the new model, its results and runs are written")
    p.add_argument(
        "--train#trainer#max_epochs", dest="epochs", type=int, default=None, help="default: stage_target.json's"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold_rule", default=None, help="the operating point's rule (default: the --from model's)")
    p.add_argument("--threshold_value", type=float, default=None)
    p.add_argument("--arch", default=None, help="the members' network (default: configs/inference.json's)")
    p.add_argument("--image_size", type=int, default=None, help="the network input (default: inference.json's)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    try:
        model = finetune(
            a.input_csv,
            a.base,
            a.bundle_root,
            a.epochs,
            a.seed,
            a.threshold_rule,
            a.threshold_value,
            a.arch,
            a.image_size,
        )
    except (LabelError, schema.DatalistError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    print(f"fine-tuned model: {model}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
