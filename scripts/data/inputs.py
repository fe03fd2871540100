"""Inference inputs: ROI PNGs, DICOM (or other full) images cropped at the training scale, and per-file errors.

Three ways to name the inputs of ``configs/inference.json``:

- a datalist split (``datalist`` + ``split``): the bundle's prepared ROIs;
- a folder (``input_dir``): every ``*.png`` ROI, DICOM file (``.dcm``/``.dicom``, or no suffix with a DICOM
  preamble), NIfTI, TIFF and PGM image in it, not recursive; the case id is the file stem; every other entry is
  logged with the reason it was left out;
- a CSV (``input_csv``) with one row per ROI (header names are case-insensitive; paths relative to the CSV's folder):

  ===========  ========  =========================================================================================
  column       required  meaning
  ===========  ========  =========================================================================================
  image        yes       image file: a ROI PNG, or a full image (DICOM, PNG/PGM/TIFF, NIfTI) when x and y are given
  x, y         no        ROI centre (column x, row y, origin top-left); without them a DICOM is cropped around its
                         centre and a PNG is taken as a ready ROI
  unit         no        ``px`` (default) or ``mm`` for x and y
  spacing_mm   no        pixel pitch of the image, overriding what the file states
  case         no        case id for the output table (default: the file stem)
  ===========  ========  =========================================================================================

Full images are cropped with :func:`scripts.data.prepare.roi.crop_roi` at ``pitch_mm`` x ``roi_size`` (the training
geometry), after reading with :func:`scripts.data.prepare.loaders.load_image` (photometric interpretation, rescale,
VOI LUT / window, pixel spacing), exactly as ``python -m scripts.data.prepare`` does for training data.

A file that cannot be read does not stop the run: :class:`LoadInputd` records the reason under ``error`` and passes
a blank image on, and :class:`scripts.evaluation.handlers.PredictionTableHandler` writes an error row for it. Error
texts name the file by its name only (no folders) and never carry DICOM patient attributes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize

from scripts.data.imageio import ImageFileError, read_roi_png
from scripts.data.prepare.bounds import check_pitch, scrub
from scripts.data.prepare.csv_source import cell_float, cell_unit, csv_cell_path, read_csv_rows
from scripts.data.prepare.dicom_io import is_dicom
from scripts.data.prepare.errors import PrepareError, printable
from scripts.data.prepare.loaders import load_image
from scripts.data.prepare.roi import RoiGeometry, crop_roi
from scripts.data.schema import load_split, unique_case

logger = logging.getLogger(__name__)

ROI_SUFFIXES = (".png",)
DICOM_SUFFIXES = (".dcm", ".dicom")
ON_ERROR_CHOICES = ("record", "raise")


class InferenceInputError(ValueError):
    """An inference input that cannot be turned into a ROI (unreadable file, bad CSV cell, ROI off the image)."""


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return path.suffix == "" and is_dicom(path)


FOLDER_SUFFIXES = ROI_SUFFIXES + DICOM_SUFFIXES + (".nii", ".nii.gz", ".tif", ".tiff", ".pgm")


def _folder_reason(p: Path) -> str | None:
    """Why a folder entry is left out of the inputs (``None``: it is an input)."""
    if p.is_symlink() and not p.exists():
        return "dangling symbolic link"
    if p.is_dir():
        return "a folder (the scan is not recursive)"
    if not p.is_file():
        return "not a regular file"
    name = p.name.lower()
    if name.endswith(FOLDER_SUFFIXES):
        return None  # an empty or broken file of a supported type gets an error row
    if p.suffix == "":
        if p.stat().st_size == 0:
            return "empty file without a suffix"
        return None if _is_dicom_file(p) else "no suffix and no DICOM preamble"
    return f"unsupported suffix {printable(p.suffix)} (inputs: {', '.join(FOLDER_SUFFIXES)}, or DICOM without suffix)"


def _stem(p: Path) -> str:
    name = p.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else p.stem


def items_from_folder(folder: str | os.PathLike) -> list[dict]:
    """One item per image directly in ``folder`` (sorted by name): ROI PNGs, DICOM (``.dcm``/``.dicom`` or a DICM
    preamble), NIfTI, TIFF and PGM; case id = file stem (non-UTF-8 bytes as ``\\xNN``). Every entry left out is
    logged with its reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceInputError(f"input_dir {folder} is not a folder")
    files, skipped = [], 0
    for p in sorted(folder.iterdir()):
        reason = _folder_reason(p)
        if reason is None:
            files.append(p)
        else:
            skipped += 1
            logger.info("input_dir: %s left out: %s", printable(p.name), reason)
    if skipped:
        logger.warning(
            "input_dir: %d entr%s left out (see the log for each reason)", skipped, "y" if skipped == 1 else "ies"
        )
    if not files:
        raise InferenceInputError(
            f"{printable(folder.name)}: no input images ({', '.join(FOLDER_SUFFIXES)}, or DICOM without suffix)"
        )
    used: set[str] = set()
    return [{"image": str(p), "case": unique_case(printable(_stem(p)), used)} for p in files]


def items_from_csv(csv_path: str | os.PathLike) -> list[dict]:
    """Items from a CSV of images and optional ROI centres (see the module docstring for the columns).

    A row whose cells cannot be parsed becomes an item that carries its ``error``, so that it is reported in the
    output table beside the other rows' results; a missing file or a CSV without an ``image`` column raises.
    """
    csv_path = Path(csv_path)
    numbered = read_csv_rows(csv_path, InferenceInputError, required=("image",), name=f"input_csv {csv_path.name}")
    used: set[str] = set()
    items = []
    for line, row in numbered:
        image = row["image"].strip()
        case = (row.get("case") or "").strip() or (_stem(Path(image)) if image else f"line{line}")
        item: dict[str, Any] = {
            "image": str(csv_cell_path(csv_path, image)) if image else "",
            "case": unique_case(printable(case), used),
        }
        try:
            if not image:
                raise InferenceInputError("empty image cell")
            x, y = cell_float(row, "x", InferenceInputError), cell_float(row, "y", InferenceInputError)
            if (x is None) != (y is None):
                raise InferenceInputError("give both x and y, or neither")
            unit = cell_unit(row, InferenceInputError)
            spacing = cell_float(row, "spacing_mm", InferenceInputError)
            if spacing is not None:
                try:
                    check_pitch(spacing, "spacing_mm")
                except PrepareError as e:
                    raise InferenceInputError(str(e)) from None
            if x is not None:
                item.update(x=x, y=y, unit=unit)
            if spacing is not None:
                item["spacing_mm"] = spacing
        except InferenceInputError as e:
            item["error"] = f"{csv_path.name} line {line}: {e}"
        items.append(item)
    return items


def select_inputs(
    input_dir: str | os.PathLike | None = None,
    input_csv: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    split: str = "test",
    exit_on_error: bool = False,
) -> list[dict]:
    """The inference items: ``input_dir``, else ``input_csv``, else the ``split`` of ``datalist`` (never two).

    A whole-input problem (no such folder, an unreadable CSV, no ``image`` column) raises
    :class:`InferenceInputError`; with ``exit_on_error`` (``configs/inference.json``) it ends the process with
    that one message instead of a traceback through the config parser."""
    try:
        if input_dir and input_csv:
            raise InferenceInputError("give input_dir or input_csv, not both")
        if input_dir:
            return items_from_folder(input_dir)
        if input_csv:
            return items_from_csv(input_csv)
        if not datalist:
            raise InferenceInputError("no input: give input_dir, input_csv, or datalist (+ split)")

        return load_split(datalist, split)
    except InferenceInputError as e:
        if exit_on_error:
            raise SystemExit(f"error: {e}") from None
        raise


def _short_reason(e: BaseException, path: str | None) -> str:
    """Exception text without folder names (paths may hold names of people or institutions)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if path:
        text = text.replace(str(path), Path(path).name)
        parent = str(Path(path).parent)
        if parent not in ("", "."):
            text = text.replace(parent + os.sep, "")
    if not isinstance(e, (InferenceInputError, PrepareError)):  # library text: may quote header values
        text = f"unexpected error ({type(e).__name__}: {scrub(text, 160)})"
    return printable(text)[:300]


class LoadInputd(MapTransform):
    """Turn an inference item into ``{"image": (1, S, S) float32 in [0, 1], "case": str, "error": str}``.

    - a ROI PNG (16-bit, the bundle's format; 8-bit is scaled by 255) without a centre is read as is;
    - any other image, or any image with ``x``/``y``, is read by :func:`scripts.data.prepare.loaders.load_image` and a
      field of view of ``roi_size * pitch_mm`` mm is cropped around the centre (``x``, ``y`` in ``unit``; the image
      centre by default) and resampled to ``pitch_mm`` by :func:`scripts.data.prepare.roi.crop_roi`;
    - an array or tensor (MONAI Deploy / Label hand over loaded images) is taken as a ROI in [0, 1] (integers are
      scaled by their type's maximum); what could only be taken with loss is an error: complex values, negative
      integers, floats outside [0, 1], more than one channel.

    The ROI is resized to ``image_size`` (area interpolation, as in training). With ``on_error="record"`` a failure
    is stored as text under ``error`` and a blank image is returned; ``"raise"`` raises
    :class:`InferenceInputError`. Keys other than ``image``, ``case`` and ``error`` are dropped so that batches of
    mixed sources collate.

    Args:
        keys: the image key (one).
        image_size: network input size (int or (H, W)).
        pitch_mm: ROI pixel pitch in mm (the training data's ``pixel_spacing_mm``, 0.1 by default).
        roi_size: ROI size in pixels before resizing (the training ROI size; defaults to ``image_size``).
        pad: ``"edge"`` or ``"zero"`` padding where the field of view leaves the image.
        max_outside_fraction: refuse a crop with more of it outside the image than this.
        on_error: ``"record"`` or ``"raise"``.
        max_megapixels: refuse an input image larger than this (checked from the file header before decoding).

    Degenerate inputs are errors, as in data preparation: NaN/inf pixels, a blank (one-valued) image or ROI, and
    the header bounds of :mod:`scripts.data.prepare.bounds` give an error row, never a prediction.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        image_size: int | Sequence[int] = 128,
        pitch_mm: float | None = 0.1,
        roi_size: int | None = None,
        pad: str = "edge",
        max_outside_fraction: float = 0.75,
        on_error: str = "record",
        max_megapixels: float | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"LoadInputd takes one image key, got {self.keys}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")

        self.key = self.keys[0]
        self.size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(map(int, image_size))
        self.geom = RoiGeometry(float(pitch_mm or 0.1), int(roi_size or self.size[0]), pad)
        self.max_outside_fraction = float(max_outside_fraction)
        self.on_error = on_error
        self.resize = Resize(self.size, mode="area")
        self.max_pixels = None if max_megapixels is None else int(float(max_megapixels) * 1e6)

    # -- readers ---------------------------------------------------------------------------------------------------

    def _crop(self, item: Mapping) -> np.ndarray:
        path = Path(item[self.key])
        try:
            img = load_image(path, spacing_mm=item.get("spacing_mm"), max_pixels=self.max_pixels)
        except PrepareError as e:
            raise InferenceInputError(str(e)) from None
        if img.spacing_mm is None:
            raise InferenceInputError(
                f"pixel pitch unknown ({img.kind} file states none): give spacing_mm for it in an input CSV"
            )
        h, w = img.mapped.shape
        if item.get("x") is not None:
            unit = item.get("unit", "px")
            x, y = float(item["x"]), float(item["y"])
            centre = (y / img.spacing_mm[0] - 0.5, x / img.spacing_mm[1] - 0.5) if unit == "mm" else (y, x)
        else:
            centre = ((h - 1) / 2.0, (w - 1) / 2.0)
        try:
            roi, outside = crop_roi(img.mapped, img.spacing_mm, centre, self.geom)
        except PrepareError as e:
            raise InferenceInputError(str(e)) from None
        if outside > self.max_outside_fraction:
            raise InferenceInputError(
                f"{outside:.0%} of the {self.geom.fov_mm:g} mm field of view lies outside the image "
                f"(limit {self.max_outside_fraction:.0%}): check the ROI centre and the pixel pitch"
            )
        if outside > 0:
            logger.info("case %s: %.0f%% of the ROI padded at the image edge", item.get("case"), 100 * outside)
        return roi

    @staticmethod
    def _array(value: Any) -> np.ndarray:
        """A ROI handed over as an array: taken as is, never converted with loss (complex values, negative integers
        and floats outside [0, 1] are errors, not clipped)."""
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise InferenceInputError(
                f"expected a 2-D grayscale ROI, got shape {tuple(np.shape(value))} (channels are not converted)"
            )
        if arr.dtype.kind == "c":
            raise InferenceInputError(f"ROI array holds complex values ({arr.dtype}): a real-valued ROI is expected")
        if arr.dtype.kind == "b":
            return arr.astype(np.float32)
        if arr.dtype.kind in "ui":
            if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
                raise InferenceInputError(
                    f"ROI array of {arr.dtype} holds negative values (down to {int(arr.min())}): they would be clipped "
                    "to 0; give unsigned integers or floats in [0, 1]"
                )
            return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
        if arr.dtype.kind != "f":
            raise InferenceInputError(f"ROI array of type {arr.dtype}: numbers are expected")
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
            raise InferenceInputError(
                f"float ROI values {float(finite.min()):g}..{float(finite.max()):g} outside [0, 1]: they would be "
                "clipped; scale the ROI to [0, 1] first"
            )
        return arr

    def _load(self, item: Mapping) -> np.ndarray:
        value = item.get(self.key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InferenceInputError(f"no {self.key!r} given")
        if not isinstance(value, (str, os.PathLike)):
            return self._array(value)
        path = Path(value)
        if not path.is_file():
            raise InferenceInputError("file not found" if not path.exists() else "not a file")
        if path.stat().st_size == 0:
            raise InferenceInputError("file is empty")
        if path.suffix.lower() in ROI_SUFFIXES and item.get("x") is None:
            try:
                return read_roi_png(path, self.max_pixels)
            except ImageFileError as e:
                raise InferenceInputError(str(e)) from None
        return self._crop(item)

    # -- transform -------------------------------------------------------------------------------------------------

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        item = dict(data)
        value = item.get(self.key)
        path = str(value) if isinstance(value, (str, os.PathLike)) else None
        case = str(item.get("case") or (Path(path).stem if path else "case"))
        error = str(item.get("error") or "")
        image = None
        if not error:
            try:
                roi = self._load(item)
                finite = np.isfinite(roi)
                if not finite.all():
                    raise InferenceInputError(f"{int(roi.size - finite.sum())} pixel(s) are NaN or infinite")
                if roi.size and float(roi.max()) <= float(roi.min()):
                    raise InferenceInputError(
                        f"every pixel of the ROI has the same value {float(roi.flat[0]):g} (blank image)"
                    )
                image = torch.from_numpy(np.ascontiguousarray(roi, dtype=np.float32))[None]
                if tuple(image.shape[1:]) != self.size:
                    image = self.resize(image)
                if isinstance(image, MetaTensor):
                    image = image.as_tensor()
                image = image.to(torch.float32).clamp_(0.0, 1.0)
            except MemoryError:
                error = "not enough memory to read or resample this image"
            except Exception as e:  # one unreadable input must not stop the others
                error = _short_reason(e, path)
        if error:
            if self.on_error == "raise":
                raise InferenceInputError(f"case {case}: {error}")
            logger.warning("case %s: input skipped: %s", printable(case), error)
            image = torch.zeros((1, *self.size), dtype=torch.float32)
        return {"image": image, "case": case, "error": error}
