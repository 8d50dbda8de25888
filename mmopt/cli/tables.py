"""Every rich table of the CLI. Rendering only: every figure comes from a manifest, a result or a report."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from mmopt.manifest import Manifest


def _shape(shape: Any) -> str:
    return escape("[" + ", ".join(map(str, shape)) + "]")


def components_table(m: Manifest) -> Table:
    t = Table(title="components", title_justify="left")
    for col in ("component", "module", "inputs (shape, dtype, source)", "outputs"):
        t.add_column(col)
    for name, c in m.components.items():
        ins = "\n".join(f"{escape(i.name)} {_shape(i.shape)} {i.dtype} <- "
                        + escape(" | ".join(sources[i.name] for _, sources in c.calls()))
                        for i in c.inputs)
        if c.repeats:  # one graph run once per call: each call's source, in order
            name_note = f"{name} (called {len(c.repeats) + 1}x)"
        else:
            name_note = name
        outs = "\n".join(f"{escape(o.name)} {_shape(o.shape)} {o.dtype}" for o in c.outputs)
        t.add_row(escape(name_note), escape(c.module or "(rest of forward)"), ins, outs)
    return t


def dims_table(m: Manifest) -> Table:
    """The exported range of every dim: what `bench --batch` and `build --profile` may ask for."""
    t = Table(title="dims: the exported range", title_justify="left")
    for col in ("dim", "min", "opt", "max"):
        t.add_column(col, justify="left" if col == "dim" else "right")
    for name, d in m.model.get("dims", {}).items():
        t.add_row(escape(name), str(d.get("min")), str(d.get("opt")), str(d.get("max")))
    return t


def weights_table(m: Manifest, bundle: Any) -> Table:
    """Weight values (initializer elements) and bytes of each component's fp32 graph."""
    import math

    import onnx

    t = Table(title="weights of the fp32 graphs", title_justify="left")
    for col in ("component", "values", "size"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for comp in m.components:
        art = m.find(comp, "fp32", stage="export")
        if art is None:
            continue
        graph = onnx.load(str(m.file(bundle, art)), load_external_data=False).graph
        count = sum(int(math.prod(i.dims)) for i in graph.initializer)
        size = f"{art.bytes / 2**20:.1f} MiB" if art.bytes >= 2**20 else f"{art.bytes / 1024:.0f} KiB"
        t.add_row(escape(comp), f"{count:,}", size)
    return t


def summary_table(m: Manifest) -> Table:
    t = Table(title="artifacts", title_justify="left")
    for col in ("artifact", "file", "size", "sha256", "note"):
        t.add_column(col)
    for a in m.artifacts:
        note = a.config.get("simplify") or a.config.get("note") or ""
        t.add_row(escape(a.id), escape(a.file), f"{a.bytes / 1024:.0f} KiB", a.sha256[:12], escape(str(note)))
    return t


def parity_table(parity: dict[str, dict[str, dict[str, Any]]]) -> Table:
    t = Table(title="parity vs eager PyTorch (worst case; checks = outputs x sizes or batches)",
              title_justify="left")
    for col in ("precision", "graph", "checks", "cos min", "max abs", "max rel", "argmax", "status"):
        t.add_column(col, justify="right" if col not in ("precision", "graph", "status") else "left")
    for precision, rows in parity.items():
        for where, s in rows.items():
            status = "[green]pass[/]" if not s["failed"] else f"[red]{s['failed']} failed[/]"
            arg = "-" if s["argmax"] is None else f"{s['argmax']:.3f}"
            t.add_row(escape(precision), escape(where), str(s["outputs"]), f"{s['cos_min']:.5f}", f"{s['max_abs']:.2e}",
                      f"{s['max_rel']:.2e}", arg, status)
    return t


def converted_table(result: Any) -> Table:
    """The artifacts a ``QuantizeResult`` wrote, beside their fp32 parents."""
    from mmopt.precision.convert import artifact_file

    m = result.manifest
    t = Table(title=f"converted: {escape(result.label)}", title_justify="left")
    for col in ("component", "precision", "file", "size", "fp32 size", "how"):
        t.add_column(col)
    for comp, prec in result.policy.items():
        if prec == "fp32":
            continue
        art, parent = m.artifact(comp, prec), m.artifact(comp, "fp32")
        t.add_row(escape(comp), prec, escape(artifact_file(comp, prec)), f"{art.bytes / 1024:.0f} KiB",
                  f"{parent.bytes / 1024:.0f} KiB", escape(how_converted(prec, art.config, result.islands.get(comp))))
    return t


def how_converted(precision: str, config: dict[str, Any], islands: dict[str, str] | None) -> str:
    """One line on how a component was converted: the calibration method (and why, for auto), fallbacks,
    nodes kept fp32."""
    if precision == "fp16":
        return f"{len(islands or {})} nodes kept fp32 (table below)" if islands else "every node fp16"
    if precision == "int8-dynamic":
        return "weights int8, activations quantized at run time"
    parts = [f"{config.get('method', '?')} calibration"]
    search = config.get("method_search")
    if search:
        errors = " · ".join(f"{m} {e:.3g}" for m, e in search["relative_error"].items())
        parts[0] += (f" (auto: least output error on {search['held_out_batches']} held-out batches: {errors})")
    fallback = (config.get("minmax_fallback") or {}).get("tensors")
    if fallback:
        parts.append(f"{len(fallback)} tensors fell back to minmax (too few calibration values)")
    if config.get("excluded_nodes"):
        parts.append(f"{len(config['excluded_nodes'])} nodes kept fp32 by [precision.exclude]")
    if config.get("fp32_stem_nodes"):
        parts.append(f"stem ({len(config['fp32_stem_nodes'])} nodes) kept fp32")
    return "; ".join(parts)


def search_table(table: dict[str, Any]) -> Table:
    """The candidates ``auto`` tried, the one it chose marked."""
    t = Table(title=f"auto: candidates tried ({escape(table['timing'].split(';')[0])})", title_justify="left")
    scored = any("accuracy" in r for r in table["candidates"])
    for col, right in (("policy", False), ("latency", True), ("parity", False), *((("accuracy", True),) if scored
                                                                                    else ()), ("", False)):
        t.add_column(col, justify="right" if right else "left")
    for r in table["candidates"]:
        parity = "pass" if r["parity_ok"] else f"fail ({r['parity_failures']} checks)"
        acc = []
        if scored:
            acc = [f"{r['accuracy'] * 100:.2f}%" + ("" if r.get("accuracy_ok", True) else " (over budget)")
                   if "accuracy" in r else ""]
        t.add_row(escape(r["label"]), f"{r['latency_ms']:.3g} ms", parity, *acc,
                  "[bold green]chosen[/]" if r["label"] == table["chosen"] else "")
    return t


def islands_table(comp: str, islands: dict[str, str]) -> Table:
    t = Table(title=f"{escape(comp)}: nodes kept in fp32", title_justify="left")
    t.add_column("node")
    t.add_column("why")
    for node, why in islands.items():
        t.add_row(escape(node), escape(why))
    return t


def accuracy_table(acc: dict[str, Any]) -> Table:
    t = Table(title=escape(f"{acc['metric']} on {acc['samples']} samples from {acc['source']}"), title_justify="left")
    t.add_column("pipeline")
    t.add_column("accuracy", justify="right")
    t.add_column("vs eager fp32", justify="right")
    base = acc["scores"].get("eager fp32")
    for label, score in acc["scores"].items():
        t.add_row(escape(label), f"{score * 100:.2f}%", "" if base is None else f"{(score - base) * 100:+.2f} pts")
    return t


def sensitivity_table(report: dict[str, Any]) -> Table:
    t = Table(title="int8 sensitivity: pipeline error with only this node quantized (worst first)",
              title_justify="left")
    for col in ("component", "node", "op", "max rel", "cos min", "argmax"):
        t.add_column(col, justify="right" if col in ("max rel", "cos min", "argmax") else "left")
    for comp, r in report.items():
        w = r["whole_component"]
        t.add_row(escape(comp), (f"(all {r['quantized_nodes']} quantized nodes)" if r['quantized_nodes'] != 1 else "(its 1 quantized node)"), "", f"{w['max_rel']:.4f}",
                  f"{w['cos_min']:.5f}", "-" if w["argmax"] is None else f"{w['argmax']:.3f}")
        for row in r["worst_nodes"]:
            t.add_row("", escape(row["node"]), escape(row["op"]), f"{row['max_rel']:.4f}", f"{row['cos_min']:.5f}",
                      "-" if row["argmax"] is None else f"{row['argmax']:.3f}")
        if r.get("suggest_exclude"):
            t.add_row("", f"[yellow]to try: exclude.{escape(comp)} = {escape(str(r['suggest_exclude']))}[/]",
                      "", "", "", "")
    return t


def bench_table(report: dict[str, Any]) -> Table:
    t = Table(title=f"bench: pipeline latency (ms, {report['settings']['threads']} thread(s)) and parity vs eager",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("variant", "batch", "p50", "p90", "samp/s", "×eager", "parity", "score"):
        t.add_column(col, justify="left" if col in ("variant", "parity") else "right", no_wrap=col == "variant")
    by_id = {v["id"]: v for v in report["variants"]}
    for r in report["latency"]:
        if r["graph"] != "pipeline":
            continue
        v = by_id[r["variant"]]
        parity = "ref" if v["backend"] == "eager" and v["device"] == "cpu" else \
            ("[green]pass[/]" if not v["failed"] else f"[red]{v['failed']} failed[/]")
        score = f"{v['task']['score']:.4f}" if v.get("task") and v["task"]["score"] is not None else "-"
        t.add_row(escape(r["variant"]), str(r["batch"]), f"{r['p50']:.3f}", f"{r['p90']:.3f}",
                  f"{r['throughput']:.0f}", f"{r['ratio_vs_eager']:.2f}x", parity, score)
    return t


def variants_table(report: dict[str, Any]) -> Table:
    """A bench report's variants side by side: precision per component, size, agreement with eager on the
    evaluation data's scores, task accuracy and pipeline latency at the largest batch."""
    pipeline = [r for r in report["latency"] if r["graph"] == "pipeline"]
    b = max(r["batch"] for r in pipeline)
    at_b = {r["variant"]: r for r in pipeline if r["batch"] == b}
    task = next((v["task"] for v in report["variants"] if v.get("task")), None)
    t = Table(title=f"precision variants: accuracy on {task['samples'] if task else '?'} test samples, latency "
                    f"at batch {b}, {report['settings']['threads']} thread(s)", title_justify="left")
    comps = list(next(v for v in report["variants"] if v["backend"] != "eager")["precisions"]) \
        if any(v["backend"] != "eager" for v in report["variants"]) else []
    t.add_column("variant", no_wrap=True)
    for c in comps:
        t.add_column(escape(c))
    for col in ("size", "cos min", "max err", "accuracy", "latency", "vs eager"):
        t.add_column(col, justify="right")
    for v in report["variants"]:
        if v["id"] not in at_b:
            continue
        eager = v["backend"] == "eager"
        vs = (v.get("task") or {}).get("vs_eager", {})
        acc = (v.get("task") or {}).get("score")
        name = v["id"].removeprefix("onnxruntime/")
        t.add_row(escape(name), *[("PyTorch" if eager else v["precisions"][c]) for c in comps],
                  "-" if eager else f"{v['bytes'] / 1024:.0f} KiB", f"{vs.get('cos_min', 1.0):.5f}",
                  f"{vs.get('max_abs', 0.0):.2e}", "-" if acc is None else f"{acc * 100:.2f}%",
                  f"{at_b[v['id']]['p50']:.2f} ms", f"{at_b[v['id']]['ratio_vs_eager']:.2f}x")
    return t


def engines_table(bundle: Any, artifacts: list[Any]) -> Table:
    """The TensorRT engines ``mmopt build`` wrote."""
    table = Table(title=f"TensorRT engines in {escape(str(bundle))}")
    for col in ("component", "precision (graph)", "engine", "MiB", "profiles", "build s", "TensorRT / GPU"):
        table.add_column(col)
    for a in artifacts:
        e = a.extra
        table.add_row(escape(a.component), f"{a.precision} ({e['graph_precision']['found']})", escape(a.file),
                      f"{a.bytes / 2**20:.1f}", ", ".join(p["name"] for p in e["profiles"]), f"{e['build_seconds']:.1f}",
                      f"{e['tensorrt']['version']} / {e['gpu']['name']} (sm {e['gpu']['compute_capability']})")
    return table


def _triton_io(tensors: Any, data_type_name: Any) -> str:
    return "\n".join(f"{escape(t.name)} {data_type_name(t.data_type).removeprefix('TYPE_')} "
                     f"{_shape(list(t.dims))}" for t in tensors)


def triton_table(r: Any) -> Table:
    """What `mmopt triton` wrote: one row per Triton model, from the validated configs."""
    from tritonclient.grpc import model_config_pb2 as mc  # present: the repository was just validated with it

    t = Table(title=f"Triton repository ({r.plan.backend})", title_justify="left")
    for col in ("model", "runs", "max batch", "dynamic batching", "instances", "inputs", "outputs"):
        t.add_column(col, justify="right" if col in ("max batch", "instances") else "left", overflow="fold")
    members = {m.name: m for m in r.plan.members.values()}
    for name, m in r.report.models.items():
        c = m.config
        if c.platform == "ensemble":
            runs = " -> ".join(s.model_name for s in c.ensemble_scheduling.step)
        else:
            runs = f"{members[name].component}: {c.platform or c.backend}" if name in members else c.platform or c.backend
        batching = ("preferred " + ", ".join(map(str, c.dynamic_batching.preferred_batch_size))
                    if c.HasField("dynamic_batching") else "-")
        count = ", ".join(f"{g.count} {mc.ModelInstanceGroup.Kind.Name(g.kind).removeprefix('KIND_')}"
                          for g in c.instance_group) or "-"
        t.add_row(escape(name), escape(runs), str(c.max_batch_size), batching, count,
                  _triton_io(c.input, mc.DataType.Name), _triton_io(c.output, mc.DataType.Name))
    return t


def triton_check_table(report: Any) -> Table:
    """A validated repository: each model, what it runs, its versions and its IO."""
    from tritonclient.grpc import model_config_pb2 as mc

    t = Table(title=f"Triton repository {escape(str(report.root))}", title_justify="left")
    for col in ("model", "runs", "max batch", "versions", "inputs", "outputs"):
        t.add_column(col, justify="right" if col == "max batch" else "left", overflow="fold")
    for name, m in report.models.items():
        c = m.config
        runs = " -> ".join(s.model_name for s in c.ensemble_scheduling.step) if c.platform == "ensemble" else m.kind
        t.add_row(escape(name), escape(runs), str(c.max_batch_size), ", ".join(map(str, m.versions)),
                  _triton_io(c.input, mc.DataType.Name), _triton_io(c.output, mc.DataType.Name))
    return t
