"""Streaming case processing, resumable atomic output, and patient-safe datalist assembly shared by all sources.

Output layout under ``out_dir``::

    roi/<task>/<case>.png         16-bit ROI (scripts.data.imageio format)
    roi/<task>/<case>_mask.png    8-bit lesion mask (when the source has one)
    roi/<task>/<case>.json        per-case record: the datalist item + the settings fingerprint (for resuming)
    datalist_<task>.json          written last, validated (scripts.data.schema.write_datalist)
    prepare_report.json           settings, counts, per-case errors and warnings
    prepare.json                  settings fingerprint of the run that owns this folder

Every file is written atomically and the datalists last, so an interrupted run leaves no datalist that points
at a half-written dataset; running the same command again reuses finished cases (same settings only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from scripts.data.imageio import write_mask_png, write_roi_png
from scripts.data.prepare.bounds import scrub
from scripts.data.prepare.errors import ErrorReport, PreparationFailed, PrepareError
from scripts.data.schema import (
    TARGET_CLASSES,
    DatalistError,
    assign_folds,
    make_datalist,
    make_item,
    split_by_patient,
    write_datalist,
)
from scripts.engine.atomic import write_json, write_text
from scripts.engine.fingerprint import compute, digest_of

logger = logging.getLogger(__name__)

TASKS = ("target", "intermediate")
MAX_OUTSIDE_FRACTION = 0.75
STAGING = ".prepare-new"


@dataclass
class CaseSpec:
    """One ROI to prepare. ``render()`` returns ``(roi (S, S) float [0, 1], mask (S, S) bool or None, info)``.

    ``fields`` hold the datalist item's keys (``label``, ``patient``, optional ``birads``, ``lesion``, descriptive
    extras); ``split`` is ``"training"``/``"test"`` when the source has an official split, else ``None``.
    ``file`` names the input for the error report (never a patient identifier beyond what the user's path holds).

    ``patient_key`` and ``case_key`` order patients before the seeded split and items in the datalists; they default
    to ``fields["patient"]`` and ``case``. A source whose patient and case ids are salted pseudonyms gives keys that
    do not depend on the salt (e.g. the original identifiers), so that the split is the same in every output folder.
    They are kept in memory only: never written to any output.
    """

    case: str
    task: str
    file: str
    fields: dict
    render: Callable[[], tuple]
    split: str | None = None
    patient_key: str | None = None
    case_key: str | None = None


class Pseudonymiser:
    """Keyed hash (HMAC-SHA256) of identifiers such as hospital patient ids: stable per salt, not reversible
    without it. The salt is read from ``salt`` or ``<out_dir>/.pseudonym_salt`` (created with a random value and
    mode 0600 when absent): keep that file private, and reuse it to get the same keys for new data."""

    def __init__(self, out_dir: str | os.PathLike, salt: str | None = None, prefix: str = "pt"):
        if salt is None:
            path = Path(out_dir) / ".pseudonym_salt"
            if path.is_file():
                salt = path.read_text().strip()
            else:
                salt = secrets.token_hex(16)
                write_text(path, salt + "\n")
                os.chmod(path, 0o600)
        self._key = salt.encode()
        self.prefix = prefix

    def __call__(self, identifier: str) -> str:
        digest = hmac.new(self._key, str(identifier).strip().encode(), hashlib.sha256).hexdigest()[:12]
        return f"{self.prefix}_{digest}"


@dataclass
class OutputFolder:
    """Owns ``out_dir``: settings check, per-case atomic writes, resumable records.

    A folder prepared with other settings is refused, or with ``overwrite`` the new run is built in a staging
    folder (``out_dir/.prepare-new``) and only :meth:`commit` (after the new datalists are written) replaces the old
    ROI files, datalists and ``prepare.json``: a failing ``--overwrite`` run leaves the old preparation as it was.
    """

    out_dir: Path
    settings: dict
    overwrite: bool = False
    split: dict | None = None
    fingerprint: str = field(init=False)
    work_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.fingerprint = digest_of(self.settings)[:16]  # short: it is shown in messages
        self.work_dir = self.out_dir
        manifest = self.out_dir / "prepare.json"
        if manifest.is_file():
            try:
                recorded = json.loads(manifest.read_text())
                old, old_settings = recorded.get("fingerprint"), recorded.get("settings") or {}
            except (OSError, ValueError, AttributeError):
                old, old_settings = "unreadable", {}
            if old != self.fingerprint:
                changed = compute(settings=self.settings).changes(compute(settings=old_settings).parts)
                if not self.overwrite:
                    raise PreparationFailed(
                        f"{self.out_dir} holds a preparation made with other settings (fingerprint {old}; "
                        f"{', '.join(changed) or 'settings unreadable'}); choose another --out folder or pass --overwrite",
                        ErrorReport(),
                    )
                self.work_dir = self.out_dir / STAGING
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self.work_dir.mkdir(parents=True)
                return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(manifest, self.manifest())

    def manifest(self) -> dict:
        """The content of ``prepare.json``: the settings' fingerprint, the settings, and what the split depends on."""
        out = {"fingerprint": self.fingerprint, "settings": self.settings}
        if self.split is not None:
            out["split"] = self.split
        return out

    @property
    def staged(self) -> bool:
        """True when this run is built in the staging folder (``--overwrite`` of other settings)."""
        return self.work_dir != self.out_dir

    def commit(self) -> None:
        """Move a staged run into place (old ROI files and datalists out, new ones in), then write the manifest."""
        if not self.staged:
            return
        old = self.out_dir / ".prepare-old"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        for p in [self.out_dir / "roi", *self.out_dir.glob("datalist_*.json")]:
            if p.exists():
                os.replace(p, old / p.name)
        for p in [self.work_dir / "roi", *self.work_dir.glob("datalist_*.json")]:
            if p.exists():
                os.replace(p, self.out_dir / p.name)
        write_json(self.out_dir / "prepare.json", self.manifest())
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir = self.out_dir

    def discard(self) -> None:
        """Remove a staged run that failed (the old preparation stays)."""
        if self.staged:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _paths(self, task: str, case: str) -> tuple[Path, Path, Path]:
        folder = self.work_dir / "roi" / task
        return folder / f"{case}.png", folder / f"{case}_mask.png", folder / f"{case}.json"

    def reuse(self, spec: CaseSpec) -> dict | None:
        """The finished item of an earlier run with the same settings, or ``None``."""
        img, _, rec = self._paths(spec.task, spec.case)
        if not rec.is_file() or not img.is_file():
            return None
        try:
            record = json.loads(rec.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("fingerprint") != self.fingerprint:
            return None
        item = record["item"]
        if item.get("mask") and not (self.work_dir / item["mask"]).is_file():
            return None
        return item

    def write(self, spec: CaseSpec, roi: np.ndarray, mask: np.ndarray | None, info: dict) -> dict:
        """Write ROI (+ mask), then the record; return the datalist item (paths relative to ``out_dir``)."""
        img, msk, rec = self._paths(spec.task, spec.case)
        write_roi_png(img, roi)
        mask_rel = None
        if mask is not None:
            write_mask_png(msk, mask)
            mask_rel = msk.relative_to(self.work_dir).as_posix()
        fields = dict(spec.fields)
        fields.update(info)
        item = make_item(
            image=img.relative_to(self.work_dir).as_posix(),
            label=fields.pop("label"),
            patient=fields.pop("patient"),
            case=spec.case,
            mask=mask_rel,
            **fields,
        )
        if spec.split is not None:
            item["official_split"] = spec.split
        write_json(rec, {"fingerprint": self.fingerprint, "item": item})
        return item


def run_cases(specs: Iterable[CaseSpec], out: OutputFolder, report: ErrorReport) -> dict[str, list[dict]]:
    """Prepare each case in turn (streaming: one full image in memory at a time); returns items by task."""
    items: dict[str, list[dict]] = {t: [] for t in TASKS}
    seen: set[str] = set()
    for spec in specs:
        if spec.case in seen:
            report.fail(spec.case, spec.file, "duplicate case id (the same ROI listed twice)")
            continue
        seen.add(spec.case)
        item = out.reuse(spec)
        if item is not None:
            if item.get("outside_fraction", 0) > 0:
                report.warn(spec.case, f"{item['outside_fraction']:.0%} of the ROI lies outside the image (padded)")
            report.n_ok += 1
            report.n_reused += 1
            items[spec.task].append(item)
            continue
        try:
            roi, mask, info = spec.render()
            frac = float(info.get("outside_fraction", 0.0))
            if frac > MAX_OUTSIDE_FRACTION:
                raise PrepareError(f"{frac:.0%} of the ROI lies outside the image (limit {MAX_OUTSIDE_FRACTION:.0%})")
            if mask is not None and not np.any(mask):
                raise PrepareError("lesion mask is empty after resampling to the ROI grid")
            item = out.write(spec, roi, mask, info)
        except PrepareError as e:
            report.fail(spec.case, spec.file, str(e))
            continue
        except MemoryError:  # one huge or hostile input: that case fails, the others go on
            report.fail(spec.case, spec.file, "not enough memory to read or resample this image")
            continue
        except Exception as e:  # a bug or an input we did not foresee: still a per-case report
            report.fail(spec.case, spec.file, f"unexpected error ({type(e).__name__}: {scrub(str(e), 160)})")
            continue
        if frac > 0:
            pad = out.settings.get("pad")
            report.warn(spec.case, f"{frac:.0%} of the ROI lies outside the image and was padded ({pad})")
        report.n_ok += 1
        items[spec.task].append(item)
    return items


def _where(items: list[dict]) -> str:
    lines = sorted(int(it["csv_line"]) for it in items if it.get("csv_line") is not None)
    if lines:
        return f"CSV line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:10]))}{' ...' if len(lines) > 10 else ''}"
    return "case(s) " + ", ".join(sorted(str(it["case"]) for it in items)[:10])


def _check_patient_splits(task: str, train: list[dict], test: list[dict]) -> None:
    """Refuse an official split that puts one patient in both training and test, naming the input lines."""
    in_test: dict[str, list[dict]] = {}
    for it in test:
        in_test.setdefault(str(it["patient"]), []).append(it)
    problems = []
    for patient in sorted({str(it["patient"]) for it in train} & set(in_test)):
        tr = [it for it in train if str(it["patient"]) == patient]
        problems.append(f"patient {patient} is in training ({_where(tr)}) and in test ({_where(in_test[patient])})")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise PrepareError(
            f"{task}: the given split puts {len(problems)} patient(s) in both training and test: "
            + "; ".join(problems[:5])
            + more
            + ". Give each patient's rows one split."
        )


def build_datalists(
    items: dict[str, list[dict]],
    out_dir: str | os.PathLike,
    source: str,
    pitch_mm: float,
    num_folds: int,
    seed: int,
    test_fraction: float,
    class_names: tuple = TARGET_CLASSES,
    order: Mapping[str, tuple[str, str]] | None = None,
    **metadata,
) -> dict[str, Path]:
    """Split, fold and write ``datalist_<task>.json`` for every task with items.

    Target: the official split when every item has one, else :func:`split_by_patient`. Intermediate: patients
    of the target test set are dropped; its own official test split is kept when present (no held-out split is
    made otherwise). Training items get patient-grouped, label-stratified folds (:func:`assign_folds`).

    ``order`` maps a case id to its ``(patient_key, case_key)`` (:class:`CaseSpec`): patients are sorted by the
    first before the seeded shuffle and items by the second in the datalists, so that split, folds and item order
    are a function of the keys, the labels and ``seed`` only. Cases without an entry use their patient and case ids.
    """
    order = order or {}
    patient_keys: dict[str, str] = {}
    for task_items in items.values():
        for it in task_items:
            patient_keys.setdefault(str(it["patient"]), order.get(it["case"], (str(it["patient"]),))[0])

    def patient_key(patient: str) -> str:
        return patient_keys.get(patient, patient)

    def case_key(item: dict) -> tuple[str, str]:
        return order.get(item["case"], ("", item["case"]))[1], item["case"]

    written: dict[str, Path] = {}
    target = items.get("target", [])
    target_test_patients: set[str] = set()
    for task in TASKS:
        task_items = items.get(task, [])
        dropped = 0
        if task == "intermediate":
            kept = [it for it in task_items if str(it["patient"]) not in target_test_patients]
            dropped = len(task_items) - len(kept)
            task_items = kept
        if not task_items:
            continue
        has_split = [it.get("official_split") in ("training", "test") for it in task_items]
        official = all(has_split)
        if any(has_split) and not official:
            raise PrepareError(f"{task}: a split is given for some cases only; give it for all or for none")
        if official:
            train = [it for it in task_items if it["official_split"] == "training"]
            test = [it for it in task_items if it["official_split"] == "test"]
            _check_patient_splits(task, train, test)
            split_rule = "official"
        elif task == "target":
            train, test = split_by_patient(task_items, test_fraction, seed=seed, patient_key=patient_key)
            split_rule = f"patient-grouped random, test fraction {test_fraction}, seed {seed}"
        else:
            train, test = list(task_items), []
            split_rule = "all training"
        if task == "target":
            target_test_patients = {str(it["patient"]) for it in test}
        train = assign_folds(train, num_folds, seed=seed, patient_key=patient_key) if train else []
        train, test = sorted(train, key=case_key), sorted(test, key=case_key)
        datalist = make_datalist(
            train,
            test,
            source=source,
            task=task,
            class_names=class_names,
            pixel_spacing_mm=pitch_mm,
            num_folds=num_folds,
            split_rule=split_rule,
            **({"dropped_items_of_target_test_patients": dropped} if task == "intermediate" else {}),
            **metadata,
        )
        path = Path(out_dir) / f"datalist_{task}.json"
        write_datalist(path, datalist)
        written[task] = path
        logger.info("%s: %d training (%d folds), %d test -> %s", task, len(train), num_folds, len(test), path)
    if target and "target" not in written:
        raise PrepareError("no target datalist written")
    return written


def check_split_options(num_folds: int, seed: int, test_fraction: float) -> None:
    """Refuse split options that could only fail after every image was decoded.

    Raises:
        ValueError: naming the option: ``num_folds`` below 2, a negative ``seed`` (numpy's generators refuse one),
            or ``test_fraction`` outside [0, 1) (0: no held-out test set).
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2 (patient-grouped cross-validation), got {num_folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(test_fraction, (int, float, np.floating)) or not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be a number >= 0 and < 1, got {test_fraction!r}")


def prepare_source(
    source: str,
    make_specs: Callable[[ErrorReport], Iterable[CaseSpec]],
    out_dir: str | os.PathLike,
    geom,
    settings: dict,
    num_folds: int = 3,
    seed: int = 0,
    test_fraction: float = 0.25,
    on_error: str = "stop",
    overwrite: bool = False,
    patient_order: str = "the datalist's patient ids",
) -> dict:
    """Run one source end to end: cases -> ROI files -> datalists -> report. Returns the report as a dict
    (with ``datalists``: task -> path). Raises :class:`PreparationFailed` on the first case error when
    ``on_error="stop"``, or when no case could be prepared.

    The options are checked before any case is made (:func:`check_split_options`). Split and folds depend on the
    cases' ``patient_key``/``case_key`` (:class:`CaseSpec`), labels, official splits and the options only, never on
    the output folder; ``prepare.json`` says so under ``split`` (``patient_order`` describes the patient keys).
    """
    check_split_options(num_folds, seed, test_fraction)
    settings = {"source": source, **geom.as_dict(), "num_folds": num_folds, "seed": seed, **settings}
    settings.setdefault("test_fraction", test_fraction)
    split = {
        "depends_on": {
            "input_digest": settings.get("input_digest"),
            "seed": seed,
            "test_fraction": test_fraction,
            "num_folds": num_folds,
        },
        "patient_order": f"{patient_order}, sorted, then shuffled by numpy.random.default_rng(seed)",
        "official_split": "kept where the input gives one for every case of a task",
        "independent_of": ["the output folder", "the pseudonym salt", "the machine"],
        # NumPy keeps Generator streams stable in practice but does not promise it across versions
        "generator": f"numpy {np.__version__} default_rng (PCG64)",
    }
    out = OutputFolder(Path(out_dir), settings, overwrite=overwrite, split=split)
    report = ErrorReport(on_error=on_error)
    report_path = out.out_dir / ("prepare_report_failed.json" if out.staged else "prepare_report.json")

    def failed(message: str) -> None:
        result = {"settings": settings, "datalists": {}, **report.as_dict(), "status": f"failed: {message}"}
        if out.staged:
            result["note"] = "--overwrite run failed: the earlier preparation in this folder was left as it was"
        write_json(report_path, result)
        out.discard()

    order: dict[str, tuple[str, str]] = {}

    def recorded(specs: Iterable[CaseSpec]) -> Iterable[CaseSpec]:
        for spec in specs:
            patient = spec.patient_key if spec.patient_key is not None else str(spec.fields.get("patient"))
            order.setdefault(spec.case, (patient, spec.case_key if spec.case_key is not None else spec.case))
            yield spec

    try:
        items = run_cases(recorded(make_specs(report)), out, report)
        if not any(items.values()):
            raise PreparationFailed("no case could be prepared: " + report.summary(), report)
        written = build_datalists(
            items,
            out.work_dir,
            source=source,
            pitch_mm=geom.pitch_mm,
            num_folds=num_folds,
            seed=seed,
            test_fraction=test_fraction,
            order=order,
            roi_geometry=geom.as_dict(),
        )
    except PreparationFailed as e:
        e.report = report
        e.report_path = report_path
        failed(str(e))
        raise
    except (PrepareError, DatalistError) as e:
        failed(str(e))
        err = PreparationFailed(str(e), report)
        err.report_path = report_path
        raise err from None
    except BaseException as e:  # interrupted, or a bug outside the per-case isolation: keep the record
        failed(f"interrupted ({type(e).__name__})")
        raise
    out.commit()
    report_path = out.out_dir / "prepare_report.json"
    result = {
        "settings": settings,
        "datalists": {k: str(out.out_dir / Path(v).name) for k, v in written.items()},
        **report.as_dict(),
        "status": "ok",
    }
    write_json(report_path, result)
    stale = out.out_dir / "prepare_report_failed.json"
    if stale.is_file():
        stale.unlink()
    logger.info("%s", report.summary())
    return result
