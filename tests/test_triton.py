"""``mmopt triton`` on the toy model, offline: the repository is the package as Triton models (IO, dims, batch
limits, wiring and hashes from the package manifest), every config parses with Triton's own schema, the
python flavour differs only where it must, bad inputs and dims Triton cannot express are refused naming the
component, tensor and fix, and hand-broken repositories are refused by the validator naming the file and
field. tests/test_triton_server.py serves the same repository with a real Triton server."""
from __future__ import annotations

import copy
import json
import types
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mmopt import api
from mmopt.errors import BackendUnavailable, TritonRepositoryError, UsageError
from mmopt.triton import config as tc, validate
from mmopt_runtime.package import sha256_file
from support import ROOT, run_cli


@pytest.fixture(scope="module")
def pkg(toy_bundle, tmp_path_factory):
    return api.package(toy_bundle.bundle, None, tmp_path_factory.mktemp("triton-pkg") / "pkg")


@pytest.fixture(scope="module")
def native(pkg, tmp_path_factory):
    return api.triton(pkg.folder, None, tmp_path_factory.mktemp("triton-native") / "repo")


@pytest.fixture
def repo(native, tmp_path):
    """A private copy of the native repository, to break by hand."""
    shutil.copytree(native.folder, tmp_path / "repo")
    return tmp_path / "repo"


def names(tensors):
    return [(t.name, validate.schema()[1].DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def test_the_repository_is_the_package_as_triton_models(native, pkg):
    root, doc = native.folder, pkg.manifest
    assert sorted(p.name for p in root.iterdir()) == ["mmopt-triton.json", "toy", "toy_fusion", "toy_image", "toy_text"]
    models = validate.check(root).models
    image = models["toy_image"].config
    assert image.platform == "onnxruntime_onnx" and image.max_batch_size == 32  # [dims] batch max
    assert names(image.input) == [("x", "TYPE_FP32", [3, 16, 16])] and names(image.output) == [("output", "TYPE_FP32", [16])]
    assert list(image.dynamic_batching.preferred_batch_size) == [8, 32]  # opt, max
    assert [(g.count, g.kind) for g in image.instance_group] == [(1, 1)]  # KIND_GPU
    text = models["toy_text"].config
    assert names(text.input) == [("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_BOOL", [-1])]
    assert ("tokens", "TYPE_FP32", [-1, 16]) in names(text.output)  # dynamic seq axis: -1
    ensemble = models["toy"].config
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 32 and not len(ensemble.instance_group)
    assert not ensemble.HasField("dynamic_batching")
    assert names(ensemble.input) == [("pixel_values", "TYPE_FP32", [3, 16, 16]), ("input_ids", "TYPE_INT64", [-1]),
                                     ("attention_mask", "TYPE_BOOL", [-1])]
    assert names(ensemble.output) == [("output", "TYPE_FP32", [5])]
    # one step per call, fed as the package's wiring feeds it
    tensor = {"input:pixel_values": "pixel_values", "input:input_ids": "input_ids",
              "input:attention_mask": "attention_mask", "fusion:output": "output"}
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    assert list(steps) == ["toy_image", "toy_text", "toy_fusion"]
    for comp, spec in doc["components"].items():
        (_, sources), = spec["calls"]
        assert dict(steps[f"toy_{comp}"].input_map) == {n: tensor.get(s, s) for n, s in sources.items()}
    assert dict(steps["toy_fusion"].output_map) == {"output": "output"}
    assert dict(steps["toy_text"].output_map) == {"pooled": "text:pooled"}  # tokens feeds nothing: not mapped
    # the graphs are the package's bytes; the marker records every graph's sha256
    marker = json.loads((root / "mmopt-triton.json").read_text())
    assert marker["kind"] == "mmopt-triton-repository" and marker["package"]["policy"] == doc["policy"]
    for comp, spec in doc["components"].items():
        assert sha256_file(root / f"toy_{comp}" / "1" / "model.onnx") == doc["files"][spec["file"]]
    assert marker["files"] == {f: sha256_file(root / f) for f in marker["files"]} and len(marker["files"]) == 3
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]


def test_the_python_flavour_from_a_bundle_through_the_cli(toy_bundle, native, tmp_path):
    out = tmp_path / "repo"
    r = run_cli("triton", str(toy_bundle.bundle), "-o", str(out), "--backend", "python")
    assert r.returncode == 0, r.stderr
    assert "repository written:" in r.stdout and "next: tritonserver --model-repository" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    py, nat = validate.check(out).models, native.report.models
    script = (ROOT / "mmopt" / "triton" / "python_model.py").read_bytes()
    for comp in ("image", "text", "fusion"):
        m = py[f"toy_{comp}"].config
        params = {k: v.string_value for k, v in m.parameters.items()}
        assert m.backend == "python" and not m.platform and [g.kind for g in m.instance_group] == [2]  # KIND_CPU
        assert params == {"onnx_file": "model.onnx", "sha256": sha256_file(out / f"toy_{comp}/1/model.onnx"),
                          "intra_op_threads": "1", "batching": "concatenate"}
        assert (out / f"toy_{comp}/1/model.py").read_bytes() == script
        # everything else is the native member's
        n = nat[f"toy_{comp}"].config
        assert (m.input, m.output, m.max_batch_size, m.dynamic_batching) == (n.input, n.output, n.max_batch_size,
                                                                             n.dynamic_batching)
    assert py["toy"].config == nat["toy"].config  # the same ensemble
    r = run_cli("triton", str(out), "--check")
    assert r.returncode == 0 and "valid:" in r.stdout, r.stdout + r.stderr


def test_only_an_mmopt_repository_or_an_empty_folder_is_replaced(pkg, tmp_path):
    out = tmp_path / "repo"
    api.triton(pkg.folder, None, out, backend="python")
    (tmp_path / ".repo.999999.dead0001.partial").mkdir()  # as a run killed while it staged: removed by the next
    api.triton(pkg.folder, None, out)  # replaces its own repository whole
    assert validate.check(out).models["toy_image"].config.platform == "onnxruntime_onnx"
    (out / "their_model").mkdir()  # a model added by hand: writing again would remove it
    with pytest.raises(UsageError, match=r"also holds their_model, which mmopt did not write there"):
        api.triton(pkg.folder, None, out)
    (out / "their_model").rmdir()
    assert not (out / "toy_image" / "1" / "model.py").exists()
    (tmp_path / "empty").mkdir()
    api.triton(pkg.folder, None, tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"exists and is not a Triton repository mmopt wrote .*Choose a new or empty"):
        api.triton(pkg.folder, None, mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a Triton repository"):
        api.triton(pkg.folder, None, tmp_path / "file")
    with pytest.raises(UsageError, match="cannot be written inside its source"):
        api.triton(pkg.folder, None, pkg.folder / "repo")
    assert (mine / "notes.txt").read_text() == "x" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine", "repo"]


def test_bad_sources_components_and_options_are_refused_before_anything_is_written(pkg, native, toy_bundle, tmp_path):
    out = tmp_path / "repo"
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    with pytest.raises(UsageError, match=r"neither an mmopt bundle \(manifest.json.*nor a package \(package.json"):
        api.triton(tmp_path / "stuff", None, out)
    with pytest.raises(UsageError, match="no such folder"):
        api.triton(tmp_path / "nope", None, out)
    with pytest.raises(UsageError, match=r"is a Triton repository mmopt wrote; check it with `mmopt triton .* --check`"):
        api.triton(native.folder, None, out)
    with pytest.raises(UsageError, match="no component 'audio'; the bundle's components are image, text, fusion"):
        api.triton(toy_bundle.bundle, {"audio": "fp32"}, out)
    with pytest.raises(UsageError, match=r"-p image=int8: .* Convert it first"):
        api.triton(toy_bundle.bundle, {"image": "int8"}, out)
    with pytest.raises(UsageError, match="no component 'audio'; the package's components are image, text, fusion"):
        api.triton(pkg.folder, {"audio": "fp32"}, out)
    with pytest.raises(UsageError, match=r"-p image=fp16: .* is a package of one policy \(image=fp32 text=fp32 "
                                         r"fusion=fp32\); give its bundle"):
        api.triton(pkg.folder, {"image": "fp16"}, out)
    api.triton(pkg.folder, {"image": "fp32"}, out)  # restating the package's policy is fine
    shutil.rmtree(out)
    for options, message in [({"backend": "tensorrt"}, "--backend tensorrt: choose native"),
                             ({"backend": "python", "kind": "gpu"}, "use --kind cpu"),
                             ({"instances": 0}, "--instances 0"), ({"name": "../up"}, "--name '../up'"),
                             ({"config": "mmopt.toml"}, "--config / --trust-checkpoint are for a bundle")]:
        with pytest.raises(UsageError, match=message):
            api.triton(pkg.folder, None, out, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stuff"]


def _with_shape(manifest, comp, side, index, shape):
    """The manifest with one tensor's shape changed (as a model whose tensor is laid out so would export it)."""
    doc = copy.deepcopy(manifest)
    batch = {k: doc["model"]["inputs"][0]["shapes"][k][0] for k in ("min", "opt", "max")}
    t = doc["components"][comp][side][index]
    t["shape"] = shape
    t["shapes"] = {k: [batch[k] if d == "batch" else (d if isinstance(d, int) else 3) for d in shape] for k in batch}
    return doc


def test_dims_triton_cannot_express_are_refused_naming_component_tensor_and_fix(pkg):
    late = _with_shape(pkg.manifest, "fusion", "outputs", 0, [5, "batch"])
    with pytest.raises(UsageError, match=r"component 'fusion', output 'output' \[5, 'batch'\] has the batch dim "
                                         r"'batch' on axis 1, not on axis 0.* --no-batching \(max_batch_size 0"):
        tc.plan(late)
    scalar = _with_shape(pkg.manifest, "image", "outputs", 0, [])
    with pytest.raises(UsageError, match=r"component 'image', output 'output' \[\] has the batch dim 'batch' on no axis"):
        tc.plan(scalar)
    loose = copy.deepcopy(pkg.manifest)
    loose["model"]["inputs"][0]["shape"] = ["n", 3, 16, 16]
    with pytest.raises(UsageError, match=r"the model inputs \(pixel_values \['n', 3, 16, 16\].*share no batch dim"):
        tc.plan(loose)
    # --no-batching expresses it: full shapes, dynamic axes -1, no batcher anywhere
    flat = tc.plan(late, batching=False)
    assert flat.max_batch_size == 0 and flat.ensemble_config["max_batch_size"] == 0
    assert flat.members["fusion"].config["output"][0]["dims"] == [5, -1]
    assert not any("dynamic_batching" in c for c in flat.configs().values())
    # a tensor with the batch on a later axis too ([batch, batch], like CLIP's logits) batches, but never merges
    mixed = tc.plan(_with_shape(pkg.manifest, "fusion", "outputs", 0, ["batch", "batch"]), backend="python")
    fusion = mixed.members["fusion"]
    assert not fusion.dynamic_batching and "dynamic_batching" not in fusion.config and "later axis" in fusion.note
    assert {p["key"]: p["value"]["string_value"] for p in fusion.config["parameters"]}["batching"] == "per-request"
    assert fusion.config["max_batch_size"] == 32 and fusion.config["output"][0]["dims"] == [-1]
    assert mixed.members["image"].dynamic_batching
    dyn = copy.deepcopy(pkg.manifest)
    dyn["policy"]["text"] = "int8-dynamic"
    text = tc.plan(dyn).members["text"]
    assert text.dynamic_batching and "one scale per batch" in text.note


def test_no_batching_writes_full_shapes_that_validate(pkg, tmp_path):
    r = api.triton(pkg.folder, None, tmp_path / "repo", batching=False, instances=2, kind="cpu")
    m = r.report.models
    assert {n: x.config.max_batch_size for n, x in m.items()} == {"toy": 0, "toy_fusion": 0, "toy_image": 0,
                                                                  "toy_text": 0}
    assert names(m["toy_image"].config.input) == [("x", "TYPE_FP32", [-1, 3, 16, 16])]
    assert [(g.count, g.kind) for g in m["toy_text"].config.instance_group] == [(2, 2)]


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, count))


def _dtype_mismatch(repo):
    cfg = repo / "toy_fusion" / "config.pbtxt"
    text = cfg.read_text()
    i = text.index("TYPE_FP32", text.index('name: "image.output"'))
    cfg.write_text(text[:i] + "TYPE_FP16" + text[i + 9:])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _fixed_batch(repo):
    import onnx

    graph = repo / "toy_image" / "1" / "model.onnx"
    proto = onnx.load(str(graph))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # exported at batch 1 only
    onnx.save(proto, str(graph))


BROKEN = {
    "a file name outside the version folder": (lambda r: _edit(
        r / "toy_image" / "config.pbtxt", 'platform: "onnxruntime_onnx"',
        'platform: "onnxruntime_onnx"\ndefault_model_filename: "../../toy_text/1/model.onnx"'), [
        r"toy_image/config.pbtxt: default_model_filename '\.\./\.\./toy_text/1/model.onnx' climbs out with '\.\.'"]),
    "a fixed batch axis while batching": (_fixed_batch, [
        r"toy_image/1/model.onnx: input 'x' has a fixed batch axis \(1\) in the graph; with max_batch_size "
        r"> 0 Triton batches on axis 0"]),
    "dtype mismatch between steps": (_dtype_mismatch, [
        r"toy/config.pbtxt: tensor 'image:output': inconsistent data type: TYPE_FP32 from step\[0\] \(toy_image\) "
        r"output 'output', TYPE_FP16 at step\[2\] \(toy_fusion\) input 'image.output'",
        r"toy_fusion/1/model.onnx: input 'image.output' is TYPE_FP32 in the graph, TYPE_FP16 in the config"]),
    "missing model": (lambda r: shutil.rmtree(r / "toy_text"), [
        r"toy/config.pbtxt: ensemble_scheduling.step\[1\] \(toy_text\): model 'toy_text' is not in the repository",
        r"toy_text/1/model.onnx: missing; mmopt-triton.json records it"]),
    "cycle": (lambda r: _edit(r / "toy" / "config.pbtxt", 'key: "x"\n      value: "pixel_values"',
                              'key: "x"\n      value: "output"'), [
        r"the steps wait on each other in a cycle: step\[0\] \(toy_image\) <- step\[2\] \(toy_fusion\) <- step\[0\]",
        r"tensor 'pixel_values' made by ensemble input 'pixel_values' is read by no step"]),
    "unknown field": (lambda r: _edit(r / "toy_image" / "config.pbtxt", "max_batch_size", "max_batch_sz"), [
        r'toy_image/config.pbtxt:\d+:\d+ : .*Message type "inference.ModelConfig" has no field named "max_batch_sz"',
        r"toy/config.pbtxt: its dataflow is checked once the configs of \['toy_image'\] parse"]),
    "bad enum": (lambda r: _edit(r / "toy_text" / "config.pbtxt", "TYPE_BOOL", "TYPE_BOOLEAN"), [
        r'toy_text/config.pbtxt:\d+:\d+ : .*Enum type "inference.DataType" has no value named TYPE_BOOLEAN']),
    "tensor made twice": (lambda r: _edit(r / "toy" / "config.pbtxt", 'value: "text:pooled"', 'value: "image:output"'), [
        r"step\[1\] \(toy_text\): output_map\['pooled'\] makes tensor 'image:output', which step\[0\] \(toy_image\) "
        r"output 'output' already makes; each ensemble tensor is made exactly once",
        r"step\[2\] \(toy_fusion\) input 'text.pooled' reads tensor 'text:pooled', which no ensemble input or step "
        r"output makes"]),
    "wrong dims": (lambda r: _edit(r / "toy_fusion" / "config.pbtxt", "dims: [ 16 ]", "dims: [ 17 ]"), [
        r"tensor 'image:output': inconsistent shape: \[-1, 16\] from step\[0\] \(toy_image\) output 'output', "
        r"\[-1, 17\] at step\[2\]"]),
    "batch limits": (lambda r: _edit(r / "toy_text" / "config.pbtxt", "max_batch_size: 32", "max_batch_size: 0"), [
        r"step\[1\] \(toy_text\): toy_text does not batch \(max_batch_size 0\) but the ensemble does \(32\)",
        r"toy_text/config.pbtxt: dynamic_batching with max_batch_size 0"]),
    "preferred size over the max": (lambda r: _edit(r / "toy_image" / "config.pbtxt", "[ 8, 32 ]", "[ 8, 64 ]"), [
        r"preferred_batch_size \[8, 64\]: each must be in 1..max_batch_size \(32\)"]),
    "graph changed": (lambda r: _flip_byte(r / "toy_image" / "1" / "model.onnx"), [
        r"toy_image/1/model.onnx: sha256 differs from mmopt-triton.json"]),
    "version folder missing": (lambda r: shutil.rmtree(r / "toy" / "1"), [r"toy/: no version folder"]),
    "a marker naming a file outside": (lambda r: _edit(r / "mmopt-triton.json", '"files": {',
                                                        '"files": {"../elsewhere/model.onnx": "00", '), [
        r"mmopt-triton.json: files\['\.\./elsewhere/model.onnx'\] climbs out with '\.\.'"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_hand_broken_repository_is_refused_naming_file_and_field(repo, case):
    breaks, messages = BROKEN[case]
    breaks(repo)
    with pytest.raises(TritonRepositoryError) as e:
        validate.check(repo)
    for message in messages:
        assert any(re.search(message, line) for line in str(e.value).splitlines()), str(e.value)


def test_the_cli_check_refuses_a_broken_repository_with_exit_1(repo):
    _dtype_mismatch(repo)
    r = run_cli("triton", str(repo), "--check")
    assert r.returncode == 1 and "inconsistent data type" in r.stderr and "Traceback" not in r.stderr


def test_an_external_data_graph_goes_in_a_model_onnx_folder(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mmopt.jobs.triton import place_onnx

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    src = tmp_path / "src" / "big.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src),
              save_as_external_data=True, location="big.weights", size_threshold=0)
    version = tmp_path / "repo" / "big" / "1"
    version.mkdir(parents=True)
    # the package manifest's part place_onnx reads (tests/test_package.py writes one from a real package)
    pkg = types.SimpleNamespace(root=src.parent, manifest={"components": {"big": {
        "file": "big.onnx", "external_data": {"big.weights": "big.weights"}}}})
    placed = place_onnx(pkg, "big", version)
    assert [(p.relative_to(version).as_posix(), listed) for p, listed in placed] == [
        ("model.onnx/model.onnx", "big.onnx"), ("model.onnx/big.weights", "big.weights")]
    x = np.ones((2, 8), np.float32)
    y = ort.InferenceSession(str(version / "model.onnx" / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x @ np.arange(64, dtype=np.float32).reshape(8, 8))
    spec = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 8]}]}
    cfg = tc.member_config("big", spec, backend="native", max_batch=4, batched=True, preferred=[4], queue_delay_us=0,
                           kind="KIND_CPU", instances=1, sha256="")
    (version.parent / "config.pbtxt").write_text(tc.render(cfg))
    assert validate.check(tmp_path / "repo").models["big"].config.platform == "onnxruntime_onnx"
    (version / "model.onnx" / "big.weights").unlink()
    with pytest.raises(TritonRepositoryError, match=r"big/1/model.onnx/big.weights: missing \(external data"):
        validate.check(tmp_path / "repo")


def test_the_tensorrt_hook_writes_cc_model_filenames_and_the_validator_wants_each_plan(tmp_path):
    spec = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["batch", 8]}],
            "outputs": [{"name": "y", "dtype": "float16", "shape": ["batch", 8]}]}
    cfg = tc.member_config("enc", spec, backend="native", max_batch=8, batched=True, preferred=[8], queue_delay_us=100,
                           kind="KIND_GPU", instances=1, sha256="", engines={"8.6": "sm86.plan", "9.0": "sm90.plan"})
    (tmp_path / "enc" / "1").mkdir(parents=True)
    (tmp_path / "enc" / "config.pbtxt").write_text(tc.render(cfg))
    (tmp_path / "enc" / "1" / "sm86.plan").write_bytes(b"plan")
    with pytest.raises(TritonRepositoryError, match=r"enc/1/sm90.plan: missing \(a TensorRT plan") as e:
        validate.check(tmp_path)
    assert "sm86" not in str(e.value)
    (tmp_path / "enc" / "1" / "sm90.plan").write_bytes(b"plan")
    c = validate.check(tmp_path).models["enc"].config
    assert c.platform == "tensorrt_plan" and dict(c.cc_model_filenames) == {"8.6": "sm86.plan", "9.0": "sm90.plan"}
    assert c.dynamic_batching.max_queue_delay_microseconds == 100


def test_strings_round_trip_through_triton_schema():
    text_format, mc = validate.schema()
    for s in ['plain', 'a "quoted" \\ name', "tab\tnew\nline", "ünïcode · ok"]:
        assert text_format.Parse(f"name: {tc.quote(s)}", mc.ModelConfig()).name == s


def test_without_the_schema_mmopt_says_what_to_install(native, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if tritonclient were not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'mmopt\[triton\]'"):
        api.check_triton(native.folder)
    with pytest.raises(BackendUnavailable, match="model-config schema"):
        api.triton(native.folder, None, tmp_path / "repo")
    assert not list(tmp_path.iterdir())


def test_a_signed_package_is_served_only_with_its_public_key(toy_bundle, tmp_path):
    pytest.importorskip("model_signing", reason="the sign extra (model-signing) is not installed")
    from test_package import _keypair

    key, pub = _keypair(tmp_path, "signer")
    signed = api.package(toy_bundle.bundle, None, tmp_path / "signed", sign_key=key)
    with pytest.raises(Exception, match="the package is signed, but no public key was given"):
        api.triton(signed.folder, None, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    r = api.triton(signed.folder, None, tmp_path / "repo", public_key=pub)
    assert json.loads((r.folder / "mmopt-triton.json").read_text())["package"]["signature_verified"] is True
    with pytest.raises(UsageError, match="--public-key checks a signed package"):
        api.triton(toy_bundle.bundle, None, tmp_path / "other", public_key=pub)


def test_the_python_model_fails_only_the_request_its_graph_cannot_take(tmp_path, monkeypatch):
    """model.py's execute on a list of requests, as Triton's dynamic batcher hands it: equal shapes merged, one
    bad request among them failing alone. triton_python_backend_utils exists only inside the server, so this
    uses a minimal stand-in of the five names model.py calls (a fake, named as such); the real server runs it in
    tests/test_triton_server.py."""
    import importlib.util
    import sys
    import types

    import onnx
    from onnx import helper, numpy_helper

    fake = types.ModuleType("triton_python_backend_utils")  # FAKE: the python backend's own module

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class Request:
        def __init__(self, **tensors):
            self.tensors = {n: Tensor(n, a) for n, a in tensors.items()}

        def requested_output_names(self):
            return []

    class Response:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    fake.Tensor, fake.InferenceResponse, fake.TritonError = Tensor, Response, str
    fake.TritonModelException = RuntimeError
    fake.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("mmopt_triton_model_py", ROOT / "mmopt" / "triton" / "python_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 2])],
                              initializer=[numpy_helper.from_array(table, "table")])
    (tmp_path / "m" / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m" / "1" / "model.onnx"))
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({
        "input": [{"name": "ids"}], "output": [{"name": "y"}], "max_batch_size": 8,
        "parameters": {"onnx_file": {"string_value": "model.onnx"}, "batching": {"string_value": "concatenate"}}}),
        "model_repository": str(tmp_path / "m"), "model_version": "1"})
    ids = [np.array([1]), np.array([99]), np.array([3, 4]), None]  # the second is past the table; the last lacks ids
    requests = [Request(ids=i) if i is not None else Request() for i in ids]
    responses = model.execute(requests)
    assert [r.error is None for r in responses] == [True, False, True, False]
    np.testing.assert_array_equal(responses[0].output_tensors[0].array, table[[1]])
    np.testing.assert_array_equal(responses[2].output_tensors[0].array, table[[3, 4]])
    assert "out of data bounds" in responses[1].error  # the merged run failed; each was retried alone
