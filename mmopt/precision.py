"""Convert a bundle's components to fp16 / int8 by the [precision] policy and judge the recomposed pipeline.

Each converted graph is written next to its fp32 parent (``<component>.<precision>.onnx``) with its
lineage in the manifest. The pipeline of the policy (fp32 where not converted) is then checked
against eager PyTorch on random inputs at the min / opt / max shapes and on real calibration
batches, scored on the evaluation data when configured, and the int8 components get a sensitivity
report. Everything happens in a staged copy of the bundle: any failure leaves it as it was.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import onnx

from mmopt import calibration, reference
from mmopt.judge.compare import Check, check_all, raise_on_failures
from mmopt.errors import ConfigError, PrecisionError, Unconvertible, describe
from mmopt.manifest import Manifest, external_data, sha256_file, staged_bundle
from mmopt.progress import Progress
from mmopt.reference import eager_io
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import PRECISIONS, ModelSpec
from mmopt.stages import fp16 as fp16_stage, graph
from mmopt.stages import int8 as int8_stage
from mmopt.stages.export import save
from mmopt.judge.parity import VERIFY_SEED, summarise, tolerance_for, verify

STATIC = {"int8", "int8-cpu"}  # calibrated Q/DQ forms
REAL_BATCHES = 4  # calibration batches also used as parity cases (real data)
SENSITIVITY_SAMPLES = 64


@dataclass
class QuantizeResult:
    bundle: Path
    manifest: Manifest
    policy: dict[str, str]
    label: str
    checks: list[Check]
    islands: dict[str, dict[str, str]] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    seconds: float = 0.0
    kept_fp32: dict[str, str] = field(default_factory=dict)  # component -> why it could not be converted


def artifact_file(component: str, precision: str) -> str:
    return f"{component}.onnx" if precision == "fp32" else f"{component}.{precision}.onnx"


def policy_label(policy: dict[str, str]) -> str:
    return " ".join(f"{c}={p}" for c, p in policy.items())


def parity_key(policy: dict[str, str]) -> str:
    used = {p for p in policy.values() if p != "fp32"}
    return used.pop() if len(used) == 1 else "mixed"


def resolve_policy(spec: ModelSpec, manifest: Manifest, override: dict[str, str] | None) -> dict[str, str]:
    asked = dict(override if override is not None else spec.precision)
    comps = list(manifest.components)
    unknown = [c for c in asked if c not in comps]
    if unknown:
        raise ConfigError(f"{spec.path}: [precision] names {', '.join(unknown)}, which the bundle does not have. "
                          f"Components: {', '.join(comps)}.")
    bad = [f"{c} = {p!r}" for c, p in asked.items() if p not in (*PRECISIONS, "auto")]
    if bad:
        raise ConfigError(f"{spec.path}: [precision] {', '.join(bad)}: use one of {', '.join(PRECISIONS)} or auto.")
    policy = {c: asked.get(c, "fp32") for c in comps}
    if all(p == "fp32" for p in policy.values()):
        raise ConfigError(f"{spec.path}: [precision] converts nothing (every component is fp32). Add e.g.\n"
                          f"  [precision]\n  {comps[0]} = \"int8\"")
    return policy


def forget_stale(manifest: Manifest, rewritten: set[tuple[str, str]]) -> None:
    """Drop parity and accuracy results of earlier policies that used an artifact this run replaces."""
    def uses(label: str) -> bool:
        return bool({tuple(part.split("=", 1)) for part in label.split()} & rewritten)

    parity = manifest.results.get("parity", {})
    for key in [k for k in parity if k != "fp32"]:
        if any((comp, row.get("precision")) in rewritten for comp, row in parity[key].items()):
            del parity[key]
    acc = manifest.results.get("accuracy")
    if acc:
        acc["scores"] = {k: v for k, v in acc["scores"].items() if not uses(k)}


class CheckingRunner(OnnxRuntimeRunner):
    """ONNX Runtime CPU for parity and accuracy runs, interleaved with eager PyTorch in one process:
    one thread unless told, and no spinning workers (they starved PyTorch's threads ~10x on 2 cores)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("config", {"session.intra_op.allow_spinning": "0"})
        kwargs["threads"] = kwargs.get("threads") or 1  # robust on a shared machine, like the eager reference
        super().__init__(*args, **kwargs)


class EmulatedFp16Runner(CheckingRunner):
    """Runs ``fp16_stage.emulate(graph)``. ORT's ENABLE_ALL level crashes on some of these graphs
    (segfault in session creation, onnxruntime 1.32); EXTENDED keeps every cast and is safe."""

    level = "ORT_ENABLE_EXTENDED"


@contextlib.contextmanager
def open_pipeline(split_components: dict, output_sources: dict[str, str], files: dict[str, Path],
                  policy: dict[str, str], scratch: Path, threads: int | None = None,
                  emulate_fp16: bool = True) -> Iterator[tuple[Pipeline, dict[str, OnnxRuntimeRunner]]]:
    """Runners for ``files`` (fp16 graphs as their CPU emulation unless told otherwise) and their pipeline.
    The pipeline's ``memo_key`` (its graphs' sha256 and how fp16 runs) lets ``judge.accuracy`` score the
    same graphs once per process."""
    with contextlib.ExitStack() as stack:
        runners, key = {}, []
        for comp, path in files.items():
            data = external_data(path)
            key.append((comp, sha256_file(path), sha256_file(data) if data.exists() else None,
                        policy.get(comp) == "fp16" and emulate_fp16))
            cls = OnnxRuntimeRunner if threads else CheckingRunner  # given threads: timed as users run it
            if policy.get(comp) == "fp16" and emulate_fp16:
                emu = Path(scratch) / f"{comp}.fp16.emulated.onnx"
                if not emu.exists():
                    save(fp16_stage.emulate(onnx.load(str(path))), emu)
                path, cls = emu, EmulatedFp16Runner
            spec = split_components[comp]
            runners[comp] = stack.enter_context(cls(path, spec.inputs, spec.outputs, name=comp, threads=threads))
        pipe = Pipeline(split_components, output_sources, runners)
        pipe.memo_key = ("onnx", tuple(sorted(key)))  # type: ignore[attr-defined]
        yield pipe, runners


def judge(model: Any, spec: ModelSpec, split: Any, runners: dict, policy: dict[str, str],
          cal: calibration.CalibrationData | None) -> list[Check]:
    """Parity per component and for the pipeline: random inputs at min / opt / max, then real batches."""
    tol = tolerance_for(spec, split, policy)
    checks = verify(model, spec, split, runners, policy)
    if cal is not None:
        pipe = Pipeline(split.components, split.output_sources, runners)
        for i, batch in enumerate(cal.batches[:REAL_BATCHES]):
            for comp, (feeds, refs) in ((c, cal.feeds[c][i]) for c in split.components):
                checks += check_all(comp, f"real{i}", refs, runners[comp].infer(feeds), tol(comp))
            checks += check_all("pipeline", f"real{i}", cal.model_outputs[i], pipe.infer(batch), tol("pipeline"))
    return checks


def _cases(model: Any, spec: ModelSpec, split: Any, comp: str, cal: calibration.CalibrationData | None):
    """(feeds, eager refs) of ``comp``: random at the three sizes, plus real calibration batches."""
    cases = [eager_io(model, spec, split, size, VERIFY_SEED + 100 + i)[2][comp]
             for i, size in enumerate(("min", "opt", "max"))]
    if cal is not None:
        cases += cal.feeds[comp][:REAL_BATCHES]
    return cases


def convert_component(comp: str, precision: str, proto: onnx.ModelProto, model: Any, spec: ModelSpec,
                      split: Any, cal: calibration.CalibrationData | None) -> tuple[onnx.ModelProto, dict, dict]:
    """One component to ``precision``: (graph, manifest config, fp32 islands). ``Unconvertible`` when this
    graph cannot take ``precision`` (the caller keeps it at fp32, or ``auto`` skips the candidate)."""
    held = graph.subgraph_nodes(proto)
    if held:
        ops = ", ".join(sorted({f"{n.op_type} ('{n.name}')" for n in held})[:3])
        raise Unconvertible(f"{comp}: {precision} cannot convert a graph holding subgraphs ({ops}; e.g. "
                            "nn.EmbeddingBag exports as a Loop), so it stays fp32")
    try:
        return _convert(comp, precision, proto, model, spec, split, cal)
    except _refusals() as e:  # ONNX Runtime or onnx refused the converted graph; mmopt's own bugs propagate
        raise Unconvertible(f"{comp}: {precision} conversion failed ({describe(e)}), so it stays fp32") from e


def _refusals() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime and onnx raise when a graph is invalid for them."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    names = ("Fail", "InvalidArgument", "InvalidGraph", "NotImplemented", "RuntimeException", "EPFail")
    return (onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            *(getattr(ort_errors, n) for n in names if hasattr(ort_errors, n)))


def _convert(comp: str, precision: str, proto: onnx.ModelProto, model: Any, spec: ModelSpec,
             split: Any, cal: calibration.CalibrationData | None) -> tuple[onnx.ModelProto, dict, dict]:
    exclude = spec.exclude.get(comp, ())
    if exclude:
        int8_stage.check_exclude(proto, exclude, comp, spec.path)
    if precision == "fp16":
        cases = _cases(model, spec, split, comp, cal)
        stats = [f for f, _ in cases] + ([f for f, _ in cal.feeds[comp]] if cal else [])
        res = fp16_stage.to_fp16(proto, stats, cases, spec.tolerances["fp16"], comp)
        ops = {n.name: n.op_type for n in res.proto.graph.node}
        islands = {n: f"{ops.get(n, '?')}: {why}" for n, why in res.islands.items()}
        config = {"converter": "onnxruntime.transformers.float16 (keep_io_types) + joined fp32 islands",
                  "range_samples": cal.samples if cal else "random inputs (no [calibration])",
                  "fp32_islands": islands, "parity_rounds": res.rounds}
        return res.proto, config, islands
    if precision in STATIC:
        if cal is None:
            raise ConfigError(f"{spec.path}: {comp} = \"{precision}\" needs a [calibration] table naming real data.")
        res = int8_stage.quantize_static_qdq(proto, [f for f, _ in cal.feeds[comp]], spec.calibration.method,
                                             exclude, cal.samples,
                                             form="cpu" if precision == "int8-cpu" else "tensorrt")
        return res.proto, {**res.config, "calibration_source": cal.source}, {}
    res = int8_stage.quantize_dynamic_int8(proto, exclude)
    return res.proto, res.config, {}


def quantize(bundle: str | Path, spec: ModelSpec, model: Any, split: Any,
             precision: dict[str, str] | None = None, progress: Progress | None = None,
             sensitivity: bool = True) -> QuantizeResult:
    """Convert, judge and record one precision policy in ``bundle``: one write transaction (the bundle
    is locked from reading its manifest to the commit, and left as it was on any failure)."""
    bundle = Path(bundle).resolve()
    with staged_bundle(bundle, keep_existing=True) as tmp:
        result = convert_in(tmp, spec, model, split, precision, progress, sensitivity)
    result.bundle = bundle
    return result


def convert_in(tmp: Path, spec: ModelSpec, model: Any, split: Any, precision: dict[str, str] | None = None,
               progress: Progress | None = None, sensitivity: bool = True) -> QuantizeResult:
    """The precision stage inside an open bundle transaction: ``tmp`` is the staged folder, which this
    reads the manifest from and writes the converted graphs and the new manifest into."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    manifest = Manifest.read_verified(tmp)
    policy = resolve_policy(spec, manifest, precision)
    # The bundle may have been re-exported while the model was built: judge it against the locked manifest.
    reference.check_checkpoint(tmp, manifest, spec)
    reference.check_matches(tmp, manifest, spec, split)
    needs_cal = any(p in (*STATIC, "fp16", "auto") for p in policy.values())
    cal = calibration.load(model, spec, split) if needs_cal and spec.calibration else None
    if any(p in (*STATIC, "auto") for p in policy.values()) and cal is None:
        calibration.load(model, spec, split)  # raises the "add a [calibration] table" error
    cache: dict[tuple[str, str], tuple] = {}
    result = QuantizeResult(tmp, manifest, policy, policy_label(policy), [])
    with tempfile.TemporaryDirectory() as scratch:
        files = {c: manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")) for c in policy}

        def converted(comp: str, prec: str) -> tuple:
            if (comp, prec) not in cache:
                parent = manifest.file(tmp, manifest.artifact(comp, "fp32", stage="export"))
                cache[(comp, prec)] = convert_component(comp, prec, onnx.load(str(parent)), model, spec, split, cal)
            return cache[(comp, prec)]

        for comp in [c for c, p in policy.items() if p not in ("fp32", "auto")]:
            try:
                converted(comp, policy[comp])
            except Unconvertible as e:
                result.kept_fp32[comp] = str(e)
                policy[comp] = "fp32"
        if result.kept_fp32:
            if all(p == "fp32" for p in policy.values()):
                raise PrecisionError("; ".join(result.kept_fp32.values()) + ". Nothing else was asked for, so "
                                     "nothing was written.")
            result.policy, result.label = policy, policy_label(policy)
            manifest.results.setdefault("kept_fp32", {}).update(result.kept_fp32)
        if "auto" in policy.values():
            from mmopt import policy as search_policy

            with progress.task("search precision policy", 1) as advance:
                policy, table, searched = search_policy.search(spec, model, split, policy, files, Path(scratch),
                                                               cal, converted, judge, open_pipeline)
                manifest.results["policy_search"] = table
                advance(1)
            result.policy, result.label = policy, policy_label(policy)
        else:
            searched = None
        label = result.label
        converted_comps = [c for c, p in policy.items() if p != "fp32"]
        with progress.task("convert precision", len(converted_comps)) as advance:
            for comp in converted_comps:
                parent = manifest.artifact(comp, "fp32", stage="export")
                proto, config, islands = converted(comp, policy[comp])
                files[comp] = tmp / artifact_file(comp, policy[comp])
                save(proto, files[comp])  # replaces the staged hard links, never writes through them
                manifest.add(tmp, comp, policy[comp], policy[comp], files[comp].name, parent=parent.id,
                             config=config)
                if islands:
                    result.islands[comp] = islands
                advance(1)
        forget_stale(manifest, {(c, policy[c]) for c in converted_comps})
        with open_pipeline(split.components, split.output_sources, files, policy, Path(scratch)) as (pipe, runners):
            result.checks = judge(model, spec, split, runners, policy, cal)
            method = spec.calibration.method if spec.calibration else None
            raise_on_failures(result.checks, f"{label} pipeline vs eager PyTorch",
                              "Nothing was written. Exclude the worst nodes ([precision.exclude], see the "
                              "sensitivity report of a passing run), keep a component at higher precision, "
                              + (f"try another [calibration].method (this run used {method}; \"auto\" picks the "
                                 "best per component), " if STATIC & set(policy.values()) and method != "auto" else "")
                              + "or loosen the gate under [tolerance.<precision>].")
            rows = {where: {**row, "precision": policy.get(where, label)}
                    for where, row in summarise(result.checks).items() if policy.get(where) != "fp32"}
            manifest.results.setdefault("parity", {})[parity_key(policy)] = rows
            if spec.evaluation is not None:
                result.accuracy = _score(spec, model, split, tmp, manifest, pipe, label, Path(scratch), searched)
        if sensitivity and cal is not None and STATIC & set(policy.values()):
            result.sensitivity = _sensitivity(split, tmp, manifest, policy, cal)
            manifest.results.setdefault("sensitivity", {}).update(result.sensitivity)
        result.seconds = time.perf_counter() - t0
        manifest.results.setdefault("precision_seconds", {})[label] = round(result.seconds, 2)
        manifest.write(tmp)
    return result


def _score(spec: ModelSpec, model: Any, split: Any, tmp: Path, manifest: Manifest, pipe: Pipeline, label: str,
           scratch: Path, searched: dict[str, Any] | None = None) -> dict[str, Any]:
    from mmopt.judge import accuracy as ev

    if searched is not None:  # the policy search scored this very pipeline on the same data
        acc = searched
    else:
        fp32_files = {c: manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")) for c in split.components}
        with open_pipeline(split.components, split.output_sources, fp32_files, {}, scratch) as (fp32_pipe, _):
            acc = ev.evaluate(spec, {"eager fp32": ev.eager_predictor(model), "onnx fp32": fp32_pipe.infer,
                                     label: pipe.infer})
    scores = acc["scores"]
    drop = scores["eager fp32"] - scores[label]
    old = manifest.results.get("accuracy", {})
    if old.get("source") == acc["source"] and old.get("samples") == acc["samples"]:
        acc["scores"] = {**old.get("scores", {}), **scores}
    acc["max_accuracy_drop"] = spec.max_accuracy_drop
    manifest.results["accuracy"] = acc
    if spec.max_accuracy_drop is not None and drop > spec.max_accuracy_drop:
        table = "\n".join(f"  {k:<50} {v:.4f}" for k, v in scores.items())
        raise PrecisionError(
            f"{label}: accuracy drops by {drop * 100:.2f} points on {acc['samples']} samples from {acc['source']}, "
            f"more than [tolerance].max_accuracy_drop = {spec.max_accuracy_drop} ({spec.max_accuracy_drop * 100:g} "
            f"points):\n{table}\nNothing was written. Keep the most sensitive component at higher precision or "
            "exclude its worst nodes ([precision.exclude]); `mmopt quantize` prints the sensitivity report.")
    return acc


def _sensitivity(split: Any, tmp: Path, manifest: Manifest, policy: dict[str, str],
                 cal: calibration.CalibrationData) -> dict[str, Any]:
    from mmopt import sensitivity as sens

    cases, rows = [], 0
    for batch, out in zip(cal.batches, cal.model_outputs):
        cases.append((batch, out))
        rows += len(next(iter(batch.values())))
        if rows >= SENSITIVITY_SAMPLES:
            break
    fp32 = {c: onnx.load(str(manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")))) for c in split.components}
    report = {}
    for comp, prec in policy.items():
        if prec not in STATIC:
            continue
        qdq = onnx.load(str(tmp / artifact_file(comp, prec)))
        r = sens.int8_sensitivity(comp, fp32[comp], qdq, split.components, split.output_sources, fp32, cases)
        r["samples"] = rows
        r["suggest_exclude"] = sens.suggest_exclude(r)
        report[comp] = r
    return report

