"""The eager reference of a bundle: the model it was exported from, rebuilt and proven to be that model.

``mmopt bench`` and ``mmopt quantize`` both judge a bundle against eager PyTorch, so both rebuild the
model. That imports and runs the model code that the bundle's config names (``[model].factory``), the
same code ``mmopt export`` ran. Before anything is imported, the config and the checkpoint are checked
against the sha256 the manifest recorded: a bundle whose model changed since export is *stale* and is
refused rather than benched against another model. After the rebuild, the captured components must
equal the bundle's.

Below that, the eager reference itself: ``eager_io`` / ``eager_io_for`` run the model with hooks and
return what every component really receives and returns, for every judge (export, quantize, bench) and
for calibration. The model is in eval mode and never mutated, so its IO on given inputs is deterministic:
it is computed once per process and shared (keyed by the model, its capture and a digest of the inputs).
Callers must not write into the arrays they get back.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmopt.capture import Split, observe, random_inputs
from mmopt.dtypes import to_numpy
from mmopt.errors import BundleError, CaptureError
from mmopt.manifest import Manifest, external_path, sha256_file
from mmopt.spec import ModelSpec, definition_sha256, load_spec

STALE_FIX = "re-export, or pass --config to use another one"


@dataclass
class Reference:
    spec: ModelSpec
    model: torch.nn.Module
    split: Any  # mmopt.capture.Split


def config_of(bundle: Path, manifest: Manifest, config: str | Path | None) -> ModelSpec:
    """The spec to rebuild the model from: ``config`` when given, else the one the bundle was exported
    from, which must still exist and be unchanged."""
    if config is not None:
        return load_spec(config)
    manifest_file = Path(bundle) / "manifest.json"
    # relative to the bundle (a project moved as a whole), then where it was exported from (a bundle copied
    # alone); the first that is the bundle's config is used
    candidates = [external_path(manifest_file, manifest.model.get("config"), "model.config")]
    if manifest.model.get("config_absolute"):
        candidates.append(external_path(manifest_file, manifest.model["config_absolute"], "model.config_absolute"))
    present = [p for p in dict.fromkeys(candidates) if p.is_file()]
    if not present:
        raise BundleError(f"{bundle}: was exported from {candidates[0]}, which no longer exists here. This "
                          "command rebuilds the eager model as its reference: pass --config path/to/mmopt.toml.")
    for path in present:
        if sha256_file(path) == manifest.model.get("config_sha256") or \
                definition_sha256(path) == manifest.model.get("definition_sha256"):
            return load_spec(path)
    raise BundleError(f"{bundle}: stale bundle: {present[0]} changed since export (its [model], [inputs], [dims] "
                      f"or [components]); {STALE_FIX}.")


def check_checkpoint(bundle: Path, manifest: Manifest, spec: ModelSpec) -> None:
    want = manifest.model.get("checkpoint_sha256")
    if spec.checkpoint is None:
        if want is not None:
            raise BundleError(f"{bundle}: stale bundle: it was exported with the checkpoint "
                              f"{manifest.model.get('checkpoint')}, and {spec.path} names none; {STALE_FIX}.")
        return
    if not spec.checkpoint.is_file():
        return  # build_model names the missing file and the field
    if sha256_file(spec.checkpoint) != want:
        raise BundleError(f"{bundle}: stale bundle: the checkpoint {spec.checkpoint} changed since export "
                          f"(or is another file than the bundle was exported from); {STALE_FIX}.")


def check_matches(bundle: Path, manifest: Manifest, spec: ModelSpec, split: Any) -> None:
    """The rebuilt model's captured components must be the bundle's (same IO, shapes and wiring)."""
    ours = {c: s.to_json() for c, s in split.components.items()}
    theirs = {c: s.to_json() for c, s in manifest.components.items()}
    if ours != theirs:
        differ = sorted(c for c in set(ours) | set(theirs) if ours.get(c) != theirs.get(c))
        raise BundleError(f"{bundle}: the model built from {spec.path} no longer matches the bundle (components "
                          f"{', '.join(differ)} differ: inputs, outputs, shapes or wiring). Re-export the bundle, "
                          "or pass the --config it was made from.")


def load(bundle: str | Path, manifest: Manifest, config: str | Path | None = None,
         trust_checkpoint: bool = False) -> Reference:
    """Spec, eager model and its split for ``bundle``, refused when stale or not the bundle's model."""
    spec = config_of(Path(bundle), manifest, config)
    check_checkpoint(Path(bundle), manifest, spec)
    return build(bundle, manifest, spec, trust_checkpoint)


_BUILT: dict[tuple, tuple[torch.nn.Module, Any]] = {}  # one model per process: the last one exported or built


def _key(spec: ModelSpec, trust_checkpoint: bool, manifest: Manifest) -> tuple:
    """A model is reused only for the bundle it was exported to (its fp32 graphs' sha256): weights a factory
    loads by itself, or model code reloaded since, cannot make a later command judge against another model."""
    exported = tuple(sorted((a.id, a.sha256) for a in manifest.artifacts if a.stage == "export"))
    return (str(spec.path), repr(spec), trust_checkpoint, exported)


def remember(spec: ModelSpec, trust_checkpoint: bool, manifest: Manifest, model: torch.nn.Module, split: Any) -> None:
    """Record the model ``mmopt export`` just built and exported as ``manifest``'s, for later commands of this
    process (``mmopt demo`` quantizes, compares and benches that bundle: the model is built and captured once)."""
    _forget(keep=model)  # hold one model at most: a long-lived process may go through many
    _BUILT[_key(spec, trust_checkpoint, manifest)] = (model, split)


def _forget(keep: torch.nn.Module | None = None) -> None:
    """Let go of the remembered model and of every eager IO computed with a model other than ``keep``."""
    _BUILT.clear()
    for key in [k for k, v in _IO.items() if v[2][0] is not keep]:
        del _IO[key]


def build(bundle: str | Path, manifest: Manifest, spec: ModelSpec, trust_checkpoint: bool = False) -> Reference:
    """The model of a spec that ``config_of`` and ``check_checkpoint`` accepted, built and captured (or the
    one this process exported this very bundle from). The model is in eval mode; nothing in mmopt mutates it."""
    from mmopt.capture import split as capture_split
    from mmopt.checkpoint import build_model

    key = _key(spec, trust_checkpoint, manifest)
    if key not in _BUILT:
        model = build_model(spec, trust_checkpoint)
        split = capture_split(model, spec)
        _forget(keep=model)
        _BUILT[key] = (model, split)
    model, split = _BUILT[key]
    check_matches(Path(bundle), manifest, spec, split)
    return Reference(spec, model, split)


# ---- eager inputs and outputs: what every component really receives and returns ---------------
def eager_io(model: torch.nn.Module, spec: ModelSpec, split: Split, size: str, seed: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[dict, dict]]]:
    """Model inputs, model outputs and each component's (inputs, outputs) at the declared ``size``; a
    component called more than once has one entry per later call too, keyed ``name@k``
    (``mmopt.spec.component_of`` gives its component)."""
    shapes = {n: spec.input_shape(n, size) for n in spec.inputs}
    return eager_io_for(model, spec, split, random_inputs(spec, shapes, seed), size)


def eager_io_for(model: torch.nn.Module, spec: ModelSpec, split: Split, inputs: dict[str, torch.Tensor],
                 label: str = "given") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                               dict[str, tuple[dict, dict]]]:
    """As ``eager_io``, for given full-model inputs (any batch size, or the user's own data). Memoised:
    the same inputs through the same model and capture run once per process."""
    key = (id(model), id(split), _digest(inputs))  # the spec only names things in error messages
    hit = _IO.get(key)
    if hit is not None:
        _IO.move_to_end(key)
        return hit[0]
    io = _run_eager(model, spec, split, inputs, label)
    nbytes = sum(a.nbytes for a in (*io[0].values(), *io[1].values())) + \
        sum(a.nbytes for feeds, outs in io[2].values() for a in (*feeds.values(), *outs.values()))
    _IO[key] = (io, nbytes, (model, split))  # the owners stay alive: their ids are never reused
    while len(_IO) > 1 and sum(v[1] for v in _IO.values()) > _IO_MAX_BYTES:
        _IO.popitem(last=False)
    return io


# (model, capture, digest of the inputs) -> (io, bytes, owners); least recently used dropped first;
# emptied when the remembered model changes (``_forget``), so models are not kept alive by it
_IO: "OrderedDict[tuple, tuple[Any, int, tuple]]" = OrderedDict()
_IO_MAX_BYTES = 512 * 2**20


def _digest(inputs: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in sorted(inputs):
        t = inputs[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run_eager(model: torch.nn.Module, spec: ModelSpec, split: Split, inputs: dict[str, torch.Tensor],
               label: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[dict, dict]]]:
    modules = {c: s.module for c, s in split.components.items() if s.module}
    run = observe(model, spec, inputs, label, modules)
    values: dict[str, Any] = {f"input:{n}": t for n, t in run.inputs.items()}
    for comp, call in run.calls.items():
        values.update({f"{comp}:{n}": leaf for n, leaf in call.outputs})
    outputs = dict(run.outputs)
    values.update({f"fusion:{n}": outputs[n] for n, src in split.output_sources.items() if src.startswith("fusion:")})
    per_comp = {}
    for comp, cs in split.components.items():
        if comp in run.calls and not cs.glue:  # what the module itself was called with
            given = dict(run.calls[comp].inputs)
            feeds = {t.name: to_numpy(given[t.name]) for t in cs.inputs}
        else:  # a glued encoder or the remainder fusion: its inputs are the wired values
            feeds = {t.name: to_numpy(values[cs.sources[t.name]]) for t in cs.inputs}
        got = dict(run.calls[comp].outputs) if comp in run.calls else outputs  # the remainder's are the model's
        per_comp[comp] = (feeds, {t.name: to_numpy(got[t.name]) for t in cs.outputs})
        for key, _ in cs.calls()[1:]:  # a component called more than once: each later call, as `name@k`
            given, got = dict(run.calls[key].inputs), dict(run.calls[key].outputs)
            per_comp[key] = ({t.name: to_numpy(given[t.name]) for t in cs.inputs},
                             {t.name: to_numpy(got[t.name]) for t in cs.outputs})
    model_in = {n: to_numpy(t) for n, t in run.inputs.items()}
    model_out = {n: to_numpy(outputs[n]) for n in split.output_sources}
    require_finite(spec, "model", model_out, label)
    for comp, (_, refs) in per_comp.items():
        require_finite(spec, f"component '{comp}'", refs, label)
    return model_in, model_out, per_comp


def require_finite(spec: ModelSpec, who: str, arrays: dict[str, np.ndarray], label: str) -> None:
    """An eager reference holding NaN or Inf cannot prove anything equal to it: refuse it, naming it."""
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise CaptureError(f"{spec.path}: eager PyTorch's {who} output '{name}' at the {label} size (shape "
                               f"{list(a.shape)}) holds {nan} NaN and {inf} Inf of {a.size} values. A reference "
                               "that is not finite cannot prove parity: fix the model, or the [inputs] ranges "
                               "that drive it there.")
