"""Variants of bundle components that the benchmarks compare against the shipped ones (not used by the bundle)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from scripts.inferers import AutocastInferer


class PlainTensorInferer(AutocastInferer):
    """``AutocastInferer`` that hands the network a plain ``torch.Tensor`` (MONAI metadata dropped first).

    A ``MetaTensor`` input makes every operation inside the network go through ``MetaTensor.__torch_function__``
    (metadata copied onto each intermediate result); the network does not use the metadata.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if hasattr(inputs, "as_tensor"):
            inputs = inputs.as_tensor()
        return super().__call__(inputs, network, *args, **kwargs)
