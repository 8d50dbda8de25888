"""Provenance: which tools made an artifact and which machine measured it (manifests and bench reports).

Below every job: export records ``tool_versions`` in the manifest, bench records them with ``machine``
and the process's memory in its report.
"""
from __future__ import annotations

import os
import platform
import resource
from typing import Any

from mmopt import __version__


def tool_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    out = {"mmopt": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        import onnxsim
        out["onnxsim"] = onnxsim.__version__
    except ImportError:  # onnxsim is optional at run time: export falls back to the unsimplified graph
        pass
    return out


def rss_mb() -> float:
    """Current resident set of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def machine() -> dict[str, Any]:
    gpu = None
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
               "compute_capability": f"{p.major}.{p.minor}"}
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "gpu": gpu, "hostname": platform.node()}
