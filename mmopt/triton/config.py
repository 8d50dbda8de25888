"""Triton model configurations for a package: one member model per component and an ensemble wired like the
pipeline, as plain dicts, and their config.pbtxt text.

Everything comes from the package manifest (what ``mmopt_runtime.Package.load`` verified): IO names and dtypes
from its specs; dims from their shapes (the batch axis left out, dynamic axes -1); ``max_batch_size`` and the
preferred batch sizes from the batch dim's opt / max; the ensemble's steps from each component's calls, its
outputs from the model's output sources. ``mmopt.triton.validate`` parses the text back with Triton's schema.

The batch dim is the dim every model input has as axis 0 (as ``mmopt.data.batch_dim`` defines it for a
config). Triton batches on axis 0 of every tensor of every model, so a member whose tensor lacks it there
cannot batch; a member whose tensor carries the batch dim on another axis too (CLIP's ``logits_per_image``:
[batch, batch]) mixes rows across the batch, so it gets no dynamic batching: merged requests would change
each other's results.
"""
from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Any

from mmopt import dtypes
from mmopt.data import shared_first_dim
from mmopt.errors import UsageError
from mmopt_runtime.pipeline import WiringError, manifest_calls, ordered

BACKENDS = ("native", "python")
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# module names that say nothing about the model: `mmopt.examples.vqa.model:build` is called "vqa"
GENERIC = {"model", "models", "modeling", "modelling", "net", "network", "networks", "arch", "src"}


class Enum(str):
    """A protobuf enum value: rendered bare (``TYPE_FP32``), not quoted."""


@dataclasses.dataclass
class Member:
    name: str  # the Triton model
    component: str
    config: dict[str, Any]
    dynamic_batching: bool
    note: str | None = None  # why it does not batch dynamically, or what batching does to it


@dataclasses.dataclass
class Plan:
    ensemble: str
    backend: str
    max_batch_size: int  # 0: no batching
    members: dict[str, Member]  # component -> member
    ensemble_config: dict[str, Any]

    def configs(self) -> dict[str, dict[str, Any]]:
        """Triton model name -> config, members first."""
        return {**{m.name: m.config for m in self.members.values()}, self.ensemble: self.ensemble_config}


def default_name(manifest: dict[str, Any]) -> str:
    """The ensemble's name, from the factory: its function when that names the model (``models.hf:clip`` ->
    ``clip``), else the last telling part of its module (``mmopt.examples.vqa.model:build_model`` -> ``vqa``,
    ``clip_small:build`` -> ``clip_small``), else ``model``."""
    module, _, function = str((manifest.get("lineage") or {}).get("factory") or "").partition(":")
    generic = function.lower() in GENERIC | {"factory", "main", ""} or \
        function.lower().startswith(("build", "make", "create", "load", "get", "new", "init"))
    parts = [p for p in module.split(".") if p and p.lower() not in GENERIC]
    name = function if not generic else parts[-1] if parts else "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def batch_dim(manifest: dict[str, Any]) -> str | None:
    """The dim every model input has as axis 0, if there is one (``mmopt.data.batch_dim`` for a package)."""
    return shared_first_dim(t["shape"] for t in manifest["model"]["inputs"])


def plan_engines(manifest: dict[str, Any], tensorrt: str,
                 platform: str = "linux-x86_64") -> dict[str, dict[str, tuple[str, str, bool]]]:
    """The package's engines a Triton server with TensorRT ``tensorrt`` on ``platform`` can load: component ->
    {compute capability (or "" for an ``ampere+`` plan) -> (plan file name in the version folder, the package's
    engine file, whether it is version-compatible)}. A set loads there by the runtime's rules
    (``mmopt_runtime.trt.compat``: that platform, and exactly that TensorRT or version-compatible and not newer);
    for one GPU the set the runtime itself would prefer wins (``mmopt_runtime.engines.preference``).
    ``UsageError`` when no set loads there, naming the sets the package has."""
    from mmopt_runtime.engines import preference
    from mmopt_runtime.trt.compat import version_problem

    sets = manifest.get("engines") or []
    usable = [s for s in sets if s["platform"] == platform and version_problem(
        s["tensorrt"]["version"], tensorrt, s["build_options"]["version_compatible"]) is None]
    if not usable:
        have = f"its sets: {', '.join(s['id'] for s in sets)}" if sets else "it holds no engine set"
        raise UsageError(f"--tensorrt {tensorrt} --platform {platform}: no engine set of the package loads in TensorRT "
                         f"{tensorrt} on {platform} ({have}). Build engines with the Triton server's TensorRT on its "
                         "platform (`mmopt build` on a machine with it, then `mmopt package ... --engines`), give "
                         "--platform, or leave --tensorrt out to serve the ONNX graphs.")
    out: dict[str, dict[str, tuple[str, str, bool]]] = {}
    for s in sorted(usable, key=preference):
        hw = s["build_options"]["hardware_compatibility"]
        cc = "" if hw == "ampere+" else s["gpu"]["compute_capability"]
        file = "model.plan" if not cc else f"model_sm{cc.replace('.', '')}.plan"
        for comp, e in s["components"].items():
            out.setdefault(comp, {}).setdefault(cc, (file, e["file"], bool(s["build_options"]["version_compatible"])))
    return out


def plan(manifest: dict[str, Any], name: str | None = None, backend: str = "native", batching: bool = True,
         instances: int = 1, kind: str | None = None, queue_delay_us: int = 0,
         engines: dict[str, dict[str, tuple[str, str, bool]]] | None = None) -> Plan:
    """The repository's configs for a verified package manifest; ``engines`` (``plan_engines``) makes those
    components TensorRT plan members. Raises ``UsageError`` listing every tensor Triton cannot express, with
    the fix."""
    kind = check_options(backend, kind, instances, queue_delay_us, name)
    name = name or default_name(manifest)
    comps = manifest["components"]
    members = {c: f"{name}_{re.sub(r'[^A-Za-z0-9_.-]', '_', c)}" for c in comps}
    clash = [c for c, m in members.items() if m == name or list(members.values()).count(m) > 1]
    if clash:
        raise UsageError(f"components {clash} give the same Triton model name ({members[clash[0]]}); give another "
                         "--name.")

    batch = batch_dim(manifest) if batching else None
    problems: list[str] = []
    if batching and batch is None:
        shapes = ", ".join(f"{t['name']} {t['shape']}" for t in manifest["model"]["inputs"])
        problems.append(f"the model inputs ({shapes}) share no batch dim as axis 0")
    max_batch, preferred = 0, []
    if batch is not None:
        first = manifest["model"]["inputs"][0]["shapes"]
        max_batch = int(first["max"][0])
        preferred = sorted({int(first["opt"][0]), max_batch} - {1})  # 1 would dispatch each request alone
        for c, spec in comps.items():
            for side in ("inputs", "outputs"):
                for t in spec[side]:
                    if not t["shape"] or t["shape"][0] != batch:
                        where = f"axis {t['shape'].index(batch)}" if batch in t["shape"] else "no axis"
                        problems.append(f"component '{c}', {side[:-1]} '{t['name']}' {t['shape']} has the batch "
                                        f"dim '{batch}' on {where}, not on axis 0")
    if problems:
        raise UsageError("Triton cannot batch this model: " + "; ".join(problems) + ". Triton's max_batch_size > 0 "
                         "needs the batch on axis 0 of every tensor of every model in the ensemble. Write the "
                         "repository with --no-batching (max_batch_size 0: dims are the full shapes, dynamic axes "
                         "-1, each request runs as sent), or re-export with the batch dim first.")

    out = {}
    for c, spec in comps.items():
        mixed = [(side[:-1], t) for side in ("inputs", "outputs") for t in spec[side]
                 if batch is not None and batch in t["shape"][1:]]
        dynamic = batch is not None and not mixed
        note = None
        if mixed:
            side, t = mixed[0]
            note = (f"no dynamic batching: its {side} '{t['name']}' {t['shape']} has the batch dim on a later axis "
                    "too, so merged requests would change each other's results; each request runs alone")
        if dynamic and (manifest.get("policy") or {}).get(c) == "int8-dynamic":
            note = ("dynamic batching on, but its int8-dynamic graph quantizes activations with one scale per batch, "
                    "so merged requests shift each other's outputs (within the policy's int8 tolerance)")
        if any(vc for _, _, vc in (engines or {}).get(c, {}).values()):
            note = ((note + "; ") if note else "") + ("its plans are version-compatible: start the server with "
                                                      "--backend-config=tensorrt,version-compatible=true")
        cfg = member_config(members[c], spec, backend=backend, max_batch=max_batch, batched=batch is not None,
                            preferred=preferred if dynamic else None, queue_delay_us=queue_delay_us,
                            kind=KINDS[kind], instances=instances, sha256=manifest["files"][spec["file"]],
                            engines={cc: f for cc, (f, _, _) in (engines or {}).get(c, {}).items()} or None)
        out[c] = Member(members[c], c, cfg, dynamic, note)
    return Plan(name, backend, max_batch, out, ensemble_config(name, manifest, members, max_batch))


def check_options(backend: str, kind: str | None, instances: int, queue_delay_us: int, name: str | None) -> str:
    """The command's options, checked before any work; returns the instance kind (gpu for native, cpu for
    python, unless given)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: choose native (onnxruntime_onnx, for a GPU or CPU Triton server) or "
                         "python (each graph in ONNX Runtime inside Triton's python backend).")
    kind = kind or ("gpu" if backend == "native" else "cpu")
    if kind not in KINDS:
        raise UsageError(f"--kind {kind}: choose gpu or cpu.")
    if backend == "python" and kind == "gpu":
        raise UsageError("--backend python --kind gpu: the python flavour runs each graph in ONNX Runtime on the CPU; "
                         "use --kind cpu, or --backend native for GPUs.")
    if instances < 1:
        raise UsageError(f"--instances {instances}: give at least 1 instance per member.")
    if queue_delay_us < 0:
        raise UsageError(f"--max-queue-delay-us {queue_delay_us}: give 0 or more microseconds.")
    if name is not None and not NAME.match(name):
        raise UsageError(f"--name {name!r}: a Triton model name is a folder name: letters, digits, '_', '.', '-', "
                         "not starting with '.' or '-'.")
    return kind


def dims(t: dict[str, Any], batched: bool) -> list[int]:
    """Triton's dims: the shape without the batch axis when the model batches; -1 for a dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in (t["shape"][1:] if batched else t["shape"])]


def tensor(t: dict[str, Any], batched: bool) -> dict[str, Any]:
    if t["dtype"] not in dtypes.TRITON:
        raise UsageError(f"tensor '{t['name']}': dtype {t['dtype']} has no Triton type.")
    return {"name": t["name"], "data_type": Enum("TYPE_" + dtypes.TRITON[t["dtype"]]), "dims": dims(t, batched)}


def member_config(name: str, spec: dict[str, Any], *, backend: str, max_batch: int, batched: bool,
                  preferred: list[int] | None, queue_delay_us: int, kind: str, instances: int, sha256: str,
                  engines: dict[str, str] | None = None) -> dict[str, Any]:
    """One component's model. ``engines`` (compute capability -> plan file, e.g. {"8.6": "model_sm86.plan"};
    the key "" for a plan that runs on any GPU it was made for, e.g. ``--hardware-compat ampere+``) makes it
    ``tensorrt_plan`` with ``cc_model_filenames`` (and ``default_model_filename``)."""
    cfg: dict[str, Any] = {"name": name}
    if engines:
        cfg["platform"] = "tensorrt_plan"
        if "" in engines:
            cfg["default_model_filename"] = engines[""]
        cfg["cc_model_filenames"] = [{"key": cc, "value": f} for cc, f in sorted(engines.items()) if cc]
    elif backend == "python":
        cfg["backend"] = "python"
    else:
        cfg["platform"] = "onnxruntime_onnx"
    cfg["max_batch_size"] = max_batch
    cfg["input"] = [tensor(t, batched) for t in spec["inputs"]]
    cfg["output"] = [tensor(t, batched) for t in spec["outputs"]]
    if preferred is not None:
        cfg["dynamic_batching"] = {"preferred_batch_size": preferred,
                                   **({"max_queue_delay_microseconds": queue_delay_us} if queue_delay_us else {})}
    cfg["instance_group"] = [{"count": instances, "kind": Enum(kind)}]
    if backend == "python" and not engines:
        params = {"onnx_file": "model.onnx", "sha256": sha256, "intra_op_threads": "1",
                  "batching": "concatenate" if preferred is not None else "per-request"}
        cfg["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in params.items()]
    return cfg


def ensemble_config(name: str, manifest: dict[str, Any], members: dict[str, str], max_batch: int) -> dict[str, Any]:
    """The model as one Triton model: model inputs -> each call's step -> model outputs, by the package's
    wiring. Ensemble tensors are named after the model input or output they are, else after the wiring's own
    source name (``image:pooler_output``)."""
    batched = max_batch > 0
    tensor_of = {f"input:{t['name']}": t["name"] for t in manifest["model"]["inputs"]}
    for out, src in manifest["model"]["output_sources"].items():
        if src in tensor_of:
            other = next(o for o, s in manifest["model"]["output_sources"].items() if s == src)
            raise UsageError(f"model outputs '{other}' and '{out}' are the same tensor ({src}); a Triton ensemble "
                             "names each tensor once. Return it once from the model.")
        tensor_of[src] = out
    try:
        calls = ordered(manifest_calls(manifest["components"]))
    except WiringError as e:
        raise UsageError(f"the package's wiring cannot be an ensemble: {e}.") from None
    for _, _, sources, _ in calls:
        for _, src in sources:
            tensor_of.setdefault(src, src)
    names = list(tensor_of.values())
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"ensemble tensor names {dup} would be used twice (a model input or output named like a "
                         "wire 'component:output'); rename the model's input or output.")
    steps = []
    for key, c, sources, outs in calls:
        steps.append({"model_name": members[c], "model_version": -1,
                      "input_map": [{"key": n, "value": tensor_of[src]} for n, src in sources],
                      "output_map": [{"key": n, "value": tensor_of[src]} for n, src in outs.items()
                                     if src in tensor_of]})
    return {"name": name, "platform": "ensemble", "max_batch_size": max_batch,
            "input": [tensor(t, batched) for t in manifest["model"]["inputs"]],
            "output": [tensor(t, batched) for t in manifest["model"]["outputs"]],
            "ensemble_scheduling": {"step": steps}}


# ---- config.pbtxt text ---------------------------------------------------------------------
def render(config: dict[str, Any], header: str = "") -> str:
    """protobuf text format of a config dict: a dict is a message, a list of dicts a repeated message (a map
    is a list of {key, value}), a list of scalars a repeated scalar, an ``Enum`` a bare enum value."""
    wrapped = [w for line in header.splitlines() for w in (textwrap.wrap(line, 110) or [""])]
    lines = [f"# {line}" if line else "#" for line in wrapped]
    _message(config, 0, lines)
    return "\n".join(lines) + "\n"


def _message(msg: dict[str, Any], depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in msg.items():
        if isinstance(value, list) and not value:
            continue  # an empty repeated field is the same as none
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                lines.append(f"{pad}{key} {{")
                _message(v, depth + 1, lines)
                lines.append(f"{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return quote(str(v))


def quote(s: str) -> str:
    """A protobuf text-format string literal (C escapes; other bytes of the UTF-8 as octal)."""
    out = []
    for b in s.encode():
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'
