"""Dictionary transforms shared by every workflow config."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, LoadImaged, MapTransform, Resized, ScaleIntensityRanged


class LoadROId(MapTransform):
    """Load the bundle's ROI files (16-bit PNG, see ``scripts.data.imageio``) as ``(1, H, W)`` float32 in [0, 1].

    ``image_size`` resizes to a square network input (ROIs are already written at the configured pitch and size,
    so this is a no-op for prepared data). ``mask_keys`` (optional, 8-bit masks) are loaded alongside, resized
    with nearest-neighbour and scaled to {0, 1}. Rows of the array are image rows (numpy order).
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int | Sequence[int] | None = None,
        mask_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        mask_keys = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys)
        size = None if image_size is None else ([image_size] * 2 if isinstance(image_size, int) else image_size)
        steps = [
            LoadImaged(
                list(self.keys) + mask_keys,
                reader="PILReader",
                reverse_indexing=False,
                image_only=True,
                ensure_channel_first=True,
                allow_missing_keys=allow_missing_keys,
            ),
            ScaleIntensityRanged(self.keys, 0.0, 65535.0, 0.0, 1.0, clip=True, allow_missing_keys=allow_missing_keys),
        ]
        if mask_keys:
            steps.append(ScaleIntensityRanged(mask_keys, 0.0, 255.0, 0.0, 1.0, clip=True, allow_missing_keys=True))
        if size is not None:
            steps.append(Resized(self.keys, size, mode="area", allow_missing_keys=allow_missing_keys))
            if mask_keys:
                steps.append(Resized(mask_keys, size, mode="nearest", allow_missing_keys=True))
        steps.append(EnsureTyped(list(self.keys) + mask_keys, dtype=torch.float32, allow_missing_keys=True))
        self.pipeline = Compose(steps)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        return self.pipeline(dict(data))
