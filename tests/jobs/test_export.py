"""Export end to end on the toy model: bundle contents, atomicity, and parity that can fail."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from support import run_cli

from mmopt.api import export
from mmopt.errors import UsageError
from mmopt.jobs.export import _verify_files
from mmopt.capture import split
from mmopt.checkpoint import build_model
from mmopt.errors import ParityError
from mmopt.manifest import Manifest
from mmopt.runners.onnxrt import OnnxRuntimeRunner
from mmopt.spec import load_spec


def test_bundle_contents(toy_bundle):
    b = toy_bundle.bundle
    m = json.loads((b / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["kind"] == "mmopt-bundle"
    assert {a["file"] for a in m["artifacts"]} == {"image.onnx", "text.onnx", "fusion.onnx"}
    assert not list(b.glob("*.data")) and not [p for p in b.parent.iterdir() if p.name.endswith(".partial")]
    assert set(m["tools"]) >= {"torch", "onnx", "onnxruntime", "onnxsim"}
    parity = m["results"]["parity"]["fp32"]
    assert set(parity) == {"image", "text", "fusion", "pipeline"}
    assert all(p["failed"] == 0 and p["cos_min"] > 0.99999 for p in parity.values())
    # dynamic axes carry the dims' names in the ONNX graph itself
    g = onnx.load(str(b / "text.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}


def test_graphs_run_at_every_profile_size(toy_bundle):
    m = toy_bundle.manifest
    spec = m.components["text"]
    with OnnxRuntimeRunner(toy_bundle.bundle / "text.onnx", spec.inputs, spec.outputs) as r:
        for batch, seq in [(1, 4), (3, 5), (32, 16)]:
            out = r.infer({"input_ids": np.ones((batch, seq), np.int64), "attention_mask": np.ones((batch, seq), bool)})
            assert out["tokens"].shape == (batch, seq, 16)
        with pytest.raises(UsageError, match="outside the exported range"):
            r.infer({"input_ids": np.ones((2, 17), np.int64), "attention_mask": np.ones((2, 17), bool)})


def test_wrong_graph_is_caught(toy_dir, tmp_path):
    """Parity can fail: a fusion graph with one perturbed weight must be reported, with the pipeline."""
    cfg = toy_dir()
    result = export(cfg, tmp_path / "b")
    bad = onnx.load(str(result.bundle / "fusion.onnx"))
    init = max(bad.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(bad, str(tmp_path / "bad_fusion.onnx"))
    spec = load_spec(cfg)
    model = build_model(spec)
    s = split(model, spec)
    files = {c: result.bundle / f"{c}.onnx" for c in s.components}
    files["fusion"] = tmp_path / "bad_fusion.onnx"
    checks = _verify_files(model, spec, s, files)
    failed = {c.component for c in checks if c.failed}
    assert failed == {"fusion", "pipeline"}


def test_failed_export_keeps_previous_bundle(toy_dir, tmp_path):
    out = tmp_path / "bundle"
    export(toy_dir(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    impossible = "[tolerance.fp32]\nmin_cosine = 1.5\n"
    with pytest.raises(ParityError, match="fail parity"):
        export(toy_dir(extra=impossible), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind


def test_inspect_and_verify_cli(toy_bundle, tmp_path):
    b = tmp_path / "copy"
    shutil.copytree(toy_bundle.bundle, b)
    r = run_cli("inspect", str(b))
    assert r.returncode == 0, r.stderr
    assert "attention_mask [batch, seq] bool <- input:attention_mask" in r.stdout
    assert run_cli("verify", str(b)).returncode == 0
    with open(b / "text.onnx", "ab") as f:
        f.write(b"\0")
    (b / "fusion.onnx").unlink()
    r = run_cli("verify", str(b))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "text.onnx: sha256 mismatch" in r.stderr and "fusion.onnx: missing" in r.stderr
    r = run_cli("inspect", str(tmp_path))
    assert r.returncode == 1 and "not an mmopt bundle" in r.stderr


def test_manifest_roundtrip(toy_bundle):
    m = Manifest.read(toy_bundle.bundle)
    assert m.to_json() == toy_bundle.manifest.to_json()  # model, components, artifacts, results, tools
    assert m.artifact("text").file == "text.onnx"


def test_a_bug_in_mmopts_export_wrapper_is_not_blamed_on_the_model(toy_dir, monkeypatch):
    """The dynamo export traces mmopt's CallWrapper: its bug keeps the traceback instead of an ExportError
    that tells the user to simplify their model. A failure in the user's code stays an ExportError."""
    from mmopt.errors import ExportError, raised_by_mmopt
    from mmopt.stages import export as stage

    spec = load_spec(toy_dir())
    model = build_model(spec)
    s = split(model, spec)

    import types

    # the injected bug: CallWrapper.forward (mmopt's own frame, traced by the exporter) calls None
    monkeypatch.setattr(stage, "pytree", types.SimpleNamespace(tree_unflatten=None, tree_leaves=stage.pytree.tree_leaves))
    with pytest.raises(Exception) as e:
        stage.export_component(model, s, "image", toy_dir().parent / "image.onnx")
    assert not isinstance(e.value, ExportError) and raised_by_mmopt(e.value)
    chain, c = [], e.value
    while c is not None:
        chain.append(type(c).__name__)
        c = c.__cause__ or c.__context__
    assert "TypeError" in chain
    monkeypatch.undo()

    def user_bug(x):
        raise ValueError("the user's encoder cannot run")

    monkeypatch.setattr(model.image_encoder, "forward", user_bug)
    with pytest.raises(ExportError, match="the ONNX export failed"):
        stage.export_component(model, s, "image", toy_dir().parent / "image.onnx")
