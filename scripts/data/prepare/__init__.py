"""Real-data preparation: CBIS-DDSM, mini-MIAS and a generic CSV -> physical-scale ROI images + datalists.

Run ``python -m scripts.data.prepare {mini-mias,cbis-ddsm,csv} --in ... --out DIR``; see ``docs/data_preparation.md``.
"""

from scripts.data.prepare.errors import ErrorReport, PreparationFailed, PrepareError
from scripts.data.prepare.roi import RoiGeometry, crop_mask, crop_roi

__all__ = ["ErrorReport", "PreparationFailed", "PrepareError", "RoiGeometry", "crop_mask", "crop_roi"]
