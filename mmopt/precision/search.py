"""``precision = "auto"``: pick, per component, the fastest precision whose pipeline still meets the budget.

Every combination of the candidates for the "auto" components (with the fixed components as
configured) is judged like any policy: parity gates against eager PyTorch and, with [evaluation],
the accuracy budget. Each candidate graph is timed alone on this machine (ONNX Runtime CPU, one
thread, median of interleaved repeats on a real calibration batch); a pipeline's latency is the sum of
its components'. The fastest passing combination wins (within 5% timing noise, the more accurate one);
fp32 always passes, so there is always one. A component called k times per forward counts k times.
The search chooses for ONNX Runtime on this CPU: its candidates are the CPU forms (int8-cpu, int8-dynamic)
and fp32. fp16 is no candidate (ONNX Runtime runs it at fp32 speed on CPU), nor is TensorRT's int8 form
(slower than fp32 on ONNX Runtime CPU: its Q/DQ cannot be fused there); set those explicitly for engines.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmopt.precision.convert import Converter, judge, open_pipeline, policy_label
from mmopt.errors import ConfigError, Unconvertible
from mmopt.judge import latency
from mmopt.judge.compare import raise_on_failures
from mmopt.progress import Progress
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import ModelSpec
from mmopt.stages.export import save

CANDIDATES = ("int8-cpu", "int8-dynamic", "fp32")
MAX_COMBINATIONS = 27
NOISE = 0.05  # latencies within 5% of the fastest count as equal


class Memo:
    """Wraps a runner so that pipelines sharing it compute each batch once: results are keyed by the
    identity of the feed arrays (kept alive in the cache, so identities are not reused)."""

    def __init__(self, runner: Any, size: int = 8):
        self.runner, self.size, self.cache = runner, size, {}

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        key = tuple(sorted((n, id(a)) for n, a in feeds.items()))
        if key not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = (feeds, self.runner.infer(feeds, check=check))
        return self.cache[key][1]


def search(spec: ModelSpec, model: Any, split: Any, policy: dict[str, str], fp32_files: dict[str, Path],
           scratch: Path, cal: Any, converter: Converter, progress: Progress | None = None
           ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any] | None]:
    """The fastest passing policy for the components set to "auto", the table of what was tried (with why
    the chosen one won), and the scores of eager, ONNX fp32 and the chosen policy (None without
    [evaluation]). ``progress`` gets one bar per phase, counting candidates, policies and samples."""
    progress = progress or Progress()
    autos = [c for c, p in policy.items() if p == "auto"]
    options = _options(spec, autos, cal)
    files, skipped = _candidates(policy, autos, options, fp32_files, scratch, converter, progress)
    lat = _time(split, files, cal)
    with contextlib.ExitStack() as stack:
        rows, pipes = _judge_all(stack, spec, model, split, policy, autos, options, files, lat, scratch, cal,
                                 progress)
        acc = _score(stack, spec, model, split, rows, pipes, fp32_files, scratch, progress) \
            if spec.evaluation else None
    best, why = _choose(rows, autos)
    table = {"candidates": [{k: v for k, v in r.items() if k != "policy"} for r in rows], "skipped": skipped,
             "chosen": best["label"], "why": why,
             "timing": "ONNX Runtime CPU, 1 thread, median of 15 interleaved runs on calibration batch 0; "
                       "pipeline = sum of components"}
    scores = None
    if acc is not None:  # reused for the chosen policy's accuracy record
        scores = {**acc, "scores": {k: acc["scores"][k] for k in ("eager fp32", "onnx fp32", best["label"])}}
    return best["policy"], table, scores


def _options(spec: ModelSpec, autos: list[str], cal: Any) -> dict[str, list[str]]:
    if cal is None:
        raise ConfigError(f"{spec.path}: [precision] {autos[0]} = \"auto\" needs a [calibration] table: "
                          "candidates are calibrated and timed on real data.")
    options = {c: list(CANDIDATES) for c in autos}
    if math.prod(len(v) for v in options.values()) > MAX_COMBINATIONS:
        raise ConfigError(f"{spec.path}: [precision] has {len(autos)} components set to \"auto\"; at most "
                          f"{MAX_COMBINATIONS} combinations are tried. Fix the precision of some of them.")
    return options


def _candidates(policy: dict[str, str], autos: list[str], options: dict[str, list[str]],
                fp32_files: dict[str, Path], scratch: Path, converter: Converter, progress: Progress
                ) -> tuple[dict[tuple[str, str], Path], list[dict[str, str]]]:
    """Each (component, precision) candidate's graph file; candidates that cannot convert are dropped from
    ``options`` and listed with their reason."""
    files: dict[tuple[str, str], Path] = {}
    skipped: list[dict[str, str]] = []
    pairs = [(c, p) for c, p in policy.items() if p != "auto"] + [(c, p) for c in autos for p in options[c]]
    for comp, prec in [(c, p) for c, p in pairs if p == "fp32"]:
        files[(comp, prec)] = fp32_files[comp]
    converting = [(c, p) for c, p in pairs if p != "fp32"]
    with progress.task("auto: calibrate and convert candidates", len(converting)) as advance:
        for comp, prec in converting:
            advance(0, doing=f"{comp}={prec}")
            try:
                proto = converter.get(comp, prec)[0]
            except Unconvertible as e:  # shown in the table with its reason; fp32 is always a candidate
                options[comp].remove(prec)
                skipped.append({"component": comp, "precision": prec, "reason": str(e)})
                advance(1)
                continue
            files[(comp, prec)] = Path(scratch) / f"candidate.{comp}.{prec}.onnx"
            save(proto, files[(comp, prec)])
            advance(1)
    return files, skipped


def _time(split: Any, files: dict[tuple[str, str], Path], cal: Any) -> dict[tuple[str, str], float]:
    """Each candidate graph alone, one thread, interleaved, on calibration batch 0 (ms)."""
    feeds = {c: cal.feeds[c][0][0] for c in split.components}
    with contextlib.ExitStack() as stack:
        runners = {}
        for (comp, prec), path in files.items():
            s = split.components[comp]
            runners[(comp, prec)] = stack.enter_context(OnnxRuntimeRunner(path, s.inputs, s.outputs, threads=1))
        return latency.median_ms({k: (lambda r=r, f=feeds[k[0]]: r.infer(f, check=False)) for k, r in runners.items()})


def _judge_all(stack: contextlib.ExitStack, spec: ModelSpec, model: Any, split: Any, policy: dict[str, str],
               autos: list[str], options: dict[str, list[str]], files: dict[tuple[str, str], Path],
               lat: dict[tuple[str, str], float], scratch: Path, cal: Any, progress: Progress
               ) -> tuple[list[dict], dict[str, Any]]:
    """Every combination judged like any policy (rows), and its pipeline on shared memoised runners."""
    rows, pipes, memos = [], {}, {}
    # The fixed components with every "auto" one at fp32 first: if that fails, no combination can pass.
    combos = sorted(itertools.product(*(options[c] for c in autos)), key=lambda c: c != ("fp32",) * len(c))
    with progress.task("auto: judge policies against eager", len(combos)) as advance:
        for combo in combos:
            trial = {**policy, **dict(zip(autos, combo))}
            advance(0, doing=policy_label(trial))
            rows.append(_judge_one(stack, spec, model, split, policy, trial, files, lat, scratch, cal, memos, pipes,
                                   first=not rows))
            advance(1)
    return rows, pipes


def _judge_one(stack: contextlib.ExitStack, spec: ModelSpec, model: Any, split: Any, policy: dict[str, str],
               trial: dict[str, str], files: dict[tuple[str, str], Path], lat: dict[tuple[str, str], float],
               scratch: Path, cal: Any, memos: dict, pipes: dict[str, Any], first: bool) -> dict[str, Any]:
    """One combination's row; its pipeline (on memoised runners shared across combinations) into ``pipes``."""
    label = policy_label(trial)
    pipe, trial_runners = stack.enter_context(open_pipeline(
        split.components, split.output_sources, {c: files[(c, p)] for c, p in trial.items()}, trial,
        Path(scratch)))
    checks = judge(model, spec, split, trial_runners, trial, cal)
    failed = [c for c in checks if c.failed]
    if first and failed:
        fixed = " ".join(f"{c}={p}" for c, p in policy.items() if p != "auto")
        raise_on_failures(checks, f"{label} (the fixed part of the policy, {fixed}, with every auto "
                                  "component at fp32)",
                          "No \"auto\" choice can pass when the fixed components fail. Try another "
                          "[calibration].method (\"auto\" picks the best per component), exclude the "
                          "worst nodes, or keep those components at higher precision.")
    # a component the forward calls k times runs k times in the pipeline
    ms = sum(lat.get((c, p), float("nan")) * len(split.components[c].calls()) for c, p in trial.items())
    shared = {c: memos.setdefault((c, p), Memo(trial_runners[c])) for c, p in trial.items()}
    pipes[label] = Pipeline(split.components, split.output_sources, shared).infer
    return {"policy": trial, "label": label, "latency_ms": round(ms, 4), "parity_ok": not failed,
            "parity_failures": len(failed)}


def _score(stack: contextlib.ExitStack, spec: ModelSpec, model: Any, split: Any, rows: list[dict],
           pipes: dict[str, Any], fp32_files: dict[str, Path], scratch: Path, progress: Progress) -> dict[str, Any]:
    """Every combination's accuracy beside eager and ONNX fp32 on the same batches, and its budget verdict."""
    from mmopt.judge import accuracy as ev

    fp32_pipe, _ = stack.enter_context(open_pipeline(split.components, split.output_sources, fp32_files,
                                                     {}, Path(scratch)))
    predictors = {"eager fp32": ev.eager_predictor(model, split), "onnx fp32": fp32_pipe.infer, **pipes}
    with progress.task(f"auto: score {len(predictors)} pipelines on evaluation samples",
                       spec.evaluation.samples) as advance:
        acc = ev.evaluate(spec, predictors, on_batch=advance)
    base = acc["scores"]["eager fp32"]
    for row in rows:
        row["accuracy"] = acc["scores"][row["label"]]
        budget = spec.max_accuracy_drop
        row["accuracy_ok"] = budget is None or base - row["accuracy"] <= budget
    return acc


def _choose(rows: list[dict], autos: list[str]) -> tuple[dict[str, Any], str]:
    """The fastest passing row (within timing noise of it, the more accurate, then the less quantized), and
    why it won, in words."""
    ok = [r for r in rows if r["parity_ok"] and r.get("accuracy_ok", True)]
    if ok:
        fastest = min(r["latency_ms"] for r in ok)
        near = [r for r in ok if r["latency_ms"] <= fastest * (1 + NOISE)]
        best = max(near, key=lambda r: (r.get("accuracy", 0.0),
                                        sum(CANDIDATES.index(p) for p in r["policy"].values() if p in CANDIDATES)))
        passing = (f"{len(ok)} of {len(rows)} candidates pass parity"
                   + (" and the accuracy budget" if "accuracy" in best else ""))
        if len(near) == 1:
            return best, f"the fastest passing candidate ({best['latency_ms']:.3g} ms); {passing}"
        most = [r for r in near if r.get("accuracy", 0.0) == best.get("accuracy", 0.0)]
        pick = ("the least quantized of them" if "accuracy" not in best
                else "the most accurate of them" if len(most) == 1
                else f"the least quantized of the {len(most)} most accurate")
        return best, (f"{len(near)} passing candidates are within {NOISE:.0%} of the fastest ({fastest:.3g} ms), "
                      f"which is timing noise here, so {pick}; {passing}")
    # only the accuracy budget can reject fp32 autos: the fixed part costs too much
    best = next(r for r in rows if all(r["policy"][c] == "fp32" for c in autos))
    return best, "no candidate passes parity and the accuracy budget: the auto components stay fp32"
