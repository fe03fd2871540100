"""mini-MIAS (MIAS MiniMammographic Database): films + ``Info.txt`` -> calcification target set and a lesion
intermediate set.

Facts from ``Info.txt`` NOTES that this module builds in:

- films are 1024 x 1024 at 200 um; coordinates (x, y) have their origin at the bottom-left corner, so the
  image row is ``H - y`` and the column is ``x``; radii are in pixels (200 um);
- films come in pairs, left (even number) and right (odd number) of one woman: ``mdb001``/``mdb002`` is one
  patient, used as the patient key (``mias_p001``);
- calcification rows without coordinates (widely distributed calcifications, "*NOTE 3*") have no ROI and are
  skipped (listed in the report's warnings); a film may list several abnormalities (one ROI each).

Target set: CALC rows with coordinates, label B = 0 (benign), M = 1 (malignant), mask = the annotated circle.
Intermediate set: every other abnormality class with coordinates (CIRC, SPIC, MISC, ARCH, ASYM), labelled
benign/malignant in the same way, mask = its circle; patients of the target test set are left out.
mini-MIAS has no official split: the target test set is drawn by patient (``split_by_patient``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from scripts.data.prepare.errors import ErrorReport, PrepareError
from scripts.data.prepare.loaders import load_image
from scripts.data.prepare.pixels import MappedImage
from scripts.data.prepare.roi import RoiGeometry, crop_roi, disc_mask
from scripts.data.prepare.staging import CaseSpec, prepare_source
from scripts.engine.atomic import file_digest

MIAS_PITCH_MM = 0.2
LESION_CLASSES = ("CIRC", "SPIC", "MISC", "ARCH", "ASYM")
_ROW = re.compile(r"^(mdb\d{3})\s+([FGD])\s+([A-Z]+)(.*)$")


@dataclass(frozen=True)
class MiasRow:
    """One line of Info.txt: ``x``, ``y`` (origin bottom-left) and ``radius`` in 200 um pixels, or ``None``."""

    ref: str
    tissue: str
    cls: str
    severity: str | None
    x: int | None
    y: int | None
    radius: int | None

    @property
    def number(self) -> int:
        return int(self.ref[3:])


def parse_info(path: str | Path) -> list[MiasRow]:
    """Parse ``Info.txt`` into rows (header and notes skipped)."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _ROW.match(line.strip())
        if not m:
            continue
        ref, tissue, cls, rest = m.groups()
        parts = rest.split()
        severity = parts[0] if parts and parts[0] in ("B", "M") else None
        nums = [p for p in parts[1 if severity else 0 :] if re.fullmatch(r"\d+", p)]
        x, y, r = (int(nums[0]), int(nums[1]), int(nums[2])) if len(nums) >= 3 else (None, None, None)
        rows.append(MiasRow(ref, tissue, cls, severity, x, y, r))
    if not rows:
        raise PrepareError(f"{path}: no mini-MIAS rows found (expected lines like 'mdb001 G CIRC B 535 425 197')")
    return rows


def patient_key(ref: str) -> str:
    """Patient key of a film: films (2k-1, 2k) are the right and left breasts of woman k."""
    n = int(ref[3:])
    return f"mias_p{(n + 1) // 2:03d}"


def find_films(root: str | Path) -> dict[str, Path]:
    """Map ``mdbNNN`` -> film file (PGM as distributed, or PNG conversions; PGM preferred) anywhere under root."""
    films: dict[str, Path] = {}
    for p in sorted(Path(root).rglob("mdb[0-9][0-9][0-9].*")):
        suffix = p.suffix.lower()
        if suffix not in (".pgm", ".png"):
            continue
        if p.stem not in films or suffix == ".pgm":
            films[p.stem] = p
    return films


def find_info(root: str | Path) -> Path:
    """Locate ``Info.txt`` (any case) under ``root``."""
    root = Path(root)
    for name in ("Info.txt", "info.txt", "INFO.TXT"):
        if (root / name).is_file():
            return root / name
    hits = sorted(p for p in root.rglob("*") if p.name.lower() == "info.txt")
    if not hits:
        raise PrepareError(f"{root}: Info.txt not found (the mini-MIAS label file)")
    return hits[0]


class _FilmCache:
    """Keeps only the last film in memory (rows are grouped by film)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.pixels: MappedImage | None = None

    def get(self, path: Path) -> MappedImage:
        if path != self.path:
            self.path, self.pixels = None, None
            self.pixels = load_image(path).mapped
            self.path = path
        return self.pixels


def _render(cache: _FilmCache, film: Path, row: MiasRow, geom: RoiGeometry, pitch: float):
    def render():
        pixels = cache.get(film)
        h, w = pixels.shape
        if not (0 <= row.x < w and 0 < row.y <= h):
            raise PrepareError(f"annotated centre x={row.x}, y={row.y} lies outside the {w}x{h} film")
        centre = (h - row.y, float(row.x))  # origin bottom-left -> row index
        roi, outside = crop_roi(pixels, (pitch, pitch), centre, geom)
        radius_mm = row.radius * pitch
        mask = disc_mask(geom, radius_mm)
        info = {
            "spacing_mm": geom.pitch_mm,
            "radius_mm": round(radius_mm, 3),
            "roi_exceeds_fov": bool(2 * radius_mm > geom.fov_mm),
            "outside_fraction": round(outside, 4),
        }
        return roi, mask, info

    return render


def mias_cases(
    root: str | Path, geom: RoiGeometry, report: ErrorReport, pitch_mm: float = MIAS_PITCH_MM
) -> Iterator[CaseSpec]:
    """Yield one :class:`CaseSpec` per annotated CALC (target) or other lesion (intermediate) row."""
    root = Path(root)
    rows = parse_info(find_info(root))
    films = find_films(root)
    if not films:
        raise PrepareError(f"{root}: no mini-MIAS films (mdbNNN.pgm or mdbNNN.png) found")
    cache = _FilmCache()
    counter: dict[str, int] = {}
    for row in rows:
        counter[row.ref] = counter.get(row.ref, 0) + 1
        if row.cls == "NORM":
            continue
        case = f"mias_{row.ref}_{counter[row.ref]}"
        if row.cls == "CALC":
            task = "target"
        elif row.cls in LESION_CLASSES:
            task = "intermediate"
        else:
            report.warn(case, f"unknown abnormality class {row.cls!r}: skipped")
            continue
        if row.x is None:
            report.warn(
                case, f"{row.cls} without coordinates in Info.txt (e.g. widely distributed calcifications): skipped"
            )
            continue
        if row.severity is None:
            report.warn(case, f"{row.cls} without severity: skipped")
            continue
        film = films.get(row.ref)
        if film is None:
            report.fail(case, root / f"{row.ref}.pgm", "film listed in Info.txt but not found (.pgm or .png)")
            continue
        fields = {
            "label": 1 if row.severity == "M" else 0,
            "patient": patient_key(row.ref),
            "film": row.ref,
            "abnormality": row.cls,
            "tissue": row.tissue,
        }
        yield CaseSpec(case, task, str(film), fields, _render(cache, film, row, geom, pitch_mm))


def prepare_mini_mias(
    root: str | Path,
    out_dir: str | Path,
    geom: RoiGeometry | None = None,
    pitch_mm: float = MIAS_PITCH_MM,
    **options: Any,
) -> dict:
    """Prepare mini-MIAS under ``out_dir`` (``datalist_target.json``, ``datalist_intermediate.json``).

    ``options``: ``num_folds``, ``seed``, ``test_fraction``, ``on_error`` and ``overwrite`` of
    ``scripts.data.prepare.staging.prepare_source``."""
    geom = geom or RoiGeometry()
    settings = {
        "source_pitch_mm": pitch_mm,
        "intermediate": "non-calcification lesions (B/M)",
        "input_digest": file_digest(find_info(root))[:16],
    }
    return prepare_source(
        "mini-mias",
        lambda report: mias_cases(root, geom, report, pitch_mm=pitch_mm),
        out_dir,
        geom,
        settings,
        **options,
    )
