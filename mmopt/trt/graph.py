"""What an ONNX graph holds, as TensorRT will see it: its precision and the ops TensorRT cannot run.

Pure (onnx only, weights left on disk). With strongly typed networks the graph *is* the precision, so
the sidecar records what was found here rather than what was asked for.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import onnx

# ONNX Runtime's integer-arithmetic quantization ops: TensorRT has no importer for them. Its int8 path
# is Q/DQ (QuantizeLinear / DequantizeLinear) around float ops, i.e. mmopt's static "int8" precision.
ORT_ONLY_OPS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
STANDARD_DOMAINS = ("", "ai.onnx")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def _dtype(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != onnx.TensorProto.BFLOAT16 \
        else "bfloat16"


def inspect_graph(path: str | Path) -> dict[str, Any]:
    """Precision found in the graph, its I/O dtypes and the nodes TensorRT will not import."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    weights = Counter(_dtype(t.data_type) for t in g.initializer)
    ops = Counter()
    blocked = []
    for node in _nodes(g):
        ops[node.op_type] += 1
        if node.op_type in ORT_ONLY_OPS or node.domain not in STANDARD_DOMAINS:
            blocked.append({"node": node.name or "(unnamed)", "op": node.op_type, "domain": node.domain or "ai.onnx"})
    qdq = sum(ops[o] for o in QDQ_OPS)
    if qdq:
        found = "int8"
    elif weights.get("float16", 0) or any(_dtype(v.type.tensor_type.elem_type) == "float16" for v in g.value_info):
        found = "fp16"
    elif weights.get("bfloat16", 0):
        found = "bf16"
    else:
        found = "fp32"
    return {"found": found,
            "initializer_dtypes": dict(sorted(weights.items())),
            "qdq_nodes": qdq,
            "inputs": {v.name: _dtype(v.type.tensor_type.elem_type) for v in g.input},
            "outputs": {v.name: _dtype(v.type.tensor_type.elem_type) for v in g.output},
            "unsupported_nodes": blocked}


def unsupported_message(file: str, blocked: list[dict[str, str]]) -> str:
    ops = sorted({b["op"] for b in blocked})
    rows = "\n".join(f"  node '{b['node']}' ({b['op']}, domain {b['domain']})" for b in blocked[:20])
    more = f"\n  ... and {len(blocked) - 20} more" if len(blocked) > 20 else ""
    return (f"{file}: TensorRT cannot import {len(blocked)} node(s) of op type {', '.join(ops)}:\n{rows}{more}\n"
            "These are ONNX Runtime-specific ops (integer-arithmetic or contrib quantization). TensorRT's int8 is "
            "static Q/DQ: build the int8 (not int8-dynamic) precision, or fp16 / fp32.")
