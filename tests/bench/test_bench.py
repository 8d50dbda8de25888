"""mmopt bench on the toy bundle: report schema and files, gates that must fail, and bad input.

One short bench run (batches 1 and 8, few repeats) is shared; the rest edit its report or fail before
measuring. No assertion depends on how fast anything ran.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from support import run_cli

from mmopt.api import bench
from mmopt.bench import gates
from mmopt.errors import GateError, MmoptError, UsageError
from mmopt.manifest import Manifest

FAST = dict(batches=[1, 8], repeats=3, warmup=1)


@pytest.fixture(scope="module")
def toy_report(toy_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bench(toy_bundle.bundle, out / "report", **FAST)


def test_report_schema(toy_report):
    r = json.loads(toy_report.files["json"].read_text())
    assert r["schema_version"] == 1 and r["kind"] == "mmopt-bench-report"
    assert {"bundle", "machine", "tools", "settings", "skipped", "variants", "latency", "memory", "gates",
            "baseline"} <= set(r)
    assert set(r["tools"]) >= {"torch", "onnxruntime", "numpy", "python"}
    assert r["settings"]["batches"] == [1, 8] and r["settings"]["threads"] == 1
    ids = [v["id"] for v in r["variants"]]
    assert ids[0] == "eager" and "onnxruntime/fp32" in ids
    ort = r["variants"][ids.index("onnxruntime/fp32")]
    assert set(ort["parity"]) == {"image", "text", "fusion", "pipeline"} and ort["failed"] == 0
    check = ort["checks"][0]
    assert {"where", "name", "max_abs", "max_rel", "cos_min", "cos_mean", "argmax", "nan", "inf", "failed"} <= set(check)
    assert isinstance(ort["memory"]["host_rss_delta_mb"], (int, float))
    rows = {(x["variant"], x["graph"], x["batch"]) for x in r["latency"]}
    assert rows == {(v, g, b) for v in ids for g in ("image", "text", "fusion", "pipeline") for b in (1, 8)}
    row = r["latency"][0]
    assert {"p50", "p90", "p99", "mean", "std", "throughput", "ratio_vs_eager", "n"} <= set(row)
    assert row["n"] == 3
    from mmopt.bench.backends import BACKENDS, unavailable
    from mmopt.manifest import Manifest

    manifest = Manifest.read(toy_report.report["bundle"]["path"])
    assert {s["backend"] for s in r["skipped"]} == {b for b in BACKENDS if unavailable(b, manifest)}
    assert all("not available here" in s["reason"] for s in r["skipped"])
    assert r["gates"] == {"passed": True, "failures": [], "max_accuracy_drop": None}


def test_markdown_and_png_written(toy_report):
    md = toy_report.files["markdown"].read_text()
    for heading in ("## mmopt bench: gates passed", "### Parity vs eager", "### Pipeline latency",
                    "### Component latency at batch 8", "### Memory", "![latency vs parity"):
        assert heading in md
    assert "| onnxruntime/fp32 | pipeline |" in md and "skipped **tensorrt**" in md
    from PIL import Image

    data = toy_report.files["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(toy_report.files["png"]).convert("RGB")
    assert image.size == (1500, 650)
    # every variant with latency rows drawn in its own colour (matplotlib's C0, C1, ... in variant order)
    from matplotlib.colors import to_rgb

    drawn = {rgb for _, rgb in image.getcolors(1 << 20)}
    timed = {r["variant"] for r in toy_report.report["latency"]}
    for i, v in enumerate(x["id"] for x in toy_report.report["variants"]):
        if v in timed:
            assert tuple(round(c * 255) for c in to_rgb(f"C{i}")) in drawn, f"{v}'s colour C{i} is not in the plot"


def _degrade(bundle: Path, comp: str = "fusion") -> None:
    """Perturb the largest initializer of ``comp`` and re-record its hash: a bad artifact, not a tampered one."""
    path = bundle / f"{comp}.onnx"
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(path))
    m = Manifest.read(bundle)
    a = m.artifact(comp)
    m.add(bundle, comp, a.stage, a.precision, a.file, a.parent, a.config, **a.extra)
    m.write(bundle)


def test_degraded_artifact_fails_parity(toy_bundle, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(toy_bundle.bundle, b)
    _degrade(b)
    r = run_cli("bench", str(b), "--batch", "8", "--repeats", "2", "--warmup", "0", "-o", str(tmp_path / "rep"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "gate(s) failed" in r.stdout
    assert "parity onnxruntime/fp32 fusion@" in r.stderr and "parity onnxruntime/fp32 pipeline@" in r.stderr
    assert "parity onnxruntime/fp32 image@" not in r.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())  # written even though gates failed
    assert report["gates"]["passed"] is False
    assert "## mmopt bench: gates FAILED" in (tmp_path / "rep" / "report.md").read_text()


def test_faster_baseline_fails_the_p50_gate(toy_bundle, toy_report, tmp_path):
    """--gate-on p50 (a dedicated runner): raw medians 4x slower than the baseline fail, eager included."""
    faster = copy.deepcopy(toy_report.report)
    for row in faster["latency"]:
        row["p50"] /= 4
    base = tmp_path / "base.json"
    base.write_text(json.dumps(faster))
    with pytest.raises(GateError, match=r"latency onnxruntime/fp32 pipeline batch 8: p50 .* vs baseline") as e:
        bench(toy_bundle.bundle, tmp_path / "rep", baseline=base, gate_on="p50", **FAST)
    report = e.value.result.report
    rows = report["baseline"]["rows"]
    assert all(r["regressed"] == (r["graph"] == "pipeline") for r in rows)  # components shown, not gated
    assert "### Against baseline" in (tmp_path / "rep" / "report.md").read_text()
    assert "latency" not in " ".join(f for f in report["gates"]["failures"] if f.startswith("parity"))


def test_a_machine_4x_slower_everywhere_is_no_regression_by_default(toy_report):
    """The default gate is the ratio to eager from the same run: a slower (or busier) machine slows eager
    and the artifacts alike, so raw p50 4x off the baseline is no failure."""
    faster = copy.deepcopy(toy_report.report)
    for row in faster["latency"]:
        row["p50"] /= 4
    report = copy.deepcopy(toy_report.report)
    report["baseline"] = gates.compare(report, faster, "base.json", 0.10)
    assert not any(r["regressed"] for r in report["baseline"]["rows"])
    assert gates.evaluate(report, None)["passed"]


def test_an_artifact_slower_relative_to_eager_fails_the_ratio_gate(toy_report):
    report = copy.deepcopy(toy_report.report)
    for row in report["latency"]:  # a measured spread of +-5% (this toy run has only 3 rounds)
        row["ratio_ci95"] = [row["ratio_vs_eager"] * 0.95, row["ratio_vs_eager"] * 1.05]
    base = copy.deepcopy(report)
    for row in base["latency"]:
        if row["variant"] != row["ratio_reference"]:  # the artifact was twice as fast relative to eager
            row["ratio_vs_eager"] /= 2
            row["ratio_ci95"] = [v / 2 for v in row["ratio_ci95"]]
    report["baseline"] = gates.compare(report, base, "base.json", 0.10)
    gated = [r for r in report["baseline"]["rows"] if r["gated"]]
    within = copy.deepcopy(report)  # the same change inside a wide spread is noise, not a regression
    for row in within["latency"]:
        row["ratio_ci95"] = [row["ratio_vs_eager"] * 0.3, row["ratio_vs_eager"] * 3]
    assert not any(r["regressed"] for r in gates.compare(within, base, "base.json", 0.10)["rows"])
    assert gated and all(r["regressed"] for r in gated) and all(r["variant"] != "eager" for r in gated)
    failures = gates.evaluate(report, None)["failures"]
    assert any("beyond this run's spread" in f and "onnxruntime/fp32 pipeline" in f for f in failures)


def test_ratios_to_different_references_are_shown_not_gated(toy_report):
    """A baseline that measured against another reference (eager-cuda there, CPU eager here) does not
    compare by ratio: the rows are information, never a regression."""
    base = copy.deepcopy(toy_report.report)
    for row in base["latency"]:
        row["ratio_reference"] = "eager-cuda"
        row["ratio_vs_eager"] /= 10
    report = copy.deepcopy(toy_report.report)
    rows = gates.compare(report, base, "base.json", 0.10)["rows"]
    assert rows and not any(r["gated"] or r["regressed"] for r in rows)


def test_ratio_interval_brackets_the_ratio_and_is_seeded():
    from mmopt.judge import latency

    rng = np.random.default_rng(0)
    ref = list(rng.integers(900, 1100, 40))
    art = [int(r * 0.5 + rng.integers(-20, 20)) for r in ref]
    lo, hi = latency.paired_ratio_interval(art, ref)
    assert lo <= latency.paired_ratio(art, ref) <= hi and 0.45 < lo < hi < 0.55
    assert (lo, hi) == latency.paired_ratio_interval(art, ref)


def test_the_same_bundle_benched_twice_on_a_loaded_machine_passes_its_own_baseline(toy_bundle, tmp_path):
    """Two back-to-back runs with a CPU hog beside them: the second gates on the first and passes."""
    import subprocess
    import sys

    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 120: pass"])
    try:
        first = bench(toy_bundle.bundle, tmp_path / "a", batches=[1, 8], repeats=15, warmup=2)
        second = bench(toy_bundle.bundle, tmp_path / "b", baseline=first.files["json"], batches=[1, 8], repeats=15,
                       warmup=2)
    finally:
        hog.kill()
    assert second.passed, second.report["gates"]["failures"]


@pytest.mark.parametrize("gate_on", ["ratio", "p50"])
@pytest.mark.parametrize("limit, slower, regressed", [(0.10, 1.08, False), (0.10, 1.12, True),
                                                      (0.25, 1.20, False), (0.25, 1.30, True)])
def test_the_latency_gate_at_its_boundary(toy_report, gate_on, limit, slower, regressed):
    """The pipeline is ``slower`` than its baseline (ratio to eager, or raw p50): it regresses exactly when
    that exceeds ``--max-latency-regression``. Rows only one run has are counted, never gated."""
    report = copy.deepcopy(toy_report.report)
    base = copy.deepcopy(report)
    for row in (*report["latency"], *base["latency"]):
        row.pop("ratio_ci95", None)  # point values: the boundary itself, no measured spread
    for row in base["latency"]:
        row["p50"] /= slower
        if row["variant"] != row["ratio_reference"]:
            row["ratio_vs_eager"] /= slower
    dropped = base["latency"].pop()
    cmp = gates.compare(report, base, "base.json", limit, gate_on=gate_on)
    gated = [r for r in cmp["rows"] if r["gated"]]
    assert gated and all(r["graph"] == "pipeline" for r in gated)
    if gate_on == "ratio":
        assert all(r["variant"] != "eager" for r in gated)  # its ratio is 1 by definition
    assert {r["regressed"] for r in gated} == {regressed}
    assert all(abs(r["change"] - (slower - 1)) < 1e-3 for r in gated)
    assert cmp["unmatched"] == {"only_in_baseline": 0, "only_in_this_run": 1}
    assert (dropped["variant"], dropped["graph"], dropped["batch"]) not in \
        {(r["variant"], r["graph"], r["batch"]) for r in cmp["rows"]}
    report["baseline"] = cmp
    assert gates.evaluate(report, None)["passed"] is not regressed


def test_accuracy_gate(toy_report):
    report = copy.deepcopy(toy_report.report)
    for v, score in zip(report["variants"], (0.90, 0.80)):
        v["task"] = {"metric": "accuracy", "output": "output", "samples": 10, "score": score}
    assert gates.evaluate(report, 0.2)["passed"]
    failed = gates.evaluate(report, 0.05)["failures"]
    assert failed == ["accuracy onnxruntime/fp32: 0.8000 vs eager 0.9000, drop 0.1000 > max_accuracy_drop 0.05"]


def test_baseline_from_another_bundle_is_usage_error(toy_report, tmp_path):
    other = copy.deepcopy(toy_report.report)
    other["bundle"]["fingerprint"] = "0123456789abcdef"
    other["bundle"]["factory"] = "clip:build"
    base = tmp_path / "other.json"
    base.write_text(json.dumps(other))
    bundle = toy_report.report["bundle"]["path"]
    r = run_cli("bench", bundle, "--baseline", str(base), "-o", str(tmp_path / "rep"))
    assert r.returncode == 2 and "reports another model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "rep").exists()
    manifest_as_baseline = Path(bundle) / "manifest.json"
    with pytest.raises(UsageError, match="not an mmopt bench report"):
        gates.load_baseline(manifest_as_baseline, 1)
    with pytest.raises(UsageError, match="no such file"):
        gates.load_baseline(tmp_path / "missing.json", 1)


def test_tampered_bundle(toy_bundle, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(toy_bundle.bundle, b)
    with open(b / "text.onnx", "ab") as f:
        f.write(b"\0")
    (b / "image.onnx").unlink()
    r = run_cli("bench", str(b), "-o", str(tmp_path / "rep"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "text.onnx: sha256 mismatch" in r.stderr and "image.onnx: missing" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--backend", "tensorrt"], "requested backend not available here"),
    (["--backend", "cuda"], "onnxruntime-cuda: onnxruntime here has no CUDAExecutionProvider"),
    (["--backend", "tpu"], "--backend tpu: unknown"),
    (["--batch", "64"], "--batch 64: outside the exported range of dim 'batch' [1, 32]"),
    (["--batch", "0,8"], "--batch 0: outside the exported range"),
    (["--batch", "two"], "--batch 'two': batch sizes are positive integers"),
    (["--inputs", "evaluation"], "--inputs evaluation: choose random"),
    (["--max-latency-regression", "fast"], "--max-latency-regression 'fast'"),
])
def test_bad_options_exit_2(toy_bundle, tmp_path, args, message):
    from mmopt.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", str(toy_bundle.bundle), "-o", str(tmp_path / "rep"), *args])
    assert isinstance(result.exception, MmoptError) and result.exception.exit_code == 2
    assert message in str(result.exception)
    assert not (tmp_path / "rep").exists()


DATA = '''
import numpy as np
import torch


def _inputs(rng, n, seq):
    mask = np.arange(seq)[None] < rng.integers(seq // 2 + 1, seq + 1, (n, 1))
    return {"pixel_values": rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(0, 50, (n, seq)), "attention_mask": mask}


def evaluation():
    """Labels are the eager model's own answers, so eager scores 1.0 and artifacts score their agreement."""
    from toy import build

    model, rng = build(), np.random.default_rng(0)
    for seq in (6, 9):
        x = _inputs(rng, 40, seq)
        with torch.no_grad():
            labels = model(**{k: torch.from_numpy(v) for k, v in x.items()}).argmax(-1).numpy()
        yield x, labels


def calibration():
    rng = np.random.default_rng(1)
    for _ in range(2):
        yield _inputs(rng, 16, 8)
'''


def test_task_score_and_user_data(toy_dir, tmp_path):
    """[evaluation] data: every variant gets a task score and parity on that data; --inputs evaluation
    times on the same data (re-cut to the exported batch range: 40-row batches become 32 + 8)."""
    (toy_dir.dir / "toydata.py").write_text(DATA)
    cfg = toy_dir(extra='[evaluation]\nsource = "toydata:evaluation"\noutput = "output"\n'
                        '[calibration]\nsource = "toydata:calibration"\n')
    from mmopt.api import export

    export(cfg, tmp_path / "bundle")
    r = bench(tmp_path / "bundle", tmp_path / "rep", inputs="evaluation", batches=[4], repeats=2, warmup=0).report
    eager, ort = r["variants"][0], r["variants"][1]
    assert eager["task"] == {"metric": "accuracy", "output": "output", "samples": 80, "score": 1.0}
    assert ort["task"]["score"] == 1.0 and ort["parity"]["pipeline"]["failed"] == 0
    # the first evaluation batches are parity cases, every component and the pipeline, as in quantize
    data = [c for c in ort["checks"] if c["where"].startswith("pipeline@data")]
    assert ort["parity"]["pipeline"]["outputs"] == 3 and ort["parity"]["pipeline on data"]["outputs"] == len(data)
    assert 1 <= len(data) <= 4 and all(c["shape"][1:] == [5] for c in data)
    assert any(c["where"].startswith("image@data") for c in ort["checks"])
    assert ort["task"]["vs_eager"]["cos_min"] > 0.9999
    assert r["settings"]["inputs"] == "evaluation"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "### Task score (accuracy of `output`, 80 samples)" in md
    r2 = bench(tmp_path / "bundle", None, inputs="calibration", batches=[32], repeats=1, warmup=0).report
    assert {x["batch"] for x in r2["latency"]} == {32}  # 16-row calibration batch tiled to 32


def test_every_precision_in_the_bundle_is_benched(toy_bundle, tmp_path):
    """fp16 / int8-dynamic artifacts beside the fp32 ones (as the precision stage writes them) each become
    a variant judged by its own precision's tolerance; a component without one keeps its fp32 graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.float16 import convert_float_to_float16

    b = tmp_path / "bundle"
    shutil.copytree(toy_bundle.bundle, b)
    m = Manifest.read(b)
    for comp in m.components:
        src = onnx.load(str(b / f"{comp}.onnx"))
        onnx.save(convert_float_to_float16(src, keep_io_types=True), str(b / f"{comp}.fp16.onnx"))
        m.add(b, comp, "precision", "fp16", f"{comp}.fp16.onnx", parent=f"{comp}/export/fp32")
    quantize_dynamic(str(b / "text.onnx"), str(b / "text.int8-dynamic.onnx"), weight_type=QuantType.QInt8)
    m.add(b, "text", "precision", "int8-dynamic", "text.int8-dynamic.onnx", parent="text/export/fp32")
    m.write(b)
    r = bench(b, None, batches=[8], repeats=2, warmup=0).report
    by_id = {v["id"]: v for v in r["variants"]}
    assert list(by_id) == ["eager", "onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8-dynamic"]
    assert by_id["onnxruntime/fp16"]["artifacts"] == {c: f"{c}/precision/fp16" for c in m.components}
    assert by_id["onnxruntime/int8-dynamic"]["artifacts"] == {"image": "image/export/fp32",
                                                              "text": "text/precision/int8-dynamic",
                                                              "fusion": "fusion/export/fp32"}
    fp16 = by_id["onnxruntime/fp16"]
    assert fp16["failed"] == 0 and fp16["parity"]["pipeline"]["max_abs"] > 1e-6  # really ran in fp16
    assert {x["variant"] for x in r["latency"]} == set(by_id)


def test_bench_measures_the_mixed_policies_quantize_judged(toy_dir, tmp_path):
    """A mixed policy quantize judged is a bench variant; re-converting one of its artifacts forgets it
    (the policy is stored as a mapping in the manifest, never parsed back from its label)."""
    from mmopt.api import export, quantize

    export(toy_dir(), tmp_path / "b")
    quantize(tmp_path / "b", precision={"image": "int8-dynamic", "text": "fp16"}, sensitivity=False)
    policies = json.loads((tmp_path / "b" / "manifest.json").read_text())["results"]["policies"]
    assert list(policies.values()) == [{"image": "int8-dynamic", "text": "fp16", "fusion": "fp32"}]
    r = bench(tmp_path / "b", None, batches=[2], repeats=1, warmup=0).report
    by_id = {v["id"]: v for v in r["variants"]}
    mixed = by_id["onnxruntime/image=int8-dynamic+text=fp16"]
    assert mixed["precision"] == "mixed" and mixed["failed"] == 0
    assert mixed["precisions"] == {"image": "int8-dynamic", "text": "fp16", "fusion": "fp32"}
    assert {"onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8-dynamic"} <= set(by_id)
    assert any(row["variant"] == mixed["id"] and row["graph"] == "pipeline" for row in r["latency"])

    quantize(tmp_path / "b", precision={"text": "fp16"}, sensitivity=False)  # rewrites text.fp16.onnx
    policies = json.loads((tmp_path / "b" / "manifest.json").read_text())["results"]["policies"]
    assert list(policies.values()) == [{"image": "fp32", "text": "fp16", "fusion": "fp32"}]
    r = bench(tmp_path / "b", None, batches=[2], repeats=1, warmup=0).report
    assert not [v for v in r["variants"] if v["precision"] == "mixed"]


def test_fp16_on_onnxruntime_cpu_is_judged_on_its_emulation(toy_dir, tmp_path):
    """ONNX Runtime CPU computes much of an fp16 graph in fp32; bench judges the emulation that keeps fp16
    rounding (as quantize does) and times the graph as written."""
    from mmopt.api import export, quantize
    from mmopt.bench import backends
    from mmopt.manifest import Manifest
    from mmopt.reference import load
    from mmopt.runners.onnxrt import OnnxRuntimeRunner

    export(toy_dir(), tmp_path / "b")
    quantize(tmp_path / "b", precision={"text": "fp16"}, sensitivity=False)
    m = Manifest.read(tmp_path / "b")
    ref = load(tmp_path / "b", m)
    (v,) = [v for v in backends.variants(m, ["onnxruntime"]) if v.id == "onnxruntime/fp16"]
    with backends.open_variant(v, tmp_path / "b", ref.model, ref.split, 1, tmp_path) as o:
        assert type(o.components["text"]) is OnnxRuntimeRunner and o.components["text"].path.name == "text.fp16.onnx"
        assert o.judged["text"].path.name.endswith(".emulated.onnx") and o.judged_whole is not o.whole
