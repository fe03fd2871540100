"""Your own data: images (DICOM, PNG/PGM/TIFF or NIfTI) + one CSV row per ROI -> datalists.

CSV columns (header names are case-insensitive; paths relative to the CSV's folder):

============  ========  =========================================================================================
column        required  meaning
============  ========  =========================================================================================
image         yes       image file
label         yes       0/1, benign/malignant (also B/M, BENIGN_WITHOUT_CALLBACK)
patient       yes       patient identifier; replaced by a keyed hash (never written out)
x, y          one ROI   ROI centre, column x and row y, origin top-left; with ``size`` -> disc mask of that diameter
x0,y0,x1,y1   form      bounding box (inclusive) -> box mask; its centre is the ROI centre
mask          of three  lesion mask file on the image's pixel grid -> the mask's box centre, the mask resampled
unit          no        ``px`` (default) or ``mm`` for x, y, size and the box
birads        no        BI-RADS category 0-6
split         no        ``train``/``training`` or ``test``: kept as given (otherwise a patient-grouped split)
task          no        ``target`` or ``intermediate`` (default ``--task``)
lesion        no        lesion id shared by the views of one lesion (hashed like the patient)
spacing_mm    no        pixel pitch for this image, overriding the file (and ``--source-pitch-mm``)
============  ========  =========================================================================================
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterator

from scripts.data.prepare.errors import ErrorReport, PrepareError
from scripts.data.prepare.loaders import LoadedImage, load_image, load_mask
from scripts.data.prepare.roi import RoiGeometry, box_centre, box_mask, crop_mask, crop_roi, disc_mask, mask_box
from scripts.data.prepare.staging import CaseSpec, Pseudonymiser, prepare_source
from scripts.engine.atomic import file_digest

LABELS = {
    "0": 0,
    "1": 1,
    "b": 0,
    "m": 1,
    "benign": 0,
    "benign_without_callback": 0,
    "malignant": 1,
}


def parse_label(value: str) -> int:
    """Class index of a label cell (0/1, benign/malignant, B/M)."""
    key = str(value).strip().lower()
    if key not in LABELS:
        raise PrepareError(f"label {value!r} is not one of 0, 1, benign, malignant")
    return LABELS[key]


def cell_float(row: dict, key: str, error: type[Exception] = PrepareError) -> float | None:
    """The number in column ``key`` of a CSV row; ``None`` when empty; ``error`` for text or a non-finite value."""
    v = (row.get(key) or "").strip()
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        raise error(f"column {key}: {v!r} is not a number") from None
    if not math.isfinite(f):
        raise error(f"column {key}: {v!r} is not finite")
    return f


def read_csv_rows(
    csv_path: str | Path, error: type[Exception] = PrepareError, required: tuple[str, ...] = (), name: str = ""
) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every data row of a CSV of image paths; header names stripped and lower-cased.

    The one CSV reader of preparation (:func:`csv_cases`) and inference (``scripts.data.inputs.items_from_csv``).
    Blank lines before the header are skipped (line numbers stay those of the file); a missing or unreadable file,
    a file without rows, or a header without one of the ``required`` columns raises ``error`` with one clear
    message naming the file (``name``, default the file's name). Paths in cells are relative to the CSV's folder
    (:func:`csv_cell_path`)."""
    csv_path = Path(csv_path)
    label = name or csv_path.name
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        raise error(f"{label}: CSV file not found") from None
    except IsADirectoryError:
        raise error(f"{label}: is a folder, not a CSV file") from None
    except UnicodeDecodeError as e:
        raise error(f"{label}: not a UTF-8 text file (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise error(f"{label}: cannot be read ({type(e).__name__})") from None
    skip = 0
    while skip < len(lines) and not lines[skip].strip():
        skip += 1
    try:
        reader = csv.DictReader(lines[skip:])
        rows = []
        for r in reader:
            row = {(k or "").strip().lower(): (v if isinstance(v, str) else "") for k, v in r.items()}
            rows.append((skip + reader.line_num, row))
    except csv.Error as e:
        raise error(f"{label}: not a readable CSV ({e})") from None
    if not rows:
        raise error(f"{label}: no rows (a header line and at least one row are expected)")
    missing = [c for c in required if c not in rows[0][1]]
    if missing:
        raise error(
            f"{label}: missing column(s) {', '.join(missing)} in the header line "
            f"(found: {', '.join(c for c in rows[0][1] if c)[:200] or 'none'})"
        )
    return rows


def csv_cell_path(csv_path: str | Path, cell: str) -> Path:
    """The file named in a CSV cell: relative paths are relative to the CSV's folder."""
    return Path(csv_path).parent / cell.strip()


def cell_unit(row: dict, error: type[Exception] = PrepareError) -> str:
    """The ``unit`` cell of a row: ``"px"`` (default) or ``"mm"``."""
    unit = (row.get("unit") or "px").strip().lower()
    if unit not in ("px", "mm"):
        raise error(f"unit {unit!r} must be px or mm")
    return unit


def _birads(row: dict) -> int | None:
    v = (row.get("birads") or "").strip()
    if v == "":
        return None
    try:
        b = int(float(v.rstrip("abcABC")))  # 4a/4b/4c -> 4
    except ValueError:
        raise PrepareError(f"birads {v!r} is not a BI-RADS category") from None
    if not 0 <= b <= 6:
        raise PrepareError(f"birads {b} outside 0..6")
    return b


class _ImageCache:
    def __init__(self) -> None:
        self.key = None
        self.value: LoadedImage | None = None

    def get(self, path: Path, spacing) -> LoadedImage:
        key = (path, spacing)
        if key != self.key:
            self.key, self.value = None, None
            self.value = load_image(path, spacing_mm=spacing)
            self.key = key
        return self.value


def _render(row: dict, path: Path, csv_path: Path, cache: _ImageCache, geom: RoiGeometry, pitch: float | None):
    def render():
        spacing_override = cell_float(row, "spacing_mm")
        spacing_override = pitch if spacing_override is None else spacing_override
        img = cache.get(path, spacing_override)
        spacing = img.spacing_mm
        if spacing is None:
            raise PrepareError(
                "pixel pitch unknown: the image states none; add a spacing_mm column or --source-pitch-mm"
            )
        unit = cell_unit(row)

        def to_px(v: float, axis: int) -> float:  # axis 0 rows (y), 1 cols (x)
            return v / spacing[axis] - 0.5 if unit == "mm" else v

        def to_mm(v: float, axis: int) -> float:
            return v if unit == "mm" else v * spacing[axis]

        info: dict = {"source_spacing_mm": [round(s, 6) for s in spacing]}
        x, y = cell_float(row, "x"), cell_float(row, "y")
        box = [cell_float(row, k) for k in ("x0", "y0", "x1", "y1")]
        mask_cell = (row.get("mask") or "").strip()
        if mask_cell:
            full_mask = load_mask(csv_cell_path(csv_path, mask_cell))
            if full_mask.shape != img.mapped.shape:
                raise PrepareError(f"mask shape {full_mask.shape} differs from image shape {img.mapped.shape}")
            b = mask_box(full_mask)
            centre = box_centre(b)
            roi, outside = crop_roi(img.mapped, spacing, centre, geom)
            mask = crop_mask(full_mask, spacing, centre, geom)
            extent = ((b[2] - b[0] + 1) * spacing[0], (b[3] - b[1] + 1) * spacing[1])
        elif all(v is not None for v in box):
            x0, y0, x1, y1 = box
            if x1 < x0 or y1 < y0:
                raise PrepareError(f"empty bounding box x0={x0}, y0={y0}, x1={x1}, y1={y1}")
            centre = ((to_px(y0, 0) + to_px(y1, 0)) / 2, (to_px(x0, 1) + to_px(x1, 1)) / 2)
            roi, outside = crop_roi(img.mapped, spacing, centre, geom)
            extent = (
                to_mm(y1 - y0, 0) + (spacing[0] if unit == "px" else 0),
                to_mm(x1 - x0, 1) + (spacing[1] if unit == "px" else 0),
            )
            mask = box_mask(geom, (extent[0] / 2, extent[1] / 2))
        elif x is not None and y is not None:
            centre = (to_px(y, 0), to_px(x, 1))
            roi, outside = crop_roi(img.mapped, spacing, centre, geom)
            size = cell_float(row, "size")
            if size is not None:
                if size <= 0:
                    raise PrepareError(f"size {size} must be positive")
                d = to_mm(size, 1)
                extent = (d, d)
                mask = disc_mask(geom, d / 2)
            else:
                extent, mask = (0.0, 0.0), None
        else:
            raise PrepareError("no ROI: give x and y (+ size), or x0, y0, x1, y1, or a mask file")
        info["outside_fraction"] = round(outside, 4)
        info["roi_exceeds_fov"] = bool(max(extent) > geom.fov_mm)
        info["spacing_mm"] = geom.pitch_mm
        return roi, mask, info

    return render


def csv_cases(
    csv_path: str | Path,
    geom: RoiGeometry,
    report: ErrorReport,
    pseudonym: Pseudonymiser,
    source_pitch_mm: float | None = None,
    default_task: str = "target",
) -> Iterator[CaseSpec]:
    """Yield one :class:`CaseSpec` per CSV row (rows grouped by image so each image is decoded once)."""
    csv_path = Path(csv_path)
    numbered = read_csv_rows(csv_path, required=("image", "label", "patient"))
    lines = [n for n, _ in numbered]
    rows = [r for _, r in numbered]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["image"], i))
    cache = _ImageCache()
    for i in order:
        row = rows[i]
        line = lines[i]
        roi_key = "|".join(row.get(k, "") for k in ("image", "x", "y", "size", "x0", "y0", "x1", "y1", "mask", "unit"))
        case = "case_" + pseudonym(roi_key).split("_", 1)[1][:10]
        where = f"{csv_path.name} line {line}"
        try:
            if not row["image"].strip():
                raise PrepareError("empty image cell")
            label = parse_label(row["label"])
            if not row["patient"].strip():
                raise PrepareError("empty patient cell")
            birads = _birads(row)
            split = (row.get("split") or "").strip().lower() or None
            if split is not None:
                split = {"train": "training", "training": "training", "test": "test"}.get(split)
                if split is None:
                    raise PrepareError(f"split {row['split']!r} must be train, training or test")
            task = (row.get("task") or default_task).strip().lower()
            if task not in ("target", "intermediate"):
                raise PrepareError(f"task {task!r} must be target or intermediate")
        except PrepareError as e:
            report.fail(case, where, str(e))
            continue
        fields = {"label": label, "patient": pseudonym(row["patient"]), "birads": birads, "csv_line": line}
        if (row.get("lesion") or "").strip():
            fields["lesion"] = "lesion_" + pseudonym(row["patient"] + "|" + row["lesion"]).split("_", 1)[1]
        path = csv_cell_path(csv_path, row["image"])
        render = _render(row, path, csv_path, cache, geom, source_pitch_mm)
        # split order from the table's own values (in memory only), not from the salted pseudonyms
        keys = {"patient_key": row["patient"].strip(), "case_key": roi_key}
        yield CaseSpec(case, task, f"{where}: {path}", fields, render, split, **keys)


def prepare_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    geom: RoiGeometry | None = None,
    source_pitch_mm: float | None = None,
    salt: str | None = None,
    default_task: str = "target",
    **options: Any,
) -> dict:
    """Prepare the ROIs listed in ``csv_path`` under ``out_dir``.

    ``options``: ``num_folds``, ``seed``, ``test_fraction``, ``on_error`` and ``overwrite`` of
    ``scripts.data.prepare.staging.prepare_source``."""
    geom = geom or RoiGeometry()
    if not Path(csv_path).is_file():
        raise PrepareError(f"{csv_path}: CSV file not found")
    pseudonym = Pseudonymiser(out_dir, salt=salt, prefix="pt")
    settings = {
        "input_digest": file_digest(csv_path)[:16],
        "source_pitch_mm": source_pitch_mm,
        "pad": geom.pad,
        # patients are ordered by their identifiers in the CSV before the seeded split (earlier versions ordered
        # them by salted pseudonym, so the split changed with the output folder): a folder prepared that way holds
        # another split and is refused here unless --overwrite
        "split_order": "csv patient id",
    }

    def cases(report: ErrorReport) -> Iterator[CaseSpec]:
        return csv_cases(csv_path, geom, report, pseudonym, source_pitch_mm, default_task)

    order = "the identifiers in the CSV's patient column (in memory only, never written out)"
    return prepare_source("csv", cases, out_dir, geom, settings, patient_order=order, **options)
