"""Which int8 nodes cost accuracy: each quantized node's own contribution to the pipeline's error.

For every node the int8 graph quantizes, a variant of the fp32 graph gets the Q/DQ of that node
alone (same scales); the recomposed pipeline (other components fp32) runs on real calibration
inputs and its outputs are compared with the eager model's. The nodes whose lone quantization hurts
most are the ones to list under ``[precision.exclude]``.

When a policy with static int8 fails its gates, ``exclusions_that_pass`` looks for the few nodes to keep
in fp32 that make it pass: the worst nodes by their lone pipeline cosine, added one at a time, each set
converted and judged like any policy, so the fix it prints is one that was proven just now.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import onnx

from mmopt.judge.compare import measure
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import ComponentSpec
from mmopt.stages import graph
from mmopt.stages.int8 import COMPUTE_OPS

TOP = 8
MAX_KEPT = 4  # nodes kept fp32 at most when looking for a passing int8 policy


class SessionRunner:
    """The bare minimum Pipeline needs: ``infer(feeds, check=False)`` on an in-memory graph."""

    def __init__(self, proto: onnx.ModelProto):
        from mmopt.ort import session

        self.sess = session(proto, threads=1)
        self.names = [o.name for o in self.sess.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.sess.run(self.names, feeds)))


def only(fp32: onnx.ModelProto, qdq: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``fp32`` with the Q/DQ that ``qdq`` puts in front of node ``name``, and no other."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    made = graph.producers(qdq.graph)
    qinit = {t.name: t for t in qdq.graph.initializer}
    have = {t.name for t in out.graph.initializer}
    qnode = next(n for n in qdq.graph.node if n.name == name)
    pos, target = next((i, n) for i, n in enumerate(out.graph.node) if n.name == name)
    known = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input} | have
    added = []
    for i, tensor in enumerate(qnode.input):
        dq = made.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        chain = [dq]
        q = made.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            chain.insert(0, q)
        rename = {}
        for node in chain:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}__only_{name}"
            for j, o in enumerate(copy.output):
                rename[o] = copy.output[j] = f"{o}__only_{name}"
            for j, inp in enumerate(copy.input):
                inp = _fp32_name(inp, known) if inp not in rename and inp not in qinit else inp
                copy.input[j] = rename.get(inp, inp)
                if inp in qinit and inp not in have:
                    out.graph.initializer.append(qinit[inp])
                    have.add(inp)
            added.append(copy)
        target.input[i] = rename[dq.output[0]]
    for k, node in enumerate(added):
        out.graph.node.insert(pos + k, node)
    graph.prune(out.graph)
    return out


def _fp32_name(tensor: str, known: set[str]) -> str:
    """The fp32 graph's name of a tensor the quantizer renamed: onnxruntime's quantizer renames a graph
    output it quantizes to ``<name>_QuantizeLinear_Input`` (the fusion head of every CLIP-style model)."""
    if tensor in known:
        return tensor
    base = tensor.removesuffix("_QuantizeLinear_Input")
    if base in known:
        return base
    raise ValueError(f"tensor '{tensor}' of the int8 graph has no counterpart in the fp32 graph")


def _error(refs: list[dict[str, np.ndarray]], outs: list[dict[str, np.ndarray]],
           scores: Collection[str]) -> dict[str, float]:
    rel, cos, agree, rows, norm = 0.0, 1.0, 0.0, 0, 0.0
    for r, o in zip(refs, outs):
        for name, ref in r.items():
            m = measure(name, ref, o[name], name in scores)
            rel, cos, norm = max(rel, m.max_rel), min(cos, m.cos_min), max(norm, m.norm_change)
            if m.argmax is not None:
                n = int(np.prod(ref.shape[:-1]))
                agree += m.argmax * n
                rows += n
    return {"max_rel": round(rel, 5), "cos_min": round(cos, 5),
            "argmax": None if rows == 0 else round(agree / rows, 4), "norm_change": round(norm, 5)}


def int8_sensitivity(comp: str, fp32: onnx.ModelProto, qdq: onnx.ModelProto,
                     components: dict[str, ComponentSpec], output_sources: dict[str, str],
                     fp32_protos: dict[str, onnx.ModelProto],
                     cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                     scores: Collection[str] = (), top: int = TOP) -> dict[str, Any]:
    """Pipeline error with all of ``comp`` int8, and with each quantized node alone int8 (the ``top`` worst);
    argmax agreement on the model's score outputs (``scores``) only. A node that cannot be isolated is
    listed under ``not_isolated`` with the reason instead of failing the report."""
    fp32 = graph.named(fp32)
    others = {c: SessionRunner(p) for c, p in fp32_protos.items() if c != comp}
    refs = [out for _, out in cases]

    def pipeline_error(proto: onnx.ModelProto) -> dict[str, float]:
        pipe = Pipeline(components, output_sources, {**others, comp: SessionRunner(proto)})
        return _error(refs, [pipe.infer(inp) for inp, _ in cases], scores)

    nodes = graph.quantized_nodes(qdq, COMPUTE_OPS)
    rows, not_isolated = [], []
    for node in nodes:
        try:
            isolated = only(fp32, qdq, node.name)
        except (ValueError, StopIteration) as e:
            not_isolated.append({"node": node.name, "op": node.op_type, "reason": str(e) or "not in the fp32 graph"})
            continue
        rows.append({"node": node.name, "op": node.op_type, **pipeline_error(isolated)})
    rows.sort(key=lambda r: (-r["max_rel"], r["cos_min"]))
    whole = pipeline_error(qdq)
    out = {"whole_component": whole, "quantized_nodes": len(nodes), "worst_nodes": rows[:top]}
    if not_isolated:
        out["not_isolated"] = not_isolated
    return out


def suggest_exclude(report: dict[str, Any], share: float = 0.5, worth: float = 0.999) -> list[str]:
    """Nodes whose lone error is at least ``share`` of the whole component's: the exclusion candidates,
    when the component hurts at all (its pipeline cosine below ``worth``)."""
    whole = report["whole_component"]
    if whole["cos_min"] >= worth and (whole["argmax"] is None or whole["argmax"] >= 1.0):
        return []
    return [r["node"] for r in report["worst_nodes"] if r["max_rel"] >= share * whole["max_rel"] > 0][:3]



def without(fp32: onnx.ModelProto, qdq: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """``qdq`` with the nodes ``names`` reading fp32 again (their Q/DQ bypassed, their weights the fp32
    graph's): what ``[precision.exclude]`` would write, without quantizing again. Same scales elsewhere."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    made = graph.producers(out.graph)
    f32 = {n.name: n for n in graph.named(fp32).graph.node}
    finit = {t.name: t for t in fp32.graph.initializer}
    have = {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        if node.name not in names:
            continue
        for i, tensor in enumerate(node.input):
            dq = made.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = made.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                continue
            weight = f32[node.name].input[i]  # a quantized initializer: the fp32 graph holds the weight
            name = weight if weight not in made else f"{weight}__fp32"  # the DQ may output that very name
            if name not in have:
                t = onnx.TensorProto()
                t.CopyFrom(finit[weight])
                t.name = name
                out.graph.initializer.append(t)
                have.add(name)
            node.input[i] = name
    graph.prune(out.graph)
    return out


def exclusions_that_pass(spec: Any, model: Any, split: Any, policy: dict[str, str], files: dict[str, Path],
                         fp32_files: dict[str, Path], scratch: Path, cal: Any,
                         cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                         advance: Callable[[int], None] = lambda n: None) -> dict[str, list[str]] | None:
    """The few static-int8 nodes (at most ``MAX_KEPT``) whose exclusion makes ``policy``'s pipeline pass
    every gate, by component, or None. Greedy: each step keeps in fp32 the candidate whose exclusion most
    raises the pipeline's worst cosine on ``cases`` (real inputs and eager outputs), then converts and judges
    the policy with those exclusions. Candidates: the worst nodes by their lone error (errors do not add
    up: the node that hurts most alone is not always the one whose removal helps most)."""
    from mmopt.judge.parity import tolerance_for
    from mmopt.precision.convert import STATIC, convert_component, judge, open_pipeline
    from mmopt.stages.export import save

    fp32 = {c: onnx.load(str(p)) for c, p in fp32_files.items()}
    protos = {c: onnx.load(str(p)) for c, p in files.items()}
    statics = [c for c, p in policy.items() if p in STATIC]
    candidates: list[tuple[str, str]] = []
    for comp in statics:
        r = int8_sensitivity(comp, fp32[comp], protos[comp], split.components, split.output_sources, fp32, cases,
                             spec.score_outputs, top=2 * TOP)
        candidates += [(comp, row["node"]) for row in r["worst_nodes"]]
    refs = [out for _, out in cases]
    gate = tolerance_for(spec, split, policy)("pipeline")

    as_judged = {c: SessionRunner(p) for c, p in protos.items()}  # one session per graph left as it is

    def worst_cos(kept: dict[str, list[str]]) -> tuple[float, float]:
        runners = {**as_judged, **{c: SessionRunner(without(fp32[c], protos[c], nodes)) for c, nodes in kept.items()}}
        err = _error(refs, [Pipeline(split.components, split.output_sources, runners).infer(i) for i, _ in cases],
                     spec.score_outputs)
        # the worse of the two int8 gates, each as its margin in units of its own gate
        limit = gate.get("max_norm_change", float("inf"))
        margin = min((err["cos_min"] - gate["min_cosine"]) / max(1 - gate["min_cosine"], 1e-9),
                     (limit - err["norm_change"]) / limit if 0 < limit < float("inf") else float("inf"))
        return margin, -err["max_rel"]

    kept: dict[str, list[str]] = {}
    best = worst_cos({})
    for _ in range(MAX_KEPT):
        left = [cn for cn in candidates if cn[1] not in kept.get(cn[0], [])]
        if not left:
            break
        scored = [(worst_cos({**kept, c: [*kept.get(c, []), n]}), (c, n)) for c, n in left]
        score, (comp, node) = max(scored)
        if score <= best:
            break  # no node helps any more: adding one would only print a useless exclusion
        best = score
        kept.setdefault(comp, []).append(node)
        trial = dataclasses.replace(spec, exclude={**spec.exclude,
                                                   **{c: (*spec.exclude.get(c, ()), *n) for c, n in kept.items()}})
        trial_files = dict(files)
        for c in kept:
            proto, _, _ = convert_component(c, policy[c], fp32[c], model, trial, split, cal)
            trial_files[c] = Path(scratch) / f"{c}.{policy[c]}.trial.onnx"
            save(proto, trial_files[c])
        with open_pipeline(split.components, split.output_sources, trial_files, policy, scratch) as (_, runners):
            passed = not any(ch.failed for ch in judge(model, trial, split, runners, policy, cal))
        advance(1)
        if passed:
            return {c: list(n) for c, n in kept.items()}
    return None


def exclude_block(kept: dict[str, list[str]], spec: Any) -> str:
    """``kept`` as the [precision.exclude] table to paste, merged with what the config already excludes."""
    rows = [f"{c} = {json.dumps([*spec.exclude.get(c, ()), *nodes])}" for c, nodes in kept.items()]
    return "[precision.exclude]\n" + "\n".join(f"  {r}" for r in rows)
