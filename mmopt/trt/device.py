"""Which NVIDIA GPU is here, asked of torch first, then what the device runtime asks (cuda-python,
nvidia-smi: ``mmopt_runtime.trt.device``, the home of the GPU record and the platform tags)."""
from __future__ import annotations

from typing import Callable

from mmopt_runtime.trt import device as _runtime
from mmopt_runtime.trt.device import GpuInfo, cudart, l4t_release, platform_tag  # noqa: F401


def _from_torch(index: int) -> GpuInfo | None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        return None
    p = torch.cuda.get_device_properties(index)
    return GpuInfo(p.name, f"{p.major}.{p.minor}", index, bool(getattr(p, "is_integrated", False)), "torch")


PROBES: tuple[Callable[[int], GpuInfo | None], ...] = (_from_torch, *_runtime.PROBES)


def current_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA GPU at ``index``, or None where no probe finds one (no GPU, no driver, nothing installed)."""
    return _runtime.first_gpu(index, PROBES)
