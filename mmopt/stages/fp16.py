"""fp16 conversion with automatic fp32 islands, fp32 inputs and outputs kept.

1. Run the fp32 graph on real data with every float tensor exposed; record each tensor's absolute max.
2. Keep in fp32 (an "island") the producer and the readers of every tensor that would overflow fp16
   (|x| above 65504 / ``HEADROOM``) or sink below its normal range, and by default the numerically
   fragile nodes: normalisation reductions, Pow, and Softmax whose inputs are far from zero.
3. Convert with onnxruntime's converter (keep_io_types), then join neighbouring islands: the
   converter rounds every tensor *between* two blocked nodes through fp16, which would undo the guard.
4. Check parity; while it fails, move to fp32 the nodes that add the most error (measured node by
   node against the fp32 graph), doubling the batch each round, until it passes or all are fp32.

ONNX Runtime's CPU provider runs most fp16 nodes in fp32 and silently drops the fp16 rounding between
them, so parity here is measured on ``emulate(graph)``: the same graph with explicit casts, computing
in fp32 but storing every tensor in fp16, as a GPU does. The artifact itself is what gets written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from mmopt.judge.compare import Check, check_all
from mmopt.errors import PrecisionError
from mmopt.stages import graph, ranges

FP16_MAX = 65504.0
HEADROOM = 4.0  # unseen data may exceed the calibration maximum
FP16_MIN_NORMAL = 2.0 ** -14
SOFTMAX_FAR = 16.0  # fp16 spacing at 16 is 1/64: exp() of such logits is off by ~1.5%
NORMALISATION = {"ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "LayerNormalization",
                 "GroupNormalization", "InstanceNormalization", "BatchNormalization", "RMSNormalization",
                 "SimplifiedLayerNormalization", "SkipLayerNormalization"}
EXACT_IN_FP16 = {"Cast", "Constant", "ConstantOfShape", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat",
                 "Slice", "Gather", "Expand", "Identity", "Flatten", "Split", "Shape", "Size", "Where", "Tile",
                 "Relu", "MaxPool", "Neg", "Abs"}


@dataclass
class Fp16Result:
    proto: onnx.ModelProto
    islands: dict[str, str]  # node name -> why it stayed fp32
    checks: list[Check]
    rounds: list[dict[str, Any]] = field(default_factory=list)


def plan_islands(proto: onnx.ModelProto, floats: dict[str, str], top: dict[str, float],
                 guard: bool = True, fragile: bool = True) -> dict[str, str]:
    """Nodes to keep in fp32 and why, from each float tensor's absolute maximum."""
    islands: dict[str, str] = {}
    readers = graph.consumers(proto.graph)
    if guard:
        for tensor, producer in floats.items():
            m = top.get(tensor, 0.0)
            if m > FP16_MAX / HEADROOM:
                why = f"overflow: '{tensor}' reaches |x| {m:.3g} (fp16 max 65504, kept {HEADROOM:g}x headroom)"
            elif 0.0 < m < FP16_MIN_NORMAL:
                why = f"underflow: '{tensor}' peaks at |x| {m:.3g}, below fp16's normal range (6.1e-05)"
            else:
                continue
            for node in ([producer] if producer else []) + [r.name for r in readers.get(tensor, [])]:
                islands.setdefault(node, why)
    if fragile:
        for node in proto.graph.node:
            if node.op_type in NORMALISATION:
                islands.setdefault(node.name, f"fragile: {node.op_type} (a reduction over many values: fp16 "
                                              "accumulates it with too few bits)")
            elif node.op_type == "Pow":
                islands.setdefault(node.name, "fragile: Pow")
            elif node.op_type == "Softmax" and top.get(node.input[0], 0.0) > SOFTMAX_FAR:
                islands.setdefault(node.name, f"fragile: Softmax input reaches |x| {top[node.input[0]]:.3g} "
                                              f"(> {SOFTMAX_FAR:g}, coarse fp16 steps)")
    return islands


def legalise(proto: onnx.ModelProto, islands: dict[str, str]) -> dict[str, str]:
    """Islands plus the Transposes that sit between fp32 and fp16 in front of a MatMul / Gemm. onnxruntime
    1.32's CPU optimiser (MatmulTransposeFusion + NchwcTransformer) crashes on a Cast between a Transpose
    and the MatMul it feeds, in both directions: Transpose(fp16) -> Cast -> MatMul(fp32), and, in every
    pre-LayerNorm transformer (``nn.TransformerEncoderLayer(norm_first=True)``, ViT), LayerNorm(fp32) ->
    Cast -> Transpose(fp16) -> MatMul(fp16). A Transpose is exact at either precision, so it joins the fp32
    side and the Cast moves past the MatMul's own input."""
    made = graph.producers(proto.graph)
    out = dict(islands)
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for name in node.input:
            src = made.get(name)
            if src is None or src.op_type != "Transpose" or src.name in out:
                continue
            if node.name in out:
                out[src.name] = (f"joins the fp32 {node.op_type} it feeds (onnxruntime's CPU optimiser "
                                 "crashes on the mixed pattern)")
                continue
            before = made.get(src.input[0])
            if before is not None and before.name in out:
                out[src.name] = (f"joins the fp32 {before.op_type} that feeds it (onnxruntime's CPU optimiser "
                                 f"crashes on a Cast between it and the fp16 {node.op_type})")
    return out


def convert(proto: onnx.ModelProto, block: dict[str, str] | set[str]) -> onnx.ModelProto:
    """onnxruntime's fp16 converter (fp32 graph inputs / outputs kept), then islands joined."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = onnx.ModelProto()
    src.CopyFrom(proto)
    out = convert_float_to_float16(src, keep_io_types=True, node_block_list=sorted(block))
    join_islands(out)
    return out


def join_islands(proto: onnx.ModelProto) -> None:
    """Cast(fp32->fp16) followed by Cast(fp16->fp32) becomes Identity of the fp32 value, so a tensor
    passed between fp32 nodes (or from an fp32 node to an fp32 graph output) never touches fp16."""
    g = proto.graph
    types = _types(proto)
    made = graph.producers(g)
    for node in g.node:
        if node.op_type != "Cast" or _to(node) != TensorProto.FLOAT:
            continue
        first = made.get(node.input[0])
        if first is None or first.op_type != "Cast" or _to(first) != TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != TensorProto.FLOAT:
            continue  # e.g. int -> fp16 -> fp32: no fp32 value to pass on
        node.op_type = "Identity"
        del node.attribute[:]
        node.input[0] = first.input[0]
    graph.prune(g)


def _to(cast: onnx.NodeProto) -> int:
    for a in cast.attribute:
        if a.name == "to":
            return a.i
    raise ValueError(f"Cast node '{cast.name}' has no 'to' attribute: the graph is invalid")


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    typed = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input,
                                                            *typed.graph.output]}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def emulate(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph with every arithmetic node made to compute in fp32 between explicit casts, so
    that ONNX Runtime on CPU keeps the fp16 rounding of every tensor (its own inserted casts it drops)."""
    types = _types(proto)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for node in out.graph.node:
        if node.op_type in EXACT_IN_FP16 or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        cast_in: dict[str, str] = {}
        for i, name in enumerate(node.input):
            if name and types.get(name) == TensorProto.FLOAT16:
                if name not in cast_in:
                    cast_in[name] = f"{name}__emu32_{node.name}"
                    nodes.append(helper.make_node("Cast", [name], [cast_in[name]], to=TensorProto.FLOAT,
                                                  name=f"{node.name}__emu_in{i}"))
                node.input[i] = cast_in[name]
        casts = []
        for i, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT16:
                node.output[i] = f"{name}__emu32"
                casts.append(helper.make_node("Cast", [node.output[i]], [name], to=TensorProto.FLOAT16,
                                              name=f"{node.name}__emu_out{i}"))
        nodes += [node, *casts]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    return out


def check(proto: onnx.ModelProto, cases: list[tuple[dict, dict]], tolerance: dict[str, float],
          where: str, scores: frozenset[str] = frozenset()) -> list[Check]:
    """Parity of the (emulated) fp16 graph against the references of each (feeds, refs) case."""
    sess = ranges.session(emulate(proto), [])
    checks = []
    for i, (feeds, refs) in enumerate(cases):
        outs = ranges.run_all(sess, feeds)
        checks += check_all(where, f"case{i}", refs, outs, tolerance, scores)
    return checks


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    ok = np.isfinite(ref)
    if not np.isfinite(a[ok]).all():
        return float("inf")
    diff = np.sqrt(np.mean((a[ok] - ref[ok]) ** 2)) if ok.any() else 0.0
    scale = np.sqrt(np.mean(ref[ok] ** 2)) if ok.any() else 0.0
    return float(diff / scale) if scale > 0 else float(diff > 0)


def added_error(proto: onnx.ModelProto, fp16: onnx.ModelProto, floats: dict[str, str],
                feeds: dict[str, np.ndarray], candidates: list[str]) -> list[tuple[str, float]]:
    """Candidates ranked by the relative error each adds: error of its output minus the worst error
    of its inputs, both against the fp32 graph on ``feeds``."""
    names = [t for t in floats if floats[t]]
    ref = ranges.run_all(ranges.session(proto, names), feeds)
    have = set(graph.producers(fp16.graph))
    # A blocked node's fp32 output is renamed '<name>_cast_to_fp16' by the converter; its fp16 copy
    # under the old name is gone when only fp32 nodes read it.
    alias = {t: t if t in have else f"{t}_cast_to_fp16" for t in names}
    alias = {t: a for t, a in alias.items() if a in have}
    got = ranges.run_all(ranges.session(emulate(fp16), list(alias.values())), feeds)
    err = {t: _rel(got[a], ref[t]) for t, a in alias.items()}
    out = []
    by_name = {n.name: n for n in proto.graph.node}
    for name in candidates:
        node = by_name[name]
        outs = [err.get(t, 0.0) for t in node.output if t in err]
        ins = [err.get(t, 0.0) for t in node.input if t in err]
        if outs:
            o, i = max(outs), max(ins, default=0.0)
            out.append((name, o - i if np.isfinite(o) else (0.0 if not np.isfinite(i) else float("inf"))))
    return sorted(out, key=lambda x: -x[1])


def to_fp16(proto: onnx.ModelProto, stats_feeds: list[dict[str, np.ndarray]], cases: list[tuple[dict, dict]],
            tolerance: dict[str, float], component: str, guard: bool = True, fragile: bool = True,
            widen: bool = True, scores: frozenset[str] = frozenset()) -> Fp16Result:
    """Convert ``proto`` to fp16, keeping fp32 islands, widened until ``cases`` meet ``tolerance``."""
    proto = graph.named(proto)
    floats = ranges.float_tensors(proto)
    top = ranges.absmax(proto, list(floats), stats_feeds)
    islands = plan_islands(proto, floats, top, guard, fragile)
    computing = [n.name for n in proto.graph.node if any(floats.get(o) for o in n.output)]
    rounds, step = [], 1
    while True:
        islands = legalise(proto, islands)
        fp16 = convert(proto, islands)
        checks = check(fp16, cases, tolerance, component, scores)
        failed = [c for c in checks if c.failed]
        rounds.append({"fp32_nodes": len(islands), "failed_outputs": len(failed)})
        if not failed or not widen:
            loads_in_onnxruntime(fp16, component)
            return Fp16Result(fp16, islands, checks, rounds)
        left = [n for n in computing if n not in islands]
        if not left:
            worst = "\n".join(f"  {c.where} {c.metrics.name}: {'; '.join(c.failed)}" for c in failed[:8])
            raise PrecisionError(
                f"component '{component}': fp16 misses [tolerance.fp16] even with every one of its "
                f"{len(computing)} computing nodes kept in fp32:\n{worst}\n"
                f"The gate is tighter than the fp32 graph itself achieves. Loosen [tolerance.fp16] or set "
                f"{component} = \"fp32\" under [precision].")
        ranked = added_error(proto, fp16, floats, cases[0][0], left)
        ranked_names = [n for n, _ in ranked] + [n for n in left if n not in dict(ranked)]
        errs = dict(ranked)
        for name in ranked_names[:step]:
            e = errs.get(name)
            islands[name] = (f"widened in parity round {len(rounds)}: adds relative error "
                             f"{e:.2g}" if e is not None else f"widened in parity round {len(rounds)}")
        step *= 2


def loads_in_onnxruntime(proto: onnx.ModelProto, component: str) -> None:
    """Create a default (ENABLE_ALL) CPU session on the artifact in a child process: some mixed-precision
    patterns crash onnxruntime's optimiser outright, which must be an error here, not a user's segfault."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmopt-fp16-") as tmp:
        path = f"{tmp}/graph.onnx"
        onnx.save(proto, path)
        code = ("import onnxruntime as o, sys; o.InferenceSession(sys.argv[1], "
                "providers=['CPUExecutionProvider'])")
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1][:300]
        raise PrecisionError(f"component '{component}': onnxruntime cannot load the fp16 graph ({tail}). "
                             f"Set {component} = \"fp32\" under [precision] and report the graph.")
