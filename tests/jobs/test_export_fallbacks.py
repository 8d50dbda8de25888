"""Behaviours the audit found untested: the raw-export fallbacks of export (onnxsim failing, or a simplified
graph failing parity), ``mmopt export --engine`` wiring, and stale results after re-quantizing."""
from __future__ import annotations

import re

import onnx
import pytest
from typer.testing import CliRunner

from mmopt import api
from mmopt.jobs import export as export_job
from mmopt.stages.export import Simplified


def test_a_simplified_graph_that_fails_parity_is_replaced_by_the_raw_export(toy_dir, monkeypatch):
    real = export_job.simplify

    def breaking(src, dst):  # onnxsim "succeeds" but changes the fusion's numbers
        result = real(src, dst)
        if dst.name == "fusion.onnx":
            proto = onnx.load(str(dst))
            init = max(proto.graph.initializer, key=lambda t: onnx.numpy_helper.to_array(t).size)
            arr = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            onnx.save(proto, str(dst))
        return result

    monkeypatch.setattr(export_job, "simplify", breaking)
    r = api.export(toy_dir(), toy_dir.dir / "b")
    fusion = r.manifest.artifact("fusion")
    assert fusion.config["simplify"] == "simplified graph failed parity; kept the unsimplified export"
    assert re.fullmatch(r"\d+ -> \d+ nodes.*", r.manifest.artifact("image").config["simplify"])  # still simplified
    assert r.manifest.results["parity"]["fp32"]["pipeline"]["failed"] == 0


def test_when_onnxsim_fails_the_raw_export_is_the_bundles_graph(toy_dir, monkeypatch):
    monkeypatch.setattr(export_job, "simplify",
                        lambda src, dst: Simplified(False, 7, reason="onnxsim failed: RuntimeError: boom"))
    r = api.export(toy_dir(), toy_dir.dir / "b")
    assert {a.config["simplify"] for a in r.manifest.artifacts} == {"onnxsim failed: RuntimeError: boom"}
    assert all((toy_dir.dir / "b" / f"{c}.onnx").is_file() for c in r.manifest.components)
    assert r.manifest.results["parity"]["fp32"]["pipeline"]["failed"] == 0


def test_export_with_engine_builds_every_graph(toy_dir, monkeypatch):
    """`mmopt export --engine` hands the new bundle to the build job (TensorRT faked: it cannot exist here)."""
    from support import TESTS

    monkeypatch.syspath_prepend(str(TESTS / "trt"))  # the TensorRT test helpers
    from trt_fake_bundle import FAKE_ENV, FakeEngineWriter

    from mmopt.cli import app
    from mmopt.jobs import build
    from mmopt_runtime.trt import api as trt_api

    writer = FakeEngineWriter()
    monkeypatch.setattr(build, "preflight", lambda: FAKE_ENV)
    monkeypatch.setattr(trt_api, "build_engine", writer)
    out = toy_dir.dir / "b"
    result = CliRunner().invoke(app, ["export", str(toy_dir()), "-o", str(out), "--engine"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert sorted(c[0] for c in writer.calls) == ["fusion.onnx", "image.onnx", "text.onnx"]
    engines = [a for a in api.inspect_bundle(out).artifacts if a.stage == "engine"]
    assert sorted(a.component for a in engines) == ["fusion", "image", "text"]
    assert "image.fp32.engine" in result.output


def test_requantizing_drops_the_results_of_the_replaced_artifact(toy_dir):
    """A mixed policy judged with image.fp16.onnx loses its parity, policy and score rows once that file is
    rewritten by another conversion; results of untouched artifacts stay."""
    b = toy_dir.dir / "b"
    api.export(toy_dir(), b)
    api.quantize(b, precision={"image": "fp16", "text": "int8-dynamic"}, sensitivity=False)
    m = api.inspect_bundle(b)
    assert "image=fp16 text=int8-dynamic fusion=fp32" in m.results["policies"] and "mixed" in m.results["parity"]
    api.quantize(b, precision={"text": "fp16"}, sensitivity=False)  # text.fp16 is new: the mixed row stays
    assert "image=fp16 text=int8-dynamic fusion=fp32" in api.inspect_bundle(b).results["policies"]
    api.quantize(b, precision={"image": "fp16"}, sensitivity=False)  # image.fp16.onnx rewritten
    m = api.inspect_bundle(b)
    assert "image=fp16 text=int8-dynamic fusion=fp32" not in m.results["policies"]
    assert "mixed" not in m.results["parity"]
    assert set(m.results["policies"]) >= {"image=fp32 text=fp16 fusion=fp32", "image=fp16 text=fp32 fusion=fp32"}


def test_the_simplify_note_says_why_a_graph_can_grow():
    assert Simplified(True, 80, 84).note == "80 -> 84 nodes (folding constants and shapes can add nodes)"
    assert Simplified(True, 84, 80).note == "84 -> 80 nodes"
    assert Simplified(False, 7, reason="onnxsim failed: X").note == "onnxsim failed: X"


def test_native_output_stays_off_the_terminal(capfd):
    """C++ code writing to the file descriptors (as onnxsim does) is captured, not shown."""
    import os

    from mmopt.stages.export import native_output

    with native_output() as lines:
        os.write(1, b"WARNING: failed to run SequenceEmpty op\n")
        os.write(2, b"std::bad_cast\n")
    out, err = capfd.readouterr()
    assert "SequenceEmpty" not in out + err and "bad_cast" not in out + err
    assert lines == ["WARNING: failed to run SequenceEmpty op", "std::bad_cast"]
