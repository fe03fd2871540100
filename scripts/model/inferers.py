"""Inferers: how a batch reaches the network (precision and memory layout)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.engine.config_values import parse_bool


def default_amp(arch: str, device: torch.device | str, image_size: int = 128) -> bool:
    """Whether bf16 autocast is the faster default: on CUDA always; on CPU, not for EfficientNet-Lite below 224 px.

    Measured with ``benchmarks/train_throughput.py`` on a 2-core CPU (docs/performance.md, 2026-12-02): training
    EfficientNet-Lite0 ran at 53.8 img/s in float32 + channels_last vs 38.3 in bf16 at 128 px, but 15.2 vs 19.0 at
    224 px; ResNet/ResNeXt train faster in bf16 at both sizes.
    """
    if str(device).startswith("cuda"):
        return True
    from scripts.model.network import is_lite

    return not is_lite(arch) or int(image_size) >= 224


def saliency_amp(arch: str, amp: bool | str) -> bool:
    """Whether saliency maps may use bf16 autocast: as ``amp`` for ResNets (maps correlate > 0.99 with float32
    ones), never for EfficientNet-Lite, whose bf16 maps at its stride-16 target layer correlated only 0.78-0.99
    with float32 ones (tests/test_saliency.py, 64 px)."""
    from scripts.model.network import is_lite

    return parse_bool(amp, "amp") and not is_lite(arch)


class AutocastInferer(Inferer):
    """Run ``network(inputs)`` under ``torch.autocast`` and return float32 outputs.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        dtype: autocast dtype; ``None`` picks bfloat16 on both (its float32 exponent range needs no gradient
            scaler; pass ``torch.float16`` only with a scaler, e.g. ``SupervisedTrainer(amp=True)``).
        enabled: ``False`` runs in plain float32 (the inferer is then a ``SimpleInferer``).
        channels_last: pass 4-D inputs in channels-last memory format (faster convolutions on CPU and GPU).
    """

    def __init__(
        self,
        device_type: str = "cpu",
        dtype: torch.dtype | None = None,
        enabled: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.device_type = "cuda" if str(device_type).startswith("cuda") else "cpu"
        self.dtype = dtype or torch.bfloat16
        self.enabled = parse_bool(enabled, "enabled")
        self.channels_last = parse_bool(channels_last, "channels_last")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, MetaTensor):
            # the network needs no metadata, and MetaTensor inputs make bf16 + channels-last backward passes about
            # 2x slower on CPU (benchmarks/train_throughput.py)
            inputs = inputs.as_tensor()
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out
