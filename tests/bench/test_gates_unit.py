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


# ---- edges (the mutation run, group gates, leans on these) -------------------------------------------

def ratio_rows(now: dict, then: dict, limit: float = 0.1) -> tuple[float, bool]:
    return gates._ratio_regressed(now, then, limit)


@pytest.mark.parametrize("now", [None, float("nan"), float("inf"), 0.0, -0.5, "0.5"])
def test_a_ratio_that_is_not_a_positive_number_is_not_gated(now):
    assert ratio_rows({"ratio_vs_eager": now}, {"ratio_vs_eager": 0.5}) == (0.0, False)
    assert ratio_rows({"ratio_vs_eager": 0.5}, {"ratio_vs_eager": now}) == (0.0, False)


def test_the_ratio_rule_at_exactly_its_limit_and_without_a_usable_interval():
    now = {"ratio_vs_eager": 0.8, "ratio_ci95": [0.75, 0.85]}
    assert ratio_rows(now, {"ratio_vs_eager": 0.5, "ratio_ci95": [0.45, 0.5]}, 0.5) == (pytest.approx(0.6), False)
    assert ratio_rows(now, {"ratio_vs_eager": 0.5, "ratio_ci95": [0.45, 0.5]}, 0.4999) == (pytest.approx(0.6), True)
    # a baseline interval that ends at or below zero says nothing: the change is shown, not gated
    assert ratio_rows(now, {"ratio_vs_eager": 0.5, "ratio_ci95": [0.0, 0.0]}) == (pytest.approx(0.6), False)
    assert ratio_rows(now, {"ratio_vs_eager": 0.5, "ratio_ci95": [-1.0, -0.5]}) == (pytest.approx(0.6), False)
    # no interval on either side: the point ratios
    assert ratio_rows({"ratio_vs_eager": 0.75}, {"ratio_vs_eager": 0.5}, 0.5) == (0.5, False)
    assert ratio_rows({"ratio_vs_eager": 0.76}, {"ratio_vs_eager": 0.5}, 0.5)[1] is True


def test_rows_the_baseline_lacks_are_skipped_and_the_rest_compared():
    base = report()
    base["latency"] = base["latency"][1:]  # no eager row: the first row of this run has no partner
    rows = gates.compare(report(), base, "b", 0.1)["rows"]
    assert [(r["variant"], r["graph"]) for r in rows] == [("onnxruntime/fp32", "pipeline"), ("onnxruntime/fp32", "image")]


def test_p50_changes_exactly():
    base = report(p50=0.5)
    rows = gates.compare(report(p50=0.75), base, "b", 0.5, gate_on="p50")["rows"]
    assert rows[1]["p50_change"] == 0.5 and rows[1]["change"] == 0.5 and rows[1]["regressed"] is False  # at the limit
    assert gates.compare(report(p50=0.7501), base, "b", 0.5, gate_on="p50")["rows"][1]["regressed"] is True
    zero = report(p50=0.0)
    assert gates.compare(report(p50=1.0), zero, "b", 0.1)["rows"][1]["p50_change"] == 0.0
    fine = gates.compare(report(p50=2.00003), report(p50=2.0), "b", 0.1, gate_on="p50")["rows"][1]
    assert fine["p50_change"] == 0.0 and fine["change"] == 0.0  # rounded to 4 places
    # the eager row under the ratio gate: its p50 change, shown and never gated
    eager = report()
    eager["latency"][0]["p50"] = 6.0
    row = gates.compare(eager, report(), "b", 0.1)["rows"][0]
    assert (row["change"], row["gated"], row["regressed"]) == (0.5, False, False)


@pytest.mark.parametrize("key", gates.MACHINE_KEYS)
def test_same_machine_means_every_machine_key_equal(key):
    machine = {"cpus": 2, "gpu": "none", "processor": "x86_64", "platform": "Linux"}
    now, base = report(), report()
    now["machine"], base["machine"] = dict(machine), {**machine, key: "other"}
    assert gates.compare(now, base, "b", 0.1)["same_machine"] is False
    base["machine"] = {**machine, "hostname": "elsewhere"}  # not a timing-relevant key
    assert gates.compare(now, base, "b", 0.1)["same_machine"] is True


def test_another_model_is_refused_with_both_fingerprints_exactly():
    other = report()
    other["bundle"] = {**other["bundle"], "fingerprint": "f2", "factory": "n:g"}
    with pytest.raises(UsageError) as e:
        gates.compare(report(), other, "o.json", 0.1)
    assert str(e.value) == ("--baseline o.json: it reports another model (bundle fingerprint f2, factory n:g) than b "
                            "(fingerprint f1, factory m:f): inputs, outputs or components differ, so latencies cannot "
                            "be compared. Use a baseline made from a bundle of this model.")


def test_baseline_refusals_exactly(tmp_path):
    path = tmp_path / "r.json"
    fix = "Pass the report.json that `mmopt bench` wrote, or regenerate it."
    path.write_text("{")
    with pytest.raises(UsageError) as e:
        gates.load_baseline(path, 1)
    assert str(e.value).startswith(f"{path}: not valid JSON (") and str(e.value).endswith(f"). {fix}")
    path.write_text(json.dumps({"kind": "mmopt-bundle"}))
    with pytest.raises(UsageError) as e:
        gates.load_baseline(path, 1)
    assert str(e.value) == (f"--baseline {path}: not an mmopt bench report (no \"kind\": \"mmopt-bench-report\"). "
                            "Pass the report.json that `mmopt bench` wrote, not a bundle manifest.")
    broken = report()
    del broken["machine"]
    path.write_text(json.dumps(broken))
    with pytest.raises(UsageError) as e:
        gates.load_baseline(path, 1)
    assert str(e.value) == f"{path}: field '(top level)': 'machine' is a required property. {fix}"


def test_failure_lines_with_intervals_and_several_reasons_exactly():
    r = report(ratio=0.8, ci=(0.78, 0.82))
    r["variants"][1]["checks"] = [{"where": "fusion@opt", "name": "logits", "failed": ["a", "b"]}]
    r["baseline"] = gates.compare(r, report(ratio=0.5, ci=(0.45, 0.55)), "b", 0.10)
    assert gates.evaluate(r, None)["failures"] == [
        "parity onnxruntime/fp32 fusion@opt logits: a; b",
        "latency onnxruntime/fp32 pipeline batch 1: 0.800x eager (95% interval 0.78-0.82) vs baseline 0.500x "
        "(0.45-0.55): +60.0%, beyond this run's spread and 10%"]


def test_the_accuracy_gate_reads_eagers_score_wherever_eager_is_listed():
    r = report(score=0.5)
    r["variants"].reverse()  # eager listed last
    r["variants"][1]["task"] = {"score": 0.75}
    assert gates.evaluate(r, 0.25)["passed"] is True  # a drop of exactly the limit passes
    assert gates.evaluate(r, 0.2499)["failures"] == [
        "accuracy onnxruntime/fp32: 0.5000 vs eager 0.7500, drop 0.2500 > max_accuracy_drop 0.2499"]
    del r["variants"][1]["task"]  # no eager score: nothing to compare against
    assert gates.evaluate(r, 0.01)["passed"] is True


def test_the_gate_error_lists_every_failure_and_carries_the_result():
    result = object()
    with pytest.raises(GateError) as e:
        gates.raise_for_gates({"gates": {"passed": False, "failures": ["one", "two"]}}, result)
    assert str(e.value) == "bench gates failed (2):\n  one\n  two" and e.value.result is result
