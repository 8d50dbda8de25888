"""What the CLI calls: export, inspect and verify a bundle. The API never imports the CLI."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mmopt.capture import Split, split as capture_split
from mmopt.checkpoint import build_model
from mmopt.errors import ExportError
from mmopt.judge.compare import Check, raise_on_failures
from mmopt.judge.parity import summarise, verify
from mmopt.manifest import Manifest, sha256_file, staged_bundle
from mmopt.progress import Progress
from mmopt.provenance import tool_versions
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.spec import ModelSpec, load_spec
from mmopt.stages.export import export_component, simplify


@dataclass
class ExportResult:
    bundle: Path
    manifest: Manifest
    checks: list[Check]
    seconds: dict[str, float] = field(default_factory=dict)
    precision: Any = None  # mmopt.precision.QuantizeResult when [precision] converts a component


def _check_graph(path: Path, comp: str) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"component '{comp}': the exported graph {path.name} fails onnx.checker: {e}") from e


def export(config: str | Path, out_dir: str | Path, trust_checkpoint: bool = False,
           progress: Progress | None = None) -> ExportResult:
    """mmopt.toml -> a verified bundle of one ONNX graph per component, written atomically."""
    progress = progress or Progress()
    t0 = time.perf_counter()
    from mmopt import reference

    spec = load_spec(config)
    model = build_model(spec, trust_checkpoint)
    split = capture_split(model, spec)
    progress.log(f"loaded {spec.factory} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    seconds: dict[str, float] = {"load_and_capture": time.perf_counter() - t0}
    comps = list(split.components)
    # One transaction: the earlier bundle at out_dir stays until the fp32 export *and* the [precision]
    # stage have both succeeded.
    with staged_bundle(out_dir) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            raw, notes, simplified = {}, {}, {}
            with progress.task("export + simplify", len(comps)) as advance:
                for comp in comps:
                    t = time.perf_counter()
                    raw[comp] = export_component(model, split, comp, Path(scratch) / f"{comp}.onnx")
                    _check_graph(raw[comp], comp)
                    result = simplify(raw[comp], tmp / f"{comp}.onnx")
                    notes[comp], simplified[comp] = result.note, result.ok
                    if not result.ok:
                        shutil.copy(raw[comp], tmp / f"{comp}.onnx")
                    seconds[comp] = time.perf_counter() - t
                    advance(1)
            with progress.task("verify vs eager (min/opt/max)", 1) as advance:
                checks = _verify_files(model, spec, split, {c: tmp / f"{c}.onnx" for c in comps})
                # A simplification that broke parity is undone: the raw export is the fallback.
                broken = {c.component for c in checks if c.failed} & set(comps)
                for comp in broken:
                    if simplified[comp]:
                        shutil.copy(raw[comp], tmp / f"{comp}.onnx")
                        notes[comp] = "simplified graph failed parity; kept the unsimplified export"
                if broken:
                    checks = _verify_files(model, spec, split, {c: tmp / f"{c}.onnx" for c in comps})
                advance(1)
            raise_on_failures(checks, f"export of {spec.path}",
                              "The bundle was not written. Loosen [tolerance.fp32] only if these errors are "
                              "acceptable for your task; otherwise report the component and op.")
            manifest = new_manifest(spec, split)
            for comp in comps:
                manifest.add(tmp, comp, "export", "fp32", f"{comp}.onnx",
                             config={"exporter": "torch.onnx.export(dynamo=True)", "simplify": notes[comp]},
                             export_seconds=round(seconds[comp], 3))
            seconds["total"] = time.perf_counter() - t0
            manifest.results["parity"] = {"fp32": summarise(checks)}
            manifest.results["export_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            manifest.write(tmp)
            reference.remember(spec, trust_checkpoint, manifest, model, split)  # later commands reuse it
        result = ExportResult(Path(os.path.abspath(out_dir)), manifest, checks, seconds)
        if any(p != "fp32" for p in spec.precision.values()):
            from mmopt.precision import convert_in

            result.precision = convert_in(tmp, spec, model, split, None, progress)
            result.precision.bundle = result.bundle
            result.manifest = result.precision.manifest
    return result


def _verify_files(model: Any, spec: ModelSpec, split: Split, files: dict[str, Path]) -> list[Check]:
    """fp32 parity of ``files`` (component -> ONNX graph) and their pipeline against the eager model."""
    with contextlib.ExitStack() as stack:
        runners = {c: stack.enter_context(OnnxRuntimeRunner(p, split.components[c].inputs,
                                                            split.components[c].outputs, name=c))
                   for c, p in files.items()}
        return verify(model, spec, split, runners, {c: "fp32" for c in files})


def new_manifest(spec: ModelSpec, split: Split) -> Manifest:
    model = {"config": str(spec.path), "config_sha256": sha256_file(spec.path), "factory": spec.factory,
             "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
             "checkpoint_sha256": sha256_file(spec.checkpoint) if spec.checkpoint else None,
             "fusion": spec.fusion or "remainder", "output_sources": split.output_sources,
             "dims": {k: vars(v) for k, v in spec.dims.items()}}
    return Manifest(model=model, model_inputs=split.model_inputs, model_outputs=split.model_outputs,
                    components=split.components, tools=tool_versions())


def inspect_bundle(bundle: str | Path) -> Manifest:
    return Manifest.read(bundle)


def verify_bundle(bundle: str | Path) -> tuple[Manifest, list[tuple[str, str]]]:
    """Re-check every artifact's sha256; returns the manifest and [(file, problem)]."""
    return Manifest.read_checked(bundle)


@dataclass
class BenchResult:
    """The bench report (see ``mmopt.bench.report``) and the files written from it."""

    report: dict[str, Any]
    files: dict[str, Path]

    @property
    def passed(self) -> bool:
        return bool(self.report["gates"]["passed"])

    def raise_for_gates(self) -> None:
        """``GateError`` (exit code 1) listing every failed parity, accuracy and latency gate."""
        from mmopt.bench.gates import raise_on_failures

        raise_on_failures(self.report, self)


def bench(bundle: str | Path, out: str | Path | None = "bench-report", baseline: str | Path | None = None,
          max_latency_regression: float = 0.10, backends: list[str] | None = None, batches: list[int] | None = None,
          threads: int | None = 1, repeats: int = 30, warmup: int = 5, inputs: str = "random", gate_on: str = "ratio",
          config: str | Path | None = None, eval_samples: int | None = None, check: bool = True,
          progress: Progress | None = None, trust_checkpoint: bool = False) -> BenchResult:
    """Parity, task score, latency and memory of eager PyTorch and every artifact of ``bundle`` on every
    backend here; optional comparison with a ``baseline`` report. Writes report.json / .md / .png into
    ``out`` and, with ``check``, raises ``GateError`` after writing when a gate fails."""
    from mmopt.bench import gates, harness, report as render
    from mmopt.errors import UsageError

    if not 0 <= max_latency_regression < 100:
        raise UsageError(f"--max-latency-regression {max_latency_regression}: give a fraction such as 0.1 (10%).")
    if out is not None:
        render.check_out(out, bundle)
    gates.check_gate_on(gate_on)  # before minutes of measurement
    base = None
    if baseline is not None:  # fail fast, before minutes of measurement
        base = gates.load_baseline(baseline, harness.REPORT_SCHEMA)
        manifest = Manifest.read(bundle)
        probe = {"bundle": {"fingerprint": manifest.fingerprint(), "path": str(bundle),
                            "factory": manifest.model.get("factory")}}
        gates.check_same_model(probe, base, baseline)
    report = harness.run(bundle, backends, batches, threads, repeats, warmup, inputs, config, eval_samples,
                         progress=progress, trust_checkpoint=trust_checkpoint)
    report["baseline"] = gates.compare(report, base, baseline, max_latency_regression, gate_on) if base else None
    report["gates"] = gates.evaluate(report, report["settings"]["max_accuracy_drop"])
    try:
        files = render.write(report, out) if out is not None else {}
    except OSError as e:
        raise UsageError(f"--out {out}: the reports could not be written ({e.strerror}).") from None
    result = BenchResult(report, files)
    if check:
        result.raise_for_gates()
    return result


def quantize(bundle: str | Path, config: str | Path | None = None, progress: Progress | None = None,
             precision: dict[str, str] | None = None, trust_checkpoint: bool = False,
             sensitivity: bool = True):
    """Convert an exported bundle's components to the [precision] policy (fp16 / int8 / int8-cpu / int8-dynamic).

    ``config`` defaults to the mmopt.toml the bundle was exported from (recorded in its manifest);
    ``precision`` overrides the config's [precision] table (component -> precision). Writes
    ``<component>.<precision>.onnx`` beside the fp32 graphs, checked against eager PyTorch and, with an
    [evaluation] table, scored on the task. A failure leaves the bundle exactly as it was.
    """
    from mmopt import reference
    from mmopt.precision import quantize as run_policy

    progress = progress or Progress()
    # A tampered bundle fails here, before minutes of model building; the stage re-checks under the lock.
    ref = reference.load(bundle, Manifest.read_verified(bundle), config, trust_checkpoint)
    return run_policy(bundle, ref.spec, ref.model, ref.split, precision, progress, sensitivity)
