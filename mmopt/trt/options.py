"""How to build an engine: the few knobs that matter once precision lives in the ONNX graph.

There is deliberately no precision flag here: engines are built as strongly typed networks, so fp16
and int8 come from the graph (fp16 tensors, Q/DQ nodes) exactly as ONNX Runtime ran and verified it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmopt.errors import UsageError
from mmopt_runtime.engines import HARDWARE_LEVELS as HARDWARE_COMPAT  # noqa: F401  (what the runtime checks)
from mmopt_runtime.paths import cache_dir


def default_timing_cache() -> Path:
    """``~/.cache/mmopt/trt-timing.cache`` (``$XDG_CACHE_HOME`` honoured): shared by every build here."""
    return cache_dir() / "trt-timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    """Options of ``mmopt build``; JSON-serialisable into each engine's sidecar.

    ``profiles`` are extra optimization profiles beside the captured min/opt/max one, each a mapping
    from a dim name to a fixed size or a ``(min, opt, max)`` triple, e.g. ``{"batch": 1}`` for latency.
    ``timing_cache=None`` builds without a persistent timing cache.
    """

    workspace_mib: int | None = None
    timing_cache: Path | None = field(default_factory=default_timing_cache)
    profiles: tuple[dict[str, Any], ...] = ()
    sparse_weights: bool = False
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    optimization_level: int | None = None

    def validate(self) -> "BuildOptions":
        problems = []
        if self.workspace_mib is not None and self.workspace_mib < 1:
            problems.append(f"--workspace-mib must be a positive number of MiB, got {self.workspace_mib}.")
        if self.hardware_compatibility not in HARDWARE_COMPAT:
            problems.append(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, "
                            f"got {self.hardware_compatibility!r}.")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            problems.append(f"--opt-level must be 0..5 (TensorRT's default is 3), got {self.optimization_level}.")
        if problems:
            raise UsageError("invalid build options:\n  " + "\n  ".join(problems))
        return self

    def to_json(self) -> dict[str, Any]:
        return {"workspace_mib": self.workspace_mib,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "profiles": [dict(p) for p in self.profiles],
                "sparse_weights": self.sparse_weights,
                "hardware_compatibility": self.hardware_compatibility,
                "version_compatible": self.version_compatible,
                "optimization_level": self.optimization_level,
                "strongly_typed": True}
