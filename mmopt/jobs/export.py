"""``mmopt export``: mmopt.toml -> a verified bundle of one ONNX graph per component, in one transaction.

Steps: load and capture the model; export and simplify every component; verify each graph and the
recomposed pipeline against eager PyTorch (a simplification that broke parity is undone); record the
manifest; run the ``[precision]`` stage when the config asks for one. The earlier bundle at OUT stays
until all of it has succeeded.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from mmopt import reference
from mmopt.capture import Split, split as capture_split
from mmopt.checkpoint import build_model
from mmopt.errors import ExportError, NothingToConvert
from mmopt.jobs.quantize import QuantizeResult, convert_in
from mmopt.judge.compare import Check, raise_on_failures
from mmopt.judge.parity import summarise, verify
from mmopt.manifest import Manifest, portable_path, sha256_file, staged_bundle
from mmopt.progress import Progress
from mmopt.provenance import tool_versions
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.spec import SIZES, ModelSpec, definition_sha256, load_spec
from mmopt.stages.export import export_component, name_dims, save, simplify


@dataclass
class ExportResult:
    bundle: Path
    manifest: Manifest
    checks: list[Check]
    seconds: dict[str, float] = field(default_factory=dict)
    precision: QuantizeResult | None = None  # when [precision] converts a component


def export(config: str | Path, out_dir: str | Path, trust_checkpoint: bool = False,
           progress: Progress | None = None) -> ExportResult:
    progress = progress or Progress()
    t0 = time.perf_counter()
    spec = load_spec(config)
    model = build_model(spec, trust_checkpoint)
    split = capture_split(model, spec)
    progress.log(f"loaded {spec.factory} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    seconds: dict[str, float] = {"load_and_capture": time.perf_counter() - t0}
    with staged_bundle(out_dir) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            raw, notes = export_graphs(model, split, tmp, Path(scratch), seconds, progress)
            checks = verify_graphs(model, spec, split, tmp, raw, notes, progress)
            manifest = record(tmp, Path(out_dir), spec, split, checks, notes, seconds, t0)
            reference.remember(spec, trust_checkpoint, manifest, model, split)  # later commands reuse it
        result = ExportResult(Path(os.path.abspath(out_dir)), manifest, checks, seconds)
        if any(p != "fp32" for p in spec.precision.values()):
            try:
                result.precision = convert_in(tmp, spec, model, split, None, progress)
            except NothingToConvert as e:  # the fp32 bundle stands; [precision] had nothing it could do
                progress.log(f"[precision] converted nothing: {e}")
                manifest.results["kept_fp32"] = {"[precision]": str(e)}
                manifest.write(tmp)
            else:
                result.precision.bundle = result.bundle
                result.manifest = result.precision.manifest
    return result


def export_graphs(model: Any, split: Split, tmp: Path, scratch: Path, seconds: dict[str, float],
                  progress: Progress) -> tuple[dict[str, Path], dict[str, str]]:
    """Each component exported (raw, into ``scratch``), checked, and simplified into ``tmp`` (the raw
    export where onnxsim fails). Returns the raw graphs and a note per component."""
    raw, notes = {}, {}
    with progress.task(f"export + simplify {', '.join(split.components)}", len(split.components)) as advance:
        for comp in split.components:
            t = time.perf_counter()
            raw[comp] = export_component(model, split, comp, scratch / f"{comp}.onnx")
            _check_graph(raw[comp], comp)
            result = simplify(raw[comp], tmp / f"{comp}.onnx")
            notes[comp] = result.note
            if result.ok:  # onnxsim may bring back the exporter's s0 / s26: the captured names go on last
                proto = onnx.load(str(tmp / f"{comp}.onnx"))
                name_dims(proto, split.components[comp])
                save(proto, tmp / f"{comp}.onnx")
            else:
                shutil.copy(raw[comp], tmp / f"{comp}.onnx")
                raw.pop(comp)  # nothing to fall back to: the graph in the bundle is the raw export
            seconds[comp] = time.perf_counter() - t
            advance(1)
    return raw, notes


def verify_graphs(model: Any, spec: ModelSpec, split: Split, tmp: Path, simplified: dict[str, Path],
                  notes: dict[str, str], progress: Progress) -> list[Check]:
    """Parity of the bundle's graphs against eager at min / opt / max. A simplified graph that fails is
    replaced by its raw export (``simplified``: component -> raw graph) and everything is checked again;
    a failure after that aborts the export."""
    files = {c: tmp / f"{c}.onnx" for c in split.components}
    with progress.task("verify vs eager at min / opt / max", len(SIZES)) as advance:
        checks = _verify_files(model, spec, split, files, advance)
    broken = {c.component for c in checks if c.failed} & set(simplified)
    for comp in broken:
        shutil.copy(simplified[comp], files[comp])
        notes[comp] = "simplified graph failed parity; kept the unsimplified export"
    if broken:
        with progress.task(f"verify again, unsimplified {', '.join(sorted(broken))}", len(SIZES)) as advance:
            checks = _verify_files(model, spec, split, files, advance)
    raise_on_failures(checks, f"export of {spec.path}",
                      "The bundle was not written. Loosen [tolerance.fp32] only if these errors are "
                      "acceptable for your task; otherwise report the component and op.")
    return checks


def record(tmp: Path, bundle: Path, spec: ModelSpec, split: Split, checks: list[Check], notes: dict[str, str],
           seconds: dict[str, float], t0: float) -> Manifest:
    """The manifest of the fp32 bundle: its model, components, artifacts and parity, written into ``tmp``
    (staged for ``bundle``)."""
    manifest = new_manifest(spec, split, bundle)
    for comp in split.components:
        manifest.add(tmp, comp, "export", "fp32", f"{comp}.onnx",
                     config={"exporter": "torch.onnx.export(dynamo=True)", "simplify": notes[comp]},
                     export_seconds=round(seconds[comp], 3))
    seconds["total"] = time.perf_counter() - t0
    manifest.results["parity"] = {"fp32": summarise(checks)}
    manifest.results["export_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    manifest.write(tmp)
    return manifest


def _check_graph(path: Path, comp: str) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"component '{comp}': the exported graph {path.name} fails onnx.checker: {e}") from e


def _verify_files(model: Any, spec: ModelSpec, split: Split, files: dict[str, Path],
                  on_size: Callable[..., None] | None = None) -> list[Check]:
    """fp32 parity of ``files`` (component -> ONNX graph) and their pipeline against the eager model."""
    with contextlib.ExitStack() as stack:
        runners = {c: stack.enter_context(OnnxRuntimeRunner(p, split.components[c].inputs,
                                                            split.components[c].outputs, name=c))
                   for c, p in files.items()}
        return verify(model, spec, split, runners, {c: "fp32" for c in files}, on_size=on_size)


def new_manifest(spec: ModelSpec, split: Split, bundle: Path) -> Manifest:
    """The manifest of a fresh export to ``bundle`` (its final place: the user's files are recorded relative
    to it)."""
    model = {"config": portable_path(spec.path, bundle), "config_absolute": str(spec.path),
             "config_sha256": sha256_file(spec.path),
             "definition_sha256": definition_sha256(spec.path), "factory": spec.factory,
             "checkpoint": portable_path(spec.checkpoint, bundle) if spec.checkpoint else None,
             "checkpoint_sha256": sha256_file(spec.checkpoint) if spec.checkpoint else None,
             "fusion": spec.fusion or "remainder", "output_sources": split.output_sources,
             "dims": {k: vars(v) for k, v in spec.dims.items()}}
    return Manifest(model=model, model_inputs=split.model_inputs, model_outputs=split.model_outputs,
                    components=split.components, tools=tool_versions())
