"""Bench gates on hand-made reports (fast and exact): baselines of another model or schema, the latency
rule per gate, rows only one run has, the failure lines, accuracy drops."""
from __future__ import annotations

import copy
import json

import pytest

from mmopt.bench import gates
from mmopt.errors import GateError, UsageError


def report(ratio: float = 0.5, p50: float = 2.0, ci: tuple[float, float] | None = None, score: float = 0.9) -> dict:
    rows = [{"variant": "eager", "graph": "pipeline", "batch": 1, "p50": 4.0, "ratio_vs_eager": 1.0,
             "ratio_reference": "eager"},
            {"variant": "onnxruntime/fp32", "graph": "pipeline", "batch": 1, "p50": p50, "ratio_vs_eager": ratio,
             "ratio_reference": "eager", "ratio_ci95": list(ci) if ci else None},
            {"variant": "onnxruntime/fp32", "graph": "image", "batch": 1, "p50": p50 / 2, "ratio_vs_eager": ratio,
             "ratio_reference": "eager"}]
    return {"kind": gates.REPORT_KIND, "schema_version": 1, "created": "now",
            "bundle": {"fingerprint": "f1", "factory": "m:f", "path": "b", "artifacts": {"a": "1"}},
            "machine": {"cpus": 2}, "settings": {"threads": 1}, "latency": rows,
            "variants": [{"id": "eager", "checks": [], "task": {"score": 0.95}},
                         {"id": "onnxruntime/fp32", "checks": [], "task": {"score": score}}]}


@pytest.mark.parametrize("limit, now, regressed", [(0.10, 0.5499, False), (0.10, 0.5501, True), (0.25, 0.6249, False),
                                                   (0.25, 0.6251, True)])
def test_the_ratio_gate_at_its_edge(limit, now, regressed):
    cmp = gates.compare(report(ratio=now), report(ratio=0.5), "base.json", limit)
    row = next(r for r in cmp["rows"] if r["graph"] == "pipeline" and r["variant"] != "eager")
    assert row["gated"] and row["regressed"] is regressed and row["change"] == pytest.approx(now / 0.5 - 1, abs=1e-4)
    eager = next(r for r in cmp["rows"] if r["variant"] == "eager")
    assert not eager["gated"] and not eager["regressed"]  # ratio 1 by definition: shown, not gated
    assert not next(r for r in cmp["rows"] if r["graph"] == "image")["gated"]


def test_the_ratio_gate_needs_the_whole_interval_beyond_the_limit():
    base = report(ratio=0.5, ci=(0.45, 0.55))
    inside = gates.compare(report(ratio=0.7, ci=(0.6, 0.8)), base, "b", 0.10)  # low end 0.6 < 0.55 * 1.1
    beyond = gates.compare(report(ratio=0.7, ci=(0.61, 0.8)), base, "b", 0.10)  # 0.61 > 0.605
    pick = lambda c: next(r for r in c["rows"] if r["gated"])  # noqa: E731
    assert not pick(inside)["regressed"] and pick(beyond)["regressed"]


def test_the_p50_gate_gates_eager_too_and_only_pipelines():
    cmp = gates.compare(report(p50=2.3), report(p50=2.0), "b", 0.10, gate_on="p50")
    gated = {(r["variant"], r["graph"]): r["regressed"] for r in cmp["rows"] if r["gated"]}
    assert gated == {("eager", "pipeline"): False, ("onnxruntime/fp32", "pipeline"): True}
    with pytest.raises(UsageError, match="--gate-on median: choose one of ratio, p50."):
        gates.compare(report(), report(), "b", 0.1, gate_on="median")


def test_another_reference_or_missing_ratios_are_shown_not_gated():
    other = report(ratio=0.1)
    for row in other["latency"]:
        row["ratio_reference"] = "eager-cuda"
    cmp = gates.compare(report(ratio=0.9), other, "b", 0.10)
    assert not any(r["gated"] or r["regressed"] for r in cmp["rows"])
    nan = report(ratio=float("nan"))
    assert not any(r["regressed"] for r in gates.compare(nan, report(), "b", 0.1)["rows"])


def test_the_comparison_record():
    base = report()
    base["latency"] = base["latency"][:2]
    base["machine"] = {"cpus": 8}
    cmp = gates.compare(report(), base, "base.json", 0.1)
    assert cmp["unmatched"] == {"only_in_baseline": 0, "only_in_this_run": 1}
    assert (cmp["path"], cmp["created"], cmp["max_latency_regression"], cmp["gate_on"]) == ("base.json", "now", 0.1,
                                                                                          "ratio")
    assert cmp["same_machine"] is False and cmp["same_artifacts"] is True and cmp["baseline_threads"] == 1
    assert cmp["tasks"] == [{"variant": "eager", "baseline_score": 0.95, "score": 0.95},
                            {"variant": "onnxruntime/fp32", "baseline_score": 0.9, "score": 0.9}]


def test_failure_lines_exactly():
    r = report(ratio=0.8, score=0.80)
    r["variants"][1]["checks"] = [{"where": "fusion@opt", "name": "logits", "failed": ["cosine 0.9 < 0.99"]}]
    r["baseline"] = gates.compare(r, report(ratio=0.5), "b", 0.10)
    g = gates.evaluate(r, 0.1)
    assert g["failures"] == [
        "parity onnxruntime/fp32 fusion@opt logits: cosine 0.9 < 0.99",
        "accuracy onnxruntime/fp32: 0.8000 vs eager 0.9500, drop 0.1500 > max_accuracy_drop 0.1",
        "latency onnxruntime/fp32 pipeline batch 1: 0.800x eager (95% interval ?-?) vs baseline 0.500x (?-?): "
        "+60.0%, beyond this run's spread and 10%"]
    assert g["passed"] is False and g["max_accuracy_drop"] == 0.1
    p = report(p50=3.0)
    p["baseline"] = gates.compare(p, report(p50=2.0), "b", 0.10, gate_on="p50")
    assert gates.evaluate(p, None)["failures"] == [
        "latency onnxruntime/fp32 pipeline batch 1: p50 3.000 ms vs baseline 2.000 ms (+50.0% > 10%)"]
    assert gates.evaluate(report(score=0.90), 0.05)["passed"] and gates.evaluate(report(score=0.89), 0.05)["failures"]
    r["gates"] = g
    with pytest.raises(GateError, match=r"^bench gates failed \(3\):\n  parity onnxruntime/fp32"):
        gates.raise_for_gates(r)
    gates.raise_for_gates({"gates": {"passed": True, "failures": []}})


def test_baselines_are_refused_with_what_to_pass(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        gates.load_baseline(tmp_path / "nope.json", 1)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"kind": "mmopt-bundle"}))
    with pytest.raises(UsageError, match="not an mmopt bench report"):
        gates.load_baseline(path, 1)
    path.write_text(json.dumps({**report(), "schema_version": 0}))
    with pytest.raises(UsageError, match="report schema 0, this mmopt writes 1"):
        gates.load_baseline(path, 1)
    broken = report()
    broken["latency"][0]["p50"] = -1
    path.write_text(json.dumps(broken))
    with pytest.raises(UsageError, match=r"field 'latency\[0\]\.p50'"):
        gates.load_baseline(path, 1)
    path.write_text(json.dumps(report()))
    assert gates.load_baseline(path, 1)["bundle"]["fingerprint"] == "f1"
    other = copy.deepcopy(report())
    other["bundle"]["fingerprint"] = "f2"
    with pytest.raises(UsageError, match="it reports another model"):
        gates.compare(report(), other, "o.json", 0.1)


def test_a_comparison_row_exactly():
    base = report(ratio=0.5, p50=2.0, ci=(0.45, 0.55))
    now = report(ratio=0.6, p50=2.5, ci=(0.58, 0.62))
    rows = gates.compare(now, base, "b.json", 0.10)["rows"]
    assert rows[1] == {"variant": "onnxruntime/fp32", "graph": "pipeline", "batch": 1, "baseline_p50": 2.0,
                       "p50": 2.5, "p50_change": 0.25, "change": 0.2, "baseline_ratio_vs_eager": 0.5,
                       "ratio_vs_eager": 0.6, "baseline_ratio_ci95": [0.45, 0.55], "ratio_ci95": [0.58, 0.62],
                       "gated": True, "regressed": False}  # +20%, but 0.58 / 0.55 - 1 = 5.5%: inside the noise
