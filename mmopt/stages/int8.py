"""int8: static Q/DQ in the form TensorRT consumes, and dynamic (weights-only) int8 for CPUs.

Static: only the compute ops (Conv, MatMul, Gemm) are quantized, never the attention masks and
glue around them; activations and weights are symmetric int8 (zero point 0), weights per output
channel, biases stay float (TensorRT's explicit-quantization rules). The activation ranges are
computed here from the real calibration feeds (``ranges``: minmax, percentile or TensorRT's entropy)
and handed to onnxruntime's quantizer as its calibration cache, so the configured method is the one
used; the written graph's scales are then checked against them.

CPU (``int8-cpu``): static int8 in the form ONNX Runtime's CPU kernels run fast: uint8 asymmetric
activations, int8 per-channel weights in 7 bits (AVX2 without VNNI multiplies uint8 x int8 pairs into
saturating int16: full-range weights overflow there), and Relu / MaxPool quantized too (a Relu folds
into the quantize before it, a MaxPool keeps its input's scale) so that runs of convolutions stay in
int8 (QLinearConv, NHWC max-pool) without a dequantize between them. Any convolution reading at most
``STEM_CHANNELS`` channels (in practice the RGB stem) and the Relu / MaxPool after it
stay fp32: ONNX Runtime's int8 convolution is slower than its fp32 one at so few channels. Not a
TensorRT input (TensorRT takes symmetric int8 only).

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
CPU_OPS = ("Conv", "MatMul", "Gemm", "Relu", "MaxPool")
STEM_CHANNELS = 4
FORMS = ("tensorrt", "cpu")


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


def thresholds_and_fallbacks(hists: dict[str, tuple[np.ndarray, np.ndarray]], method: str,
                             percentile: float = ranges.PERCENTILE) -> tuple[dict[str, float], list[str]]:
    """Thresholds per tensor of ``hists``, and the tensors too sparsely seen for ``method`` (given minmax)."""
    names = list(hists)
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


def _quantizer(proto: onnx.ModelProto, lohi: dict[str, tuple[float, float]], **options: Any) -> onnx.ModelProto:
    """onnxruntime's static quantizer (QDQ) with the given activation ranges as its calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                                 for n, (lo, hi) in lohi.items()})
    with tempfile.TemporaryDirectory(prefix="mmopt-int8-") as tmp:
        src, dst, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save(proto, str(src))
        save_tensors_data(data, cache)
        with _quiet():
            quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                            **options)
        return onnx.load(str(dst))


def qdq(proto: onnx.ModelProto, th: dict[str, float], exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    """TensorRT's form, with the given symmetric activation thresholds."""
    from onnxruntime.quantization import QuantType

    return _quantizer(proto, {n: (-t, t) for n, t in th.items()}, op_types_to_quantize=list(COMPUTE_OPS),
                      activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                     "DedicatedQDQPair": True,
                                     "OpTypesToExcludeOutputQuantization": list(COMPUTE_OPS)})


def qdq_cpu(proto: onnx.ModelProto, lohi: dict[str, tuple[float, float]], exclude: tuple[str, ...]) -> onnx.ModelProto:
    """ONNX Runtime's CPU form (see the module text), with the given asymmetric activation ranges."""
    from onnxruntime.quantization import QuantType

    # (no MatMulConstBOnly: onnxruntime 1.32's QDQ quantizer ignores it, so a MatMul of two activations,
    # e.g. attention scores, is quantized like any other; the parity gates judge the result)
    return _quantizer(proto, lohi, op_types_to_quantize=list(CPU_OPS), reduce_range=True,
                      activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))


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


def cpu_tensors(proto: onnx.ModelProto, exclude: tuple[str, ...]) -> list[str]:
    """Float tensors read or written by the ops the CPU form quantizes: what needs a range."""
    floats = ranges.float_tensors(proto)
    return sorted({t for n in proto.graph.node if n.op_type in CPU_OPS and n.name not in exclude
                   for t in [*n.input, *n.output] if t in floats})


def cpu_stems(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """(``proto`` rewritten, the nodes to keep fp32): each Conv with at most ``STEM_CHANNELS`` input channels
    and the single-consumer Relu / MaxPool chain after it. Within that chain Relu -> MaxPool becomes
    MaxPool -> Relu (exact: max-pooling commutes with a non-decreasing function), so the int8 region starts
    with a QuantizeLinear after a Relu, which ONNX Runtime fuses away. After a MaxPool, ONNX Runtime's QDQ
    propagation moves it back over the pool, which then runs as a slow uint8 NCHW MaxPool (measured 7 ms
    vs 0.7 ms fp32 on the VQA stem at batch 32)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    init = {t.name: t for t in out.graph.initializer}
    outputs = {o.name for o in out.graph.output}
    cons = graph.consumers(out.graph)
    keep: list[str] = []
    swaps: list[tuple[str, str]] = []
    for node in out.graph.node:
        w = init.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
        if w is None or len(w.dims) < 2 or w.dims[1] * group > STEM_CHANNELS:  # input channels, not per group
            continue
        keep.append(node.name)
        cur = node
        while cur.output[0] not in outputs and len(nxt := cons.get(cur.output[0], [])) == 1 \
                and nxt[0].op_type in ("Relu", "MaxPool") and len([o for o in nxt[0].output if o]) == 1:
            if cur.op_type == "Relu" and nxt[0].op_type == "MaxPool":
                swaps.append((cur.name, nxt[0].name))
            keep.append(nxt[0].name)
            cur = nxt[0]
    if not swaps:
        return out, tuple(keep)
    order = [n.name for n in out.graph.node]
    by_name = {n.name: n for n in out.graph.node}
    for relu_name, pool_name in swaps:  # x -Relu-> a -MaxPool-> y   becomes   x -MaxPool-> a -Relu-> y
        relu, pool = by_name[relu_name], by_name[pool_name]
        x, a, y = relu.input[0], relu.output[0], pool.output[0]
        pool.input[0], pool.output[0], relu.input[0], relu.output[0] = x, a, a, y
        stale = [v for v in out.graph.value_info if v.name == a]  # a is now the pooled tensor: shape differs
        for v in stale:
            out.graph.value_info.remove(v)
        i, j = order.index(relu_name), order.index(pool_name)
        order[i], order[j] = order[j], order[i]
    nodes = [onnx.NodeProto() for _ in order]
    for node, name in zip(nodes, order):
        node.CopyFrom(by_name[name])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, tuple(keep)


def clipped(proto: onnx.ModelProto, lohi: dict[str, tuple[float, float]], th: dict[str, float],
            skip: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Asymmetric ranges clipped to the method's |x| threshold (minmax: unchanged). A quantized MaxPool's
    output takes its input's range: onnxruntime's quantizer gives it the input's scale (a pool only
    selects values), and the written scales are checked against these ranges."""
    out = {n: (max(lo, -th[n]), min(hi, th[n])) for n, (lo, hi) in lohi.items()}
    for node in proto.graph.node:  # topological order: chained pools inherit along the chain
        if node.op_type == "MaxPool" and node.name not in skip and node.input[0] in out and node.output[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return out


def quantize_static_qdq(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str,
                        exclude: tuple[str, ...] = (), samples: int = 0, form: str = "tensorrt") -> Int8Result:
    """Static Q/DQ with ``method`` ranges from ``feeds``, in TensorRT's form (symmetric int8 on the inputs of
    Conv / MatMul / Gemm) or ONNX Runtime's CPU form (``form = "cpu"``, see the module text).

    ``method = "auto"`` quantizes with each of minmax, percentile and entropy (one set of histograms)
    and keeps the one whose outputs are closest to fp32 on the last quarter of the feeds (held out
    from the ranges)."""
    if form not in FORMS:
        raise ValueError(f"int8 form {form!r}: use one of {', '.join(FORMS)}")
    proto = graph.named(proto)
    config: dict[str, Any] = {}
    stems: tuple[str, ...] = ()
    if form == "cpu":
        proto, stems = cpu_stems(proto)
    skip = (*exclude, *stems)
    names = cpu_tensors(proto, skip) if form == "cpu" else calibrated_tensors(proto)
    held = max(1, len(feeds) // 4) if method == "auto" and len(feeds) > 1 else 0
    fit, check = (feeds[:-held], feeds[-held:]) if held else (feeds, feeds)
    lohi = ranges.extrema(proto, names, fit)
    hists = ranges.histograms(proto, names, fit, top={n: max(hi, -lo) for n, (lo, hi) in lohi.items()})

    def quantized(m: str) -> tuple[onnx.ModelProto, dict[str, float], list[str], dict[str, float]]:
        """(graph, thresholds, sparse tensors, the activation scales the graph must carry)."""
        th, sparse = thresholds_and_fallbacks(hists, m)
        if form == "tensorrt":
            return qdq(proto, th, exclude), th, sparse, {n: t / 127.0 for n, t in th.items()}
        clipped_ranges = clipped(proto, lohi, th, skip)
        # uint8 over the range widened to include 0; an all-zero tensor gets onnxruntime's scale 1.0
        scales = {n: (max(hi, 0.0) - min(lo, 0.0)) / 255.0 or 1.0 for n, (lo, hi) in clipped_ranges.items()}
        return qdq_cpu(proto, clipped_ranges, skip), th, sparse, scales

    if method == "auto":
        tried = {}
        for m in ("minmax", "percentile", "entropy"):
            q, th, sparse, scales = quantized(m)
            tried[m] = (output_error(proto, q, check), q, th, sparse, scales)
        method_used = min(tried, key=lambda m: tried[m][0])
        _, out, th, sparse, scales = tried[method_used]
        config["method_search"] = {"held_out_batches": len(check), "chosen": method_used,
                                   "relative_error": {m: round(v[0], 6) for m, v in tried.items()}}
    else:
        out, th, sparse, scales = quantized(method)
        method_used = method
    checked = check_scales(out, scales, symmetric=form == "tensorrt")  # how many scales were checked
    quantized_nodes = graph.quantized_nodes(out, COMPUTE_OPS)
    if quantized_nodes and not checked:
        raise RuntimeError(f"int8: {len(quantized_nodes)} nodes were quantized, but no activation QuantizeLinear "
                           "carries a tensor mmopt computed a range for: the quantizer's scales are unchecked")
    if form == "cpu":
        fmt = ("QDQ for ONNX Runtime CPU (uint8 asymmetric activations, 7-bit per-channel int8 weights, "
               "Relu / MaxPool quantized; not a TensorRT input)")
        ops = list(CPU_OPS)
    else:
        fmt, ops = "QDQ (symmetric int8, per-channel weights, float bias)", list(COMPUTE_OPS)
    config = {"format": fmt, "method": method_used, "samples": samples, "op_types": ops,
              "quantized_nodes": len(quantized_nodes), "checked_activation_scales": checked,
              # |x| threshold per calibrated tensor (scale = threshold / 127 in TensorRT's form)
              "activation_thresholds": {n: float(f"{t:.6g}") for n, t in sorted(th.items())},
              "excluded_nodes": list(exclude),
              **({"fp32_stem_nodes": list(stems)} if stems else {}), **config}
    if method_used == "percentile":
        config["percentile"] = ranges.PERCENTILE
    if sparse:
        config["minmax_fallback"] = {"tensors": sparse, "why": f"seen in fewer than {ranges.MIN_VALUES} "
                                     f"calibration values: too few for {method_used}'s histogram"}
    return Int8Result(out, config, th)


def check_scales(proto: onnx.ModelProto, scales: dict[str, float], symmetric: bool) -> int:
    """Every activation QuantizeLinear on a ranged tensor must carry the scale computed from mmopt's ranges
    (and zero point 0 when ``symmetric``): proof that the quantizer used them, not its own. An activation
    QuantizeLinear on a tensor without a range is an error too. Returns how many were checked."""
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in init:
            continue  # weights are quantized per channel from their own values
        # onnxruntime renames a graph output it quantizes to <name>_QuantizeLinear_Input
        tensor = node.input[0] if node.input[0] in scales else node.input[0].removesuffix("_QuantizeLinear_Input")
        if tensor not in scales:
            raise RuntimeError(f"int8: the quantizer quantized '{node.input[0]}', for which mmopt computed no "
                               "range: its scale would be the quantizer's own guess")
        scale = float(init[node.input[1]])
        zp = init.get(node.input[2]) if len(node.input) > 2 else np.zeros(1)
        want = scales[tensor]
        if not np.isclose(scale, want, rtol=1e-5) or (symmetric and np.any(zp != 0)):
            raise RuntimeError(f"int8: quantizer wrote scale {scale} / zero point {zp} for {tensor}, "
                               f"expected {want}{' / 0' if symmetric else ''} from the computed ranges")
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
