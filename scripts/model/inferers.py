"""Inferers: how a batch reaches the network (precision and memory layout)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping

import monai
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.engine.config_values import parse_bool
from scripts.model.network import is_lite

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above the first one with bfloat16 instructions
_BF16_ONEDNN_ISAS = {
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
    "DEFAULT",
    "ALL",
}


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as the Linux kernel reports them (empty where ``cpuinfo`` cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_cpu_bf16(flags: set[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether bfloat16 runs on native CPU instructions here, and why: ``(native, reason)``.

    Native means the CPU has AVX-512 BF16 or AMX-BF16 (``flags``, default :func:`cpu_flags`), PyTorch uses its
    AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can lower) and
    oneDNN is not capped below its bf16 ISA (``ONEDNN_MAX_CPU_ISA`` in ``environ``). Without native support bf16
    autocast is emulated and slower than float32 (measured in docs/performance.md, "The precision default, native
    bf16 and AVX2 kernels").
    """
    flags = cpu_flags() if flags is None else flags
    environ = os.environ if environ is None else environ
    hardware = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not hardware:
        return False, "the CPU has no bf16 instructions (neither avx512_bf16 nor amx_bf16)"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False, f"PyTorch runs {capability} kernels (no bf16 instructions), though the CPU has {hardware}"
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in _BF16_ONEDNN_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below its bf16 kernels, though the CPU has {hardware}"
    return True, f"the CPU has {hardware} and PyTorch runs {capability} kernels"


def precision_choice(arch: str, device: torch.device | str, image_size: int = 128) -> dict:
    """The default precision for ``arch`` on ``device`` at ``image_size`` px, and why: ``{"amp": bool, "reason": str}``.

    bf16 autocast on CUDA. On a CPU, float32 (+ channels_last) unless bf16 is native (:func:`native_cpu_bf16`); with
    native bf16, bf16 for ResNet/ResNeXt and for EfficientNet-Lite from 224 px, where it trained at least as fast as
    float32 (measured in docs/performance.md, "The precision default, native bf16 and AVX2 kernels"). The choice
    depends on the machine's features only, never on a timing, so the same machine always makes the same choice (and
    the same weights).
    """
    if str(device).startswith("cuda"):
        return {"amp": True, "reason": "CUDA device: bf16 autocast"}
    native, why = native_cpu_bf16()
    if not native:
        return {"amp": False, "reason": f"float32: {why}"}
    if is_lite(arch) and int(image_size) < 224:
        return {"amp": False, "reason": f"float32: EfficientNet-Lite below 224 px trains faster in float32 ({why})"}
    return {"amp": True, "reason": f"bf16 autocast: {why}"}


def environment() -> dict:
    """What a run's figures depend on beyond code and data: library versions and the floating-point kernels in use.

    Weights are reproducible bit for bit on the same CPU capability and thread count, not across them (AVX2 and
    AVX-512 kernels round differently; docs/README.md gives the measured difference)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        # variables that hold the kernels below what the CPU offers (e.g. AVX2 on an AVX-512 machine)
        "kernel_limits": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_cpu_bf16": dict(zip(("native", "reason"), native_cpu_bf16())),
    }


def default_amp(arch: str, device: torch.device | str, image_size: int = 128) -> bool:
    """Whether bf16 autocast is the default for ``arch`` on ``device`` at ``image_size`` px
    (:func:`precision_choice`); configs use it as ``amp``, which a run can override (``--amp true|false``)."""
    return precision_choice(arch, device, image_size)["amp"]


def saliency_amp(arch: str, amp: bool | str) -> bool:
    """Whether saliency maps may use bf16 autocast: as ``amp`` for ResNets, whose bf16 maps match float32 ones,
    never for EfficientNet-Lite, whose bf16 maps at its stride-16 target layer match them less well (correlations in
    docs/saliency.md, "Methods", "Precision"; checked in tests/test_saliency.py)."""
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
            # the network needs no metadata, and MetaTensor inputs slow bf16 + channels-last backward passes down
            # on CPU (measured in docs/performance.md, "Training: bundle vs plain loop")
            inputs = inputs.as_tensor()
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 views of a batch of square images under the symmetries of the square: rotations by 0, 90, 180 and 270
    degrees, each with and without a left-right flip (the last two dimensions are the image's)."""
    rotations = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [torch.flip(view, dims=(-1,)) for view in rotations]


class FlipRotateInferer(Inferer):
    """Test-time augmentation: the mean of ``inferer``'s outputs (a member's logits) over the 8 flips and 90-degree
    rotations of the input (:func:`dihedral_views`); calcifications have no preferred orientation in a ROI.

    Args:
        inferer: runs the network on each view (e.g. :class:`AutocastInferer`).
        enabled: ``False`` runs ``inferer`` once on the input as it is.
    """

    def __init__(self, inferer: Inferer, enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.enabled = parse_bool(enabled, "enabled")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()
        outputs = [self.inferer(view, network, *args, **kwargs) for view in dihedral_views(inputs)]
        return torch.stack(outputs).mean(dim=0)
