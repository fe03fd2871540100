"""Saliency outputs: NIfTI maps, overlay PNGs and the outcome gallery, all written atomically.

Shapes and units: ROIs and maps ``(H, W)`` float in [0, 1]; masks ``(H, W)`` bool; pixel spacing in mm as a
scalar or a (row, column) pair, as DICOM PixelSpacing.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scripts.engine.atomic import atomic_path


def _spacing_xy(spacing_mm: float | Sequence[float] | None) -> tuple[float, float]:
    """(x = column pitch, y = row pitch) in mm from a scalar or a (row, column) pair, as DICOM PixelSpacing."""
    if spacing_mm is None:
        return 1.0, 1.0
    if isinstance(spacing_mm, (int, float)):
        return float(spacing_mm), float(spacing_mm)
    row, col = (float(v) for v in spacing_mm)
    return col, row


def save_map_nifti(path: str | Path, cam: np.ndarray, spacing_mm: float | Sequence[float] | None) -> Path:
    """Write an ``(H, W)`` map as gzipped NIfTI, atomically.

    NIfTI's first axis is x (columns), so the array is stored as ``(W, H)`` with the affine
    ``diag(col_pitch, row_pitch, 1, 1)`` in mm; ``np.asarray(nib.load(path).dataobj).T`` gives the ``(H, W)`` map.

    Args:
        path: the ``.nii.gz`` file to write.
        cam: the map ``(H, W)``.
        spacing_mm: the map's pixel pitch in mm: one value, ``(row, column)``, or ``None``.
    """
    import nibabel as nib  # optional: NIfTI only (the deploy app's environment has no nibabel)

    sx, sy = _spacing_xy(spacing_mm)
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(cam, dtype=np.float32).T), np.diag([sx, sy, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"saliency map, [0,1]"
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(img.to_bytes(), compresslevel=6))
    return Path(path)


def _heat_rgb(cam: np.ndarray) -> np.ndarray:
    import matplotlib  # optional heavy dependency: loaded only when a figure is drawn

    return matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3].astype(np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def render_overlay(
    roi: np.ndarray, cam: np.ndarray, lines: Sequence[str], mask: np.ndarray | None = None, min_size: int = 256
) -> np.ndarray:
    """RGB uint8 image: a text band over [ROI in gray | ROI with the heat map (and the mask's outline)].

    Args:
        roi: the ROI ``(H, W)`` in [0, 1].
        cam: its map ``(H, W)`` in [0, 1].
        lines: the text lines of the band.
        mask: the lesion mask ``(H, W)``, outlined on the map (``None``: no outline).
        min_size: smaller ROIs are enlarged by an integer factor (nearest neighbour) to at least this many pixels.
    """
    scale = max(1, math.ceil(min_size / max(roi.shape)))
    if scale > 1:
        roi = np.kron(roi, np.ones((scale, scale), dtype=np.float32))
        cam = np.kron(cam, np.ones((scale, scale), dtype=np.float32))
        mask = None if mask is None else np.kron(mask, np.ones((scale, scale), dtype=bool))
    gray = np.repeat(np.clip(roi, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    alpha = 0.6 * np.clip(cam, 0, 1)[..., None]
    over = (1 - alpha) * gray + alpha * _heat_rgb(cam)
    if mask is not None:
        over[_outline(mask)] = (0.0, 1.0, 0.0)
    h, w = roi.shape
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    line_h, gap = 18, 4
    band = line_h * len(lines) + 6
    canvas = np.zeros((band + h, 2 * w + gap, 3), dtype=np.float32)
    canvas[band:, :w] = gray
    canvas[band:, w + gap :] = over
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i, text in enumerate(lines):
        draw.text((4, 3 + i * line_h), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def save_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 ``(H, W, 3)`` image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


OUTCOMES = (
    ("malignant, correct (TP)", 1, True),
    ("benign, correct (TN)", 0, True),
    ("malignant, misclassified (FN)", 1, False),
    ("benign, misclassified (FP)", 0, False),
)


def _thumb(a: np.ndarray, size: int = 128) -> np.ndarray:
    h, w = a.shape
    s = size / max(h, w)
    if s >= 1:
        return a.astype(np.float32)
    return np.asarray(
        Image.fromarray(a.astype(np.float32), mode="F").resize((max(1, round(w * s)), max(1, round(h * s))))
    )


def gallery_example(roi: np.ndarray, cam: np.ndarray, mask: np.ndarray | None, case: str, prob: float) -> dict:
    """One gallery entry (thumbnails of at most 128 px of the ``(H, W)`` ROI, map and mask) for :func:`save_gallery`."""
    thumb_mask = None if mask is None else _thumb(mask.astype(np.float32))
    return {"roi": _thumb(roi), "cam": _thumb(cam), "mask": thumb_mask, "case": case, "prob": prob}


def save_gallery(path: str | Path, groups: dict[str, list[dict]], per_group: int, title: str = "") -> Path:
    """Save a figure with one row per non-empty outcome group; the mask's outline is drawn in green.

    Args:
        path: the image file to write.
        groups: ``{name: [entry, ...]}``, each entry from :func:`gallery_example`; groups without cases get no row
            but are named under the title.
        per_group: the most entries drawn per row.
        title: the figure's title.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # optional heavy dependency: loaded only when a figure is drawn
    )
    from matplotlib.figure import Figure

    empty = [name for name, exs in groups.items() if not exs]
    names = [name for name, exs in groups.items() if exs] or ["no ROIs"]
    if empty:
        title = (title + "\n" if title else "") + "no cases: " + ", ".join(empty)
    cols = max(1, per_group)
    fig = Figure(figsize=(2.2 * cols + 1.2, 2.4 * len(names) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), cols, squeeze=False)
    for r, name in enumerate(names):
        exs = groups.get(name, [])
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(exs):
                ex = exs[c]
                ax.imshow(ex["roi"], cmap="gray", vmin=0, vmax=1)
                ax.imshow(ex["cam"], cmap="jet", vmin=0, vmax=1, alpha=0.45)
                if ex.get("mask") is not None:
                    ax.contour(ex["mask"], levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(f"{ex['case']}\nP(malig.)={ex['prob']:.2f}", fontsize=8)
            elif c == 0 and not exs:
                ax.text(0.5, 0.5, "no ROIs", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
