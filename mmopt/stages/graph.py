"""Small ONNX graph helpers shared by the precision stages."""
from __future__ import annotations

from collections import defaultdict

import onnx


def load(path) -> onnx.ModelProto:
    return onnx.load(str(path))


def named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every node has a unique, non-empty name (block / exclude lists refer to names)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return out


def external_locations(proto: onnx.ModelProto) -> list[str]:
    """The external data files a graph's initializers name (their ``location``), sorted, each once."""
    return sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output if name}


def quantized_nodes(proto: onnx.ModelProto, ops: tuple[str, ...]) -> list[onnx.NodeProto]:
    """Nodes of type ``ops`` that read a DequantizeLinear: what a Q/DQ graph really computes in int8."""
    made = producers(proto.graph)
    return [n for n in proto.graph.node if n.op_type in ops
            and any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in n.input)]


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (and initializers nothing uses), repeatedly."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def check_names(proto: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> list[str]:
    """Names in ``names`` that are not nodes of ``proto``."""
    have = {n.name for n in proto.graph.node}
    return [n for n in names if n not in have]


def subgraph_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that hold subgraphs (Loop, If, Scan): the precision converters only rewrite the main graph."""
    return [n for n in proto.graph.node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
