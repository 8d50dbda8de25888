"""TensorRT engines from an mmopt bundle: ``build_engines`` and what it needs.

Importing this package never imports ``tensorrt`` (nor torch): TensorRT is loaded by
``mmopt.trt.api.load()`` only when an engine is built or run, so ``import mmopt`` and ``mmopt --help``
work on machines without it. Names below are resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_engines": "mmopt.trt.build",
    "preflight": "mmopt.trt.build",
    "BuildOptions": "mmopt.trt.options",
    "default_timing_cache": "mmopt.trt.options",
    "parse_profile": "mmopt.trt.profiles",
    "TensorRTUnavailable": "mmopt.trt.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmopt.trt' has no attribute {name!r}")
