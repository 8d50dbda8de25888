"""The one ONNX Runtime session factory and graph check, shared by mmopt (``mmopt.ort`` re-exports it: runners,
range collection, sensitivity) and its device runtime (package graphs). Needs onnxruntime only."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# ONNX Runtime's type strings (session inputs and outputs) -> mmopt's dtype names.
TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
         "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
         "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def available_devices() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [d for d, p in PROVIDERS.items() if p in have]


def session(model: str | Path | bytes | Any, device: str = "cpu", threads: int | None = None,
            level: str = "ORT_ENABLE_ALL", config: dict[str, str] | None = None,
            external: dict[str, bytes] | None = None) -> Any:
    """An ``InferenceSession`` on ``model`` (a path, serialised bytes or an ``onnx.ModelProto``).

    ``threads`` pins intra-op threads (inter-op to 1); ``level`` is a ``GraphOptimizationLevel`` name;
    ``config`` holds session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``;
    ``external`` the bytes of the external data files a graph in bytes names ({location: data}), so they are
    read from memory (from the very bytes a caller hashed), never from disk.
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
    if isinstance(model, bytes):
        # a graph in bytes naming external data would otherwise be read from the working directory: point ONNX
        # Runtime at a folder that cannot exist, so only the data handed over here (hashed by the caller) loads
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    "/nonexistent/mmopt-external-data-comes-from-memory-only")
    if external:
        import numpy as np

        if not hasattr(so, "add_external_initializers_from_files_in_memory"):
            raise RuntimeError(f"onnxruntime {ort.__version__} cannot read external data from memory (it has no "
                               "SessionOptions.add_external_initializers_from_files_in_memory); upgrade onnxruntime "
                               "(1.32 has it)")
        names = list(external)
        so.add_external_initializers_from_files_in_memory(
            names, [np.frombuffer(external[n], dtype=np.uint8) for n in names], [len(external[n]) for n in names])
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else \
        (model if isinstance(model, bytes) else str(model))
    return ort.InferenceSession(source, so, providers=[PROVIDERS[device]])


def io_problems(sess: Any, inputs: dict[str, tuple[str, int]], outputs: dict[str, tuple[str, int]]) -> list[str]:
    """What keeps ``sess`` from being the graph whose inputs (exactly) and outputs (at least) are ``{name:
    (dtype, rank)}``: missing or unexpected names, other dtypes or ranks. Empty when it is that graph."""
    problems = []
    have_in = {i.name: i for i in sess.get_inputs()}
    have_out = {o.name: o for o in sess.get_outputs()}
    for kind, want, have, exact in (("input", inputs, have_in, True), ("output", outputs, have_out, False)):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want] if exact else []
        if missing:
            problems.append(f"{kind}s {', '.join(missing)} missing (graph has {', '.join(have) or 'none'})")
        if extra:
            problems.append(f"unexpected {kind}s {', '.join(extra)}")
        for name, (dtype, rank) in want.items():
            if name not in have:
                continue
            got = TYPES.get(have[name].type, have[name].type)
            if got != dtype:
                problems.append(f"{kind} '{name}' is {got}, expected {dtype}")
            shape = have[name].shape
            if shape is not None and len(shape) != rank:
                problems.append(f"{kind} '{name}' has rank {len(shape)}, expected {rank}")
    return problems


def fast_run(sess: Any) -> Callable[[list[str], dict[str, Any], Any], list[Any]]:
    """``sess``'s run without the Python wrapper's per-call re-validation of input names (the caller has
    checked the feeds): about 10% of a batch-1 pipeline on small models. The public ``run`` where this
    onnxruntime has no binding to call."""
    inner = getattr(sess, "_sess", None)
    return inner.run if hasattr(inner, "run") else (lambda names, feeds, options: sess.run(names, feeds, options))
