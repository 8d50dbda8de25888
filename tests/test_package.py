"""``mmopt package`` and the torch-free runtime (``mmopt_runtime``, ``mmopt-run``) on the toy model: the package is
self-tested before it is written; the runtime, run with torch, onnx and mmopt made unimportable, verifies it,
self-tests it and computes exactly what mmopt's own pipeline computes on the same graphs; a tampered file, a
path outside the package or golden outputs that no longer match are refused, by name."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmopt import api
from mmopt.errors import UsageError
from mmopt_runtime import Package, PackageError
from mmopt_runtime.package import sha256_file
from support import ROOT, TESTS

BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "onnx", "mmopt", "onnxsim"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from mmopt_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_every_runtime_module_imports_without_torch_onnx_or_mmopt():
    """The whole runtime, its TensorRT half included, under the import blocker: no module of it may need torch,
    onnx or mmopt, even lazily at import time."""
    code = BLOCKED.split("from mmopt_runtime.cli")[0] + (
        "import importlib, pkgutil, mmopt_runtime\n"
        "names = [m.name for m in pkgutil.walk_packages(mmopt_runtime.__path__, 'mmopt_runtime.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(sorted(names))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    for name in ("mmopt_runtime.engines", "mmopt_runtime.trt.api", "mmopt_runtime.trt.runner",
                 "mmopt_runtime.trt.memory", "mmopt_runtime.trt.device", "mmopt_runtime.cli"):
        assert name in r.stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from models.toy import CONFIG

    d = tmp_path_factory.mktemp("pkg")
    for name in ("toy.py", "toydata.py"):
        shutil.copy(TESTS / "models" / name, d / name)
    (d / "mmopt.toml").write_text(CONFIG.format(checkpoint="", extra=(
        '[calibration]\nsource = "toydata:calibration_batches"\nsamples = 32\n'
        '[evaluation]\nsource = "toydata:evaluation_batches"\noutput = "output"\n')))
    api.export(d / "mmopt.toml", d / "bundle")
    api.quantize(d / "bundle", precision={"text": "int8-dynamic"}, sensitivity=False)
    yield d / "bundle"
    for mod in ("toy", "toydata"):
        sys.modules.pop(mod, None)


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


@pytest.fixture
def pkg(bundle, tmp_path):
    r = api.package(bundle, {"text": "int8-dynamic"}, tmp_path / "pkg")
    return r


def test_the_package_holds_the_policy_its_hashes_and_golden_samples(pkg, bundle):
    doc = json.loads((pkg.folder / "package.json").read_text())
    assert doc["policy"] == {"image": "fp32", "text": "int8-dynamic", "fusion": "fp32"}
    assert sorted(p.name for p in pkg.folder.iterdir()) == ["fusion.onnx", "golden.npz", "image.onnx", "merged.onnx",
                                                            "package.json", "text.int8-dynamic.onnx"]
    assert doc["merged"] == {"file": "merged.onnx"} and pkg.merged["file"] == "merged.onnx"
    assert pkg.merged["vs_split"] < 1e-5 and pkg.selftest["graph"] == "merged"
    assert doc["files"] == {n: sha256_file(pkg.folder / n) for n in doc["files"]}
    assert doc["golden"]["samples"] == 4 and doc["golden"]["source"] == "evaluation: toydata:evaluation_batches"
    assert doc["golden"]["tolerance"]["min_cosine"] == 0.98  # the policy's gate: its int8 component's
    assert doc["lineage"]["bundle_fingerprint"] and doc["lineage"]["artifacts"]["text"]["id"]
    assert pkg.selftest["passed"] is True
    with tarfile.open(pkg.archive) as tar:
        assert sorted(tar.getnames()) == sorted(["pkg", *(f"pkg/{n}" for n in [*doc["files"], "package.json"])])
    assert not [p for p in pkg.folder.parent.iterdir() if p.name.startswith(".")]


def test_the_runtime_needs_no_torch_and_computes_what_mmopts_pipeline_does(pkg, tmp_path):
    r = run("selftest", pkg.folder)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True and json.loads(r.stdout)["graph"] == "merged"
    with np.load(pkg.folder / "golden.npz") as g:
        feeds = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    np.savez(tmp_path / "in.npz", **feeds)
    r = run("infer", pkg.folder, "--inputs", tmp_path / "in.npz", "--out", tmp_path / "out.npz")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as out:
        served = {k: out[k] for k in out.files}
    # mmopt's own pipeline, on the same graphs
    from mmopt.manifest import Manifest
    from mmopt.runners.onnxrt import OnnxRuntimeRunner
    from mmopt.runners.pipeline import Pipeline

    m = Manifest.read(pkg.manifest["lineage"]["bundle"])
    runners = {c: OnnxRuntimeRunner(pkg.folder / pkg.manifest["components"][c]["file"], s.inputs, s.outputs,
                                    threads=1).__enter__() for c, s in m.components.items()}
    want = Pipeline(m.components, m.model["output_sources"], runners).infer(feeds)
    split = Package.load(pkg.folder, merged=False)
    assert served.keys() == want.keys() and split.graph == "split"
    for k in want:  # the split graphs bit for bit; the merged graph (one session) to float rounding
        np.testing.assert_array_equal(split.infer(feeds)[k], want[k])
        np.testing.assert_allclose(served[k], want[k], rtol=1e-5, atol=1e-6)
    r = run("bench", pkg.folder, "--rounds", "3")
    assert r.returncode == 0 and set(json.loads(r.stdout)["latency"]) == {"min", "opt", "max"}


def test_a_tampered_file_is_refused_by_name(pkg):
    graph = pkg.folder / "image.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte flipped
    r = run("selftest", pkg.folder)
    assert r.returncode == 1 and f"{graph}: sha256 differs from the package manifest" in r.stderr
    with pytest.raises(PackageError, match="sha256 differs"):
        Package.load(pkg.folder)


def test_the_merged_graph_is_hashed_like_every_file_and_optional(pkg):
    merged = pkg.folder / "merged.onnx"
    data = merged.read_bytes()
    merged.write_bytes(data[:-1] + b"\0")
    with pytest.raises(PackageError, match=r"merged.onnx: sha256 differs from the package manifest"):
        Package.load(pkg.folder)
    merged.write_bytes(data)
    doc = json.loads((pkg.folder / "package.json").read_text())
    (pkg.folder / "package.json").write_text(json.dumps({**doc, "merged": None}))  # a package without one
    assert Package.load(pkg.folder).graph == "split"
    (pkg.folder / "package.json").write_text(json.dumps({**doc, "merged": {"file": 3}}))
    with pytest.raises(PackageError, match=r"field 'merged' is not \{file\}"):
        Package.load(pkg.folder)


def test_graphs_that_cannot_be_merged_say_why():
    import onnx
    from onnx import helper

    from mmopt.stages.merge import MergeError, merge

    def graph(opset):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 2])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 2])
        return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                 opset_imports=[helper.make_opsetid("", opset)])

    t = {"dtype": "float32", "shape": ["b", 2], "shapes": {k: [1, 2] for k in ("min", "opt", "max")}}
    comps = {"a": {"outputs": [{**t, "name": "y"}], "calls": [["a", {"x": "input:x"}]]},
             "b": {"outputs": [{**t, "name": "y"}], "calls": [["b", {"x": "a:y"}]]}}
    model = {"inputs": [{**t, "name": "x"}], "outputs": [{**t, "name": "out"}], "output_sources": {"out": "b:y"}}
    with pytest.raises(MergeError, match=r"component 'b' imports opset 18 of domain 'ai.onnx', another component 17 "
                                         r"\(re-export the bundle at one opset"):
        merge(comps, model, {"a": graph(17), "b": graph(18)})
    joined = merge(comps, model, {"a": graph(17), "b": graph(17)})
    import onnxruntime as ort

    x = np.array([[-1.0, 2.0]], np.float32)
    out = ort.InferenceSession(joined.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(out[0], np.maximum(x, 0))


def test_merge_follows_the_wiring_not_the_component_order():
    """A component called twice, the second call reading a component listed after it, and a model output read
    straight from a model input: the merged graph computes what the split pipeline does."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from mmopt.stages.merge import MergeError, merge
    from mmopt_runtime.pipeline import Pipeline

    def graph(op):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 2])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 2])
        return helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 17)])

    t = {"dtype": "float32", "shape": ["b", 2], "shapes": {k: [1, 2] for k in ("min", "opt", "max")}}
    comps = {"a": {"outputs": [{**t, "name": "y"}], "calls": [["a", {"x": "input:x"}], ["a@2", {"x": "b:y"}]]},
             "b": {"outputs": [{**t, "name": "y"}], "calls": [["b", {"x": "a:y"}]]}}
    model = {"inputs": [{**t, "name": "x"}], "outputs": [{**t, "name": "out"}, {**t, "name": "echo"}],
             "output_sources": {"out": "a@2:y", "echo": "input:x"}}
    graphs = {"a": graph("Neg"), "b": graph("Exp")}
    joined = merge(comps, model, graphs)
    x = np.array([[-1.0, 2.0]], np.float32)
    got = dict(zip(["out", "echo"], ort.InferenceSession(joined.SerializeToString(),
                                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})))
    np.testing.assert_allclose(got["out"], -np.exp(-x), rtol=1e-6)
    np.testing.assert_array_equal(got["echo"], x)
    sessions = {c: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
                for c, g in graphs.items()}
    steps = [(key, (lambda f, _, s=sessions[c]: {"y": s.run(None, f)[0]}), tuple(src.items()), {"y": f"{key}:y"})
             for c, spec in comps.items() for key, src in spec["calls"]]
    split = Pipeline(steps, model["output_sources"]).infer({"x": x})
    np.testing.assert_array_equal(split["out"], got["out"])
    loop = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "body", [], [])
    with_sub = graph("Neg")
    with_sub.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=loop, else_branch=loop))
    with pytest.raises(MergeError, match=r"component 'b' holds sub-graphs \(If / Loop / Scan\)"):
        merge(comps, model, {"a": graph("Neg"), "b": with_sub})


def test_a_merged_graph_that_differs_from_the_split_pipeline_is_dropped_with_the_reason(pkg, tmp_path):
    import onnx
    from onnx import numpy_helper

    from mmopt.jobs.package import check_merged

    stage = tmp_path / "stage"
    shutil.copytree(pkg.folder, stage)
    proto = onnx.load(str(stage / "merged.onnx"))
    w = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)  # the largest weight, doubled
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    onnx.save(proto, str(stage / "merged.onnx"))
    doc = json.loads((stage / "package.json").read_text())
    doc["files"]["merged.onnx"] = sha256_file(stage / "merged.onnx")
    (stage / "package.json").write_text(json.dumps(doc))
    with np.load(stage / "golden.npz") as g:
        golden = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    result, served = check_merged(stage, doc, Package.load(stage, merged=False), golden)
    assert served is None
    assert result["reason"].startswith("the merged graph ")  # differs, or fails its own golden self-test
    assert not (stage / "merged.onnx").exists() and "merged.onnx" not in doc["files"]
    assert json.loads((stage / "package.json").read_text())["merged"] is None
    assert Package.load(stage).graph == "split"


def test_check_inputs_passes_a_known_signature_fast_and_never_caches_a_conversion(pkg):
    p = Package.load(pkg.folder)
    with np.load(pkg.folder / "golden.npz") as g:
        feeds = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    before = len(p._accepted)
    assert p.check_inputs(feeds).keys() == feeds.keys() and len(p._accepted) == before  # the self-test's
    as_ints = {**feeds, "attention_mask": feeds["attention_mask"].astype(np.int64)}
    assert p.check_inputs(as_ints)["attention_mask"].dtype == np.bool_
    assert len(p._accepted) == before  # converted: checked again every time
    bad = {**as_ints, "attention_mask": as_ints["attention_mask"] * 3}  # same signature, values no bool takes
    with pytest.raises(PackageError, match="input 'attention_mask': dtype int64"):
        p.check_inputs(bad)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "a/../../b", "sub\\x.onnx"])
def test_a_path_outside_the_package_is_refused(pkg, path):
    doc = json.loads((pkg.folder / "package.json").read_text())
    doc["components"]["image"]["file"] = path
    doc["files"][path] = "0" * 64
    (pkg.folder / "package.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match=r"field '.*': .* (is an absolute path|climbs out with '\.\.'|holds a NUL "
                                           r"or backslash)\. The manifest was edited"):
        Package.load(pkg.folder)


def test_golden_outputs_that_no_longer_match_are_refused(pkg):
    golden = pkg.folder / "golden.npz"
    with np.load(golden) as g:
        data = {k: g[k] for k in g.files}
    data["output/output"] = data["output/output"] * 2.0  # e.g. a device computing something else
    np.savez(golden, **data)
    doc = json.loads((pkg.folder / "package.json").read_text())
    doc["files"]["golden.npz"] = sha256_file(golden)
    (pkg.folder / "package.json").write_text(json.dumps(doc))
    r = run("selftest", pkg.folder)
    assert r.returncode == 1 and "the golden self-test fails" in r.stderr and "output:" in r.stderr


def test_bad_input_is_refused_before_anything_is_written(bundle, tmp_path):
    with pytest.raises(UsageError, match="no component 'audio'"):
        api.package(bundle, {"audio": "fp32"}, tmp_path / "p")
    with pytest.raises(UsageError, match=r"-p image=int8-cpu: bundle has no int8-cpu artifact .* Convert it first"):
        api.package(bundle, {"image": "int8-cpu"}, tmp_path / "p")
    with pytest.raises(UsageError, match="cannot be written inside its bundle"):
        api.package(bundle, None, bundle / "p")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="exists and is not an mmopt package"):
        api.package(bundle, None, mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_package_is_replaced_whole(bundle, tmp_path):
    first = api.package(bundle, None, tmp_path / "p")
    assert first.manifest["policy"]["text"] == "fp32"
    second = api.package(bundle, {"text": "int8-dynamic"}, tmp_path / "p")
    assert (tmp_path / "p" / "text.int8-dynamic.onnx").exists() and not (tmp_path / "p" / "text.onnx").exists()
    assert second.manifest["policy"]["text"] == "int8-dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p.tar.gz"]


def test_the_runtime_checks_inputs_against_the_package(pkg):
    p = Package.load(pkg.folder)
    with np.load(pkg.folder / "golden.npz") as g:
        feeds = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    with pytest.raises(PackageError, match=r"missing \['pixel_values'\]"):
        p.infer({k: v for k, v in feeds.items() if k != "pixel_values"})
    with pytest.raises(PackageError, match=r"input 'pixel_values': axis 2 is 8, expected 16"):
        p.infer({**feeds, "pixel_values": feeds["pixel_values"][:, :, :8]})
    with pytest.raises(PackageError, match=r"axis 0 \('batch'\) is 64, outside the exported range \[1, 32\]"):
        p.infer({k: np.repeat(v, 16, axis=0) for k, v in feeds.items()})
    assert p.infer(feeds)["output"].shape == (4, 5)


def edit(pkg, change):
    """Apply ``change`` to package.json (in an unsigned package no hash covers the manifest: edits it cannot catch)."""
    doc = json.loads((pkg.folder / "package.json").read_text())
    change(doc)
    (pkg.folder / "package.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["components"].__setitem__("image", "x"), r"field 'components\.image' is not a component"),
    (lambda d: d["components"]["image"].__setitem__("file", ["a"]), r"field 'components\.image' is not a component"),
    (lambda d: d["golden"].pop("file"), r"field 'golden' is not"),
    (lambda d: d["golden"]["tolerance"].__setitem__("min_cosine", float("nan")), r"NaN is not a number"),
    (lambda d: d["golden"]["tolerance"].pop("max_norm_change"), r"golden\.tolerance"),
    (lambda d: d["golden"]["tolerance"].__setitem__("min_cosine", "high"), r"golden\.tolerance"),
    (lambda d: d["components"]["fusion"]["calls"][0][1].__setitem__("image.output", "imag:output"),
     r"reads 'imag:output', which is no model input"),
    (lambda d: d["components"]["fusion"]["calls"][0][1].__setitem__("extra", "input:pixel_values"), r"feeds .* the graph"),
    (lambda d: d["model"]["output_sources"].__setitem__("output", "fusion:nope"), r"model\.output_sources"),
    (lambda d: d["model"]["inputs"][0].__setitem__("dtype", "complex64"), r"model\.inputs\[0\]"),
    (lambda d: d["files"].__setitem__("image.onnx", "not a hash"), r"field 'files'"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(pkg, change, message):
    edit(pkg, change)
    with pytest.raises(PackageError, match=message):
        Package.load(pkg.folder)
    r = run("selftest", pkg.folder)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_a_self_test_with_nothing_to_compare_is_refused(pkg):
    golden = pkg.folder / "golden.npz"
    with np.load(golden) as g:
        inputs_only = {k: g[k] for k in g.files if k.startswith("input/")}
    np.savez(golden, **inputs_only)
    edit(pkg, lambda d: d["files"].__setitem__("golden.npz", sha256_file(golden)))
    with pytest.raises(PackageError, match="the self-test needs every model output"):
        Package.load(pkg.folder)


def test_a_graph_with_external_data_ships_its_data_hashed_and_loads_it_from_memory(bundle, tmp_path):
    import onnx

    from mmopt.manifest import Manifest

    b = tmp_path / "bundle"
    shutil.copytree(bundle, b)
    m = Manifest.read(b)
    art = m.artifact("image", "fp32")
    onnx.save(onnx.load(str(b / art.file)), str(b / art.file), save_as_external_data=True,
              all_tensors_to_one_file=True, location="image.weights", size_threshold=100)  # as exporters do over 2 GB
    art.sha256 = sha256_file(b / art.file)
    m.write(b)
    r = api.package(b, {"text": "int8-dynamic"}, tmp_path / "pkg")
    spec = r.manifest["components"]["image"]
    assert spec["external_data"] == {"image.weights": "image.weights"}
    assert r.manifest["files"]["image.weights"] == sha256_file(r.folder / "image.weights")
    split = Package.load(r.folder, merged=False)  # the data comes from the bytes hashed, not from the path
    assert split.selftest_result["passed"] and r.merged["file"] == "merged.onnx"  # merged: weights inside it
    ok = run("selftest", r.folder)  # torch, onnx and mmopt unimportable
    assert ok.returncode == 0, ok.stderr
    if importlib.util.find_spec("tritonclient") is not None:  # Triton wants such a graph as a model.onnx/ folder
        repo = api.triton(r.folder, None, tmp_path / "repo").folder
        assert sorted(p.name for p in (repo / "toy_image" / "1" / "model.onnx").iterdir()) == ["image.weights",
                                                                                                  "model.onnx"]
    weights = r.folder / "image.weights"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(PackageError, match=r"image.weights: sha256 differs from the package manifest"):
        Package.load(r.folder, merged=False)


def test_a_graph_with_external_data_no_hash_covers_is_refused(pkg, monkeypatch):
    import onnx

    graph = pkg.folder / "image.onnx"
    proto = onnx.load(str(graph))
    onnx.save(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location="image.data",
              size_threshold=100)  # the weights out, small constants (shape inference reads them) inline
    edit(pkg, lambda d: d["files"].__setitem__("image.onnx", sha256_file(graph)))
    monkeypatch.chdir(pkg.folder)  # where image.data sits: ONNX Runtime must not read it from here either
    with pytest.raises(PackageError, match=r"cannot load component 'image' .*must be listed in the manifest "
                                           r"\(components.<c>.external_data\)"):
        Package.load(pkg.folder, merged=False)


def test_inputs_are_never_converted_lossily(pkg):
    p = Package.load(pkg.folder)
    with np.load(pkg.folder / "golden.npz") as g:
        feeds = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    with pytest.raises(PackageError, match=r"input 'pixel_values': dtype float64, the package takes float32"):
        p.infer({**feeds, "pixel_values": feeds["pixel_values"].astype(np.float64)})
    with pytest.raises(PackageError, match=r"the merged graph: ONNX Runtime failed on these inputs .*'text/.*indices"):
        p.infer({**feeds, "input_ids": feeds["input_ids"] + 100})  # past the embedding table: the graph says so
    assert p.infer({**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})["output"].shape == (4, 5)
    mask = feeds["attention_mask"]
    assert p.infer({**feeds, "attention_mask": mask.astype(np.int64)})["output"].shape == (4, 5)  # 0 / 1 ints
    with pytest.raises(PackageError, match="input 'attention_mask': dtype float32"):
        p.infer({**feeds, "attention_mask": mask.astype(np.float32)})
    with pytest.raises(PackageError, match=r"batch = 2, but input 'pixel_values' has batch = 4"):
        p.infer({**feeds, "input_ids": feeds["input_ids"][:2], "attention_mask": mask[:2]})


def test_a_run_killed_between_the_renames_is_repaired_by_the_next(bundle, tmp_path):
    """The package is written by the bundle store's transaction: a run killed between its two renames (the
    fallback where the kernel cannot exchange) leaves the old package aside and no package; the next run puts
    it back, then replaces it; what a killed run staged is removed."""
    first = api.package(bundle, None, tmp_path / "p")
    os.rename(first.folder, tmp_path / ".p.999999.dead0001.old")  # as a run killed after moving the old aside
    (tmp_path / ".p.999999.dead0002.partial").mkdir()
    (tmp_path / ".p.tar.gz.999999.partial").write_bytes(b"half an archive")
    second = api.package(bundle, None, tmp_path / "p")
    assert (second.folder / "package.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p.tar.gz"]


def test_concurrent_writers_of_one_package_take_turns(bundle, tmp_path):
    """Two `mmopt package -o p` at once: each waits its turn on the store's lock, then replaces the package whole;
    neither fails and the result is one complete package. The test holds the lock while both start (as a third
    writer would), so they are sure to meet it whatever the machine's speed, and lets go once both say they wait."""
    import threading
    import time

    from mmopt.jobs.package import PACKAGE
    from mmopt.store import writer_lock

    cmd = [sys.executable, "-m", "mmopt", "package", str(bundle), "-o", str(tmp_path / "p")]
    waiting = "waiting for another mmopt process"
    with writer_lock(tmp_path / "p", lambda message: None, PACKAGE):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(2)]
        logs: list[list[str]] = [[] for _ in procs]
        readers = [threading.Thread(target=lambda p=p, log=log: log.extend(p.stdout), daemon=True)
                   for p, log in zip(procs, logs)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 240
        while not all(any(waiting in line for line in log) for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs
            time.sleep(0.1)
    for p, r in zip(procs, readers):
        p.wait(timeout=300)
        r.join(timeout=60)
    outs = ["".join(log) for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(waiting in out for out in outs), outs
    assert Package.load(tmp_path / "p").selftest_result["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p.tar.gz"]
    with tarfile.open(tmp_path / "p.tar.gz") as tar:  # the archive is the folder's, not the other writer's
        assert tar.extractfile("p/package.json").read() == (tmp_path / "p" / "package.json").read_bytes()


# ---- signatures (OpenSSF model-signing, key mode) ---------------------------------------------

def _keypair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (folder / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder / f"{name}.pem", folder / f"{name}.pub.pem"


def test_a_signed_package_serves_only_with_its_public_key(bundle, tmp_path):
    pytest.importorskip("model_signing", reason="the sign extra (model-signing) is not installed")
    key, pub = _keypair(tmp_path, "signer")
    _, other = _keypair(tmp_path, "other")
    r = api.package(bundle, {"text": "int8-dynamic"}, tmp_path / "signed", sign_key=key)
    assert (r.folder / "package.sig").is_file()
    with tarfile.open(r.archive) as tar:
        assert "signed/package.sig" in tar.getnames()
    ok = run("selftest", r.folder, "--public-key", pub)  # torch, onnx and mmopt unimportable
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signed"] is True
    with pytest.raises(PackageError, match=r"package.sig: the package is signed, but no public key was given"):
        Package.load(r.folder)
    with pytest.raises(PackageError, match=r"does not verify with .*other.pub.pem \(Key mismatch"):
        Package.load(r.folder, public_key=other)
    # a manifest edited and every hash redone, as whoever can write package.json could: the signature catches it
    from mmopt_runtime.package import read_manifest
    from mmopt_runtime.signing import verify

    digests = verify(r.folder, pub)  # checked; then the manifest is swapped before the runtime reads it
    assert digests["package.json"] == sha256_file(r.folder / "package.json") and "merged.onnx" in digests
    edit(r, lambda d: d["golden"]["tolerance"].__setitem__("min_cosine", -1.0))
    with pytest.raises(PackageError, match=r"package.json: is not the manifest the signature covers"):
        read_manifest(r.folder, digests)
    # (model-signing's message is a list's repr: its quoting depends on the digests' bytes)
    with pytest.raises(PackageError, match=r"does not verify .*Hash mismatch for \\*'package\.json"):
        Package.load(r.folder, public_key=pub)


def test_signing_refusals_come_before_any_work(pkg, bundle, tmp_path):
    pytest.importorskip("model_signing", reason="the sign extra (model-signing) is not installed")
    _, pub = _keypair(tmp_path, "signer")
    with pytest.raises(PackageError, match=r"unsigned \(no package.sig\), but a public key was given"):
        Package.load(pkg.folder, public_key=pub)
    with pytest.raises(UsageError, match=r"--sign-key .*missing.pem: no such file"):
        api.package(bundle, {}, tmp_path / "never", sign_key=tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(UsageError, match=r"--sign-key .*bad.pem: cannot sign with it"):
        api.package(bundle, {}, tmp_path / "never", sign_key=tmp_path / "bad.pem")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    (tmp_path / "rsa.pem").write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(UsageError, match=r"--sign-key .*rsa.pem: not an elliptic-curve key"):
        api.package(bundle, {}, tmp_path / "never", sign_key=tmp_path / "rsa.pem")
    assert not (tmp_path / "never").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- the runtime installed alone, in a fresh venv without torch (.ci/run makes it) ---------------------

RUNTIME_VENV = Path(os.environ.get("MMOPT_RUNTIME_VENV", ROOT / ".ci" / "runtime-venv"))


@pytest.mark.skipif(not (RUNTIME_VENV / "bin" / "mmopt-run").exists(),
                    reason=f"no runtime-only venv at {RUNTIME_VENV} (.ci/run makes it: python -m venv, then "
                           "pip install ./runtime)")
def test_the_runtime_installed_alone_without_torch_serves_the_package(pkg, tmp_path):
    py = RUNTIME_VENV / "bin" / "python"
    env = {"PATH": f"{RUNTIME_VENV / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run([str(py), "-c", "import importlib.util as u, mmopt_runtime; print(mmopt_runtime.__file__, "
                            "[m for m in ('torch', 'onnx', 'mmopt') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    where, _, present = probe.stdout.partition(" ")
    assert str(RUNTIME_VENV) in where and present.strip() == "[]", probe.stdout + probe.stderr
    with np.load(pkg.folder / "golden.npz") as g:
        feeds = {k[len("input/"):]: g[k] for k in g.files if k.startswith("input/")}
    np.savez(tmp_path / "in.npz", **feeds)
    cli = RUNTIME_VENV / "bin" / "mmopt-run"
    for args in (["selftest", pkg.folder], ["infer", pkg.folder, "--inputs", tmp_path / "in.npz", "--out",
                                            tmp_path / "out.npz"], ["bench", pkg.folder, "--rounds", "3"]):
        r = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as out:
        served = {k: out[k] for k in out.files}
    want = Package.load(pkg.folder).infer(feeds)  # the same package in this environment, with mmopt and torch
    assert served.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(served[k], want[k])
