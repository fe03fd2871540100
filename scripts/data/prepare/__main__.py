"""Command line: ``python -m scripts.data.prepare {mini-mias,cbis-ddsm,csv} --in PATH --out DIR [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scripts.data.prepare.bounds import DEFAULT_MAX_PIXELS, check_pitch, set_max_pixels
from scripts.data.prepare.cbis_tables import INTERMEDIATE_CHOICES, TARGET_CHOICES
from scripts.data.prepare.errors import ON_ERROR_CHOICES, PreparationFailed, PrepareError
from scripts.data.prepare.roi import PAD_CHOICES, RoiGeometry


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (ROI images, datalists, report)")
    p.add_argument("--pitch-mm", type=float, default=None, help="output pixel pitch in mm (default 0.1)")
    p.add_argument("--fov-mm", type=float, default=None, help="ROI field of view in mm (default pitch x size)")
    p.add_argument("--size", type=int, default=None, help="ROI edge in pixels (default 128)")
    p.add_argument("--pad", choices=PAD_CHOICES, default="edge", help="padding beyond the image edge")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds (patient-grouped, stratified)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of any test split")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop", help="stop at the first bad case or skip")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a preparation made with other settings in --out (only once the new run has succeeded)",
    )
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_PIXELS / 1e6,
        help="refuse images larger than this, checked from the file header before decoding (default %(default)g)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m scripts.data.prepare`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m scripts.data.prepare", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("mini-mias", help="mini-MIAS films (PGM or PNG) + Info.txt")
    p.add_argument("--in", dest="input", required=True, type=Path, help="folder with Info.txt and the films")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of target ROIs held out (by patient)")
    _common(p)
    p = sub.add_parser("cbis-ddsm", help="CBIS-DDSM case tables + TCIA DICOM tree")
    p.add_argument("--in", dest="input", required=True, type=Path, help="DICOM tree root (TCIA download)")
    p.add_argument("--tables", type=Path, default=None, help="folder with the four case tables (default --in)")
    p.add_argument("--source-pitch-mm", type=float, default=0.05, help="pitch when a DICOM states none (mm)")
    p.add_argument(
        "--target",
        choices=TARGET_CHOICES,
        default="calc",
        help="calc: calcification rows form the target set (default); none: no target set, CBIS-DDSM as "
        "intermediate data for your own target",
    )
    p.add_argument(
        "--intermediate",
        choices=INTERMEDIATE_CHOICES,
        default=None,
        help="rows of the intermediate set (default mass); target patients are kept out of it: all of them when "
        "calc rows are in both sets, else those of the target test set",
    )
    p.add_argument("--no-mass", action="store_true", help="deprecated: same as --intermediate none")
    _common(p)
    p = sub.add_parser("csv", help="your own images + a CSV of ROIs (see docs/data_preparation.md)")
    p.add_argument("--in", dest="input", required=True, type=Path, help="the CSV file")
    p.add_argument("--source-pitch-mm", type=float, default=None, help="pitch of images that state none (mm)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out share when the CSV has no split")
    p.add_argument("--salt", default=None, help="secret for patient pseudonyms (default: OUT/.pseudonym_salt)")
    p.add_argument("--task", choices=("target", "intermediate"), default="target", help="task of rows without one")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 failed, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        geom = RoiGeometry.resolve(args.pitch_mm, args.fov_mm, args.size, pad=args.pad)
        if getattr(args, "source_pitch_mm", None) is not None:
            check_pitch(args.source_pitch_mm, "--source-pitch-mm")
        if not args.max_megapixels > 0:
            raise ValueError(f"--max-megapixels {args.max_megapixels:g} must be positive")
        set_max_pixels(int(args.max_megapixels * 1e6))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.source == "cbis-ddsm":
        from scripts.data.prepare.cbis_tables import resolve_selection

        if args.no_mass:
            if args.intermediate not in (None, "none"):
                print(f"error: --no-mass contradicts --intermediate {args.intermediate}", file=sys.stderr)
                return 2
            print("warning: --no-mass is deprecated; use --intermediate none", file=sys.stderr)
            args.intermediate = "none"
        args.intermediate = args.intermediate or "mass"
        try:
            resolve_selection(args.target, args.intermediate)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    common = dict(
        out_dir=args.out,
        geom=geom,
        num_folds=args.folds,
        seed=args.seed,
        on_error=args.on_error,
        overwrite=args.overwrite,
        # the source options that this source's parser defines
        **{k: getattr(args, k) for k in ("source_pitch_mm", "test_fraction") if hasattr(args, k)},
    )
    try:
        if args.source == "mini-mias":
            from scripts.data.prepare.mini_mias import prepare_mini_mias

            result = prepare_mini_mias(args.input, **common)
        elif args.source == "cbis-ddsm":
            from scripts.data.prepare.cbis_ddsm import prepare_cbis_ddsm

            selection = dict(target=args.target, intermediate=args.intermediate)
            result = prepare_cbis_ddsm(args.input, tables=args.tables, **selection, **common)
        else:
            from scripts.data.prepare.csv_source import prepare_csv

            result = prepare_csv(args.input, salt=args.salt, default_task=args.task, **common)
    except PreparationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        report = e.report_path or Path(args.out) / "prepare_report.json"
        print(f"summary: {e.report.summary()}; report: {report}", file=sys.stderr)
        return 1
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result["summary"])
    if "row_selection" in result:
        from scripts.data.prepare.cbis_tables import describe_selection

        for line in describe_selection(result["row_selection"]):
            print(line)
    for task, path in result["datalists"].items():
        print(f"{task}: {path}")
    for err in result["errors"]:
        print(f"skipped {err['case']}: {err['reason']} ({err['file']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
