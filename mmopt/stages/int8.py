"""int8: static Q/DQ in the form TensorRT consumes, and dynamic (weights-only) int8 for CPUs.

Static: only the compute ops (Conv, MatMul, Gemm) are quantized, never the attention masks and
glue around them; activations and weights are symmetric int8 (zero point 0), weights per output
channel, biases stay float (TensorRT's explicit-quantization rules). The activation ranges are
computed here from the real calibration feeds (``ranges``: minmax, percentile or TensorRT's entropy)
and handed to onnxruntime's quantizer as its calibration cache, so the configured method is the one
used; the written graph's scales are then checked against them.

Dynamic: MatMul weights int8, activations quantized at run time by onnxruntime's CPU kernels (Gemm
is rewritten as MatMul + Add first so linear layers qualify). A CPU deployment option: TensorRT
does not run it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmopt.errors import ConfigError
from mmopt.stages import graph, ranges

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class Int8Result:
    proto: onnx.ModelProto
    config: dict[str, Any]
    thresholds: dict[str, float]


def check_exclude(proto: onnx.ModelProto, exclude: tuple[str, ...], component: str, config: Any) -> None:
    missing = graph.check_names(proto, exclude)
    if missing:
        import difflib

        names = [n.name for n in proto.graph.node if n.op_type in COMPUTE_OPS]
        hints = [f"'{m}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(m, names, 1)) else "")
                 for m in missing]
        raise ConfigError(f"{config}: field 'precision.exclude.{component}': no node named {', '.join(hints)} in "
                          f"{component}'s graph. Its Conv / MatMul / Gemm nodes are: {', '.join(names[:30])}"
                          f"{' ...' if len(names) > 30 else ''}. The sensitivity report names the nodes to exclude.")


def calibrated_tensors(proto: onnx.ModelProto) -> list[str]:
    """Float activations read by the compute ops: what gets a Q/DQ pair (outputs are not quantized)."""
    floats = ranges.float_tensors(proto)
    return sorted({t for n in proto.graph.node if n.op_type in COMPUTE_OPS for t in n.input if t in floats})


def thresholds(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str,
               percentile: float = ranges.PERCENTILE) -> dict[str, float]:
    return thresholds_and_fallbacks(proto, feeds, method, percentile)[0]


def thresholds_and_fallbacks(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str,
                             percentile: float = ranges.PERCENTILE, hists: dict | None = None
                             ) -> tuple[dict[str, float], list[str]]:
    """Thresholds per calibrated tensor, and the tensors too sparsely seen for ``method`` (given minmax)."""
    names = calibrated_tensors(proto)
    hists = hists if hists is not None else ranges.histograms(proto, names, feeds)
    sparse = [n for n in names if method != "minmax" and hists[n][0].sum() < ranges.MIN_VALUES]
    return {n: ranges.threshold(*hists[n], method, percentile) for n in names}, sparse


@contextlib.contextmanager
def _quiet():
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def qdq(proto: onnx.ModelProto, th: dict[str, float], exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer with the given activation thresholds as its calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.float32(-t), highest=np.float32(t))
                                                 for n, t in th.items()})
    with tempfile.TemporaryDirectory(prefix="mmopt-int8-") as tmp:
        src, dst, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save(proto, str(src))
        save_tensors_data(data, cache)
        with _quiet():
            quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(COMPUTE_OPS), per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=str(cache),
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QuantizeBias": False, "DedicatedQDQPair": True,
                                           "OpTypesToExcludeOutputQuantization": list(COMPUTE_OPS)})
        return onnx.load(str(dst))


def output_error(fp32: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """Worst relative RMS error of ``candidate``'s outputs against ``fp32``'s on ``feeds``."""
    a, b = ranges.session(fp32, []), ranges.session(candidate, [])
    worst = 0.0
    for f in feeds:
        ref, got = ranges.run_all(a, f), ranges.run_all(b, f)
        for name, r in ref.items():
            if np.issubdtype(r.dtype, np.floating):
                d = got[name].astype(np.float64) - r
                worst = max(worst, float(np.sqrt(np.mean(d ** 2)) / (np.sqrt(np.mean(r.astype(np.float64) ** 2))
                                                                     + 1e-12)))
    return worst


def quantize_static_qdq(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str,
                        exclude: tuple[str, ...] = (), samples: int = 0) -> Int8Result:
    """Symmetric per-channel Q/DQ on Conv / MatMul / Gemm with ``method`` ranges from ``feeds``.

    ``method = "auto"`` quantizes with each of minmax, percentile and entropy (one set of histograms)
    and keeps the one whose outputs are closest to fp32 on the last quarter of the feeds (held out
    from the ranges)."""
    proto = graph.named(proto)
    config: dict[str, Any] = {}
    if method == "auto":
        held = max(1, len(feeds) // 4) if len(feeds) > 1 else 0
        fit, check = (feeds[:-held], feeds[-held:]) if held else (feeds, feeds)
        hists = ranges.histograms(proto, calibrated_tensors(proto), fit)
        tried = {}
        for m in ("minmax", "percentile", "entropy"):
            th, sparse = thresholds_and_fallbacks(proto, fit, m, hists=hists)
            q = qdq(proto, th, exclude)
            tried[m] = (output_error(proto, q, check), q, th, sparse)
        chosen = min(tried, key=lambda m: tried[m][0])
        _, out, th, sparse = tried[chosen]
        config["method_search"] = {"held_out_batches": len(check), "chosen": chosen,
                                   "relative_error": {m: round(v[0], 6) for m, v in tried.items()}}
        method_used = chosen
    else:
        th, sparse = thresholds_and_fallbacks(proto, feeds, method)
        out = qdq(proto, th, exclude)
        method_used = method
    used = check_scales(out, th)
    quantized = [n.name for n in out.graph.node if n.op_type in COMPUTE_OPS and _reads_dq(out, n)]
    config = {"format": "QDQ (symmetric int8, per-channel weights, float bias)", "method": method_used,
              "samples": samples, "op_types": list(COMPUTE_OPS), "quantized_nodes": len(quantized),
              "activation_ranges": used, "excluded_nodes": list(exclude), **config}
    if method_used == "percentile":
        config["percentile"] = ranges.PERCENTILE
    if sparse:
        config["minmax_fallback"] = {"tensors": sparse, "why": f"seen in fewer than {ranges.MIN_VALUES} "
                                     f"calibration values: too few for a {method_used} histogram"}
    return Int8Result(out, config, th)


def _reads_dq(proto: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    made = graph.producers(proto.graph)
    return any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in node.input)


def check_scales(proto: onnx.ModelProto, th: dict[str, float]) -> int:
    """Every activation QuantizeLinear must carry scale = threshold / 127 and zero point 0: proof that
    the quantizer used the ranges computed here, not its own. Returns how many were checked."""
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in th:
            continue
        scale = float(init[node.input[1]])
        zp = init.get(node.input[2]) if len(node.input) > 2 else np.zeros(1)
        want = th[node.input[0]] / 127.0
        if not np.isclose(scale, want, rtol=1e-5) or np.any(zp != 0):
            raise RuntimeError(f"int8: quantizer wrote scale {scale} / zero point {zp} for {node.input[0]}, "
                               f"expected {want} / 0 from the computed ranges")
        checked += 1
    return checked


def gemm_as_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm with a constant B (alpha = beta = 1, transA = 0) as MatMul + Add, which dynamic int8 covers."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    init = {t.name: t for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in init or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(init[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = f"{node.input[1]}__kn"
        out.graph.initializer.append(numpy_helper.from_array(w, wname))
        mm_out = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}__mm"
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name))
        if mm_out != node.output[0]:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], node.output[:1], name=f"{node.name}__bias"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    graph.prune(out.graph)
    return out


def quantize_dynamic_int8(proto: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> Int8Result:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = gemm_as_matmul(graph.named(proto))
    with tempfile.TemporaryDirectory(prefix="mmopt-int8d-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8d.onnx"
        onnx.save(proto, str(src))
        with _quiet():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=False, nodes_to_exclude=list(exclude))
        out = onnx.load(str(dst))
    n = sum(1 for node in out.graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    config = {"format": "dynamic int8 (weights int8, activations quantized at run time; CPU only, "
                        "not a TensorRT input)", "op_types": ["MatMul", "Gemm (as MatMul + Add)"],
              "quantized_nodes": n, "excluded_nodes": list(exclude)}
    return Int8Result(out, config, {})
