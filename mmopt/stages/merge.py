"""One graph for a whole policy: the component graphs joined by the captured wiring.

On ONNX Runtime CPU the split pipeline pays a session call and Python glue per component (5-11% at batch 1 for
the VQA model, benchmarks/package_vqa.py); one merged graph pays them once. Each call's graph is added under the prefix ``<call>/``
(``onnx.compose.add_prefix``: nodes, values, initializers, local functions; graphs holding sub-graphs are
not merged, since add_prefix misses their outer-scope reads), in wiring order, its inputs fed by
Identity nodes from the model inputs or from the prefixed outputs of the calls it reads, and each model output
is an Identity of its source. ONNX Runtime's graph optimizer removes the Identities, so the merged graph
runs the split pipeline's operators (fusions across the former boundaries may round differently; the
package checks it against the split pipeline).

The wiring is the package manifest's (``components[c].calls``, ``model.output_sources``), so there is one
description of it. A graph that cannot be merged (different opset versions of one domain, over protobuf's
2 GB) is a ``MergeError`` naming why; the package then ships the split graphs only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import compose, helper

from mmopt_runtime.pipeline import manifest_calls, ordered

LIMIT = 2 ** 31 - 1  # protobuf's message size limit


class MergeError(ValueError):
    """The component graphs cannot be joined into one; the reason says which."""


def merge(components: dict[str, dict[str, Any]], model: dict[str, Any], graphs: dict[str, onnx.ModelProto],
          name: str = "pipeline") -> onnx.ModelProto:
    """``graphs`` (component -> ModelProto) joined as the package manifest's ``components`` and ``model``
    (inputs, outputs, output_sources) wire them. Returns a checked ModelProto."""
    opsets: dict[str, int] = {}
    for comp, proto in graphs.items():
        for imp in proto.opset_import:
            have = opsets.setdefault(imp.domain, imp.version)
            if have != imp.version:
                raise MergeError(f"component '{comp}' imports opset {imp.version} of domain "
                                 f"'{imp.domain or 'ai.onnx'}', another component {have} (re-export the bundle at "
                                 "one opset to merge them)")
    for comp, proto in graphs.items():
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in _all_nodes(proto)
               for a in n.attribute):
            # add_prefix leaves a sub-graph's reads of outer-scope names unprefixed (onnx 1.23)
            raise MergeError(f"component '{comp}' holds sub-graphs (If / Loop / Scan), which onnx.compose does not "
                             "rename consistently")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    sparse: list[onnx.SparseTensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    calls = ordered(manifest_calls(components))
    for key, comp, pairs, _ in calls:  # in wiring order: every node after the nodes it reads
        sources = dict(pairs)
        part = compose.add_prefix(graphs[comp], f"{key}/")
        g = part.graph
        for inp in g.input:
            if any(inp.name == t.name for t in g.initializer):
                continue  # an initializer listed as an input (old exporters): it stays a weight
            src = sources.get(inp.name[len(key) + 1:])
            if src is None:
                raise MergeError(f"call '{key}': the wiring feeds nothing to its graph input "
                                 f"'{inp.name[len(key) + 1:]}'")
            nodes.append(helper.make_node("Identity", [_name(src)], [inp.name], name=f"{inp.name}/feed"))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        sparse.extend(g.sparse_initializer)
        infos.extend([*g.value_info, *g.input, *g.output])
        for f in part.functions:
            functions[(f.domain, f.name)] = f
    for out, src in model["output_sources"].items():
        nodes.append(helper.make_node("Identity", [_name(src)], [out], name=f"{out}/result"))
    inputs = [_info(t) for t in model["inputs"]]
    outputs = [_info(t) for t in model["outputs"]]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits, sparse_initializer=sparse,
                              value_info=[v for v in infos if v.type.WhichOneof("value") is not None])
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                               functions=list(functions.values()), producer_name="mmopt package")
    merged.ir_version = max(p.ir_version for p in graphs.values())
    if merged.ByteSize() > LIMIT:
        raise MergeError(f"the merged graph would be {merged.ByteSize() / 2 ** 30:.1f} GiB, over protobuf's 2 GiB")
    try:
        onnx.checker.check_model(merged)
    except onnx.checker.ValidationError as e:
        raise MergeError(f"the joined graph fails onnx.checker ({str(e).splitlines()[0]})") from None
    return merged


def _name(source: str) -> str:
    """A wiring source ("input:<model input>" or "<call>:<output>") as its value's name in the merged graph."""
    kind, _, tensor = source.partition(":")
    return tensor if kind == "input" else f"{kind}/{tensor}"


def _all_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [*proto.graph.node, *(n for f in proto.functions for n in f.node)]


def _info(t: dict[str, Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(t["name"], helper.np_dtype_to_tensor_dtype(np.dtype(t["dtype"])),
                                         list(t["shape"]))
