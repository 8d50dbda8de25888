"""A Triton model repository checked before any server sees it: mmopt's own, or one edited by hand.

1. Every ``<model>/config.pbtxt`` is parsed with Triton's own schema (``tritonclient``'s ``model_config_pb2``
   and protobuf's ``text_format``: syntax, unknown fields, bad enum values, with line:column). The server
   itself only says "failed to read text proto" for these.
2. Meaning, as the server checks it on load (and a few things it only finds on the first request):
   - each model: its name is its folder, a version folder exists, dims are -1 or positive, preferred batch
     sizes fit ``max_batch_size``, an ensemble takes no instance group;
   - every file a model needs is there: its ONNX graph (a ``model.onnx/`` folder with the external data it
     names), TensorRT plans (``cc_model_filenames`` too), ``model.py`` and the graph it loads, whose sha256 must
     be the one its config records;
   - each ensemble: every step's model exists (at that version); each step feeds exactly the model's inputs
     and maps only its outputs; each ensemble tensor is made exactly once and read by someone; dtypes and
     shapes agree between the step that makes a tensor, every step that reads it and the ensemble's outputs;
     no cycle among the steps; no step model batches less than the ensemble.
Every problem names the file and the field; all of them are reported at once (``TritonRepositoryError``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mmopt.errors import BackendUnavailable, TritonRepositoryError
from mmopt_runtime.package import sha256_file
from mmopt_runtime.paths import escape

CONFIG = "config.pbtxt"
MARKER = "mmopt-triton.json"
INSTALL = "pip install 'mmopt[triton]' (tritonclient and grpcio; mmopt keeps the protobuf that onnx brings)"


def schema() -> tuple[Any, Any]:
    """(text_format, model_config_pb2): Triton's schema, imported only when a repository is checked."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as e:  # tritonclient.grpc raises RuntimeError without grpcio
        raise BackendUnavailable(f"checking a Triton repository needs Triton's model-config schema, from "
                                 f"tritonclient ({e}). Install it: {INSTALL}.") from None
    return text_format, model_config_pb2


@dataclasses.dataclass
class Model:
    name: str
    config: Any  # inference.ModelConfig
    versions: list[int]

    @property
    def kind(self) -> str:
        c = self.config
        return c.platform or c.backend

    def full_shape(self, t: Any) -> list[int]:
        return ([-1] if self.config.max_batch_size > 0 else []) + list(t.dims)


@dataclasses.dataclass
class Report:
    root: Path
    models: dict[str, Model]

    @property
    def ensembles(self) -> list[str]:
        return [n for n, m in self.models.items() if m.config.platform == "ensemble"]

    def summary(self) -> list[dict[str, Any]]:
        return [{"model": n, "kind": m.kind, "max_batch_size": m.config.max_batch_size, "versions": m.versions,
                 "inputs": [t.name for t in m.config.input], "outputs": [t.name for t in m.config.output],
                 "steps": [s.model_name for s in m.config.ensemble_scheduling.step]}
                for n, m in self.models.items()]


def check(repo: str | Path) -> Report:
    """The repository's models, or ``TritonRepositoryError`` listing every problem."""
    text_format, mc = schema()
    root = Path(repo)
    if not root.is_dir():
        raise TritonRepositoryError(f"{root}: is not a folder; give a Triton model repository (one folder per model "
                                    "with a config.pbtxt), e.g. one `mmopt triton` wrote.")
    problems: list[str] = []
    models: dict[str, Model] = {}
    unreadable: set[str] = set()  # folders whose config does not parse: reported once, not again by ensembles
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        where = f"{folder.name}/{CONFIG}"
        if not (folder / CONFIG).is_file():
            problems.append(f"{folder.name}/: no {CONFIG}. Every model needs a complete config (mmopt's servers run "
                            "with --disable-auto-complete-config, and an ensemble cannot be auto-completed).")
            continue
        try:
            cfg = text_format.Parse((folder / CONFIG).read_text(), mc.ModelConfig())
        except text_format.ParseError as e:
            problems.append(f"{where}:{e} (Triton's model_config.proto has the fields and values).")
            unreadable.add(folder.name)
            continue
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{where}: cannot be read ({e}).")
            unreadable.add(folder.name)
            continue
        versions = sorted(int(v.name) for v in folder.iterdir() if v.is_dir() and v.name.isdigit())
        models[folder.name] = Model(folder.name, cfg, versions)
    if not models and not problems:
        problems.append(f"{root}: holds no model folders.")
    for name, m in models.items():
        problems += _model(root, m, mc)
    for name, m in models.items():
        if m.config.platform == "ensemble":
            skipped = sorted({s.model_name for s in m.config.ensemble_scheduling.step} & unreadable)
            if skipped:
                problems.append(f"{name}/{CONFIG}: its dataflow is checked once the configs of {skipped} parse.")
            else:
                problems += _ensemble(m, models, mc)
    problems += _marker(root)
    if problems:
        raise TritonRepositoryError(f"{root}: not a repository Triton can serve as written ({len(problems)} "
                                    "problem" + ("s" if len(problems) > 1 else "") + "):\n"
                                    + "\n".join(f"  {p}" for p in problems))
    return Report(root, models)


def _model(root: Path, m: Model, mc: Any) -> list[str]:
    c, where, out = m.config, f"{m.name}/{CONFIG}", []
    if c.name and c.name != m.name:
        out.append(f"{where}: name: \"{c.name}\" but the folder is {m.name}; Triton needs them equal.")
    if not c.platform and not c.backend:
        out.append(f"{where}: neither platform nor backend is set (e.g. platform: \"onnxruntime_onnx\", "
                   "backend: \"python\", platform: \"ensemble\").")
    if not m.versions:
        out.append(f"{m.name}/: no version folder (e.g. {m.name}/1/); an ensemble needs an empty one too.")
    if c.max_batch_size < 0:
        out.append(f"{where}: max_batch_size: {c.max_batch_size}; give 0 (no batching) or more.")
    for side in ("input", "output"):
        names = [t.name for t in getattr(c, side)]
        for i, t in enumerate(getattr(c, side)):
            field = f"{where}: {side}[{i}] '{t.name}'"
            if not t.name or names.count(t.name) > 1:
                out.append(f"{field}: the name is empty or used twice.")
            if t.data_type == mc.TYPE_INVALID:
                out.append(f"{field}: data_type is missing.")
            if any(d == 0 or d < -1 for d in t.dims):
                out.append(f"{field}: dims {list(t.dims)}: each dim is -1 (dynamic) or positive.")
        if not names and c.platform != "ensemble":
            out.append(f"{where}: no {side}; a complete config lists every {side} of the model.")
    if c.HasField("dynamic_batching"):
        sizes = list(c.dynamic_batching.preferred_batch_size)
        if c.max_batch_size == 0:
            out.append(f"{where}: dynamic_batching with max_batch_size 0; batching needs max_batch_size > 0.")
        elif any(not 0 < s <= c.max_batch_size for s in sizes):
            out.append(f"{where}: dynamic_batching.preferred_batch_size {sizes}: each must be in 1..max_batch_size "
                       f"({c.max_batch_size}).")
    if c.platform == "ensemble":
        if len(c.instance_group):
            out.append(f"{where}: instance_group on an ensemble; ensembles take none (their steps' models do).")
        if not len(c.ensemble_scheduling.step):
            out.append(f"{where}: platform \"ensemble\" without ensemble_scheduling steps.")
        return out
    for v in m.versions:
        out += _files(root / m.name / str(v), f"{m.name}/{v}", c, mc)
    return out


def _files(folder: Path, rel: str, c: Any, mc: Any) -> list[str]:
    kind = c.platform or c.backend
    params = {k: v.string_value for k, v in c.parameters.items()}
    named = [("default_model_filename", c.default_model_filename), ("parameters onnx_file", params.get("onnx_file")),
             *((f"cc_model_filenames {k}", v) for k, v in c.cc_model_filenames.items())]
    escapes = [f"{rel.rpartition('/')[0]}/{CONFIG}: {field} {name!r} {problem}; a model's files sit in its version "
               "folder."
               for field, name in named if name for _, problem in [escape(folder, name, "version folder")] if problem]
    if escapes:
        return escapes
    if kind in ("onnxruntime_onnx", "onnxruntime"):
        name = c.default_model_filename or "model.onnx"
        return _onnx(folder / name, f"{rel}/{name}", c, mc)
    if kind in ("tensorrt_plan", "tensorrt"):
        files = list(c.cc_model_filenames.values()) or [c.default_model_filename or "model.plan"]
        return [f"{rel}/{f}: missing (a TensorRT plan the config names)." for f in files if not (folder / f).is_file()]
    if kind == "python":
        out = []
        script = c.default_model_filename or "model.py"
        if not (folder / script).is_file():
            out.append(f"{rel}/{script}: missing; the python backend needs it (without it the server hangs while "
                       "loading).")
        if "onnx_file" in params:
            graph = folder / params["onnx_file"]
            out += _onnx(graph, f"{rel}/{params['onnx_file']}", c, mc, exact_inputs=True)
            path = graph / "model.onnx" if graph.is_dir() else graph
            if not out and params.get("sha256") and sha256_file(path) != params["sha256"]:
                out.append(f"{rel}/{params['onnx_file']}: sha256 differs from the config's parameter sha256: the "
                           "graph was changed. Write the repository again with `mmopt triton`.")
        return out
    return []  # another backend: its files are its own business


def _onnx(path: Path, rel: str, c: Any, mc: Any, exact_inputs: bool = False) -> list[str]:
    """A single-file graph, or a ``model.onnx/`` folder holding ``model.onnx`` and the external data it names;
    its inputs and outputs as the config declares them (names, dtypes, ranks, static dims). ``exact_inputs``:
    the graph takes exactly the config's inputs (mmopt's model.py feeds every one)."""
    import onnx

    from mmopt.stages.graph import external_locations

    if not path.exists():
        return [f"{rel}: missing (the ONNX graph the config needs)."]
    out = []
    graph = path
    if path.is_dir():
        graph = path / "model.onnx"
        if not graph.is_file():
            return [f"{rel}/model.onnx: missing; a model.onnx folder holds the graph as model.onnx beside its data."]
    try:
        proto = onnx.load(str(graph), load_external_data=False)
    except Exception as e:
        return [f"{rel}: not an ONNX graph ({str(e).splitlines()[0] if str(e) else type(e).__name__})."]
    locations = set(external_locations(proto))
    if locations and not path.is_dir():
        out.append(f"{rel}: keeps weights in external data files; Triton wants such a graph as a model.onnx/ folder "
                   "holding model.onnx and its data.")
    elif locations:
        why = {loc: escape(path, loc, "model.onnx folder")[1] for loc in locations}
        bad = sorted(loc for loc, w in why.items() if w)
        out += [f"{rel}/{loc}: external data that {why[loc]}." for loc in bad]
        out += [f"{rel}/{loc}: missing (external data of model.onnx)." for loc in sorted(locations - set(bad))
                if not (path / loc).is_file()]
    return out + _graph_io(proto, rel, c, mc, exact_inputs)


def _graph_io(proto: Any, rel: str, c: Any, mc: Any, exact_inputs: bool) -> list[str]:
    from onnx import helper

    from mmopt import dtypes

    def declared(t: Any) -> tuple[str | None, list[Any]]:
        tt = t.type.tensor_type
        try:
            name = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        except Exception:
            name = None
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return ("TYPE_" + dtypes.TRITON[name]) if name in dtypes.TRITON else None, dims

    batch = [-1] if c.max_batch_size > 0 else []
    initializers = {t.name for t in proto.graph.initializer}
    graph = {"input": {t.name: t for t in proto.graph.input if t.name not in initializers},
             "output": {t.name: t for t in proto.graph.output}}
    out = []
    for side in ("input", "output"):
        for t in getattr(c, side):
            if t.name not in graph[side]:
                out.append(f"{rel}: the graph has no {side} '{t.name}' (its {side}s: {', '.join(graph[side])}).")
                continue
            dtype, dims = declared(graph[side][t.name])
            want = mc.DataType.Name(t.data_type)
            if dtype != want:
                out.append(f"{rel}: {side} '{t.name}' is {dtype or 'a type Triton has no name for'} in the graph, "
                           f"{want} in the config.")
            full = batch + list(t.dims)
            if batch and dims and dims[0] != -1:
                out.append(f"{rel}: {side} '{t.name}' has a fixed batch axis ({dims[0]}) in the graph; with "
                           "max_batch_size > 0 Triton batches on axis 0, so it must be dynamic. Export it with a "
                           "dynamic batch dim, or set max_batch_size: 0 and full dims.")
                continue
            if len(dims) != len(full) or any(g != -1 and w != -1 and g != w for g, w in zip(dims, full)):
                out.append(f"{rel}: {side} '{t.name}' has shape {dims} in the graph (-1: dynamic); the config's "
                           f"dims give {full}" + (" (the batch axis first, as max_batch_size > 0)" if batch else "")
                           + ".")
    if exact_inputs:
        extra = sorted(set(graph["input"]) - {t.name for t in c.input})
        if extra:
            out.append(f"{rel}: the graph also takes inputs {extra} that the config does not list.")
    return out




def _ensemble(e: Model, models: dict[str, Model], mc: Any) -> list[str]:
    """The ensemble's dataflow, as the server's ensemble check (and its first request) would see it."""
    c, where, out = e.config, f"{e.name}/{CONFIG}", []
    made: dict[str, tuple[int, list[int], str]] = {}  # tensor -> (dtype, full shape, who makes it)
    reads: list[tuple[str, int, list[int], str]] = []  # (tensor, dtype, full shape, who reads it)
    for t in c.input:
        made[t.name] = (t.data_type, e.full_shape(t), f"ensemble input '{t.name}'")
    producer: dict[str, int] = {}
    step_reads: dict[int, set[str]] = {}
    for i, step in enumerate(c.ensemble_scheduling.step):
        field = f"{where}: ensemble_scheduling.step[{i}] ({step.model_name})"
        m = models.get(step.model_name)
        if m is None:
            out.append(f"{field}: model '{step.model_name}' is not in the repository (folders: "
                       f"{', '.join(sorted(models))}).")
            continue
        if step.model_version != -1 and step.model_version not in m.versions:
            out.append(f"{field}: model_version {step.model_version}, but {m.name} has versions {m.versions}.")
        if m.config.max_batch_size == 0 and c.max_batch_size > 0:
            out.append(f"{field}: {m.name} does not batch (max_batch_size 0) but the ensemble does "
                       f"({c.max_batch_size}); give both the same max_batch_size.")
        elif c.max_batch_size > m.config.max_batch_size > 0:
            out.append(f"{field}: the ensemble's max_batch_size {c.max_batch_size} exceeds {m.name}'s "
                       f"{m.config.max_batch_size}.")
        ins = {t.name: t for t in m.config.input}
        outs = {t.name: t for t in m.config.output}
        for key, tensor in step.input_map.items():
            if key not in ins:
                out.append(f"{field}: input_map['{key}']: {m.name} has no input '{key}' (inputs: {', '.join(ins)}).")
                continue
            reads.append((tensor, ins[key].data_type, m.full_shape(ins[key]), f"step[{i}] ({m.name}) input '{key}'"))
            step_reads.setdefault(i, set()).add(tensor)
        unfed = [n for n, t in ins.items() if n not in step.input_map and not t.optional]
        if unfed:
            out.append(f"{field}: input_map does not feed {m.name}'s inputs {unfed}.")
        for key, tensor in step.output_map.items():
            if key not in outs:
                out.append(f"{field}: output_map['{key}']: {m.name} has no output '{key}' (outputs: "
                           f"{', '.join(outs)}).")
                continue
            if tensor in made:
                out.append(f"{field}: output_map['{key}'] makes tensor '{tensor}', which {made[tensor][2]} already "
                           "makes; each ensemble tensor is made exactly once.")
                continue
            made[tensor] = (outs[key].data_type, m.full_shape(outs[key]), f"step[{i}] ({m.name}) output '{key}'")
            producer[tensor] = i
    for t in c.output:
        reads.append((t.name, t.data_type, e.full_shape(t), f"ensemble output '{t.name}'"))
    read_names = {r[0] for r in reads}
    for tensor, dtype, shape, who in reads:
        if tensor not in made:
            out.append(f"{where}: {who} reads tensor '{tensor}', which no ensemble input or step output makes.")
            continue
        dtype0, shape0, maker = made[tensor]
        if dtype != dtype0:
            out.append(f"{where}: tensor '{tensor}': inconsistent data type: {mc.DataType.Name(dtype0)} from {maker}, "
                       f"{mc.DataType.Name(dtype)} at {who}.")
        elif not _same_shape(shape0, shape):
            out.append(f"{where}: tensor '{tensor}': inconsistent shape: {shape0} from {maker}, {shape} at {who} "
                       "(-1: dynamic; the batch axis is the leading -1 when max_batch_size > 0).")
    for tensor, (_, _, maker) in made.items():
        if tensor not in read_names:
            out.append(f"{where}: tensor '{tensor}' made by {maker} is read by no step and is no ensemble output.")
    out += _cycles(where, c, producer, step_reads)
    return out


def _same_shape(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def _cycles(where: str, c: Any, producer: dict[str, int], step_reads: dict[int, set[str]]) -> list[str]:
    """Steps that wait on each other: step i reads a tensor that step j makes, and so on back to i."""
    after = {i: sorted({producer[t] for t in ts if t in producer}) for i, ts in step_reads.items()}
    state: dict[int, int] = {}  # 1: on the path, 2: done

    def visit(i: int, path: list[int]) -> list[int] | None:
        state[i] = 1
        for j in after.get(i, []):
            if state.get(j) == 1:
                return path[path.index(j):] + [j] if j in path else [i, j]
            if state.get(j) is None:
                found = visit(j, path + [j])
                if found:
                    return found
        state[i] = 2
        return None

    steps = c.ensemble_scheduling.step
    for i in range(len(steps)):
        if state.get(i) is None:
            cycle = visit(i, [i])
            if cycle:
                names = " <- ".join(f"step[{k}] ({steps[k].model_name})" for k in cycle)
                return [f"{where}: ensemble_scheduling: the steps wait on each other in a cycle: {names}; no step "
                        "can start. Each tensor must come from an earlier step."]
    return []


def _marker(root: Path) -> list[str]:
    """In a repository mmopt wrote: every graph and model.py still has the sha256 recorded when it was written."""
    path = root / MARKER
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        return [f"{MARKER}: cannot be read as JSON ({e}); write the repository again with `mmopt triton`."]
    out = []
    for rel, digest in sorted(files.items()):
        full, why = escape(root, rel, "repository") if isinstance(rel, str) else (root, "is not a path")
        if why:
            out.append(f"{MARKER}: files['{rel}'] {why}.")
        elif not full.is_file():
            out.append(f"{rel}: missing; {MARKER} records it. Copy the whole repository, or write it again.")
        elif sha256_file(full) != digest:
            out.append(f"{rel}: sha256 differs from {MARKER}: changed since `mmopt triton` wrote it (configs may be "
                       "edited; graphs and model.py may not). Write the repository again.")
    return out
