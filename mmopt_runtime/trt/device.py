"""Which NVIDIA GPU is here, asked of cuda-python, then nvidia-smi (torch-free: the device runtime's view).

Engines record the GPU they were built on and are checked against the GPU they run on, so this must work on
edge devices without torch (cuda-python) and on hosts without either (nvidia-smi). mmopt's build side asks
torch first (``mmopt.trt.device``), then these.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    index: int = 0
    integrated: bool = False  # a Jetson's iGPU
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]
    return runtime


def _from_cuda_python(index: int) -> GpuInfo | None:
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count <= index:
        return None
    err, prop = rt.cudaGetDeviceProperties(index)
    if err != rt.cudaError_t.cudaSuccess:
        return None
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name, f"{prop.major}.{prop.minor}", index, bool(prop.integrated), "cuda-python")


def _from_nvidia_smi(index: int) -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", str(index)],
                         capture_output=True, text=True, timeout=20)
    if out.returncode != 0 or "," not in out.stdout:
        return None
    name, cc = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
    return GpuInfo(name, cc, index, False, "nvidia-smi")


PROBES: tuple[Callable[[int], GpuInfo | None], ...] = (_from_cuda_python, _from_nvidia_smi)


def first_gpu(index: int, probes: Sequence[Callable[[int], GpuInfo | None]]) -> GpuInfo | None:
    """What the first probe that can tell says of GPU ``index``; None where none finds one."""
    for probe in probes:
        try:
            info = probe(index)
        except Exception:  # a probe that is not installed or cannot initialise tells us nothing
            continue
        if info is not None:
            return info
    return None


def current_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA GPU at ``index``, or None where no probe finds one (no GPU, no driver, nothing installed)."""
    return first_gpu(index, PROBES)


def platform_tag() -> str:
    """``linux-x86_64``, ``linux-aarch64``, ``windows-amd64``: engines never move between these."""
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def l4t_release(path: Path = Path("/etc/nv_tegra_release")) -> str | None:
    """The Jetson Linux (L4T) release, e.g. ``R36.3.0`` on JetPack 6.0; None off Jetson."""
    try:
        head = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    # "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    major = re.match(r"#\s*(R\d+)\b", head)
    if major is None:
        return None  # not an L4T release line
    rev = re.search(r"REVISION:\s*([\d.]+)", head)
    return f"{major.group(1)}.{rev.group(1)}" if rev else major.group(1)
