"""Synthetic mammographic ROIs: the bundle's embedded default data (never clinical evidence).

Three tasks share one background generator (parenchymal texture with power spectrum ``P(f) ∝ 1/f^β``,
fat/dense mixing and quantum-like noise):

* ``target``: microcalcification clusters, ``benign`` (0) vs ``malignant`` (1). Benign: a few (≈5-10)
  round/punctate calcifications of 0.3-1 mm and similar size, loosely spaced; malignant: many (≈10-50)
  fine pleomorphic calcifications of 0.1-0.5 mm of varied size and shape, dense, some fine-linear or
  branching. The mask is the union of the drawn calcifications.
* ``intermediate``: masses, ``circumscribed`` (0, round/oval, well-defined margin) vs ``spiculated``
  (1, irregular core with radiating spicules). The mask is the drawn mass (core and spicules).
* ``film``: the target task (same classes, labels and calcification morphology) in another acquisition domain,
  digitised screen-film, as the intermediate dataset of a double transfer (the same task in another domain, as
  in Samala et al., IEEE TMI 2019). The image passes through :func:`apply_film_domain`: screen/digitiser
  unsharpness (``film_blur_mm``), an H&D-like characteristic curve (``film_gamma``) and spatially correlated film
  grain (``film_grain_sigma`` over ``film_grain_mm``); ``film_tissue_contrast`` and ``film_calc_contrast`` scale
  the background's tissue contrast and the calcifications' contrast. The mask is the drawn calcifications.

Each ROI of the benign/malignant tasks (``target``, ``film``) carries a **simulated reader's** BI-RADS category
(:func:`simulated_birads`): drawn by pathology from the CBIS-DDSM calcification case tables' category frequencies
(:data:`CBIS_DDSM_CALC_BIRADS_COUNTS`), independent of the image; ``metadata.reader`` describes it (``kind``
"simulated"). Intermediate (mass) ROIs have ``birads`` null.

Every ROI is seeded on its own from ``(seed, task, index)``, so output does not depend on the order or the
number of worker processes; the same seed gives byte-identical files. ROIs are grouped into synthetic
patients (1-3 ROIs each, sharing a background style) so that patient-grouped splitting matters.

Images are ``(H, W)`` float in [0, 1] (brighter = denser), square, ``image_size`` px at ``pixel_spacing_mm``;
by default every ROI covers the same ``FIELD_MM`` (12.8 mm: 128 px at 0.1 mm), so a smaller or larger network
input changes the pitch, not the anatomy (clusters of up to ~5 mm radius fit).
Difficulty knobs: ``cnr`` (calcification contrast-to-noise) and ``overlap`` (0 = class distributions fully
separated, 1 = identical), shared by ``target`` and ``film``; ``mass_cnr`` and ``mass_overlap`` for the
intermediate task; the ``film_*`` knobs for the film domain (stored only in ``film`` datalists' metadata, so the
film task left ``target`` and ``intermediate`` outputs byte-identical).

Modules: :mod:`scripts.data.synthetic_params` (tasks, morphologies, :class:`SynthParams`), :mod:`scripts.data.synthetic_render`
(background, lesions, film domain, per-ROI seeding); this module writes datasets and is the command line (it
re-exports the other two's public names).

Command line::

    python -m scripts.data.synthetic --out data/synthetic --task target --n-train 200 --n-test 200 --seed 0
    python -m scripts.data.synthetic --out data/synthetic --task film --n-train 1200 --n-test 0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from scripts.data.imageio import write_mask_png, write_roi_png
from scripts.data.schema import (
    DatalistError,
    assign_folds,
    make_datalist,
    make_item,
    read_datalist,
    split_by_patient,
    write_datalist,
)
from scripts.data.synthetic_params import (  # noqa: F401 (re-exported)
    CALCIFICATION_TASKS,
    CBIS_DDSM_CALC_BIRADS_COUNTS,
    FIELD_MM,
    FILM_NONNEGATIVE,
    FILM_PREFIX,
    GENERATOR_VERSION,
    INTERMEDIATE_CLASSES,
    READER_TASKS,
    TASKS,
    CalcMorphology,
    MassMorphology,
    SynthParams,
    class_morphology,
    expected_reader_performance,
    reader_birads_distribution,
    reader_metadata,
    task_params_dict,
)
from scripts.data.synthetic_render import (  # noqa: F401 (re-exported)
    add_quantum_noise,
    apply_film_domain,
    calcification_scene,
    draw_calcifications,
    draw_mass,
    film_grain,
    generate_roi,
    make_background,
    patient_style,
    plan_patients,
    power_law_field,
    render_film_roi,
    render_intermediate_roi,
    render_primitives,
    render_target_roi,
    simulated_birads,
)
from scripts.engine.fingerprint import compute

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- dataset
def _write_one(job: tuple) -> dict:
    task, index, label, patient_index, seed, size, spacing, params, root = job
    image, mask, info = generate_roi(task, index, label, patient_index, seed, size, spacing, params)
    case = f"{TASKS[task][1]}-{index + 1:04d}"
    write_roi_png(Path(root, "images", f"{case}.png"), image)
    write_mask_png(Path(root, "masks", f"{case}.png"), mask)
    return info


def _resolve_params(task: str, params: SynthParams | dict | None, overlap: float | None, cnr: float | None):
    p = params if isinstance(params, SynthParams) else SynthParams.from_dict(params)
    calc = task in CALCIFICATION_TASKS
    if overlap is not None:
        p = replace(p, **{"overlap" if calc else "mass_overlap": float(overlap)})
    if cnr is not None:
        p = replace(p, **{"cnr" if calc else "mass_cnr": float(cnr)})
    p.validate()
    return p


def generate_dataset(
    out_dir: str | os.PathLike,
    task: str = "target",
    n_train: int = 200,
    n_test: int = 200,
    num_folds: int = 3,
    image_size: int = 128,
    pixel_spacing_mm: float | None = None,
    seed: int = 0,
    params: SynthParams | dict | None = None,
    workers: int = 1,
    overlap: float | None = None,
    cnr: float | None = None,
    force: bool = False,
) -> Path:
    """Write a synthetic dataset under ``out_dir/<task>/`` and return the path of its ``datalist.json``.

    ``images/<case>.png`` (16-bit ROI) and ``masks/<case>.png`` (8-bit lesion mask) are written beside the
    datalist. Patients are split whole into training (``n_train`` ROIs, with patient-grouped, label-stratified
    ``fold``) and test (``n_test`` ROIs; counts are matched to within a patient or two). ``params`` is a
    :class:`SynthParams` or a (partial) dict; ``overlap`` and ``cnr`` override the chosen task's knobs (``film``:
    the target's ``overlap`` and ``cnr``; the ``film_*`` knobs are stored in film datalists only). If the
    datalist exists with identical metadata and its files are present, nothing is regenerated ("up to date")
    unless ``force``. ``workers > 1`` uses processes; output does not depend on it. ``pixel_spacing_mm`` defaults
    to ``FIELD_MM / image_size`` (0.1 mm at 128 px). Items of :data:`READER_TASKS` get the simulated reader's
    ``birads`` (:func:`simulated_birads`) and the metadata its description (``reader``, :func:`reader_metadata`);
    the others get ``birads`` null and no ``reader``.
    """
    if pixel_spacing_mm is None:
        pixel_spacing_mm = FIELD_MM / max(int(image_size), 1)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    n_train, n_test, num_folds, image_size, seed = int(n_train), int(n_test), int(num_folds), int(image_size), int(seed)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    if pixel_spacing_mm <= 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    p = _resolve_params(task, params, overlap, cnr)
    _, case_prefix, patient_prefix, classes = TASKS[task]
    root = Path(out_dir) / task
    path = root / "datalist.json"
    generator = {
        "name": "scripts.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_size": image_size,
        "params": task_params_dict(p, task),
    }
    metadata_extra = {
        "image_size": image_size,
        "synthetic": True,
        "note": "Synthetic ROIs for demonstration and testing; never clinical evidence.",
        "generator": generator,
    }
    if task in READER_TASKS:
        metadata_extra["reader"] = reader_metadata()
    meta_kw = dict(
        source="synthetic",
        task=task,
        class_names=classes,
        pixel_spacing_mm=float(pixel_spacing_mm),
        num_folds=num_folds,
        **metadata_extra,
    )
    wanted = json.loads(json.dumps(make_datalist([], [], **meta_kw)["metadata"]))
    if path.is_file() and not force:
        try:
            # the settings are the datalist's metadata: compared part by part, so the log can say what changed
            changed = compute(settings=wanted).changes(compute(settings=read_datalist(path).get("metadata", {})).parts)
        except DatalistError as e:  # missing or broken files: regenerate
            changed = [str(e)]
        if not changed:
            logger.info("synthetic %s data up to date: %s", task, path)
            return path
        logger.info("synthetic %s data regenerated: %s", task, "; ".join(changed))
    if path.exists():
        path.unlink()  # a half-regenerated folder must never look up to date
    for sub in ("images", "masks"):
        for old_file in (root / sub).glob(f"{case_prefix}-*.png"):
            old_file.unlink()

    n = n_train + n_test
    plan = plan_patients(n, task, seed, p)
    jobs = [
        (task, i, lab, pat, seed, image_size, float(pixel_spacing_mm), p, str(root))
        for i, (pat, lab) in enumerate(plan)
    ]
    logger.info(
        "generating %d synthetic %s ROIs (%d px, %.3g mm/px) in %s", n, task, image_size, pixel_spacing_mm, root
    )
    t0 = time.perf_counter()
    infos: list[dict] = []
    step = max(n // 10, 1)
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as ex:
            for i, info in enumerate(ex.map(_write_one, jobs, chunksize=max(n // (8 * workers), 1))):
                infos.append(info)
                if (i + 1) % step == 0 or i + 1 == n:
                    logger.info("  %d/%d ROIs", i + 1, n)
    else:
        for i, job in enumerate(jobs):
            infos.append(_write_one(job))
            if (i + 1) % step == 0 or i + 1 == n:
                logger.info("  %d/%d ROIs", i + 1, n)
    logger.info("generated %d ROIs in %.1f s", n, time.perf_counter() - t0)

    items = []
    for i, ((pat, lab), info) in enumerate(zip(plan, infos)):
        case = f"{case_prefix}-{i + 1:04d}"
        items.append(
            make_item(
                image=f"images/{case}.png",
                label=lab,
                patient=f"{patient_prefix}{pat + 1:04d}",
                case=case,
                mask=f"masks/{case}.png",
                birads=simulated_birads(task, i, lab, seed),
                **info,
            )
        )
    if n_test > 0:
        train, test = split_by_patient(items, n_test / n, seed=seed)
    else:
        train, test = items, []
    train = assign_folds(train, num_folds, seed=seed)
    test = sorted(test, key=lambda it: it["case"])
    datalist = make_datalist(train, test, **meta_kw)
    write_datalist(path, datalist)
    logger.info("datalist: %s (%d training, %d test ROIs)", path, len(train), len(test))
    return path


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point; returns the datalist path (also printed)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder; data go to OUT/<task>/")
    ap.add_argument("--task", choices=sorted(TASKS), default="target")
    ap.add_argument("--n-train", type=int, default=200, help="training ROIs (folds are assigned within them)")
    ap.add_argument("--n-test", type=int, default=200, help="held-out test ROIs")
    ap.add_argument("--folds", dest="num_folds", type=int, default=3, help="cross-validation folds (>= 2)")
    ap.add_argument("--size", dest="image_size", type=int, default=128, help="ROI side in px")
    ap.add_argument(
        "--spacing",
        dest="pixel_spacing_mm",
        type=float,
        default=None,
        help=f"pixel spacing in mm (default {FIELD_MM} mm / size)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap", type=float, default=None, help="class overlap in [0, 1] (task's knob; film: target's)")
    ap.add_argument(
        "--cnr", type=float, default=None, help="lesion contrast-to-noise ratio (task's knob; film: target's)"
    )
    ap.add_argument("--noise", type=float, default=None, help="quantum-noise std at intensity 0.5")
    ap.add_argument("--params", default=None, help="JSON file or string with SynthParams fields to override")
    ap.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    kw = vars(args)  # the flags are generate_dataset's keywords, less --out, --params and --noise
    text, noise = kw.pop("params"), kw.pop("noise")
    params: dict = json.loads(Path(text).read_text() if Path(text).is_file() else text) if text else {}
    if noise is not None:
        params["noise_sigma"] = noise
    path = generate_dataset(kw.pop("out"), params=params, **kw)
    print(path)
    return path


if __name__ == "__main__":
    main()
