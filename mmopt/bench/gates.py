"""Gates over a bench report: parity and accuracy of every variant, and latency against a baseline.

A baseline is an earlier report of the same model (same bundle fingerprint: model inputs, outputs and
component interfaces); a report of another model is a usage error (exit 2). Latency regressions are
judged on the pipeline medians of rows present in both runs (same variant and batch size): a
component's time shows up in its pipeline, and gating every component row too would only multiply
false alarms on a noisy machine. Component rows are still compared side by side in the report.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmopt.errors import GateError, UsageError

REPORT_KIND = "mmopt-bench-report"
_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
# What a baseline must hold for ``compare`` to read it: the whole document is checked before any use.
BASELINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "schema_version", "bundle", "latency", "variants", "machine", "settings"],
    "properties": {
        "created": {"type": ["string", "null"]},
        "bundle": {"type": "object", "required": ["fingerprint", "artifacts"],
                   "properties": {"fingerprint": {"type": "string"}, "factory": {"type": ["string", "null"]},
                                  "artifacts": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "latency": {"type": "array", "items": {
            "type": "object", "required": ["variant", "graph", "batch", "p50"],
            "properties": {"variant": {"type": "string"}, "graph": {"type": "string"},
                           "batch": {"type": "integer", "minimum": 0}, "p50": {**_NUM, "minimum": 0},
                           "ratio_vs_eager": _OPT_NUM,
                           "ratio_ci95": {"type": ["array", "null"], "minItems": 2, "maxItems": 2, "items": _NUM}}}},
        "variants": {"type": "array", "items": {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"},
                           "task": {"type": ["object", "null"], "properties": {"score": _OPT_NUM}}}}},
        "machine": {"type": "object"},
        "settings": {"type": "object", "properties": {"threads": {"type": ["integer", "null"]}}},
    },
}


def load_baseline(path: str | Path, schema_version: int) -> dict[str, Any]:
    from mmopt.manifest import read_json, validate

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--baseline {path}: no such file. Pass a report.json written by an earlier `mmopt bench`.")
    fix = "Pass the report.json that `mmopt bench` wrote, or regenerate it."
    data = read_json(path, fix, UsageError)
    if not isinstance(data, dict) or data.get("kind") != REPORT_KIND:
        raise UsageError(f"--baseline {path}: not an mmopt bench report (no \"kind\": \"{REPORT_KIND}\"). "
                         "Pass the report.json that `mmopt bench` wrote, not a bundle manifest.")
    if data.get("schema_version") != schema_version:
        raise UsageError(f"--baseline {path}: report schema {data.get('schema_version')!r}, this mmopt writes "
                         f"{schema_version}. Regenerate the baseline with this version of mmopt.")
    validate(data, BASELINE_SCHEMA, path, fix, UsageError)
    return data


def check_same_model(report: dict[str, Any], baseline: dict[str, Any], path: str | Path) -> None:
    ours, theirs = report["bundle"], baseline["bundle"]
    if ours["fingerprint"] != theirs.get("fingerprint"):
        raise UsageError(f"--baseline {path}: it reports another model (bundle fingerprint {theirs.get('fingerprint')}, "
                         f"factory {theirs.get('factory')}) than {ours['path']} (fingerprint {ours['fingerprint']}, "
                         f"factory {ours['factory']}): inputs, outputs or components differ, so latencies cannot "
                         "be compared. Use a baseline made from a bundle of this model.")


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["variant"], row["graph"], row["batch"]


GATES = ("ratio", "p50")
# what makes two reports' raw timings comparable (``same_machine`` in the comparison)
MACHINE_KEYS = ("cpus", "gpu", "processor", "platform")


def check_gate_on(gate_on: str) -> None:
    if gate_on not in GATES:
        raise UsageError(f"--gate-on {gate_on}: choose one of {', '.join(GATES)}.")


def _ratio_regressed(r: dict[str, Any], b: dict[str, Any], max_regression: float) -> tuple[float, bool]:
    """Change of the ratio to eager (measured in the same run), and whether it regressed beyond noise:
    even the low end of this run's bootstrap interval is slower than the baseline's high end by more
    than ``max_regression``. Runs without an interval (older reports) use the point ratio."""
    now, then = r.get("ratio_vs_eager"), b.get("ratio_vs_eager")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (now, then)):
        return 0.0, False
    change = now / then - 1
    low = (r.get("ratio_ci95") or [now])[0]
    high = (b.get("ratio_ci95") or [None, then])[-1]
    if not high or high <= 0:
        return change, False
    return change, low / high - 1 > max_regression


def compare(report: dict[str, Any], baseline: dict[str, Any], path: str | Path, max_regression: float,
            gate_on: str = "ratio") -> dict[str, Any]:
    """Side-by-side rows (both runs' medians, change) and which pipeline rows regress too far.

    ``gate_on="ratio"`` (default) gates each variant's ratio to eager measured in the same run, and only
    beyond that run's own spread: a loaded machine slows eager and the artifact alike, so the ratio holds
    where raw p50 swings by tens of percent. ``gate_on="p50"`` gates raw medians, for a dedicated runner.
    The eager reference itself (ratio 1 by definition) is gated only by p50."""
    check_gate_on(gate_on)
    check_same_model(report, baseline, path)
    old = {_key(r): r for r in baseline["latency"]}
    rows = []
    for r in report["latency"]:
        b = old.get(_key(r))
        if b is None:
            continue
        p50_change = r["p50"] / b["p50"] - 1 if b["p50"] > 0 else 0.0
        is_reference = r["variant"] == r.get("ratio_reference")
        # a ratio to another reference (eager-cuda here, CPU eager there) does not compare: shown, not gated
        same_reference = r.get("ratio_reference") == b.get("ratio_reference")
        if gate_on == "p50":
            change, beyond = p50_change, p50_change > max_regression
        elif is_reference or not same_reference:
            change, beyond = p50_change, False  # its ratio is 1 by definition: reported, not gated
        else:
            change, beyond = _ratio_regressed(r, b, max_regression)
        gated = r["graph"] == "pipeline" and (gate_on == "p50" or (not is_reference and same_reference))
        rows.append({"variant": r["variant"], "graph": r["graph"], "batch": r["batch"],
                     "baseline_p50": b["p50"], "p50": r["p50"], "p50_change": round(p50_change, 4),
                     "change": round(change, 4),
                     "baseline_ratio_vs_eager": b.get("ratio_vs_eager"), "ratio_vs_eager": r.get("ratio_vs_eager"),
                     "baseline_ratio_ci95": b.get("ratio_ci95"), "ratio_ci95": r.get("ratio_ci95"),
                     "gated": gated, "regressed": gated and beyond})
    now = {_key(r) for r in report["latency"]}
    unmatched = {"only_in_baseline": len(set(old) - now), "only_in_this_run": len(now - set(old))}
    old_tasks = {v["id"]: v.get("task") for v in baseline["variants"]}
    tasks = [{"variant": v["id"], "baseline_score": (old_tasks.get(v["id"]) or {}).get("score"),
              "score": v["task"]["score"]} for v in report["variants"] if v.get("task")]
    same_machine = all(baseline["machine"].get(k) == report["machine"].get(k) for k in MACHINE_KEYS)
    return {"path": str(path), "created": baseline.get("created"), "max_latency_regression": max_regression,
            "gate_on": gate_on,
            "same_machine": same_machine, "same_artifacts": baseline["bundle"].get("artifacts") ==
            report["bundle"]["artifacts"], "unmatched": unmatched, "rows": rows, "tasks": tasks,
            "baseline_threads": baseline["settings"].get("threads")}


def evaluate(report: dict[str, Any], max_accuracy_drop: float | None) -> dict[str, Any]:
    """Every failing gate as one line: parity per output, accuracy drop vs eager, latency regressions."""
    failures = []
    eager_score = next((v["task"]["score"] for v in report["variants"] if v["id"] == "eager" and v.get("task")), None)
    for v in report["variants"]:
        for c in v["checks"]:
            if c["failed"]:
                failures.append(f"parity {v['id']} {c['where']} {c['name']}: {'; '.join(c['failed'])}")
        score = (v.get("task") or {}).get("score")
        if max_accuracy_drop is not None and score is not None and eager_score is not None \
                and eager_score - score > max_accuracy_drop:
            failures.append(f"accuracy {v['id']}: {score:.4f} vs eager {eager_score:.4f}, drop "
                            f"{eager_score - score:.4f} > max_accuracy_drop {max_accuracy_drop}")
    base = report.get("baseline")
    if base:
        for r in base["rows"]:
            if r["regressed"] and base["gate_on"] == "p50":
                failures.append(f"latency {r['variant']} {r['graph']} batch {r['batch']}: p50 {r['p50']:.3f} ms vs "
                                f"baseline {r['baseline_p50']:.3f} ms (+{r['change']:.1%} > "
                                f"{base['max_latency_regression']:.0%})")
            elif r["regressed"]:
                ci, bci = r.get("ratio_ci95") or ["?", "?"], r.get("baseline_ratio_ci95") or ["?", "?"]
                failures.append(f"latency {r['variant']} {r['graph']} batch {r['batch']}: {r['ratio_vs_eager']:.3f}x "
                                f"eager (95% interval {ci[0]}-{ci[1]}) vs baseline {r['baseline_ratio_vs_eager']:.3f}x "
                                f"({bci[0]}-{bci[1]}): +{r['change']:.1%}, beyond this run's spread and "
                                f"{base['max_latency_regression']:.0%}")
    return {"passed": not failures, "failures": failures, "max_accuracy_drop": max_accuracy_drop}


def raise_for_gates(report: dict[str, Any], result: object = None) -> None:
    gates = report["gates"]
    if gates["passed"]:
        return
    lines = "\n".join(f"  {f}" for f in gates["failures"])
    raise GateError(f"bench gates failed ({len(gates['failures'])}):\n{lines}", result)
