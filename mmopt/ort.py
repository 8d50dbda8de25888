"""The one ONNX Runtime session factory: every session mmopt opens (runners, range collection,
sensitivity) is made here, with the same options and logging. It lives in the device runtime
(``mmopt_runtime.ort``), which opens its package graphs the same way; this module is its name in mmopt."""
from __future__ import annotations

from mmopt_runtime.ort import PROVIDERS, available_devices, fast_run, io_problems, session

__all__ = ["PROVIDERS", "available_devices", "fast_run", "io_problems", "session"]
