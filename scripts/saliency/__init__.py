"""Saliency maps for the ensemble (pytorch-grad-cam), localisation metrics against lesion masks, a weight
randomisation sanity check, and the workflow that writes overlays, NIfTI maps and a gallery.

Modules: :mod:`~scripts.saliency.cam` (the ensemble CAM engine), :mod:`~scripts.saliency.localisation` (pointing
game, energy in mask, chance levels, bootstrap table), :mod:`~scripts.saliency.sanity` (weight randomisation),
:mod:`~scripts.saliency.render` (overlays, NIfTI maps, gallery), :mod:`~scripts.saliency.settings` (the settings
dataclass, the threshold from the metrics file) and :mod:`~scripts.saliency.workflow` (``run_saliency``, the
config entry). The names below are the ones configs, tests and benchmarks use.
"""

from scripts.saliency.cam import (
    METHODS,
    TARGETS,
    CAMResult,
    EnsembleCAM,
    TargetLayerCut,
    ensemble_members,
    normalise_maps,
    target_layer,
)
from scripts.saliency.localisation import (
    FEATURE_STRIDE,
    chance_levels,
    distance_to_mask,
    energy_in_mask,
    iou_at,
    localisation_metrics,
    localisation_table,
    pointing_game,
)
from scripts.saliency.render import render_overlay, save_gallery, save_map_nifti
from scripts.saliency.sanity import RANDOMISATION_MODES, map_similarity, randomisation_check
from scripts.saliency.settings import SaliencySettings, none_if_off
from scripts.saliency.workflow import load_mask, load_weights, run_saliency

__all__ = [
    "CAMResult",
    "EnsembleCAM",
    "FEATURE_STRIDE",
    "METHODS",
    "RANDOMISATION_MODES",
    "SaliencySettings",
    "TARGETS",
    "TargetLayerCut",
    "chance_levels",
    "distance_to_mask",
    "energy_in_mask",
    "ensemble_members",
    "iou_at",
    "load_mask",
    "load_weights",
    "localisation_metrics",
    "localisation_table",
    "map_similarity",
    "none_if_off",
    "normalise_maps",
    "pointing_game",
    "randomisation_check",
    "render_overlay",
    "run_saliency",
    "save_gallery",
    "save_map_nifti",
    "target_layer",
]
