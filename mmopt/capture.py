"""Observe the eager model and split it into components: specs, dynamic axes and wiring.

The full model runs at the min / opt / max sizes of every dim with hooks on each component. Hooks
see the exact tensor objects, so wiring is found by identity: an encoder input that *is* a model
input, a fusion input that *is* an encoder output. Nested inputs and outputs (tuples, dicts, Hugging
Face ModelOutput) are flattened with ``torch.utils._pytree`` under stable dotted names. An axis is
dynamic when its size differs between captures, and is named after the dim whose sizes it follows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from mmopt import dtypes
from mmopt.errors import CaptureError, describe, forwards, interrupted, raised_by_mmopt, where_raised
from mmopt.spec import SIZES, ComponentSpec, Dim, ModelSpec, TensorSpec, call_key, component_of



# ---------------------------------------------------------------------------------------------
# Inputs

def capture_dims(dims: dict[str, Dim]) -> dict[str, dict[str, int]]:
    """Sizes the model is *run* at. A dynamic dim whose min is 1 is captured at 2: torch.export
    specialises size-1 axes, and a capture at 1 could not tell a dynamic axis from a static one."""
    out = {}
    for name, d in dims.items():
        lo = d.min if d.min == d.max or d.min > 1 else min(2, d.opt)
        out[name] = {"min": lo, "opt": d.opt, "max": d.max}
    return out


def random_inputs(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Fresh random full-model inputs: floats and ints in their range. Bool inputs, and integer inputs
    with range [0, 1], are padding masks: each row keeps a prefix of at least half its length."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, inp in spec.inputs.items():
        shape = shapes[name]
        if inp.dtype == "bool" or (inp.range is not None and tuple(inp.range) == (0, 1)):
            length = shape[-1]
            keep = torch.randint((length + 1) // 2, length + 1, shape[:-1] + (1,), generator=g)
            out[name] = (torch.arange(length).expand(shape) < keep).to(dtypes.torch_dtype(inp.dtype))
        elif inp.dtype in ("int64", "int32"):
            lo, hi = inp.range  # type: ignore[misc]
            out[name] = torch.randint(int(lo), int(hi) + 1, shape, generator=g, dtype=dtypes.torch_dtype(inp.dtype))
        else:
            if inp.range is not None:
                lo, hi = inp.range
                x = torch.rand(shape, generator=g) * (hi - lo) + lo
            else:
                x = torch.randn(shape, generator=g)
            out[name] = x.to(dtypes.torch_dtype(inp.dtype))
    return out


def spec_shapes(spec: ModelSpec, sizes: dict[str, dict[str, int]], size: str) -> dict[str, tuple[int, ...]]:
    return {n: tuple(d if isinstance(d, int) else sizes[d][size] for d in i.shape) for n, i in spec.inputs.items()}


# ---------------------------------------------------------------------------------------------
# Flattening with names

def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def nest(inputs: dict[str, Any]) -> dict[str, Any]:
    """Model keyword arguments from flat input names: ``batch.pixel_values`` becomes
    ``batch={"pixel_values": ...}`` (a ``forward(batch)`` taking one dict); other names pass as they are."""
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        head, dot, rest = name.partition(".")
        if dot:
            out.setdefault(head, {})[rest] = value
        else:
            out[name] = value
    return {k: nest(v) if isinstance(v, dict) else v for k, v in out.items()}


def register_containers(obj: Any) -> None:
    """Plain ``@dataclass`` types in ``obj`` (at any depth) become pytree containers, as NamedTuples and
    Hugging Face ``ModelOutput``s already are, so their tensor fields are outputs with their field names
    (``torch.export.register_dataclass``: the exporter rebuilds them too)."""
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen or isinstance(x, (torch.Tensor, str, bytes, int, float, bool)) or x is None:
            return
        seen.add(id(x))
        cls = type(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and cls not in pytree.SUPPORTED_NODES:
            torch.export.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name, None))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)


def flatten_named(obj: Any, prefix: str) -> tuple[list[tuple[str, Any]], pytree.TreeSpec]:
    register_containers(obj)
    leaves, treespec = pytree.tree_flatten_with_path(obj)
    named = [(".".join([prefix, *(_key_name(k) for k in path)]) if prefix else
              ".".join(_key_name(k) for k in path) or "output", leaf) for path, leaf in leaves]
    return named, treespec


def flatten_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list[tuple[str, Any]], pytree.TreeSpec]:
    """Flatten a call's (args, kwargs) naming each leaf after the forward's parameter names."""
    params = list(inspect.signature(module.forward).parameters)
    register_containers((args, kwargs))
    leaves, treespec = pytree.tree_flatten_with_path((args, kwargs))
    named = []
    for path, leaf in leaves:
        where, first, *rest = path
        if _key_name(where) == "0":
            idx = int(_key_name(first))
            base = params[idx] if idx < len(params) and params[idx] not in ("args", "kwargs") else f"arg{idx}"
        else:
            base = _key_name(first)
        named.append((".".join([base, *(_key_name(k) for k in rest)]), leaf))
    return named, treespec


# ---------------------------------------------------------------------------------------------
# Observation: one run of the full model with hooks

@dataclass
class Call:
    """What one component saw in one run: named input leaves (with the call's tree), named outputs."""

    inputs: list[tuple[str, Any]]
    in_tree: pytree.TreeSpec
    outputs: list[tuple[str, Any]]
    out_tree: pytree.TreeSpec
    started: int = 0  # when the call began and ended, counted over every hooked call of the run
    finished: int = 0


def get_submodule(model: torch.nn.Module, path: str, field_name: str, config: Any) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") < 2][:40]
        raise CaptureError(f"{config}: field '{field_name}': the model has no submodule '{path}'. "
                           f"Submodules include: {', '.join(names)}.") from None


@contextlib.contextmanager
def hooked(model: torch.nn.Module, modules: dict[str, str], config: Any) -> Iterator[dict[str, list[Call]]]:
    calls: dict[str, list[Call]] = {name: [] for name in modules}
    handles = []
    pending: dict[str, tuple] = {}
    clock = [0]
    owners: dict[int, str] = {}
    for name, path in modules.items():
        field_name = "components.fusion" if name == "fusion" else f"components.{name}"
        mod = get_submodule(model, path, field_name, config)
        if id(mod) in owners:
            raise CaptureError(f"{config}: field '{field_name}': components '{owners[id(mod)]}' and '{name}' name "
                               f"the same module ('{path}'). A module the forward calls more than once is one "
                               "component (mmopt runs its graph once per call): keep one of the two names.")
        owners[id(mod)] = name

        def pre(m, args, kwargs, name=name):
            clock[0] += 1
            pending[name] = (*flatten_call(m, args, kwargs), clock[0])

        def post(m, args, kwargs, out, name=name):
            named_in, in_tree, started = pending.pop(name)
            named_out, out_tree = flatten_named(out, "")
            clock[0] += 1
            calls[name].append(Call(named_in, in_tree, named_out, out_tree, started, clock[0]))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


_OPERATORS = {"__truediv__": "/", "__mul__": "*", "__add__": "+", "__sub__": "-", "__matmul__": "@",
              "__rtruediv__": "/", "__rmul__": "*", "__radd__": "+", "__rsub__": "-", "__getitem__": "[...]"}


def public_name(func: Any) -> str:
    """How the user wrote the op: ``torch.ones``, ``Tensor.div``, ``/`` (not ``_VariableFunctionsClass.ones``)."""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
    owner, _, attr = qual.rpartition(".")
    if attr in _OPERATORS and owner in ("TensorBase", "Tensor", "_TensorBase"):
        return f"the operator `{_OPERATORS[attr]}` (Tensor.{attr})"
    if owner in ("TensorBase", "_TensorBase"):
        return f"Tensor.{attr}"
    if owner == "_VariableFunctionsClass":
        return f"torch.{attr}"
    module = getattr(func, "__module__", None)
    return f"{module}.{qual}" if module and not owner and module.startswith("torch") else qual


class _Producers(TorchFunctionMode):
    """Records which torch function produced each tensor (by id), and which tensors were read."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, str] = {}
        self.read: set[int] = set()

    @forwards
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.read.add(id(leaf))
        out = func(*args, **kwargs)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                # ids of freed temporaries get reused: the latest producer of a live tensor is its own
                self.producer[id(leaf)] = public_name(func)
        return out


@dataclass
class Run:
    """One run of the full model. ``calls`` is keyed by call key: a component's first call under its name,
    later calls of the same component as ``name@2``, ``name@3`` (``mmopt.spec.call_key``)."""

    size: str
    inputs: dict[str, torch.Tensor]
    outputs: list[tuple[str, Any]]
    calls: dict[str, Call]
    producers: dict[int, str] = field(default_factory=dict)


def observe(model: torch.nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor], size: str,
            modules: dict[str, str]) -> Run:
    with torch.no_grad(), hooked(model, modules, spec.path) as calls, _Producers() as prod:
        try:
            out = model(**nest(inputs))
        except (Exception, SystemExit) as e:
            if interrupted():
                raise KeyboardInterrupt from None
            if raised_by_mmopt(e):
                raise  # a bug in mmopt's hooks keeps its traceback
            shapes = {k: tuple(v.shape) for k, v in inputs.items()}
            raise CaptureError(f"{spec.path}: the model's forward failed at the {size} size with inputs "
                               f"{shapes}: {describe(e)}{where_raised(e)}. Check [inputs] and [dims] against what "
                               "the model accepts.") from None
    keyed = {}
    for name, got in calls.items():
        if not got or (name == "fusion" and len(got) > 1):
            raise CaptureError(f"{spec.path}: component '{name}' ({modules[name]}) was called {len(got)} times "
                               "in one forward; " + ("it must run once." if got else
                                                    "check that the forward calls that submodule."))
        keyed.update({call_key(name, k): call for k, call in enumerate(got, 1)})
    outputs, _ = flatten_named(out, "")
    return Run(size, inputs, outputs, keyed, prod.producer)


# ---------------------------------------------------------------------------------------------
# From three runs to specs

def _dtype(t: torch.Tensor, where: str) -> str:
    name = dtypes.name_of(t.dtype)
    if name is None:
        raise CaptureError(f"{where} has dtype {t.dtype}, which mmopt cannot export. Supported: "
                           f"{', '.join(dtypes.NAMES)}.")
    return name


def tensor_spec(name: str, per_size: dict[str, torch.Tensor], dims: dict[str, Dim],
                sizes: dict[str, dict[str, int]], where: str, rng: tuple | None = None) -> TensorSpec:
    shapes = {s: tuple(per_size[s].shape) for s in SIZES}
    if len({len(v) for v in shapes.values()}) != 1:
        raise CaptureError(f"{where}: rank changes between sizes ({shapes}); mmopt needs a fixed rank.")
    shape: list[int | str] = []
    true_shapes = {s: list(shapes[s]) for s in SIZES}
    for axis in range(len(shapes["min"])):
        triple = tuple(shapes[s][axis] for s in SIZES)
        if len(set(triple)) == 1:
            shape.append(triple[0])
            continue
        dim = next((d for d in dims if tuple(sizes[d][s] for s in SIZES) == triple), None)
        if dim is None:
            shape.append(f"{name.replace('.', '_')}_dim{axis}")
        else:
            shape.append(dim)
            for s in SIZES:  # the profile uses the declared size (e.g. batch 1), not the capture size
                true_shapes[s][axis] = dims[dim].at(s)
    return TensorSpec(name, _dtype(per_size["opt"], where), tuple(shape),
                      {s: tuple(v) for s, v in true_shapes.items()}, rng)


@dataclass
class Split:
    """Everything export and verification need: specs, wiring, and how to rebuild each call."""

    components: dict[str, ComponentSpec]
    model_inputs: list[TensorSpec]
    model_outputs: list[TensorSpec]
    output_sources: dict[str, str]
    runs: dict[str, Run]
    fusion_module: str | None


def _ident(run: Run) -> dict[int, str]:
    """id(tensor) -> source name, for model inputs and every encoder output of one run."""
    ids = {id(t): f"input:{n}" for n, t in run.inputs.items()}
    for comp, call in run.calls.items():
        if comp == "fusion":
            continue
        for name, leaf in call.outputs:
            if isinstance(leaf, torch.Tensor):
                ids.setdefault(id(leaf), f"{comp}:{name}")
    return ids


def split(model: torch.nn.Module, spec: ModelSpec, seed: int = 0) -> Split:
    sizes = capture_dims(spec.dims)
    modules = dict(spec.components)
    if spec.fusion:
        modules["fusion"] = spec.fusion
    runs = {s: observe(model, spec, random_inputs(spec, spec_shapes(spec, sizes, s), seed + i), s, modules)
            for i, s in enumerate(SIZES)}
    opt = runs["opt"]
    ids = _ident(opt)

    model_inputs = [tensor_spec(n, {s: runs[s].inputs[n] for s in SIZES}, spec.dims, sizes,
                                f"{spec.path}: input '{n}'", spec.inputs[n].range) for n in spec.inputs]
    components: dict[str, ComponentSpec] = {}
    glued = [c for c in spec.components
             if any(_computed_inputs(call, k, ids) for k, call in opt.calls.items() if component_of(k) == c)]
    for c in glued:
        if call_key(c, 2) in opt.calls:
            what = next((opt.producers.get(id(leaf)) for k, call in opt.calls.items() if component_of(k) == c
                         for _, leaf in call.inputs if isinstance(leaf, torch.Tensor) and id(leaf) not in ids), None)
            raise CaptureError(f"{spec.path}: field 'components.{c}': '{spec.components[c]}' is called "
                               f"{sum(component_of(k) == c for k in opt.calls)} times, on inputs the model's "
                               f"forward computes (by {what or 'an operation'}, e.g. slicing frames out of one "
                               "input). mmopt runs a component called more than once only on model inputs or "
                               "other components' outputs as they are: pass each view as its own model input, "
                               "or make the component the module that loops over them.")
    for comp, path in spec.components.items():
        if comp not in glued:
            components[comp] = _component(comp, "encoder", path, runs, spec, sizes, ids, spec.path)
    # An encoder whose inputs the parent computes takes the model inputs and the other encoders' outputs
    # (the glue may read them: a mask from the image features' shape, BLIP's encoder_hidden_states), and
    # runs after them in the pipeline.
    # (finished, input spec, source) of every call output a glued encoder may read
    offered: list[tuple[int, TensorSpec, str]] = []

    def offer(c: ComponentSpec) -> None:
        for key, _ in c.calls():
            for t in c.outputs:
                offered.append((opt.calls[key].finished, dataclasses.replace(t, name=f"{key}.{t.name}"),
                                f"{key}:{t.name}"))

    for c in list(components.values()):
        offer(c)
    for comp in sorted(glued, key=lambda c: opt.calls[c].started):  # in call order: each reads the model
        # inputs and the calls that ended before it began
        began = opt.calls[comp].started
        before = [(t, src) for end, t, src in offered if end < began]
        glue = ([*model_inputs, *(t for t, _ in before)],
                {**{t.name: f"input:{t.name}" for t in model_inputs}, **{t.name: src for t, src in before}})
        components[comp] = _component(comp, "encoder", spec.components[comp], runs, spec, sizes, ids, spec.path,
                                      glue_inputs=glue)
        offer(components[comp])
    out_names = [n for n, leaf in opt.outputs if isinstance(leaf, torch.Tensor)]

    if spec.fusion:
        fusion = _component("fusion", "fusion", spec.fusion, runs, spec, sizes, ids, spec.path)
        fused = {id(leaf): f"fusion:{n}" for n, leaf in opt.calls["fusion"].outputs if isinstance(leaf, torch.Tensor)}
        sources = {}
        for n, leaf in opt.outputs:
            if isinstance(leaf, torch.Tensor):
                src = fused.get(id(leaf)) or ids.get(id(leaf))
                if src is None:
                    raise CaptureError(f"{spec.path}: field 'components.fusion': model output '{n}' is computed "
                                       f"after '{spec.fusion}' (by {opt.producers.get(id(leaf), 'an operation')} "
                                       "in the model's forward). Remove `fusion = ...` so mmopt exports the rest "
                                       "of the forward as the fusion graph.")
                sources[n] = src
    else:
        fusion, sources = remainder_fusion(model, spec, runs, sizes, ids)
    components["fusion"] = fusion
    model_outputs = [tensor_spec(n, {s: dict(runs[s].outputs)[n] for s in SIZES}, spec.dims, sizes,
                                 f"model output '{n}'") for n in out_names]
    unknown = [n for n in spec.scores if n not in out_names]
    if unknown:
        raise CaptureError(f"{spec.path}: field 'tolerance.scores': the model has no output "
                           f"{', '.join(repr(n) for n in unknown)}. Its outputs are: {', '.join(out_names)}.")
    return Split(components, model_inputs, model_outputs, sources, runs, spec.fusion)


def _component(comp: str, kind: str, path: str, runs: dict[str, Run], spec: ModelSpec,
               sizes: dict[str, dict[str, int]], ids: dict[int, str], config: Any,
               glue_inputs: tuple[list[TensorSpec], dict[str, str]] | None = None) -> ComponentSpec:
    opt = runs["opt"].calls[comp]
    if glue_inputs is not None:
        # computed in the parent's forward: the graph starts at the model inputs (and the other encoders'
        # outputs), glue included
        return ComponentSpec(comp, kind, path, tuple(glue_inputs[0]),
                             tuple(_outputs(comp, path, runs, spec, sizes, config)), dict(glue_inputs[1]), glue=True)
    keys = _call_keys(comp, path, runs, config)
    inputs, sources = [], {}
    repeats: list[dict[str, str]] = [{} for _ in keys[1:]]
    for i, (name, leaf) in enumerate(opt.inputs):
        others = [runs[s].calls[k].inputs[i][1] for s in SIZES for k in keys]
        if not isinstance(leaf, torch.Tensor):
            if any(isinstance(o, torch.Tensor) for o in others):
                raise CaptureError(f"{config}: component '{comp}' argument '{name}' is a tensor in some calls and "
                                   f"{type(leaf).__name__} in others; one graph needs the same kind every time.")
            if any(o != leaf for o in others if not isinstance(o, torch.Tensor)):
                raise CaptureError(f"{config}: component '{comp}' argument '{name}' is a non-tensor value that "
                                   "changes with the input size" + (" or between its calls" if repeats else "") +
                                   "; mmopt can only bake in constants.")
            continue
        first: TensorSpec | None = None
        for k, key in enumerate(keys):
            src = _source(comp, kind, path, key, name, runs["opt"].calls[key].inputs[i][1], runs, ids, config)
            origin, _, source = src.partition(":")
            rng = spec.inputs[source].range if origin == "input" else None
            got = tensor_spec(name, {s: runs[s].calls[key].inputs[i][1] for s in SIZES}, spec.dims, sizes,
                              f"component '{comp}' input '{name}'", rng)
            if first is None:
                first = got
                inputs.append(got)
                sources[name] = src
                continue
            if (got.dtype, got.shape, got.shapes) != (first.dtype, first.shape, first.shapes):
                raise CaptureError(f"{config}: component '{comp}' ({path}) is called {len(keys)} times, and its "
                                   f"input '{name}' differs between calls (call 1: {first.dtype} {list(first.shape)}, "
                                   f"call {k + 1}: {got.dtype} {list(got.shape)}, from {src}). mmopt exports one "
                                   "graph per component: every call must pass tensors of the same dtype and "
                                   "shape (the same [dims]).")
            repeats[k - 1][name] = src
    return ComponentSpec(comp, kind, path, tuple(inputs), tuple(_outputs(comp, path, runs, spec, sizes, config)),
                         sources, repeats=tuple(repeats))


def _call_keys(comp: str, path: str, runs: dict[str, Run], config: Any) -> list[str]:
    """The keys of a component's calls, which must be as many, with the same arguments, at every size."""
    counts = {s: sum(1 for k in runs[s].calls if component_of(k) == comp) for s in SIZES}
    if len(set(counts.values())) != 1:
        raise CaptureError(f"{config}: component '{comp}' ({path}) is called {counts['min']} / {counts['opt']} / "
                           f"{counts['max']} times at the min / opt / max sizes: the number of calls depends on an "
                           "input size, which one exported graph cannot follow. Make it fixed (e.g. a fixed "
                           "number of frames), or make the component the module that loops over them.")
    keys = [call_key(comp, k) for k in range(1, counts["opt"] + 1)]
    for key in keys[1:]:
        for s in SIZES:
            if runs[s].calls[key].in_tree != runs[s].calls[comp].in_tree:
                raise CaptureError(f"{config}: component '{comp}' ({path}) is called {len(keys)} times with "
                                   "arguments of another structure each time (positional / keyword / nested "
                                   "arguments differ). mmopt exports one graph for it: call it the same way "
                                   "every time.")
    return keys


def _source(comp: str, kind: str, path: str, key: str, name: str, leaf: torch.Tensor, runs: dict[str, Run],
            ids: dict[int, str], config: Any) -> str:
    """Where a call's tensor argument comes from: a model input or a component's output, as it is."""
    src = ids.get(id(leaf))
    if src is None or src.startswith(f"{key}:"):
        what = runs["opt"].producers.get(id(leaf), "an operation")
        field_name = "components.fusion" if kind == "fusion" else f"components.{comp}"
        fix = ("Remove `fusion = ...` so mmopt exports the rest of the forward as the fusion graph."
               if kind == "fusion" else
               "Pass model inputs to the encoder unchanged, or move that computation into the encoder.")
        raise CaptureError(f"{config}: field '{field_name}': input '{name}' of '{path}' is computed in the "
                           f"model's forward (by {what}) between the model inputs / encoders and this "
                           f"module. {fix}")
    return src


def _computed_inputs(call: Call, key: str, ids: dict[int, str]) -> bool:
    """Whether the parent's forward computes any tensor argument of this call (not a model input or
    another call's output as it is)."""
    for _, leaf in call.inputs:
        if isinstance(leaf, torch.Tensor):
            src = ids.get(id(leaf))
            if src is None or src.startswith(f"{key}:"):
                return True
    return False


def _outputs(comp: str, path: str, runs: dict[str, Run], spec: ModelSpec, sizes: dict[str, dict[str, int]],
             config: Any) -> list[TensorSpec]:
    opt = runs["opt"].calls[comp]
    outputs = [tensor_spec(name, {s: runs[s].calls[comp].outputs[i][1] for s in SIZES}, spec.dims, sizes,
                           f"component '{comp}' output '{name}'")
               for i, (name, leaf) in enumerate(opt.outputs) if isinstance(leaf, torch.Tensor)]
    if not outputs:
        raise CaptureError(f"{config}: component '{comp}' ({path}) returns no tensor.")
    return outputs


# ---------------------------------------------------------------------------------------------
# Remainder fusion: the parent's forward with the encoders replaced by their outputs

class EncoderStub(torch.nn.Module):
    """Stands in for an encoder: ignores its arguments, returns the outputs it is given. Everything else
    the parent's forward reads of the encoder (``self.encoder.config``, ``.dtype``, a submodule's shape,
    its parameters) comes from the original, which is held without being registered as a submodule, so
    the fusion graph does not take the encoder's weights along."""

    def __init__(self, slot: dict[str, Any], name: str, original: torch.nn.Module):
        super().__init__()
        self._slot, self._name, self._calls = slot, name, 0
        self.__dict__["_original"] = original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The outputs of this call: the first call's, then ``name@2``'s, ... (a tower called twice)."""
        self._calls += 1
        key = call_key(self._name, self._calls)
        if key not in self._slot:
            raise CaptureError(f"'{self._name}' was called more times ({self._calls}) than in the captured "
                               "forward; the number of calls must not depend on the input values.")
        return self._slot[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        return self.__dict__["_original"].parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        return self.__dict__["_original"].named_parameters(*args, **kwargs)

    def buffers(self, recurse: bool = True):  # type: ignore[override]
        return self.__dict__["_original"].buffers(recurse)


@contextlib.contextmanager
def stubbed(model: torch.nn.Module, paths: dict[str, str], slot: dict[str, Any]) -> Iterator[None]:
    """Temporarily replace each encoder submodule by an ``EncoderStub`` reading from ``slot`` (by call key)."""
    originals = {}
    for comp, path in paths.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        originals[comp] = (parent, attr, getattr(parent, attr))
        setattr(parent, attr, EncoderStub(slot, comp, originals[comp][2]))
    try:
        yield
    finally:
        for parent, attr, mod in reversed(originals.values()):
            setattr(parent, attr, mod)


def remainder_fusion(model: torch.nn.Module, spec: ModelSpec, runs: dict[str, Run],
                     sizes: dict[str, dict[str, int]], ids: dict[int, str]) -> tuple[ComponentSpec, dict[str, str]]:
    opt = runs["opt"]
    slot = {k: pytree.tree_unflatten([leaf for _, leaf in call.outputs], call.out_tree)
            for k, call in opt.calls.items() if component_of(k) in spec.components}
    with torch.no_grad(), stubbed(model, spec.components, slot), _Producers() as prod:
        try:
            out = model(**nest(opt.inputs))
        except (Exception, SystemExit) as e:
            if interrupted():
                raise KeyboardInterrupt from None
            if raised_by_mmopt(e):
                raise
            raise CaptureError(f"{spec.path}: the rest of the forward (the fusion graph: everything but the "
                               f"encoders {', '.join(spec.components.values())}) failed with the encoders "
                               f"replaced by their outputs: {describe(e)}{where_raised(e)}. It may use an encoder "
                               "in a way other than calling it; set [components] fusion to a submodule "
                               "that takes the encoders' outputs instead.") from None
    leaves, _ = flatten_named(out, "")
    sources, fusion_outputs = {}, []
    for name, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        if id(leaf) in ids:
            sources[name] = ids[id(leaf)]
        else:
            sources[name] = f"fusion:{name}"
            fusion_outputs.append(name)
    if not fusion_outputs:
        raise CaptureError(f"{spec.path}: the model's forward returns the encoders' outputs unchanged; "
                           "there is no fusion computation to export.")
    # Fusion inputs: every encoder output and model input the remainder actually reads.
    used = [src for i, src in ids.items() if i in prod.read]
    calls = sorted((k for k in opt.calls if component_of(k) in spec.components),
                   key=lambda k: (list(spec.components).index(component_of(k)), int(k.partition("@")[2] or 1)))
    order = [f"input:{n}" for n in spec.inputs] + [f"{k}:{n}" for k in calls
                                                   for n, leaf in opt.calls[k].outputs if isinstance(leaf, torch.Tensor)]
    inputs, fsources = [], {}
    for src in [s for s in order if s in used]:
        comp, _, name = src.partition(":")
        if comp == "input":
            per = {s: runs[s].inputs[name] for s in SIZES}
            rng, in_name = spec.inputs[name].range, name
        else:
            per = {s: dict(runs[s].calls[comp].outputs)[name] for s in SIZES}
            rng, in_name = None, f"{comp}.{name}"
        inputs.append(tensor_spec(in_name, per, spec.dims, sizes, f"fusion input '{in_name}'", rng))
        fsources[in_name] = src
    out_per = {n: {s: dict(runs[s].outputs)[n] for s in SIZES} for n in fusion_outputs}
    outputs = [tensor_spec(n, out_per[n], spec.dims, sizes, f"fusion output '{n}'") for n in fusion_outputs]
    return ComponentSpec("fusion", "fusion", "", tuple(inputs), tuple(outputs), fsources), sources
