"""TensorRT errors, for building and running engines. Each says what went wrong and what to do; mmopt's CLI
and ``mmopt-run`` print them and exit 1. Torch-free."""
from __future__ import annotations

from mmopt_runtime.errors import BackendUnavailable, MmoptError


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT or an NVIDIA GPU is missing here: engines must be built and run on the target device."""

    exit_code = 1
    reason: str = ""  # one line for a list of problems (set where the cause is known)


class TensorRTFeatureUnavailable(MmoptError):
    """The installed TensorRT lacks a build option that was asked for."""


class OnnxParseError(MmoptError):
    """TensorRT's ONNX parser rejected a graph; the message lists every failing node."""


class EngineBuildError(MmoptError):
    """TensorRT could not build an engine from a parsed graph."""


class EngineIncompatible(MmoptError):
    """An engine's recorded build environment does not match the running GPU / TensorRT."""


class EngineLoadError(MmoptError):
    """An engine file is missing, tampered with, or TensorRT refused to deserialise it."""


class CudaError(MmoptError, RuntimeError):
    """A CUDA runtime call failed (out of device memory, a lost device); the message names the call."""


class EngineRunError(MmoptError, RuntimeError):
    """TensorRT failed to run an engine it had loaded (``execute_async_v3`` returned false)."""


class NoProfileFits(MmoptError):
    """A call's input shapes fit none of the engine's optimization profiles (exit code 2: the caller's input)."""

    exit_code = 2


UNSUPPORTED_CODES = ("UNSUPPORTED_NODE", "UNSUPPORTED_NODE_ATTR", "UNSUPPORTED_NODE_INPUT",
                     "UNSUPPORTED_NODE_DATATYPE", "UNSUPPORTED_NODE_DYNAMIC", "UNSUPPORTED_NODE_SHAPE",
                     "UNSUPPORTED_GRAPH")


def parser_error_message(file: str, trt_version: str, errors: list[dict], log: list[str] = ()) -> str:
    """Every parser error with its node name and op type, then what to do about unsupported ops.

    ``errors`` are dicts with code, desc, node (index), node_name and op, as read from TensorRT's
    ``OnnxParser.get_error``; ``log`` holds the logger's error lines, shown when the parser gave none.
    """
    rows = []
    for e in errors:
        node = e.get("node_name") or (f"#{e['node']}" if e.get("node", -1) >= 0 else "(graph)")
        op = f" ({e['op']})" if e.get("op") else ""
        rows.append(f"  node '{node}'{op}: {e.get('code', 'ERROR')}: {e.get('desc', '').strip()}")
    if not rows:
        rows = [f"  {line}" for line in log] or ["  (the parser reported no details)"]
    msg = f"{file}: TensorRT {trt_version}'s ONNX parser rejected the graph:\n" + "\n".join(rows)
    unsupported = sorted({e["op"] or "?" for e in errors if e.get("code") in UNSUPPORTED_CODES})
    if unsupported:
        msg += (f"\nTensorRT {trt_version} does not support op(s) {', '.join(unsupported)} as used here. Re-export "
                "the component without them (see TensorRT's ONNX operator support matrix for this version), or "
                "run this component with ONNX Runtime: the pipeline mixes backends per component.")
    else:
        msg += "\nFix the graph at the node(s) above and re-run `mmopt export`, then `mmopt build`."
    return msg
