"""TensorRT on the build machine: build options, profiles derived from captures, graph inspection, torch device
memory and GPU discovery. The bindings (``api``), compatibility rules, the engine runner and the errors live in
the device runtime (``mmopt_runtime.trt``), which runs engines too. The build job is ``mmopt.jobs.build``.

Importing this package never imports ``tensorrt`` (nor torch): TensorRT is loaded by
``mmopt_runtime.trt.api.load()`` only when an engine is built or run, so ``import mmopt`` and ``mmopt --help``
work on machines without it. Names below are resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
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
