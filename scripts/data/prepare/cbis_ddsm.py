"""CBIS-DDSM (TCIA): the four case tables + the DICOM tree -> a calcification target set and an intermediate set.

- Target (``target="calc"``, the default): every calcification row; label MALIGNANT = 1, BENIGN /
  BENIGN_WITHOUT_CALLBACK = 0; ``birads`` = the table's ``assessment``; calc type / distribution, subtlety, breast
  density, laterality and view are kept; the official train/test split is kept (calc-train and calc-test share no
  patient). ``target="none"`` prepares no target set (CBIS-DDSM as intermediate data for one's own FFDM target).
- Intermediate (``intermediate``: ``"mass"`` (default), ``"calc"``, ``"both"`` or ``"none"``): the rows of those
  kinds, same label rule, official split kept per patient (a patient with a test row in any included table is test).
  Target patients are kept out, at the level of the case tables (before any image is read): with calcification
  rows in both sets, every patient of the target set; otherwise the patients of the target test set; nothing
  without a target set. The counts (rows, patients, why) go to the log, ``prepare_report.json``
  (``row_selection``) and the intermediate datalist's metadata (``row_kinds``, ``exclusion``).
- DICOM tree: both the tables' own layout (``<series>/<uid>/<uid>/000000.dcm``) and the NBIA Data Retriever's
  (``CBIS-DDSM/<series>/<date-study>/<n-description>/1-1.dcm``): files are found by the series folder name
  (e.g. ``Calc-Training_P_00005_RIGHT_CC_1``), and the ROI mask is told from the cropped image by content (a mask
  is binary), which also undoes the tables' swapped crop/mask paths.
- ROI centre = the centre of the mask's bounding box; pixel pitch from the DICOM, else ``source_pitch_mm``
  (CBIS-DDSM scans carry no spacing; about 50 um).
- Patient keys are the dataset's own public pseudonyms (``P_00005``), which are needed to trace a ROI back to the
  case tables; no DICOM attribute (PatientName, PatientID, dates) is read into any output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from scripts.data.prepare.cbis_tables import (
    RowSelection,
    describe_selection,
    find_tables,
    resolve_selection,
    select_rows,
)
from scripts.data.prepare.dicom_io import read_dicom
from scripts.data.prepare.errors import ErrorReport, PrepareError
from scripts.data.prepare.pixels import MappedImage
from scripts.data.prepare.roi import RoiGeometry, box_centre, crop_mask, crop_roi, mask_box
from scripts.data.prepare.staging import CaseSpec, prepare_source
from scripts.data.schema import read_datalist, write_datalist
from scripts.engine.atomic import write_json

logger = logging.getLogger(__name__)

PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
SERIES_RE = re.compile(r"^(Calc|Mass)-(Training|Test)_P_\d+_(LEFT|RIGHT)_(CC|MLO)(_\d+)?$")
DEFAULT_PITCH_MM = 0.05


class DicomTree:
    """Finds the DICOM files of a table path in either TCIA layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PrepareError(f"{root}: DICOM folder not found")
        self.series: dict[str, Path] = {}
        for dirpath, dirnames, _ in os.walk(self.root):
            for d in dirnames:
                if SERIES_RE.match(d) and d not in self.series:
                    self.series[d] = Path(dirpath, d)

    def direct(self, table_path: str) -> Path | None:
        """The file at exactly the table's path (old layout), if present."""
        rel = table_path.replace("\\", "/").strip("/")
        for base in (self.root, self.root / "CBIS-DDSM"):
            p = base / rel
            if p.is_file():
                return p
        return None

    def files(self, table_path: str) -> list[Path]:
        """All DICOM files of the table path's series folder (e.g. ``Calc-Test_P_00038_LEFT_CC_1``)."""
        key = table_path.replace("\\", "/").strip("/").split("/")[0]
        folder = self.series.get(key)
        if folder is None:
            return []
        return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def _is_binary(pixels: MappedImage) -> bool:
    """True when the image holds two values, 0 and its maximum (checked block by block)."""
    top = pixels.value_range()[1]
    return bool(top > 0 and not any(np.any((block != 0) & (block != top)) for _, block in pixels.blocks()))


def _raw_dicom(path: Path) -> MappedImage:
    """Stored pixel values (no windowing), for telling a binary mask from a cropped image."""
    return read_dicom(path, apply_voi=False).mapped


def find_full_image(tree: DicomTree, row: dict) -> Path:
    """The full mammogram file of a table row."""
    p = tree.direct(row["image_file_path"])
    if p is not None:
        return p
    files = tree.files(row["image_file_path"])
    if not files:
        raise PrepareError(
            f"full mammogram not found under {tree.root} for series {row['image_file_path'].split('/')[0]}"
        )
    return max(files, key=lambda f: f.stat().st_size)


def find_mask(tree: DicomTree, row: dict, full_shape: tuple[int, int]) -> tuple[Path, np.ndarray, bool]:
    """(path, boolean mask, swapped) for a row: the binary file among the crop/mask candidates, preferring the one
    whose shape matches the full image. ``swapped`` is True when it sat at the table's crop path."""
    crop_p, mask_p = tree.direct(row["cropped_image_file_path"]), tree.direct(row["roi_mask_file_path"])
    if crop_p is not None or mask_p is not None:
        candidates = [p for p in (mask_p, crop_p) if p is not None]
    else:
        candidates = tree.files(row["roi_mask_file_path"]) or tree.files(row["cropped_image_file_path"])
    if not candidates:
        raise PrepareError(f"ROI mask not found for series {row['roi_mask_file_path'].split('/')[0]}")
    best = None
    problems = []
    for p in candidates:
        try:
            px = _raw_dicom(p)
        except PrepareError as e:
            problems.append(f"{p.name}: {e}")
            continue
        if not _is_binary(px):
            continue
        mismatch = abs(px.shape[0] - full_shape[0]) + abs(px.shape[1] - full_shape[1])
        if best is None or mismatch < best[0]:
            best = (mismatch, p, px.above(0.0))
    if best is None:
        extra = f" ({'; '.join(problems)})" if problems else ""
        raise PrepareError(f"no binary ROI mask among {[p.name for p in candidates]}{extra}")
    swapped = crop_p is not None and best[1] == crop_p and crop_p != mask_p
    return best[1], best[2], swapped


class _FullCache:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.value = None

    def get(self, path: Path):
        if path != self.path:
            self.path, self.value = None, None
            self.value = read_dicom(path)
            self.path = path
        return self.value


def _render(tree: DicomTree, row: dict, cache: _FullCache, geom: RoiGeometry, pitch: float):
    def render():
        full_path = find_full_image(tree, row)
        full = cache.get(full_path)
        spacing = full.spacing_mm or (pitch, pitch)
        mask_path, mask, swapped = find_mask(tree, row, full.mapped.shape)
        box = mask_box(mask)
        info = {"source_spacing_mm": [round(s, 6) for s in spacing], "paths_swapped": swapped}
        if mask.shape != full.mapped.shape:
            # a known quirk: some masks are a few pixels off the full image; map by proportion
            ratio = (full.mapped.shape[0] / mask.shape[0], full.mapped.shape[1] / mask.shape[1])
            if max(abs(r - 1.0) for r in ratio) > 0.05:
                raise PrepareError(f"mask shape {mask.shape} does not match the full image {full.mapped.shape}")
            info["mask_shape_mismatch"] = True
        else:
            ratio = (1.0, 1.0)
        mc = box_centre(box)
        centre = ((mc[0] + 0.5) * ratio[0] - 0.5, (mc[1] + 0.5) * ratio[1] - 0.5)
        roi, outside = crop_roi(full.mapped, spacing, centre, geom)
        mspacing = (spacing[0] * ratio[0], spacing[1] * ratio[1])
        roi_mask = crop_mask(mask, mspacing, mc, geom)
        extent = ((box[2] - box[0] + 1) * mspacing[0], (box[3] - box[1] + 1) * mspacing[1])
        info.update(
            outside_fraction=round(outside, 4),
            lesion_extent_mm=[round(e, 2) for e in extent],
            roi_exceeds_fov=bool(max(extent) > geom.fov_mm),
            spacing_mm=geom.pitch_mm,
        )
        return roi, roi_mask, info

    return render


def _int(v: str) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def cbis_cases(
    dicom_root: str | Path,
    selection: RowSelection,
    geom: RoiGeometry,
    report: ErrorReport,
    source_pitch_mm: float = DEFAULT_PITCH_MM,
) -> Iterator[CaseSpec]:
    """Yield one :class:`CaseSpec` per selected table row (see :func:`select_rows`)."""
    tree = DicomTree(dicom_root)
    cache = _FullCache()
    for planned in selection.rows:
        kind, split, table, row = planned.kind, planned.table_split, planned.table, planned.row
        series = f"{kind}-{split}_{row['patient_id']}_{row.get('left_or_right_breast', '')}"
        case = f"cbis_{series}_{row.get('image_view', '')}_{row.get('abnormality_id', '')}".lower()
        case = re.sub(r"[^a-z0-9_]+", "_", case)
        label = PATHOLOGY.get(row["pathology"].upper())
        if label is None:
            report.fail(case, table.name, f"pathology {row['pathology']!r} not in {sorted(PATHOLOGY)}")
            continue
        birads = _int(row.get("assessment"))
        fields = {
            "label": label,
            "patient": row["patient_id"],
            "birads": birads if birads is not None and 0 <= birads <= 6 else None,
            "pathology": row["pathology"].upper(),
            "subtlety": _int(row.get("subtlety")),
            "breast_density": _int(row.get("breast_density")),
            "laterality": row.get("left_or_right_breast"),
            "view": row.get("image_view"),
            "abnormality_id": _int(row.get("abnormality_id")),
        }
        if kind == "calc":
            fields.update(
                calc_type=row.get("calc_type") or None, calc_distribution=row.get("calc_distribution") or None
            )
        else:
            fields.update(mass_shape=row.get("mass_shape") or None, mass_margins=row.get("mass_margins") or None)
        if planned.split != split:
            fields["table_split"] = split  # moved to test: the patient has a test row in another table
        where = f"{table.name}: {row['image_file_path'].split('/')[0]} / {row['roi_mask_file_path'].split('/')[0]}"
        render = _render(tree, row, cache, geom, source_pitch_mm)
        yield CaseSpec(case, planned.task, where, fields, render, planned.split)


def _item_kind(item: dict) -> str:
    return "calc" if item["case"].startswith("cbis_calc_") else "mass"


def _annotate_datalists(datalists: dict[str, str], selection: RowSelection) -> None:
    """Add to each written datalist's metadata which kinds of rows it holds (and, for the intermediate set, what
    was excluded and why); re-validated and rewritten atomically."""
    for task, path in datalists.items():
        datalist = read_datalist(path, validate=False)
        items = [it for s in ("training", "validation", "test") for it in datalist.get(s, [])]
        meta = datalist["metadata"]
        if task == "target":
            meta["row_kinds"] = ["calc"]
        else:
            info = selection.summary["intermediate"]
            meta["row_kinds"] = list(selection.intermediate_kinds)
            meta["exclusion"] = info["exclusion"]
            meta["moved_to_test"] = info["moved_to_test"]
        meta["items_by_kind"] = dict(sorted(Counter(_item_kind(it) for it in items).items()))
        write_datalist(path, datalist)


def prepare_cbis_ddsm(
    dicom_root: str | Path,
    out_dir: str | Path,
    tables: str | Path | None = None,
    geom: RoiGeometry | None = None,
    num_folds: int = 3,
    seed: int = 0,
    on_error: str = "stop",
    overwrite: bool = False,
    source_pitch_mm: float = DEFAULT_PITCH_MM,
    mass: bool | None = None,
    target: str = "calc",
    intermediate: str = "mass",
) -> dict:
    """Prepare CBIS-DDSM under ``out_dir``: ``datalist_target.json`` (calcification rows, unless ``target="none"``)
    and ``datalist_intermediate.json`` (rows of ``intermediate``: mass, calc, both or none), target patients kept
    out of the intermediate set (:func:`select_rows`). ``mass=False`` is the deprecated spelling of
    ``intermediate="none"``. Returns the report (see ``scripts.data.prepare.staging.prepare_source``) with
    ``row_selection`` added."""
    if mass is not None:
        warnings.warn("mass= is deprecated: use intermediate='mass' or 'none'", DeprecationWarning, stacklevel=2)
        if not mass:
            if intermediate not in ("mass", "none"):
                raise ValueError(f"mass=False contradicts intermediate={intermediate!r}")
            intermediate = "none"
    target, kinds = resolve_selection(target, intermediate)
    geom = geom or RoiGeometry()
    found = find_tables(tables or dicom_root, kinds=("calc",) if target == "calc" else kinds)
    selection = select_rows(found, target, intermediate)
    for line in describe_selection(selection.summary):
        logger.info("%s", line)
    if selection.summary["missing_tables"]:
        logger.warning("case table(s) not found: %s", ", ".join(selection.summary["missing_tables"]))
    if kinds and not selection.summary["intermediate"]["rows"]:
        logger.warning("the intermediate set is empty: %s", "; ".join(describe_selection(selection.summary)[1:]))
    digest = hashlib.sha256(b"".join(Path(p).read_bytes() for _, p in sorted(found.items()))).hexdigest()[:16]
    settings = {"source_pitch_mm": source_pitch_mm, "mass": "mass" in kinds, "input_digest": digest}
    if target != "calc" or kinds not in (("mass",), ()):
        settings.update(target=target, intermediate=list(kinds))  # the two historical choices keep their fingerprint
    result = prepare_source(
        "cbis-ddsm",
        lambda report: cbis_cases(dicom_root, selection, geom, report, source_pitch_mm),
        out_dir,
        geom,
        settings,
        num_folds=num_folds,
        seed=seed,
        on_error=on_error,
        overwrite=overwrite,
    )
    _annotate_datalists(result["datalists"], selection)
    result["row_selection"] = selection.summary
    write_json(Path(out_dir) / "prepare_report.json", result)  # the report prepare_source wrote, + row_selection
    return result
