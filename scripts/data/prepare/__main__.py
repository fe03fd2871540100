"""Command line: ``python -m scripts.data.prepare {mini-mias,cbis-ddsm,csv} --in PATH --out DIR [options]``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

from scripts.data.prepare.bounds import DEFAULT_MAX_PIXELS, PITCH_RANGE_MM, check_pitch, set_max_pixels
from scripts.data.prepare.cbis_ddsm import prepare_cbis_ddsm
from scripts.data.prepare.cbis_tables import (
    INTERMEDIATE_CHOICES,
    TARGET_CHOICES,
    describe_selection,
    find_tables,
    resolve_selection,
)
from scripts.data.prepare.csv_source import prepare_csv, read_csv_rows
from scripts.data.prepare.errors import ON_ERROR_CHOICES, PreparationFailed, PrepareError
from scripts.data.prepare.mini_mias import find_films, find_info, parse_info, prepare_mini_mias
from scripts.data.prepare.roi import PAD_CHOICES, RoiGeometry

MAX_ROI_SIZE = 4096  # px: far beyond any calcification ROI; keeps one output image within tens of MB


class ArgumentProblem(ValueError):
    """An argument that cannot work, found before any image is decoded; ``flag`` names it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def int_at_least(lo: int, hi: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer within ``[lo, hi]`` (``why`` explains the bound in the message)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}{why}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number >= 0 and < 1 (the share of ROIs held out for testing; 0: none)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1 (a share of the ROIs), got {value:g}")
    return value


def pitch_mm(text: str) -> float:
    """An argparse type: a pixel pitch in mm within :data:`~scripts.data.prepare.bounds.PITCH_RANGE_MM`."""
    value = _number(text, float)
    lo, hi = PITCH_RANGE_MM
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{value:g} mm is outside the plausible pixel pitch range {lo:g}-{hi:g} mm")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.set_defaults(subparser=p)  # for argument errors found after parsing (argparse's format, exit status 2)
    p.add_argument("--out", required=True, type=Path, help="output folder (ROI images, datalists, report)")
    p.add_argument("--pitch-mm", type=pitch_mm, default=None, help="output pixel pitch in mm (default 0.1)")
    p.add_argument("--fov-mm", type=positive_float, default=None, help="ROI field of view in mm (default pitch x size)")
    p.add_argument("--size", type=int_at_least(8, MAX_ROI_SIZE), default=None, help="ROI edge in pixels (default 128)")
    p.add_argument("--pad", choices=PAD_CHOICES, default="edge", help="padding beyond the image edge")
    p.add_argument(
        "--folds",
        type=int_at_least(2, why=" (patient-grouped cross-validation)"),
        default=3,
        help="cross-validation folds (patient-grouped, stratified)",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the folds and of any test split")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop", help="stop at the first bad case or skip")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a preparation made with other settings in --out (only once the new run has succeeded)",
    )
    p.add_argument(
        "--max-megapixels",
        type=positive_float,
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
    p.add_argument("--test-fraction", type=fraction, default=0.25, help="share of target ROIs held out (by patient)")
    _common(p)
    p = sub.add_parser("cbis-ddsm", help="CBIS-DDSM case tables + TCIA DICOM tree")
    p.add_argument("--in", dest="input", required=True, type=Path, help="DICOM tree root (TCIA download)")
    p.add_argument("--tables", type=Path, default=None, help="folder with the four case tables (default --in)")
    p.add_argument("--source-pitch-mm", type=pitch_mm, default=0.05, help="pitch when a DICOM states none (mm)")
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
    p.add_argument("--source-pitch-mm", type=pitch_mm, default=None, help="pitch of images that state none (mm)")
    p.add_argument("--test-fraction", type=fraction, default=0.25, help="held-out share when the CSV has no split")
    p.add_argument("--salt", default=None, help="secret for patient pseudonyms (default: OUT/.pseudonym_salt)")
    p.add_argument("--task", choices=("target", "intermediate"), default="target", help="task of rows without one")
    _common(p)
    return parser


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ArgumentProblem("--out", f"{out} exists and is not a folder")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArgumentProblem("--out", f"{out} cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArgumentProblem("--out", f"{out} cannot be written: no write permission in {ancestor}")


def _check_csv(args: argparse.Namespace) -> None:
    try:
        read_csv_rows(args.input, required=("image", "label", "patient"), name=str(args.input))
    except PrepareError as e:
        raise ArgumentProblem("--in", str(e)) from None
    if args.salt is not None and not args.salt.strip():
        raise ArgumentProblem("--salt", "is empty: give a secret, or leave --salt out to use OUT/.pseudonym_salt")


def _check_mini_mias(root: Path) -> None:
    if not root.is_dir():
        raise ArgumentProblem("--in", f"{root}: {'not a folder' if root.exists() else 'folder not found'}")
    try:
        parse_info(find_info(root))
        if not find_films(root):
            raise PrepareError(f"{root}: no mini-MIAS films (mdbNNN.pgm or mdbNNN.png) found")
    except PrepareError as e:
        raise ArgumentProblem("--in", str(e)) from None


def _check_cbis_ddsm(args: argparse.Namespace) -> None:
    if args.no_mass:
        if args.intermediate not in (None, "none"):
            raise ArgumentProblem("--no-mass", f"--no-mass contradicts --intermediate {args.intermediate}")
        print("warning: --no-mass is deprecated; use --intermediate none", file=sys.stderr)
        args.intermediate = "none"
    args.intermediate = args.intermediate or "mass"
    try:
        target, kinds = resolve_selection(args.target, args.intermediate)
    except ValueError as e:
        raise ArgumentProblem("--target/--intermediate", str(e)) from None
    for flag, folder in (("--in", args.input), ("--tables", args.tables)):
        if folder is not None and not folder.is_dir():
            raise ArgumentProblem(flag, f"{folder}: {'not a folder' if folder.exists() else 'folder not found'}")
    try:
        find_tables(args.tables or args.input, kinds=("calc",) if target == "calc" else kinds)
    except PrepareError as e:
        raise ArgumentProblem("--tables" if args.tables else "--in", str(e)) from None


def check_arguments(args: argparse.Namespace) -> RoiGeometry:
    """Check every argument that can be checked without decoding an image; returns the ROI geometry.

    Value ranges are checked by the parser's types; this adds what needs several arguments or the file system: the
    ROI geometry, the output folder, and the input (a CSV with the required columns; a mini-MIAS folder with
    ``Info.txt`` and films; CBIS-DDSM case tables of the chosen kinds). Sets the decode cap (``--max-megapixels``).

    Raises:
        ArgumentProblem: naming the argument.
    """
    try:
        geom = RoiGeometry.resolve(args.pitch_mm, args.fov_mm, args.size, pad=args.pad)
        check_pitch(geom.pitch_mm, "the output pixel pitch (--fov-mm / --size)")
    except (ValueError, PrepareError) as e:
        raise ArgumentProblem("--pitch-mm/--fov-mm/--size", str(e)) from None
    if geom.size > MAX_ROI_SIZE:
        raise ArgumentProblem("--fov-mm", f"gives a ROI of {geom.size} px, more than {MAX_ROI_SIZE} (see --pitch-mm)")
    _check_out(args.out)
    if args.source == "csv":
        _check_csv(args)
    elif args.source == "mini-mias":
        _check_mini_mias(args.input)
    else:
        _check_cbis_ddsm(args)
    set_max_pixels(int(args.max_megapixels * 1e6))
    return geom


def _refuse(parser: argparse.ArgumentParser, flag: str, message: str) -> int:
    """Print argparse's usage and ``error: argument FLAG: MESSAGE`` (one line) and return its exit status, 2."""
    try:
        parser.error(f"argument {flag}: {' '.join(message.split())}")
    except SystemExit as e:
        return int(e.code)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 failed, 2 bad arguments).

    Every argument is checked (:func:`check_arguments`) before any image is decoded or anything is written."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument: argparse has printed the usage and the message
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        geom = check_arguments(args)
    except ArgumentProblem as e:
        return _refuse(args.subparser, e.flag, str(e))
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
            result = prepare_mini_mias(args.input, **common)
        elif args.source == "cbis-ddsm":
            selection = dict(target=args.target, intermediate=args.intermediate)
            result = prepare_cbis_ddsm(args.input, tables=args.tables, **selection, **common)
        else:
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
        for line in describe_selection(result["row_selection"]):
            print(line)
    for task, path in result["datalists"].items():
        print(f"{task}: {path}")
    for err in result["errors"]:
        print(f"skipped {err['case']}: {err['reason']} ({err['file']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
