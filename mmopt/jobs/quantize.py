"""Convert a bundle's components to fp16 / int8 by the [precision] policy and judge the recomposed pipeline.

Each converted graph is written next to its fp32 parent (``<component>.<precision>.onnx``) with its
lineage in the manifest. The pipeline of the policy (fp32 where not converted) is then checked
against eager PyTorch on random inputs at the min / opt / max shapes and on real calibration
batches, scored on the evaluation data when configured, and the int8 components get a sensitivity
report. Everything happens in a staged copy of the bundle: any failure leaves it as it was.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mmopt import calibration, reference
from mmopt.precision.convert import (STATIC, Converter, artifact_file, judge, open_pipeline, parity_key,
                                     policy_label, refusals)
from mmopt.errors import ConfigError, NothingToConvert, ParityError, PrecisionError, Unconvertible, describe
from mmopt.judge import accuracy as ev
from mmopt.judge.compare import Check, raise_on_failures
from mmopt.judge.parity import summarise
from mmopt.manifest import Manifest, staged_bundle
from mmopt.precision import search, sensitivity as sens
from mmopt.progress import Progress
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import PRECISIONS, ModelSpec
from mmopt.stages.export import save

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
    sensitivity_error: str | None = None  # why the sensitivity report could not be made (the conversion stands)
    search: dict[str, Any] | None = None  # what this run's "auto" search tried (None: no component was auto)


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
    """Drop the judged policies, and their parity and accuracy results, that used an artifact this run
    replaces. Policies are read from ``results.policies`` (label -> component -> precision), never parsed
    back from their labels."""
    policies = manifest.results.get("policies", {})
    stale = {label for label, pol in policies.items() if set(pol.items()) & rewritten}
    for label in stale:
        del policies[label]
    parity = manifest.results.get("parity", {})
    for key in [k for k in parity if k != "fp32"]:
        if any((comp, row.get("precision")) in rewritten for comp, row in parity[key].items()):
            del parity[key]
    acc = manifest.results.get("accuracy")
    if acc:
        # A score is kept only under a label whose policy is known and current (eager and ONNX fp32 always):
        # a bundle written before results.policies existed loses its older policies' scores rather than
        # keep ones that may describe a replaced graph.
        known = set(policies) | {"eager fp32", "onnx fp32"}
        acc["scores"] = {k: v for k, v in acc["scores"].items() if k in known and k not in stale}


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
    cal = _calibration(model, spec, split, policy)
    result = QuantizeResult(tmp, manifest, policy, policy_label(policy), [])
    with tempfile.TemporaryDirectory() as scratch:
        files = {c: manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")) for c in policy}
        converter = Converter(dict(files), model, spec, split, cal)
        keep_unconvertible_fp32(result, converter)
        searched = None
        if "auto" in result.policy.values():
            searched = search_autos(result, spec, model, split, files, Path(scratch), cal, converter, progress)
        write_converted(result, tmp, converter, files, progress)
        judge_and_record(result, spec, model, split, tmp, files, Path(scratch), cal, searched, progress)
        if sensitivity and cal is not None and STATIC & set(result.policy.values()):
            try:  # a report never takes a conversion down: it is written without it, and says why
                result.sensitivity = _sensitivity(split, tmp, manifest, result.policy, cal, spec.score_outputs)
                manifest.results.setdefault("sensitivity", {}).update(result.sensitivity)
            except (ValueError, *refusals()) as e:
                result.sensitivity_error = manifest.results["sensitivity_error"] = describe(e)
        result.seconds = time.perf_counter() - t0
        manifest.results.setdefault("precision_seconds", {})[result.label] = round(result.seconds, 2)
        manifest.write(tmp)
    return result


def _calibration(model: Any, spec: ModelSpec, split: Any, policy: dict[str, str]) -> Any:
    """Calibration data when the policy needs it (int8 ranges, fp16 overflow statistics, auto timing)."""
    if any(p in (*STATIC, "auto") for p in policy.values()) and spec.calibration is None:
        calibration.load(model, spec, split)  # raises the "add a [calibration] table" error
    # int8-dynamic needs none, but is judged on real batches too where [calibration] names them
    needs = any(p in (*STATIC, "fp16", "auto", "int8-dynamic") for p in policy.values())
    return calibration.load(model, spec, split) if needs and spec.calibration else None


def keep_unconvertible_fp32(result: QuantizeResult, converter: Converter) -> None:
    """A component whose graph cannot take its precision stays fp32 (said in the result and manifest)."""
    policy = result.policy
    for comp in [c for c, p in policy.items() if p not in ("fp32", "auto")]:
        try:
            converter.get(comp, policy[comp])
        except Unconvertible as e:
            result.kept_fp32[comp] = str(e)
            policy[comp] = "fp32"
    if result.kept_fp32:
        if all(p == "fp32" for p in policy.values()):
            raise NothingToConvert("; ".join(result.kept_fp32.values()) + ". Nothing else was asked for, so "
                                   "nothing was written.")
        result.label = policy_label(policy)
        result.manifest.results.setdefault("kept_fp32", {}).update(result.kept_fp32)


def search_autos(result: QuantizeResult, spec: ModelSpec, model: Any, split: Any, files: dict[str, Path],
                 scratch: Path, cal: Any, converter: Converter, progress: Progress) -> dict[str, Any] | None:
    """The "auto" components chosen by the policy search; returns its scores (reused for the record)."""
    policy, table, searched = search.search(spec, model, split, result.policy, files, scratch, cal, converter,
                                            progress)
    result.manifest.results["policy_search"] = table
    result.search = table
    result.policy, result.label = policy, policy_label(policy)
    return searched


def write_converted(result: QuantizeResult, tmp: Path, converter: Converter, files: dict[str, Path],
                    progress: Progress) -> None:
    """Each converted graph saved beside its fp32 parent and added to the manifest with its lineage."""
    manifest, policy = result.manifest, result.policy
    converted = [c for c, p in policy.items() if p != "fp32"]
    label = ", ".join(f"{c}={policy[c]}" for c in converted)
    with progress.task(f"convert {label}", len(converted)) as advance:
        for comp in converted:
            parent = manifest.artifact(comp, "fp32", stage="export")
            proto, config, islands = converter.get(comp, policy[comp])
            files[comp] = tmp / artifact_file(comp, policy[comp])
            save(proto, files[comp])  # replaces the staged hard links, never writes through them
            manifest.add(tmp, comp, policy[comp], policy[comp], files[comp].name, parent=parent.id, config=config)
            if islands:
                result.islands[comp] = islands
            advance(1)
    forget_stale(manifest, {(c, policy[c]) for c in converted})


def judge_and_record(result: QuantizeResult, spec: ModelSpec, model: Any, split: Any, tmp: Path,
                     files: dict[str, Path], scratch: Path, cal: Any, searched: dict[str, Any] | None,
                     progress: Progress) -> None:
    """The policy's pipeline judged (parity gates, then the accuracy budget) and recorded in the manifest:
    its parity, the policy itself (what bench measures) and its accuracy."""
    manifest, policy, label = result.manifest, result.policy, result.label
    with open_pipeline(split.components, split.output_sources, files, policy, scratch) as (pipe, runners):
        result.checks = judge(model, spec, split, runners, policy, cal)
        method = spec.calibration.method if spec.calibration else None
        fix, looked = None, False
        static = {c for c, p in policy.items() if p in STATIC}
        if cal is not None and any(c.failed and c.component in static | {"pipeline"} for c in result.checks):
            looked = True  # what int8 nodes kept fp32 could fix: a static component's or the pipeline's check
            try:
                fix = find_exclusions(spec, model, split, policy, files, tmp, manifest, scratch, cal, progress)
            except (ValueError, Unconvertible, *refusals()):
                fix = None  # the search is a hint: it never replaces the failure it was looking into
        try:
            raise_on_failures(result.checks, f"{label} pipeline vs eager PyTorch", "Nothing was written. " + (
                f"Keeping {sum(map(len, fix.values()))} node(s) in fp32 passes every parity gate (converted and "
                f"judged just now): put in {spec.path}\n{sens.exclude_block(fix, spec)}\n(replacing any "
                "[precision.exclude] table there) and run again, or keep a component at higher precision."
                if fix else
                "Keep a component at higher precision, exclude its worst int8 nodes ([precision.exclude]"
                + (f"; keeping up to {sens.MAX_KEPT} of them in fp32 was not enough" if looked else "") + "), "
                + (f"try another [calibration].method (this run used {method}; \"auto\" picks the best per "
                   "component), " if static and method != "auto" else "")
                + "or loosen the gate under [tolerance.<precision>]."))
        except ParityError as e:
            e.exclude = fix  # type: ignore[attr-defined]  # the verified fix, for callers that apply it
            raise
        rows = {where: {**row, "precision": policy.get(where, label)}
                for where, row in summarise(result.checks).items() if policy.get(where) != "fp32"}
        manifest.results.setdefault("parity", {})[parity_key(policy)] = rows
        manifest.results.setdefault("policies", {})[label] = dict(policy)
        if spec.evaluation is not None:
            result.accuracy = _score(spec, model, split, tmp, manifest, pipe, label, scratch, searched)


def _score(spec: ModelSpec, model: Any, split: Any, tmp: Path, manifest: Manifest, pipe: Pipeline, label: str,
           scratch: Path, searched: dict[str, Any] | None = None) -> dict[str, Any]:
    if searched is not None:  # the policy search scored this very pipeline on the same data
        acc = searched
    else:
        fp32_files = {c: manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")) for c in split.components}
        with open_pipeline(split.components, split.output_sources, fp32_files, {}, scratch) as (fp32_pipe, _):
            acc = ev.evaluate(spec, {"eager fp32": ev.eager_predictor(model, split), "onnx fp32": fp32_pipe.infer,
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


def find_exclusions(spec: ModelSpec, model: Any, split: Any, policy: dict[str, str], files: dict[str, Path],
                    tmp: Path, manifest: Manifest, scratch: Path, cal: calibration.CalibrationData,
                    progress: Progress) -> dict[str, list[str]] | None:
    """After a failed judge: the few int8 nodes to keep fp32 that make the policy pass, or None."""
    fp32_files = {c: manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")) for c in split.components}
    with progress.task("int8 failed its gates: look for nodes to keep fp32", sens.MAX_KEPT) as advance:
        return sens.exclusions_that_pass(spec, model, split, policy, files, fp32_files, scratch, cal,
                                         _sensitivity_cases(cal)[0], advance)


def _sensitivity_cases(cal: calibration.CalibrationData) -> tuple[list[tuple[dict, dict]], int]:
    """Real calibration batches and their eager outputs, up to ``SENSITIVITY_SAMPLES`` rows."""
    cases, rows = [], 0
    for batch, out in zip(cal.batches, cal.model_outputs):
        cases.append((batch, out))
        rows += len(next(iter(batch.values())))
        if rows >= SENSITIVITY_SAMPLES:
            break
    return cases, rows


def _sensitivity(split: Any, tmp: Path, manifest: Manifest, policy: dict[str, str],
                 cal: calibration.CalibrationData, scores: frozenset[str] = frozenset()) -> dict[str, Any]:
    cases, rows = _sensitivity_cases(cal)
    fp32 = {c: onnx.load(str(manifest.file(tmp, manifest.artifact(c, "fp32", stage="export")))) for c in split.components}
    report = {}
    for comp, prec in policy.items():
        if prec not in STATIC:
            continue
        qdq = onnx.load(str(tmp / artifact_file(comp, prec)))
        r = sens.int8_sensitivity(comp, fp32[comp], qdq, split.components, split.output_sources, fp32, cases,
                                  scores)
        r["samples"] = rows
        r["suggest_exclude"] = sens.suggest_exclude(r)
        report[comp] = r
    return report

