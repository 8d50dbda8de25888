"""``mmopt.toml`` parsed into a ``ModelSpec``, and the captured tensor / component specs.

One declaration drives everything downstream: the inputs and symbolic dims here become the capture
sizes, the ONNX dynamic axes, the TensorRT profiles, the calibration shapes and the parity inputs.
Every field is checked on load; an unknown key is an error (a typo must not silently do nothing).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmopt.errors import ConfigError

from mmopt.dtypes import ITEMSIZE, LIMITS, NAMES as DTYPES  # noqa: E402  (the one dtype table)
# Ordered from the most to the least faithful (the pipeline is judged by its least faithful part).
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-cpu", "int8")
from mmopt_runtime.engines import CPU_ONLY  # noqa: E402,F401  (ONNX Runtime forms TensorRT cannot build)


def precision_rank(precision: str) -> int:
    """Position in ``PRECISIONS`` (less faithful is higher); an unknown precision ranks last."""
    return PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "auto")
SIZES = ("min", "opt", "max")
TOP_LEVEL = ("model", "inputs", "dims", "components", "precision", "calibration", "evaluation", "tolerance")

# Parity defaults per precision: what a converted graph must meet against eager fp32.
# max_norm_change: how far the output's norm may move from eager's (cosine and argmax cannot see a uniform
# mis-scaling, and int8 has no error gate).
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs": 1e-3, "max_rel": 1e-2, "min_cosine": 0.99999, "min_argmax": 1.0, "max_norm_change": 0.01},
    "fp16": {"max_abs": 5e-2, "max_rel": 5e-1, "min_cosine": 0.999, "min_argmax": 0.98, "max_norm_change": 0.05},
    "int8": {"max_abs": float("inf"), "max_rel": float("inf"), "min_cosine": 0.98, "min_argmax": 0.9,
             "max_norm_change": 0.25},
    "int8-cpu": {"max_abs": float("inf"), "max_rel": float("inf"), "min_cosine": 0.98, "min_argmax": 0.9,
                 "max_norm_change": 0.25},
    "int8-dynamic": {"max_abs": float("inf"), "max_rel": float("inf"), "min_cosine": 0.98, "min_argmax": 0.9,
                     "max_norm_change": 0.25},
}


@dataclass(frozen=True)
class Dim:
    min: int
    opt: int
    max: int

    def at(self, size: str) -> int:
        return getattr(self, size)


@dataclass(frozen=True)
class InputSpec:
    """One argument of the full model's forward, as declared in the config."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    range: tuple[float, float] | None = None

    def concrete(self, dims: dict[str, Dim], size: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d].at(size) for d in self.shape)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an exported component, as captured from the eager model.

    ``shape`` holds ints for static axes and axis names for dynamic ones; ``shapes`` holds the
    concrete min / opt / max shapes seen in the three captures.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    shapes: dict[str, tuple[int, ...]]
    range: tuple[float, float] | None = None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
               "shapes": {k: list(v) for k, v in self.shapes.items()}}
        if self.range is not None:
            out["range"] = list(self.range)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]),
                   {k: tuple(v) for k, v in d["shapes"].items()},
                   tuple(d["range"]) if d.get("range") is not None else None)


@dataclass(frozen=True)
class ComponentSpec:
    """One exported graph: an encoder, or the fusion remainder / head.

    ``sources`` maps each input name to where its value comes from in the pipeline:
    ``"input:<model input>"`` or ``"<component>:<output name>"``. ``glue``: the parent's forward computes
    the encoder's inputs from the model inputs (pixel normalisation, a mask made with ``torch.ones``), so
    the graph takes the model inputs and holds that computation before the encoder.

    ``repeats``: an encoder the forward calls more than once (a siamese tower, two views) is one graph,
    run once per call; ``sources`` wires its first call and ``repeats`` each later one. Call ``k`` (from 2)
    is addressed as ``"<component>@k"``: its outputs are ``"<component>@k:<output name>"``.
    """

    name: str
    kind: str  # "encoder" | "fusion"
    module: str  # dotted submodule path; "" for the remainder fusion
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sources: dict[str, str]
    glue: bool = False
    repeats: tuple[dict[str, str], ...] = ()

    def calls(self) -> list[tuple[str, dict[str, str]]]:
        """(call key, sources) of every call in order: the component's name, then ``name@2``, ..."""
        return [(self.name, self.sources)] + [(call_key(self.name, k), r) for k, r in enumerate(self.repeats, 2)]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "module": self.module,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "sources": dict(self.sources), **({"glue": True} if self.glue else {}),
                **({"repeats": [dict(r) for r in self.repeats]} if self.repeats else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ComponentSpec":
        return cls(d["name"], d["kind"], d["module"],
                   tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]),
                   dict(d["sources"]), bool(d.get("glue", False)),
                   tuple(dict(r) for r in d.get("repeats", ())))


def call_key(component: str, k: int) -> str:
    """The name of a component's ``k``-th call (1-based) in the wiring: ``name`` for the first."""
    return component if k == 1 else f"{component}@{k}"


def component_of(key: str) -> str:
    """The component a call key (or a ``key:output`` source) belongs to: ``tower@2:x`` -> ``tower``."""
    return key.partition(":")[0].partition("@")[0]


@dataclass(frozen=True)
class CalibrationSpec:
    source: str
    samples: int = 512
    method: str = "entropy"


@dataclass(frozen=True)
class EvaluationSpec:
    """A callable yielding ``(inputs, labels)``; the score is argmax accuracy of ``output``."""

    source: str
    output: str
    samples: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    factory: str
    checkpoint: Path | None
    state_dict_key: str | None
    kwargs: dict[str, Any]
    inputs: dict[str, InputSpec]
    dims: dict[str, Dim]
    components: dict[str, str]
    fusion: str | None
    tolerances: dict[str, dict[str, float]]
    max_accuracy_drop: float | None = None
    precision: dict[str, str] = field(default_factory=dict)
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calibration: CalibrationSpec | None = None
    evaluation: EvaluationSpec | None = None
    scores: tuple[str, ...] = ()  # [tolerance] scores: model outputs whose argmax is gated, besides [evaluation]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def score_outputs(self) -> frozenset[str]:
        """Model outputs that are class scores: argmax agreement is gated on these and on nothing else
        (an embedding's, a hidden state's or a feature's argmax means nothing)."""
        return frozenset(self.scores) | ({self.evaluation.output} if self.evaluation else set())

    def input_shape(self, name: str, size: str) -> tuple[int, ...]:
        return self.inputs[name].concrete(self.dims, size)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Parsing. Every check names the file and the field, and says what to write instead.

class _Fields:
    """Reads one TOML table, remembering which keys were used so leftovers can be reported."""

    def __init__(self, path: Path, table: Any, where: str):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{where}] must be a table, got {type(table).__name__}.")
        self.path, self.table, self.where, self.used = path, table, where, set()

    def err(self, key: str, msg: str) -> ConfigError:
        dotted = f"{self.where}.{key}" if self.where else key
        return ConfigError(f"{self.path}: field '{dotted}': {msg}")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                spare = [k for k in self.table if k not in self.used]
                close = difflib.get_close_matches(key, spare, n=1, cutoff=0.6)
                typo = f" (found '{close[0]}': did you mean '{key}'?)" if close else ""
                raise self.err(key, f"is required{what and ': ' + what}{typo}.")
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise self.err(key, f"must be {names}, got {value!r}{what and ' (' + what + ')'}.")
        return value

    def finish(self, allowed_extra: bool = False) -> None:
        if allowed_extra:
            return
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise unknown_key(self, unknown[0], sorted(self.used))


def unknown_key(f: "_Fields", key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f.err(key, f"unknown key; {hint}Known keys here: {', '.join(known)}.")


def _callable_ref(f: _Fields, key: str, default: Any = ...) -> Any:
    value = f.get(key, str, default, what='"module:attr", e.g. "my_project.model:build_model"')
    if value is not default and (value.count(":") != 1 or not all(value.split(":"))):
        raise f.err(key, f'must look like "module:attr" (e.g. "my_project.model:build_model"), got {value!r}.')
    return value


def _parse_dims(path: Path, raw: Any) -> dict[str, Dim]:
    f = _Fields(path, raw, "dims")
    dims = {}
    for name in raw:
        spec = f.get(name, (dict, int), what="{ min = 2, opt = 8, max = 32 } or a fixed int")
        if isinstance(spec, int):
            spec = {"min": spec, "opt": spec, "max": spec}
        g = _Fields(path, spec, f"dims.{name}")
        lo, opt, hi = (g.get(k, int) for k in SIZES)
        g.finish()
        if not 1 <= lo <= opt <= hi:
            raise f.err(name, f"needs 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}.")
        dims[name] = Dim(lo, opt, hi)
    return dims


def _parse_inputs(path: Path, raw: Any, dims: dict[str, Dim]) -> dict[str, InputSpec]:
    f = _Fields(path, raw, "inputs")
    if not raw:
        raise ConfigError(f"{path}: [inputs] is empty: declare each argument of the model's forward, "
                          'e.g. [inputs.pixel_values] shape = ["batch", 3, 224, 224], dtype = "float32".')
    out = {}
    tables = {}
    for name in raw:
        table = f.get(name, dict)
        if "shape" not in table and table and all(isinstance(v, dict) for v in table.values()):
            # forward(batch) taking one dict: [inputs.batch.pixel_values] names the entry batch["pixel_values"]
            tables.update({f"{name}.{key}": value for key, value in table.items()})
        else:
            tables[name] = table
    for name, table in tables.items():
        g = _Fields(path, table, f"inputs.{name}")
        shape = g.get("shape", list, what='e.g. ["batch", 3, 224, 224]')
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 1):
                raise g.err("shape", f"entries must be positive ints or names from [dims], got {d!r}.")
            if isinstance(d, str) and d not in dims:
                raise g.err("shape", f"uses dim '{d}' which [dims] does not define. "
                            f"Add e.g. {d} = {{ min = 2, opt = 8, max = 32 }} under [dims].")
        dtype = g.get("dtype", str, "float32")
        if dtype not in DTYPES:
            raise g.err("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        rng = g.get("range", list, None, what="[low, high]")
        if rng is not None:
            if len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng) \
                    or not all(math.isfinite(v) for v in rng) or rng[0] > rng[1]:
                raise g.err("range", f"must be [low, high], finite numbers with low <= high, got {rng!r}.")
            lo, hi = LIMITS[dtype]
            if rng[0] < lo or rng[1] > hi:
                raise g.err("range", f"{rng!r} is beyond what {dtype} holds ([{lo:g}, {hi:g}]). Narrow the range "
                                     "or choose a wider dtype.")
            if dtype in ("int64", "int32", "bool") and not all(float(v).is_integer() for v in rng):
                raise g.err("range", f"must hold whole numbers for a {dtype} input, got {rng!r}.")
            rng = (rng[0], rng[1])
        elif dtype in ("int64", "int32"):
            raise g.err("range", "is required for integer inputs (token ids must fit the vocabulary), "
                        "e.g. range = [0, 30521].")
        g.finish()
        out[name] = InputSpec(name, tuple(shape), dtype, rng)
    return out


def _parse_tolerance(path: Path, raw: Any) -> tuple[dict[str, dict[str, float]], float | None, tuple[str, ...]]:
    tol = {k: dict(v) for k, v in DEFAULT_TOLERANCES.items()}
    f = _Fields(path, raw, "tolerance")
    scores = f.get("scores", list, [])
    if not all(isinstance(x, str) and x for x in scores):
        raise f.err("scores", "is a list of model output names whose argmax is a prediction, e.g. "
                              '["logits"].')
    drop = f.get("max_accuracy_drop", (int, float), None)
    if drop is not None and not 0 <= drop <= 1:
        raise f.err("max_accuracy_drop", f"is a fraction of the score in [0, 1] (0.01 = one point), got {drop!r}.")
    for prec in PRECISIONS:
        if prec in raw:
            g = _Fields(path, f.get(prec, dict), f"tolerance.{prec}")
            for key in DEFAULT_TOLERANCES["fp32"]:
                value = g.get(key, (int, float), None)
                if value is not None:
                    tol[prec][key] = float(value)
            g.finish()
    f.finish()
    return tol, (float(drop) if drop is not None else None), tuple(scores)


DEFINITION = ("model", "inputs", "dims", "components")  # the tables that define the exported graphs


def definition_sha256(path: str | Path) -> str:
    """sha256 of what in ``mmopt.toml`` defines the exported graphs ([model], [inputs], [dims],
    [components]). Editing [precision], [calibration], [evaluation] or [tolerance] (or a comment) after
    export does not make a bundle stale: following a printed ``[precision.exclude]`` fix must not."""
    _, raw = _read_toml(path)
    text = json.dumps({k: raw.get(k) for k in DEFINITION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_toml(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path).resolve()
    if path.is_dir():
        path = path / "mmopt.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. Write an mmopt.toml (see docs/config.md) "
                          "or pass the path to an existing one.")
    try:
        return path, tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}. Fix the syntax at that line.") from None


def _parse_model(path: Path, raw: Any) -> dict[str, Any]:
    m = _Fields(path, raw, "model")
    ckpt = m.get("checkpoint", str, None)
    out = {"factory": _callable_ref(m, "factory"), "checkpoint": (path.parent / ckpt).resolve() if ckpt else None,
           "state_dict_key": m.get("state_dict_key", str, None), "kwargs": m.get("kwargs", dict, {})}
    m.finish()
    return out


def _parse_components(path: Path, raw: Any) -> tuple[dict[str, str], str | None]:
    c = _Fields(path, raw, "components")
    components: dict[str, str] = {}
    fusion = None
    for name in c.table:
        value = c.get(name, str, what="a dotted submodule path such as \"vision_model\"")
        if name == "fusion":
            fusion = value
        else:
            if not name.isidentifier():
                raise c.err(name, "component names must be identifiers (letters, digits, _).")
            if name in ("input", "pipeline"):  # the wiring's model inputs and the judges' whole-model row
                raise c.err(name, f"'{name}' is reserved; name the component after its modality (image, text, ...).")
            components[name] = value
    if not components:
        raise ConfigError(f"{path}: [components] names no encoder. Add e.g. image = \"vision_encoder\".")
    return components, fusion


def _parse_precision(path: Path, raw: Any, names: list[str]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    p = _Fields(path, raw, "precision")
    precision, exclude = {}, {}
    for name in p.table:
        if name == "exclude":
            ex = _Fields(path, p.get(name, dict), "precision.exclude")
            for comp in ex.table:
                nodes = ex.get(comp, list)
                if comp not in names or not all(isinstance(n, str) for n in nodes):
                    raise ex.err(comp, "must be a component name with a list of ONNX node names.")
                exclude[comp] = tuple(nodes)
            continue
        value = p.get(name, str)
        if name not in names:
            raise p.err(name, f"is not a component. Components: {', '.join(names)}.")
        if value not in (*PRECISIONS, "auto"):
            raise p.err(name, f"must be one of {', '.join(PRECISIONS)} or auto (the fastest that meets the "
                              f"budget), got {value!r}.")
        precision[name] = value
    return precision, exclude


def _parse_calibration(path: Path, raw: Any) -> CalibrationSpec:
    k = _Fields(path, raw, "calibration")
    calibration = CalibrationSpec(_callable_ref(k, "source"), k.get("samples", int, 512),
                                  k.get("method", str, "entropy"))
    if calibration.method not in CALIBRATION_METHODS:
        raise k.err("method", f"must be one of {', '.join(CALIBRATION_METHODS)}, got {calibration.method!r}.")
    if calibration.samples < 1:
        raise k.err("samples", f"must be positive, got {calibration.samples}.")
    k.finish()
    return calibration


def _parse_evaluation(path: Path, raw: Any) -> EvaluationSpec:
    e = _Fields(path, raw, "evaluation")
    evaluation = EvaluationSpec(_callable_ref(e, "source"), e.get("output", str), e.get("samples", int, None))
    e.finish()
    return evaluation


def load_spec(path: str | Path) -> ModelSpec:
    """Parse and check ``mmopt.toml``. Relative paths resolve against the file's folder."""
    path, raw = _read_toml(path)
    top = _Fields(path, raw, "")
    for key in raw:
        if key not in TOP_LEVEL:
            raise unknown_key(top, key, list(TOP_LEVEL))
    model = _parse_model(path, top.get("model", dict, what="a [model] table with factory = \"module:attr\""))
    dims = _parse_dims(path, top.get("dims", dict, {}))
    inputs = _parse_inputs(path, top.get("inputs", dict, what="one [inputs.<name>] table per forward argument"),
                           dims)
    unused = set(dims) - {d for i in inputs.values() for d in i.shape if isinstance(d, str)}
    if unused:
        raise ConfigError(f"{path}: field 'dims.{sorted(unused)[0]}': no input uses this dim. "
                          "Remove it or use it in an [inputs.*] shape.")
    components, fusion = _parse_components(
        path, top.get("components", dict, what='e.g. [components] image = "vision_encoder"'))
    precision, exclude = _parse_precision(path, top.get("precision", dict, {}), [*components, "fusion"])
    calibration = _parse_calibration(path, top.get("calibration", dict)) if "calibration" in raw else None
    evaluation = _parse_evaluation(path, top.get("evaluation", dict)) if "evaluation" in raw else None
    tolerances, drop, scores = _parse_tolerance(path, top.get("tolerance", dict, {}))
    top.finish()
    check_memory(path, inputs, dims)
    return ModelSpec(path=path, **model, inputs=inputs, dims=dims, components=components, fusion=fusion,
                     tolerances=tolerances, max_accuracy_drop=drop, precision=precision, exclude=exclude,
                     calibration=calibration, evaluation=evaluation, scores=scores)


def available_bytes() -> int | None:
    """Memory this machine can still give (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(path: Path, inputs: dict[str, InputSpec], dims: dict[str, Dim]) -> None:
    """Refuse [dims] whose max-size inputs alone would take more than half the memory left, before anything
    is allocated: capture, export and calibration all run the model at the max size."""
    have = available_bytes()
    if not have:
        return
    sizes = {n: math.prod(i.concrete(dims, "max")) * ITEMSIZE[i.dtype] for n, i in inputs.items()}
    need = sum(sizes.values())
    if need <= have // 2:
        return
    biggest = max(sizes, key=sizes.get)
    named = [d for d in inputs[biggest].shape if isinstance(d, str)]
    dim = max(named, key=lambda d: dims[d].max) if named else None
    where = f"field 'dims.{dim}.max'" if dim else f"field 'inputs.{biggest}.shape'"
    raise ConfigError(f"{path}: {where}: at the max sizes the inputs alone need {need / 2**30:.1f} GiB "
                      f"({biggest}: {list(inputs[biggest].concrete(dims, 'max'))}), and this machine has "
                      f"{have / 2**30:.1f} GiB available; the model's activations need more. "
                      + (f"Lower dims.{dim}.max (now {dims[dim].max})." if dim else "Use a smaller shape."))
