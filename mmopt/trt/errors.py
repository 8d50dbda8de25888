"""TensorRT-layer errors. Each says what went wrong and what to do; the CLI prints them and exits 1."""
from __future__ import annotations

from mmopt.errors import BackendUnavailable, ExportError, MmoptError

HOW_TO_BUILD = """\
TensorRT engines are specific to the GPU model and TensorRT version that build them, so mmopt builds them
on the target device itself (or on a machine with the identical GPU and software image, e.g. the same
JetPack release); it never cross-builds for Jetson. The ONNX bundle is the portable artifact. On the target:
  1. install TensorRT's Python bindings: pip install -e '.[tensorrt]' (in a checkout of mmopt)
     (on a Jetson use the TensorRT that JetPack ships: JetPack 6 has TensorRT 10.3, `sudo apt install
     python3-libnvinfer`, and a venv created with --system-site-packages)
  2. copy the bundle there, e.g. rsync -a BUNDLE/ device:BUNDLE/
  3. mmopt build BUNDLE --precision fp16
See docs/tensorrt.md."""


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT or an NVIDIA GPU is missing here: engines must be built and run on the target device."""

    exit_code = 1


class TensorRTFeatureUnavailable(MmoptError):
    """The installed TensorRT lacks a build option that was asked for."""


class OnnxParseError(ExportError):
    """TensorRT's ONNX parser rejected a graph; the message lists every failing node."""


class EngineBuildError(ExportError):
    """TensorRT could not build an engine from a parsed graph."""


class EngineIncompatible(MmoptError):
    """An engine's recorded build environment does not match the running GPU / TensorRT."""


class EngineLoadError(MmoptError):
    """An engine file is missing, tampered with, or TensorRT refused to deserialise it."""


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
