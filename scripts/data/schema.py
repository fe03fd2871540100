"""The bundle's datalist schema: defined once here, written by every data source, read by every workflow.

A datalist is a JSON file in MONAI's decathlon style::

    {
      "metadata": {"schema_version": 1, "source": "synthetic", "task": "target",
                   "class_names": ["benign", "malignant"], "pixel_spacing_mm": 0.1, "num_folds": 3},
      "training": [item, ...],   # every training item carries "fold" (0 .. num_folds-1)
      "validation": [item, ...], # optional; when absent, validation for fold k = training items with fold == k
      "test": [item, ...]
    }

Each item:

==============  ========  ===============================================================================
key             required  meaning
==============  ========  ===============================================================================
``image``       yes       ROI image path (16-bit grayscale PNG), relative to the datalist's folder
``label``       yes       class index into ``metadata.class_names`` (target: 0 benign, 1 malignant)
``patient``     yes       pseudonymous patient key (never a DICOM PatientID); splits are grouped by it
``case``        yes       anonymous case id, unique within the datalist; used in every output filename
``mask``        no        lesion mask path (8-bit PNG, same shape, non-zero = lesion) or null
``lesion``      no        lesion key: both views of one lesion share it (defaults to ``case``)
``birads``      no        radiologist's BI-RADS category (int 0-6) or null
``fold``        training  cross-validation fold of the item
``spacing_mm``  no        pixel pitch of the ROI image in mm (defaults to ``metadata.pixel_spacing_mm``)
==============  ========  ===============================================================================

Sources may add descriptive keys (e.g. ``calc_type``, ``subtlety``); workflows ignore them.

``metadata.reference_standard`` says where the labels come from (:data:`REFERENCE_STANDARDS`, filled in by
:func:`make_datalist` from the source; :func:`reference_standard` reads it, falling back to the source for older
datalists); the evaluation report prints it. ``metadata.class_names`` (:func:`class_names`) names the labels.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from scripts.engine.atomic import write_json

SCHEMA_VERSION = 1
TARGET_CLASSES = ("benign", "malignant")
REQUIRED_KEYS = ("image", "label", "patient", "case")
PATH_KEYS = ("image", "mask")
SPLITS = ("training", "validation", "test")
# metadata.reference_standard: where a source's labels come from (make_datalist writes it; the report prints it)
REFERENCE_STANDARDS = {
    "synthetic": "simulated ground truth (the labels the generator drew the ROIs from; not a clinical verdict)",
    "cbis-ddsm": "histopathology (CBIS-DDSM's verified pathology; BENIGN_WITHOUT_CALLBACK: benign without biopsy)",
    "labelled": "the labels given with the images for fine-tuning (e.g. a reader's, through the MONAI Label app)",
    "mini-mias": "the severity (B/M) stated in the mini-MIAS Info.txt (the database does not say how each was verified)",
}
REFERENCE_NOT_STATED = "not stated by the data source"


class DatalistError(ValueError):
    """A datalist that breaks the schema; the message lists every offender."""


def make_item(
    image: str,
    label: int,
    patient: str,
    case: str,
    mask: str | None = None,
    lesion: str | None = None,
    birads: int | None = None,
    fold: int | None = None,
    spacing_mm: float | None = None,
    **extra: Any,
) -> dict:
    """Build one datalist item with the schema's keys (``None`` values of optional keys are kept as null)."""
    item = {"image": str(image), "label": int(label), "patient": str(patient), "case": str(case)}
    item["mask"] = None if mask is None else str(mask)
    item["lesion"] = str(lesion) if lesion is not None else str(case)
    item["birads"] = None if birads is None else int(birads)
    if fold is not None:
        item["fold"] = int(fold)
    if spacing_mm is not None:
        item["spacing_mm"] = float(spacing_mm)
    item.update(extra)
    return item


def unique_case(case: str, used: set[str]) -> str:
    """``case``, or ``case_2``, ``case_3``, ... if already in ``used``; the name returned is added to ``used``."""
    name, i = case, 1
    while name in used:
        i += 1
        name = f"{case}_{i}"
    used.add(name)
    return name


def make_datalist(
    training: Sequence[dict],
    test: Sequence[dict],
    source: str,
    task: str,
    class_names: Sequence[str] = TARGET_CLASSES,
    pixel_spacing_mm: float | None = None,
    num_folds: int | None = None,
    validation: Sequence[dict] | None = None,
    reference_standard: str | None = None,
    **extra_metadata: Any,
) -> dict:
    """Assemble a datalist dictionary with its metadata block (``reference_standard`` defaults to the source's
    entry in :data:`REFERENCE_STANDARDS`, else :data:`REFERENCE_NOT_STATED`)."""
    folds = {it["fold"] for it in training if "fold" in it}
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "task": task,
        "class_names": list(class_names),
        "pixel_spacing_mm": pixel_spacing_mm,
        "num_folds": num_folds if num_folds is not None else (max(folds) + 1 if folds else 0),
        "reference_standard": reference_standard or default_reference_standard(source),
    }
    meta.update(extra_metadata)
    out = {"metadata": meta, "training": list(training)}
    if validation is not None:
        out["validation"] = list(validation)
    out["test"] = list(test)
    return out


def write_datalist(path: str | os.PathLike, datalist: dict, check_files: bool = True) -> Path:
    """Validate ``datalist`` (paths relative to ``path``'s folder) and write it atomically."""
    validate_datalist(datalist, base_dir=Path(path).parent, check_files=check_files, name=str(path))
    return write_json(path, datalist)


def read_datalist(path: str | os.PathLike, validate: bool = True, check_files: bool = True) -> dict:
    """Read a datalist JSON file; validate it against the schema unless told not to."""
    path = Path(path)
    try:
        datalist = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist file not found") from None
    except json.JSONDecodeError as e:
        raise DatalistError(f"{path}: not valid JSON ({e})") from None
    if validate:
        validate_datalist(datalist, base_dir=path.parent, check_files=check_files, name=str(path))
    return datalist


def class_names(datalist: dict) -> list[str]:
    """The datalist's class names (``metadata.class_names``; the target classes when absent)."""
    return list(datalist.get("metadata", {}).get("class_names", TARGET_CLASSES))


def num_folds(path: str | os.PathLike) -> int:
    """How many cross-validation folds the datalist at ``path`` defines (``metadata.num_folds``); at least 1."""
    n = read_datalist(path, check_files=False).get("metadata", {}).get("num_folds")
    if not isinstance(n, int) or n < 1:
        raise DatalistError(f"{path}: metadata.num_folds is {n!r}; a target datalist needs its folds (>= 1)")
    return n


def find_datalist(dataset_dir: str | os.PathLike, task: str) -> str:
    """The ``task`` datalist of a prepared dataset folder: ``<dir>/<task>/datalist.json`` (the synthetic layout) or
    ``<dir>/datalist_<task>.json`` (``scripts.data.prepare``'s), as an absolute path.

    Raises:
        FileNotFoundError: neither file exists (the message says how to make one).
    """
    folder = Path(dataset_dir).resolve()
    for candidate in (folder / task / "datalist.json", folder / f"datalist_{task}.json"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{folder}: no {task} datalist ({task}/datalist.json or datalist_{task}.json); "
        "prepare one with `python -m scripts.data.prepare` or leave dataset_dir unset to use synthetic data"
    )


def has_datalist(dataset_dir: str | os.PathLike | None, task: str) -> bool:
    """Whether :func:`find_datalist` finds a ``task`` datalist in ``dataset_dir`` (``None``: no folder, no)."""
    if dataset_dir is None:
        return False
    try:
        find_datalist(dataset_dir, task)
    except FileNotFoundError:
        return False
    return True


def default_reference_standard(source: Any) -> str:
    """The reference standard of a known ``source`` (``"synthetic"``, ``"cbis-ddsm"``, ``"mini-mias"``, any case;
    a source string that starts with one of them counts), else :data:`REFERENCE_NOT_STATED`."""
    text = str(source or "").strip().lower().replace("_", "-")
    for name, standard in REFERENCE_STANDARDS.items():
        if text.startswith(name):
            return standard
    return REFERENCE_NOT_STATED


def reference_standard(datalist: dict) -> str:
    """The datalist's ``metadata.reference_standard``; for a datalist written before the field existed, that of
    its ``metadata.source`` (:func:`default_reference_standard`)."""
    meta = datalist.get("metadata", {})
    return str(meta.get("reference_standard") or default_reference_standard(meta.get("source")))


def reader_label(datalist: dict) -> str:
    """Who gave the items' BI-RADS categories: ``metadata.reader.label`` (the synthetic generator's
    ``"simulated reader"``), else ``"radiologist"`` (real data: the CSV's ``birads`` column, CBIS-DDSM's
    ``assessment``)."""
    reader = datalist.get("metadata", {}).get("reader") or {}
    return str(reader.get("label") or "radiologist")


def resolve(item: dict, base_dir: str | os.PathLike) -> dict:
    """Copy of ``item`` with its path keys made absolute against ``base_dir``."""
    out = dict(item)
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = str(Path(base_dir, out[key]))
    return out


def select(datalist: dict, split: str, fold: int | None = None) -> list[dict]:
    """Items of one split; for ``fold=k``: "training" = folds != k, "validation" = fold k.

    When the datalist has an explicit "validation" list it is used as is, and ``fold`` only filters
    nothing. ``fold=None`` with split "training" returns every training item.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return list(datalist.get("test", []))
    if "validation" in datalist:
        return list(datalist[split])
    training = datalist.get("training", [])
    if fold is None:
        if split == "validation":
            raise ValueError("this datalist has no 'validation' list: give a fold to hold out")
        return list(training)
    if split == "validation":
        return [it for it in training if it.get("fold") == fold]
    return [it for it in training if it.get("fold") != fold]


def load_split(
    datalist_path: str | os.PathLike, split: str, fold: int | None = None, validate: bool = True
) -> list[dict]:
    """Read a datalist and return one split's items with absolute paths (for configs' ``dataset#data``)."""
    datalist = read_datalist(datalist_path, validate=validate)
    base = Path(datalist_path).parent
    items = select(datalist, split, fold)
    if not items:
        raise DatalistError(f"{datalist_path}: split {split!r} (fold {fold}) is empty")
    return [resolve(it, base) for it in items]


def validate_datalist(
    datalist: dict, base_dir: str | os.PathLike | None = None, check_files: bool = True, name: str = "datalist"
) -> None:
    """Refuse a datalist that breaks the schema, listing every offender.

    Checks: required keys; labels inside the class map; unique case ids; every referenced file exists
    and is non-empty (when ``check_files``); no patient in two splits (training/validation/test) and,
    for cross-validation, no patient in two folds.
    """
    problems: list[str] = []
    if not isinstance(datalist, dict):
        raise DatalistError(f"{name}: a datalist must be a JSON object with 'training' and 'test' lists")
    n_classes = len(class_names(datalist))
    seen_cases: dict[str, str] = {}
    patient_splits: dict[str, set] = defaultdict(set)
    patient_folds: dict[str, set] = defaultdict(set)
    for split in SPLITS:
        items = datalist.get(split)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.append(f"'{split}' is not a list")
            continue
        for i, item in enumerate(items):
            where = f"{split}[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{where}: not an object")
                continue
            missing = [k for k in REQUIRED_KEYS if item.get(k) in (None, "")]
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            where = f"{split}[{i}] (case {item['case']})"
            label = item["label"]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_classes:
                problems.append(f"{where}: label {label!r} outside the class map 0..{n_classes - 1}")
            if item["case"] in seen_cases:
                problems.append(f"{where}: case id also used in {seen_cases[item['case']]}")
            seen_cases[item["case"]] = where
            patient_splits[str(item["patient"])].add(split)
            if split == "training" and "fold" in item:
                patient_folds[str(item["patient"])].add(item["fold"])
            if check_files and base_dir is not None:
                for key in PATH_KEYS:
                    if item.get(key):
                        p = Path(base_dir, item[key])
                        if not p.is_file():
                            problems.append(f"{where}: {key} file missing: {p}")
                        elif p.stat().st_size == 0:
                            problems.append(f"{where}: {key} file is empty: {p}")
    for patient, splits in sorted(patient_splits.items()):
        if len(splits) > 1:
            problems.append(f"patient {patient} is in several splits: {sorted(splits)}")
    for patient, folds in sorted(patient_folds.items()):
        if len(folds) > 1:
            problems.append(f"patient {patient} is in several folds: {sorted(folds)}")
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DatalistError(f"{name}: {len(problems)} problem(s):\n  {shown}{more}")


def _patient_order(by_patient: Mapping[str, Any], patient_key: Callable[[str], Any] | None) -> list[str]:
    """The patients sorted by ``patient_key`` (default: the patient value itself), ties by the value."""
    if patient_key is None:
        return sorted(by_patient)
    return sorted(by_patient, key=lambda p: (str(patient_key(p)), p))


def assign_folds(
    items: Sequence[dict], num_folds: int, seed: int = 0, patient_key: Callable[[str], Any] | None = None
) -> list[dict]:
    """Assign ``fold`` to items, grouped by patient and stratified by label (reproducible by ``seed``).

    Patients are sorted by ``patient_key``, shuffled by ``seed``, then dealt, larger patients first, to the fold that
    currently holds the fewest items of their majority label: every patient's items land in one fold and classes stay
    balanced. The folds are therefore a function of the patients' keys, their labels and the seed only.

    Args:
        items: datalist items (``patient``, ``label``, ``case``).
        num_folds: at least 2.
        seed: seed of the shuffle (>= 0).
        patient_key: maps a ``patient`` value to the key patients are sorted by before the shuffle (default: the
            value itself). Give a key that does not depend on a pseudonym's salt (e.g. the original identifier, kept
            in memory) when the ``patient`` values are salted pseudonyms, so that the folds do not change with it.

    Returns:
        Copies of the items with ``fold`` set, sorted by ``case``.

    Raises:
        ValueError: ``num_folds`` below 2 or a negative ``seed``.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_patient[str(it["patient"])].append(it)
    rng = np.random.default_rng(seed)
    patients = _patient_order(by_patient, patient_key)
    rng.shuffle(patients)
    labels = sorted({int(it["label"]) for it in items})
    counts = np.zeros((num_folds, max(labels) + 1 if labels else 1), dtype=int)
    majority = {p: int(np.bincount([int(it["label"]) for it in by_patient[p]]).argmax()) for p in patients}
    # larger patients first so the greedy deal stays balanced
    patients.sort(key=lambda p: -len(by_patient[p]))
    out = []
    for p in patients:
        lab = majority[p]
        fold = int(np.lexsort((counts.sum(1), counts[:, lab]))[0])
        for it in by_patient[p]:
            new = dict(it)
            new["fold"] = fold
            out.append(new)
            counts[fold, int(it["label"])] += 1
    out.sort(key=lambda it: it["case"])
    return out


def split_by_patient(
    items: Sequence[dict], test_fraction: float, seed: int = 0, patient_key: Callable[[str], Any] | None = None
) -> tuple[list[dict], list[dict]]:
    """Split items into (rest, test) with whole patients on one side, stratified by patient majority label.

    Within each majority label, patients sorted by ``patient_key`` are shuffled by ``seed`` and taken into the test
    set until it holds about ``test_fraction`` of that label's items: the split is a function of the patients' keys,
    their labels and the seed only.

    Args:
        items: datalist items (``patient``, ``label``).
        test_fraction: share of the items held out, in [0, 1].
        seed: seed of the shuffle (>= 0).
        patient_key: as in :func:`assign_folds` (default: the ``patient`` value itself).

    Returns:
        ``(rest, test)``, each in the order of the shuffled patients.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1] or a negative ``seed``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be within [0, 1], got {test_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_patient[str(it["patient"])].append(it)
    rng = np.random.default_rng(seed)
    rest: list[dict] = []
    test: list[dict] = []
    by_label: dict[int, list[str]] = defaultdict(list)
    for p in _patient_order(by_patient, patient_key):
        lab = int(np.bincount([int(it["label"]) for it in by_patient[p]]).argmax())
        by_label[lab].append(p)
    for lab in sorted(by_label):
        patients = by_label[lab]
        rng.shuffle(patients)
        n_items = sum(len(by_patient[p]) for p in patients)
        target, taken = test_fraction * n_items, 0
        for p in patients:
            if taken < target - len(by_patient[p]) / 2:
                test.extend(by_patient[p])
                taken += len(by_patient[p])
            else:
                rest.extend(by_patient[p])
    return rest, test


def items_from_folder(folder: str | os.PathLike, pattern: str = "*.png") -> list[dict]:
    """Unlabelled items for every ROI file in ``folder`` (inference on a folder): case id = file stem."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise DatalistError(f"{folder}: no files matching {pattern!r}")
    return [{"image": str(f), "case": f.stem} for f in files]
