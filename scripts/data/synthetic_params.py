"""Parameters of the synthetic ROI generator (:mod:`scripts.data.synthetic`): tasks, class morphologies,
:class:`SynthParams` with its difficulty knobs, and the simulated reader's BI-RADS frequencies (CBIS-DDSM)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from scripts.data.schema import TARGET_CLASSES

GENERATOR_VERSION = 2  # 2: a simulated reader's BI-RADS on the benign/malignant tasks (images and masks unchanged)
FIELD_MM = 12.8  # default side of a ROI in mm; pixel spacing = FIELD_MM / image_size unless given
INTERMEDIATE_CLASSES = ("circumscribed", "spiculated")
# task -> (numeric code used in seeds, case-id prefix, patient-id prefix, class names)
TASKS: dict[str, tuple[int, str, str, tuple[str, ...]]] = {
    "target": (1, "t", "synth-p", TARGET_CLASSES),
    "intermediate": (2, "i", "synth-ip", INTERMEDIATE_CLASSES),
    "film": (3, "f", "synth-fp", TARGET_CLASSES),
}
CALCIFICATION_TASKS = ("target", "film")  # tasks drawing calcification clusters (benign / malignant)
# tasks whose lesions get a simulated reader's BI-RADS: calcification tasks with the benign / malignant classes
READER_TASKS = tuple(t for t in CALCIFICATION_TASKS if tuple(TASKS[t][3]) == tuple(TARGET_CLASSES))
FILM_PREFIX = "film_"  # SynthParams fields of the film domain
FILM_NONNEGATIVE = ("film_blur_mm", "film_grain_sigma", "film_grain_mm", "film_tissue_contrast", "film_calc_contrast")
_STREAM_LAYOUT, _STREAM_PATIENT, _STREAM_ROI, _STREAM_READER = 0, 1, 2, 3

# ----------------------------------------------------------------------------------------------- simulated reader
# A fact of the CBIS-DDSM dataset (Sawyer-Lee et al., The Cancer Imaging Archive 2016, doi:10.7937/K9/TCIA.2016.7O02S9CY,
# CC BY 3.0): the rows of calc_case_description_train_set.csv and calc_case_description_test_set.csv (one row per
# calcification abnormality and image view, 1872 in all) counted by pathology (MALIGNANT; BENIGN and
# BENIGN_WITHOUT_CALLBACK) and BI-RADS ``assessment``. tests/test_synthetic.py recounts them from the tables.
CBIS_DDSM_CALC_BIRADS_COUNTS: dict[str, dict[int, int]] = {
    "benign": {0: 39, 2: 552, 3: 60, 4: 546, 5: 2},
    "malignant": {0: 37, 2: 1, 3: 53, 4: 385, 5: 197},
}
CBIS_DDSM_CITATION = (
    "Sawyer-Lee R, Gimenez F, Hoogi A, Rubin D. Curated Breast Imaging Subset of DDSM (CBIS-DDSM). The Cancer Imaging "
    "Archive, 2016. doi:10.7937/K9/TCIA.2016.7O02S9CY. CC BY 3.0"
)
READER_MODEL = "BI-RADS drawn by pathology from CBIS-DDSM calcification case-table frequencies"
READER_CUT = 4  # BI-RADS >= 4 (biopsy recommended) is the reader's positive call


# ----------------------------------------------------------------------------------------------- parameters
@dataclass
class CalcMorphology:
    """Distribution of one class's calcification cluster (lengths in mm)."""

    count_min: float  # number of calcifications, drawn log-uniform in [count_min, count_max]
    count_max: float
    diam_min: float  # cluster's typical diameter drawn log-uniform in [diam_min, diam_max] (mm)
    diam_max: float
    size_cv: float  # within-cluster coefficient of variation of diameters (0 = all equal)
    irregularity: float  # amplitude of the outline's angular harmonics (0 = smooth ellipse)
    aspect_max: float  # largest length/width ratio of a calcification (1 = round)
    linear_fraction: float  # fraction of fine-linear / branching calcifications
    radius_min: float  # cluster radius (mm), uniform in [radius_min, radius_max], clipped to the ROI
    radius_max: float
    elongation_max: float  # cluster's largest length/width ratio (1 = round cluster)
    min_spacing: float  # smallest edge-to-edge gap between calcifications (mm)


@dataclass
class MassMorphology:
    """Distribution of one class's mass (lengths in mm)."""

    radius_min: float  # core radius, uniform in [radius_min, radius_max] (mm)
    radius_max: float
    aspect_max: float  # largest core length/width ratio
    lobulation: float  # amplitude of the outline's angular harmonics
    margin_mm: float  # width of the blurred margin (mm): small = well-defined, large = ill-defined
    spicules_min: float  # number of spicules, uniform integer in [spicules_min, spicules_max]
    spicules_max: float
    spicule_length: float  # spicule length as a multiple of the core radius (mean; +-40 %)


def _benign() -> CalcMorphology:
    return CalcMorphology(5, 10, 0.35, 0.9, 0.12, 0.06, 1.25, 0.0, 4.2, 5.8, 1.3, 1.0)


def _malignant() -> CalcMorphology:
    return CalcMorphology(10, 50, 0.15, 0.4, 0.45, 0.35, 2.5, 0.25, 1.5, 3.5, 2.5, 0.15)


def _circumscribed() -> MassMorphology:
    return MassMorphology(1.8, 3.5, 1.5, 0.04, 0.15, 0, 0, 0.0)


def _spiculated() -> MassMorphology:
    return MassMorphology(1.5, 3.0, 1.3, 0.22, 0.6, 6, 16, 1.6)


@dataclass
class SynthParams:
    """All generation parameters; stored in the datalist metadata (intensities are on the [0, 1] scale)."""

    # background: power-law texture, fat/dense mixing, quantum-like noise
    shared_style: bool = True  # a patient's ROIs share one background style (False: each ROI draws its own)
    beta_mean: float = 3.1  # spectral exponent of P(f) ∝ 1/f^β (mammography ≈ 3.1)
    beta_sd: float = 0.15  # per-patient spread of β, clipped to [beta_min, beta_max]
    beta_min: float = 2.8
    beta_max: float = 3.4
    density_min: float = 0.1  # dense (fibroglandular) area fraction, per patient
    density_max: float = 0.7
    fat_level: float = 0.32  # intensity of fat
    dense_contrast: float = 0.22  # dense minus fat intensity
    texture_std: float = 0.035  # std of the linear texture component
    noise_sigma: float = 0.015  # quantum-noise std at intensity 0.5 (std ∝ sqrt(intensity))
    psf_sigma_mm: float = 0.06  # Gaussian PSF applied to lesions (mm)
    # target task (microcalcifications)
    cnr: float = 12.0  # peak contrast (before PSF) of a 0.5 mm calcification / noise_sigma
    size_contrast_exponent: float = 0.5  # contrast ∝ (diameter / 0.5 mm) ** exponent
    overlap: float = 0.5  # 0 = classes' morphology fully separated, 1 = identical
    benign: CalcMorphology = field(default_factory=_benign)
    malignant: CalcMorphology = field(default_factory=_malignant)
    # intermediate task (masses)
    mass_cnr: float = 10.0  # peak core contrast / noise_sigma
    mass_overlap: float = 0.2
    circumscribed: MassMorphology = field(default_factory=_circumscribed)
    spiculated: MassMorphology = field(default_factory=_spiculated)
    # film task: the target task in a digitised screen-film domain (see apply_film_domain; stored in film datalists)
    film_blur_mm: float = 0.1  # extra Gaussian blur σ (mm) of the whole image: screen unsharpness + digitiser
    film_gamma: float = 0.7  # characteristic-curve stand-in: intensity -> intensity ** film_gamma
    film_grain_sigma: float = 0.02  # film-grain std (intensity units, additive, after the curve)
    film_grain_mm: float = 0.1  # grain correlation length: Gaussian σ (mm) of the filter applied to white noise
    film_tissue_contrast: float = 1.1  # multiplies dense_contrast and texture_std of the background
    film_calc_contrast: float = 2.5  # multiplies the calcifications' contrast (cnr · noise_sigma) before the blur
    # patients: probabilities of 1, 2, 3, ... ROIs per synthetic patient
    rois_per_patient: tuple[float, ...] = (0.3, 0.4, 0.3)

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary (nested dataclasses become dicts, tuples lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict | None) -> "SynthParams":
        """Build from a (possibly partial) dictionary; nested morphology entries may be partial too."""
        out = cls()
        if not d:
            return out
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown synthetic parameter(s): {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            cur = getattr(out, k)
            if isinstance(cur, (CalcMorphology, MassMorphology)):
                kw[k] = v if isinstance(v, type(cur)) else replace(cur, **dict(v))
            elif k == "rois_per_patient":
                kw[k] = tuple(float(x) for x in v)
            elif isinstance(cur, bool):
                kw[k] = bool(v)
            else:
                kw[k] = float(v)
        return replace(out, **kw)

    def validate(self) -> None:
        """Refuse out-of-range knobs."""
        for name in ("overlap", "mass_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("cnr", "mass_cnr", "noise_sigma", "psf_sigma_mm") + FILM_NONNEGATIVE:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.film_gamma <= 5.0:
            raise ValueError(f"film_gamma must be in (0, 5], got {self.film_gamma}")
        if not self.film_grain_mm <= 2.0:
            raise ValueError(f"film_grain_mm must be <= 2 mm (a grain, not a background), got {self.film_grain_mm}")
        if not self.beta_min <= self.beta_max:
            raise ValueError("beta_min must be <= beta_max")
        p = np.asarray(self.rois_per_patient, dtype=float)
        if p.size == 0 or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"rois_per_patient must be non-negative probabilities, got {self.rois_per_patient}")


def task_params_dict(params: SynthParams, task: str) -> dict:
    """``params.to_dict()`` as stored in ``task``'s datalist: the ``film_*`` knobs only for the ``film`` task."""
    d = params.to_dict()
    return d if task == "film" else {k: v for k, v in d.items() if not k.startswith(FILM_PREFIX)}


def _blend(own: Any, other: Any, overlap: float) -> Any:
    """Move each numeric field of ``own`` towards ``other`` by ``overlap / 2`` (overlap 1 = both at the midpoint)."""
    w = overlap / 2.0
    return type(own)(**{f.name: (1 - w) * getattr(own, f.name) + w * getattr(other, f.name) for f in fields(own)})


def class_morphology(params: SynthParams, task: str, label: int) -> CalcMorphology | MassMorphology:
    """The effective morphology distribution of one class after applying the task's ``overlap`` knob."""
    if task in CALCIFICATION_TASKS:
        a, b, ov = params.benign, params.malignant, params.overlap
    elif task == "intermediate":
        a, b, ov = params.circumscribed, params.spiculated, params.mass_overlap
    else:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return _blend(a, b, ov) if label == 0 else _blend(b, a, ov)


# ----------------------------------------------------------------------------------------------- simulated reader
def reader_birads_distribution(label: int) -> tuple[np.ndarray, np.ndarray]:
    """The simulated reader's BI-RADS categories and their probabilities for a lesion of class ``label``.

    Args:
        label: 0 (benign) or 1 (malignant).

    Returns:
        ``(categories, probabilities)``: the BI-RADS categories of :data:`CBIS_DDSM_CALC_BIRADS_COUNTS` for that
        pathology (ascending) and their relative frequencies.
    """
    if int(label) not in (0, 1):
        raise ValueError(f"label must be 0 (benign) or 1 (malignant), got {label!r}")
    counts = CBIS_DDSM_CALC_BIRADS_COUNTS[TARGET_CLASSES[int(label)]]
    categories = np.array(sorted(counts), dtype=np.int64)
    freq = np.array([counts[int(c)] for c in categories], dtype=np.float64)
    return categories, freq / freq.sum()


def expected_reader_performance(
    counts: dict[str, dict[int, int]] | None = None, cut: int = READER_CUT
) -> dict[str, float]:
    """The simulated reader's population AUC (BI-RADS as an ordinal score) and sensitivity/specificity at ``cut``.

    Args:
        counts: BI-RADS counts per pathology (``benign``, ``malignant``); default :data:`CBIS_DDSM_CALC_BIRADS_COUNTS`.
        cut: BI-RADS >= ``cut`` is a positive call.

    Returns:
        ``{"cut", "auc", "sensitivity", "specificity"}``: the values the reader converges to over many lesions
        (the AUC counts ties as one half; BI-RADS 0 ranks lowest, as in the evaluation).
    """
    counts = counts or CBIS_DDSM_CALC_BIRADS_COUNTS
    ben, mal = counts["benign"], counts["malignant"]
    n_ben, n_mal = sum(ben.values()), sum(mal.values())
    pairs = sum(
        m * b * (1.0 if cm > cb else 0.5 if cm == cb else 0.0) for cm, m in mal.items() for cb, b in ben.items()
    )
    return {
        "cut": int(cut),
        "auc": pairs / (n_ben * n_mal),
        "sensitivity": sum(m for c, m in mal.items() if c >= cut) / n_mal,
        "specificity": sum(b for c, b in ben.items() if c < cut) / n_ben,
    }


def reader_metadata() -> dict[str, Any]:
    """The datalist metadata block (``metadata.reader``) that describes the simulated reader.

    Returns:
        A JSON-ready dictionary: ``kind`` ("simulated"), ``label`` ("simulated reader"), ``model``, ``draw``,
        ``independent_of_image``, ``birads_counts`` (per pathology, categories as strings), ``source``,
        ``citation`` and ``expected`` (:func:`expected_reader_performance`, rounded to 4 decimals).
    """
    expected = expected_reader_performance()
    return {
        "kind": "simulated",
        "label": "simulated reader",
        "model": READER_MODEL,
        "draw": "one category per ROI by its pathology, from its own random stream (seed, task, ROI index)",
        "independent_of_image": True,
        "birads_counts": {
            k: {str(c): int(n) for c, n in sorted(v.items())} for k, v in CBIS_DDSM_CALC_BIRADS_COUNTS.items()
        },
        "source": "CBIS-DDSM calc_case_description_train_set.csv + calc_case_description_test_set.csv "
        "(rows: calcification abnormality x image view; benign = BENIGN + BENIGN_WITHOUT_CALLBACK)",
        "citation": CBIS_DDSM_CITATION,
        "expected": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in expected.items()},
    }
