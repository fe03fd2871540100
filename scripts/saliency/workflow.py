"""The saliency workflow: maps for the inference inputs (a datalist split, a folder, a CSV, DICOM files), with
localisation metrics where an item carries a lesion mask, a randomisation check, overlays, NIfTI maps, a gallery
and ``localisation.json``.

Inputs go through the inference preprocessing (``configs/inference.json``'s ``@preprocessing``, i.e.
:class:`scripts.data.inputs.LoadInputd`), so maps are computed, scored and written at the network input's geometry:
``(H, W)`` = ``image_size``. A mask (``item["mask"]``, a ROI-shaped PNG) is resized to that geometry
(area-weighted, a pixel is lesion when at least half of it is; a mask that would vanish keeps every touched pixel).
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.data.imageio import read_mask_png
from scripts.data.schema import unique_case
from scripts.engine.atomic import write_json
from scripts.engine.progress import ProgressLogger
from scripts.model.network import WeightsError, load_state_dict_file
from scripts.saliency.cam import MALIGNANT, EnsembleCAM
from scripts.saliency.localisation import BOOTSTRAP_RESAMPLES, localisation_metrics, localisation_table
from scripts.saliency.render import OUTCOMES, gallery_example, render_overlay, save_gallery, save_map_nifti, save_png
from scripts.saliency.sanity import randomisation_check
from scripts.saliency.settings import SaliencySettings, none_if_off

logger = logging.getLogger(__name__)


def load_weights(network: nn.Module, path: str | Path | None) -> nn.Module:
    """Load a state-dict file strictly into ``network`` and return it.

    Args:
        network: the ensemble (DDP-wrapped or not).
        path: the state-dict file (e.g. the bundle's ``models/model.pt``); ``None`` or ``"none"`` leaves
            ``network`` unchanged (weights already loaded by the merged config).

    Raises:
        WeightsError: the file's weights do not match ``network``.
    """
    if none_if_off(path) is None:
        return network

    target = getattr(network, "module", network)
    try:
        target.load_state_dict(load_state_dict_file(path))
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not match the network ({type(target).__name__}): {e}") from None
    logger.info("saliency: weights loaded from %s", path)
    return network


def _safe_name(case: str, used: set[str]) -> str:
    """A unique file-name stem for ``case`` (characters other than ``A-Za-z0-9._-`` become ``_``)."""
    return unique_case(re.sub(r"[^A-Za-z0-9._-]", "_", str(case)).strip(".") or "case", used)


def load_mask(path: str | Path, shape: tuple[int, int], case: str) -> np.ndarray | None:
    """The mask PNG at ``path`` as ``(H, W)`` bool at the network input's ``shape``, or ``None`` if it is empty.

    Args:
        path: the mask PNG.
        shape: the network input's ``(H, W)``; a mask of another size is resized by area.
        case: the case's name, for the warning about an empty mask.
    """
    mask = read_mask_png(path)
    if tuple(mask.shape) != tuple(shape):
        frac = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=shape, mode="area")[0, 0]
        mask = (frac >= 0.5).numpy() if bool((frac >= 0.5).any()) else (frac > 0).numpy()
    if not mask.any():
        logger.warning("saliency: case %s: empty mask, no localisation metrics", case)
        return None
    return mask


def _batches(items: Sequence[Mapping], preprocessing: Callable, size: int, errors: list[dict]):
    """Yield lists of ``(item, image (1, H, W) float tensor)`` of at most ``size``, in order; items the
    preprocessing could not read are appended to ``errors`` as ``{"case", "error"}``."""
    batch: list[tuple[Mapping, torch.Tensor]] = []
    for item in items:
        out = preprocessing(dict(item))
        if out.get("error"):
            errors.append({"case": str(out.get("case")), "error": str(out["error"])})
            continue
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
        if batch and (len(batch) >= size or image.shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append(({**item, "case": out.get("case", item.get("case"))}, image))
    if batch:
        yield batch


def _overlay_lines(s: SaliencySettings, case: str, prob: float, pred: int, label: int | None) -> list[str]:
    truth = "unknown" if label is None else s.class_names[label]
    verdict = "" if label is None else ("   correct" if pred == label else "   MISCLASSIFIED")
    return [
        f"case {case}   {s.method} ({s.target_label})",
        f"P(malignant) = {prob:.3f}   predicted: {s.class_names[pred]}",
        f"true: {truth}{verdict}",
    ]


def _settings_record(s: SaliencySettings, layer: str, cell_px: tuple[float, float] | None, size) -> dict:
    cell = "" if cell_px is None else f" = {s.tolerance_cells * math.sqrt(cell_px[0] * cell_px[1]):g} px"
    return {
        "method": s.method,
        "target": s.target_label,
        "threshold": s.threshold,
        "iou_threshold": s.iou_threshold,
        "layer": layer,
        "cell_px": None if cell_px is None else list(cell_px),
        "tolerance": f"{s.tolerance_cells:g} feature-map cell(s){cell} of network input",
        "image_size": None if size is None else list(size),
        "spacing_mm": s.spacing_mm,
        "freeze": s.freeze,
        "amp": s.amp,
        "chance": "uniform map: energy and IoU = mask area fraction; random point: pointing = fraction of pixels "
        "within tolerance of the mask; centre prior: a map peaking at the ROI centre",
        "ci": f"95 % percentile bootstrap over ROIs ({BOOTSTRAP_RESAMPLES} resamples)",
    }


class _Collected:
    """What the loop over batches gathers: one row per readable ROI, localisation records for the masked ones, gallery
    examples per outcome group and the first ROIs (with their maps) for the randomisation check."""

    def __init__(self, settings: SaliencySettings, out_dir: Path) -> None:
        self.s, self.out_dir = settings, out_dir
        self.rows: list[dict] = []
        self.records: list[dict] = []
        self.errors: list[dict] = []
        self.used: set[str] = set()
        self.gallery: dict[str, list[dict]] = {name: [] for name, _, _ in OUTCOMES}
        self.gallery["label unknown"] = []
        self.rand_x: list[torch.Tensor] = []
        self.rand_maps: list[np.ndarray] = []

    def keep_for_randomisation(self, x: torch.Tensor, maps: np.ndarray) -> None:
        """The first ``randomisation_images`` ROIs and their trained maps."""
        k = self.s.randomisation_images - len(self.rand_x) if self.s.randomisation else 0
        if k > 0:
            self.rand_x.extend(x[:k])
            self.rand_maps.extend(maps[:k])

    def add(self, item: Mapping, roi: np.ndarray, cam_map: np.ndarray, prob: float, tolerance_px: float) -> None:
        """Score one ROI, write its overlay and NIfTI map, and keep its row."""
        s, size = self.s, roi.shape
        case, pred = str(item.get("case")), int(prob >= s.threshold)
        label = None if item.get("label") is None else int(item["label"])
        correct = None if label is None else bool(pred == label)
        name = _safe_name(case, self.used)
        mask = load_mask(item["mask"], size, case) if item.get("mask") else None
        row = {"case": case, "label": label, "prob_malignant": prob, "pred": pred, "correct": correct}
        row.update({"overlay": f"overlays/{name}.png", "map": f"maps/{name}.nii.gz"})
        if mask is not None:
            loc = localisation_metrics(cam_map, mask, tolerance_px, s.iou_threshold)
            self.records.append({"case": case, "label": label, "correct": correct, **loc})
            row.update(loc)
        self.rows.append(row)
        save_map_nifti(self.out_dir / "maps" / f"{name}.nii.gz", cam_map, s.spacing_mm)
        lines = _overlay_lines(s, case, prob, pred, label)
        save_png(self.out_dir / "overlays" / f"{name}.png", render_overlay(roi, cam_map, lines, mask))
        group = next((g for g, lab, ok in OUTCOMES if lab == label and ok == correct), "label unknown")
        if len(self.gallery[group]) < s.gallery_per_group:
            self.gallery[group].append(gallery_example(roi, cam_map, mask, case, prob))

    def gallery_groups(self) -> dict[str, list[dict]]:
        """The outcome groups to draw; ROIs without a label form one row (alone when no ROI has one)."""
        gallery = {k: v for k, v in self.gallery.items() if k != "label unknown"}
        unknown = self.gallery["label unknown"]
        if unknown:
            gallery = gallery if any(gallery.values()) else {}
            gallery["label unknown"] = unknown
        return gallery

    def counts(self) -> dict[str, int]:
        rows = self.rows
        counts = {"n": len(rows), "with_mask": len(self.records), "unmasked": len(rows) - len(self.records)}
        counts["errors"] = len(self.errors)
        for gname, glabel, gcorrect in OUTCOMES:
            counts[gname] = sum(1 for r in rows if r["label"] == glabel and r["correct"] == gcorrect)
        counts["label unknown"] = sum(1 for r in rows if r["label"] is None)
        return counts


def run_saliency(
    items: Sequence[Mapping],
    ensemble: nn.Module,
    settings: SaliencySettings,
    out_dir: str | Path,
    preprocessing: Callable[[dict], Mapping],
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Saliency maps for ``items`` (the inference inputs, ``configs/inference.json``'s ``@data``).

    Args:
        items: dicts with ``image`` (a path or an array) and optionally ``case``, ``label`` (0/1) and ``mask``
            (a mask PNG of the ROI's shape); the other keys are read by ``preprocessing``.
        ensemble: the trained ensemble (weights loaded).
        settings: what to compute (:class:`~scripts.saliency.settings.SaliencySettings`).
        out_dir: output folder.
        preprocessing: item -> ``{"image": (1, H, W) in [0, 1], "case", "error"}``, as
            :class:`scripts.data.inputs.LoadInputd` (inference's ``@preprocessing``).
        device: where the ensemble runs.

    Writes, per readable input, ``overlays/<case>.png`` (input, heat map, P(malignant), prediction, true label)
    and ``maps/<case>.nii.gz`` (the ``(H, W)`` map at ``settings.spacing_mm``); localisation metrics for items
    with a non-empty mask (the others get maps only and count as unmasked); then ``gallery.png`` (outcome groups)
    and ``localisation.json`` (settings, counts, table, per-ROI rows, unreadable inputs, randomisation check).
    File names use the case id only. Returns the summary (settings, counts, table, randomisation, output paths).
    """
    s = settings
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    if s.spacing_mm is None:
        logger.warning("saliency: no spacing_mm: NIfTI maps written with 1.0 mm pitch")
    ensemble = ensemble.to(device).eval()
    t0 = time.time()
    got = _Collected(s, out_dir)
    size = None
    logger.info("saliency: %d inputs, method=%s target=%s, output %s", len(items), s.method, s.target, out_dir)
    cam_args = {"method": s.method, "target": s.target, "threshold": s.threshold, "amp": s.amp, "layer": s.layer}
    progress = ProgressLogger("saliency")
    progress.start(len(items), ": ")
    with EnsembleCAM(ensemble, freeze=s.freeze, **cam_args) as cam:
        for batch in _batches(items, preprocessing, s.batch_size, got.errors):
            x = torch.stack([image for _, image in batch])  # (B, 1, H, W)
            size = tuple(x.shape[-2:])
            res = cam(x)
            got.keep_for_randomisation(x, res.maps)
            tolerance_px = s.tolerance_cells * math.sqrt(cam.cell_px[0] * cam.cell_px[1])
            for i, (item, image) in enumerate(batch):
                got.add(item, image[0].numpy(), res.maps[i], float(res.probs[i, MALIGNANT]), tolerance_px)
            progress.update(len(got.rows) + len(got.errors))
        layer_name, cell_px = cam.layer_name, cam.cell_px
    title = f"{s.method} ({'class-agnostic' if s.method == 'eigencam' else 'target: ' + s.target})"
    title = f"{title}, threshold {s.threshold:.3f}"
    save_gallery(out_dir / "gallery.png", got.gallery_groups(), s.gallery_per_group, title=title)
    rand = None
    if got.rand_x:
        x, maps = torch.stack(got.rand_x), np.stack(got.rand_maps)
        rand = randomisation_check(ensemble, x, mode=s.randomisation, seed=s.seed, original_maps=maps, **cam_args)
    table = localisation_table(got.records, s.class_names)
    result = {"settings": _settings_record(s, layer_name, cell_px, size), "counts": got.counts(), "table": table}
    result["randomisation"] = rand
    write_json(out_dir / "localisation.json", {**result, "cases": got.rows, "errors": got.errors})
    elapsed = time.time() - t0
    logger.info(
        "saliency: done, %d maps (%d unreadable) in %.1f s; outputs in %s", len(got.rows), len(got.errors), elapsed,
        out_dir,
    )  # fmt: skip
    outputs = {"dir": str(out_dir), "gallery": str(out_dir / "gallery.png")}
    outputs.update({k: str(out_dir / v) for k, v in (("localisation", "localisation.json"), ("overlays", "overlays"))})
    outputs["maps"] = str(out_dir / "maps")
    return {**result, "localisation": table, "seconds": elapsed, "outputs": outputs}
