"""The one ONNX Runtime session factory: every session mmopt opens (runners, range collection,
sensitivity) is made here, with the same options and logging."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_devices() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [d for d, p in PROVIDERS.items() if p in have]


def session(model: str | Path | bytes | Any, device: str = "cpu", threads: int | None = None,
            level: str = "ORT_ENABLE_ALL", config: dict[str, str] | None = None) -> Any:
    """An ``InferenceSession`` on ``model`` (a path, serialised bytes or an ``onnx.ModelProto``).

    ``threads`` pins intra-op threads (inter-op to 1); ``level`` is a ``GraphOptimizationLevel`` name;
    ``config`` holds session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else \
        (model if isinstance(model, bytes) else str(model))
    return ort.InferenceSession(source, so, providers=[PROVIDERS[device]])
