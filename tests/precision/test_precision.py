"""fp16 / int8 on the toy model and on a model that overflows fp16: artifacts, lineage, Q/DQ form,
the overflow guard, the calibration methods, and that failures leave the bundle untouched."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import pytest
from support import TESTS, run_cli

from mmopt import api
from mmopt.errors import CalibrationError, ConfigError, ParityError, PrecisionError
from mmopt.manifest import Manifest
from mmopt.spec import DEFAULT_TOLERANCES
from mmopt.stages import fp16 as fp16_stage
from mmopt.stages import int8 as int8_stage
from mmopt.stages import ranges

CALIBRATION = """
[calibration]
source = "toydata:calibration_batches"
samples = 32
method = "{method}"
[evaluation]
source = "toydata:evaluation_batches"
output = "output"
samples = 128
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An exported toy bundle plus write(extra=..., method=...) -> a config for it with data callables."""
    from models.toy import CONFIG

    d = tmp_path_factory.mktemp("prec")
    for f in ("toy.py", "toydata.py"):
        shutil.copy(TESTS / "models" / f, d / f)

    def write(extra: str = "", method: str = "entropy", name: str = "mmopt.toml", source: str = "calibration_batches"):
        path = d / name
        path.write_text(CONFIG.format(checkpoint="", extra=extra) + CALIBRATION.format(method=method)
                        .replace("toydata:calibration_batches", f"toydata:{source}"))
        return path

    api.export(write(), d / "bundle")
    write.bundle = d / "bundle"
    yield write
    for mod in ("toy", "toydata"):
        sys.modules.pop(mod, None)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_fp16_and_dynamic_int8_beside_fp32_with_lineage(toy):
    r = api.quantize(toy.bundle, precision={"image": "fp16", "text": "fp16", "fusion": "fp16"})
    r2 = api.quantize(toy.bundle, precision={"text": "int8-dynamic"})
    m = Manifest.read(toy.bundle)
    assert not m.check_files(toy.bundle)
    files = {a.file for a in m.artifacts}
    assert {"image.fp16.onnx", "text.fp16.onnx", "fusion.fp16.onnx", "text.int8-dynamic.onnx"} <= files
    art = m.artifact("text", "fp16")
    assert art.stage == "fp16" and art.parent == "text/export/fp32"
    islands = art.config["fp32_islands"]
    assert islands and all("LayerNormalization" in why for why in islands.values())
    assert r.islands["text"] == islands
    # the fp16 graph keeps fp32 inputs and outputs
    g = onnx.load(str(toy.bundle / "text.fp16.onnx")).graph
    assert {o.name: o.type.tensor_type.elem_type for o in g.output} == {"pooled": 1, "tokens": 1}
    parity = m.results["parity"]
    assert set(parity["fp16"]) == {"image", "text", "fusion", "pipeline"}
    assert all(row["failed"] == 0 for row in parity["fp16"].values())
    assert set(parity["int8-dynamic"]) == {"text", "pipeline"}
    dyn = m.artifact("text", "int8-dynamic")
    assert dyn.config["quantized_nodes"] >= 4 and "CPU only" in dyn.config["format"]
    acc = m.results["accuracy"]
    # toydata's labels are eager's own argmax, so only the converted pipelines' scores measure anything
    assert acc["samples"] == 128 and r2.label in acc["scores"] and "onnx fp32" in acc["scores"]
    assert acc["scores"]["onnx fp32"] == acc["scores"]["eager fp32"]
    assert acc["scores"][r.label] >= acc["scores"]["eager fp32"] - 0.02


def test_int8_is_tensorrt_style_qdq_with_sensitivity_and_exclude(toy):
    r = api.quantize(toy.bundle, toy(), precision={"image": "int8", "text": "int8"})
    m = r.manifest
    art = m.artifact("text", "int8")
    assert art.config["method"] == "entropy" and art.config["samples"] == 32
    assert art.config["checked_activation_scales"] > 0 and art.parent == "text/export/fp32"
    q = onnx.load(str(toy.bundle / "text.int8.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    made = {o: n for n in q.graph.node for o in n.output}
    readers = [n for n in q.graph.node if any(made.get(i) is not None and made[i].op_type == "DequantizeLinear"
                                              for i in n.input)]
    assert readers and {n.op_type for n in readers} <= {"Conv", "MatMul", "Gemm", "QuantizeLinear"}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = init[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()  # symmetric int8
    # every activation scale is the recorded threshold / 127: the calibration mmopt computed is the one used
    th = art.config["activation_thresholds"]
    acts = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init]
    assert acts and len(acts) == art.config["checked_activation_scales"]
    for n in acts:
        assert np.isclose(float(init[n.input[1]]), th[n.input[0]] / 127, rtol=1e-5), n.input[0]
    weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and init.get(n.input[0]) is not None
               and init[n.input[0]].ndim == 2]
    assert weights and all(init[n.input[1]].size > 1 for n in weights)  # per-channel scales
    assert not any(init.get(n.input[0]) is not None and init[n.input[0]].dtype == np.int32
                   for n in q.graph.node if n.op_type == "DequantizeLinear")  # float bias
    sens = m.results["sensitivity"]["text"]
    nodes = {n.name for n in q.graph.node}
    assert sens["quantized_nodes"] == len([n for n in readers if n.op_type != "QuantizeLinear"])
    assert sens["worst_nodes"] and all(row["node"] in nodes for row in sens["worst_nodes"])
    worst = sens["worst_nodes"][0]["node"]

    excluded = api.quantize(toy.bundle, toy(f'[precision.exclude]\ntext = ["{worst}"]', name="ex.toml"),
                            precision={"text": "int8"})
    q = onnx.load(str(toy.bundle / "text.int8.onnx"))
    made = {o: n for n in q.graph.node for o in n.output}
    node = next(n for n in q.graph.node if n.name == worst)
    assert not any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in node.input)
    assert excluded.manifest.artifact("text", "int8").config["excluded_nodes"] == [worst]

    with pytest.raises(ConfigError, match=r"precision.exclude.text': no node named 'node_lineer'"):
        api.quantize(toy.bundle, toy('[precision.exclude]\ntext = ["node_lineer"]', name="typo.toml"),
                     precision={"text": "int8"})


def test_failed_quantize_leaves_the_bundle_byte_identical(toy):
    api.quantize(toy.bundle, precision={"image": "fp16"})  # the bundle holds converted files too
    before = snapshot(toy.bundle)
    impossible = toy("[tolerance.fp16]\nmax_abs = 0.0\nmax_rel = 0.0\n", name="impossible.toml")
    with pytest.raises(PrecisionError, match="even with every one of its"):
        api.quantize(toy.bundle, impossible, precision={"fusion": "fp16", "text": "fp16"})
    assert snapshot(toy.bundle) == before
    no_drop = toy("[tolerance]\nmax_accuracy_drop = 0.0\n", name="nodrop.toml")
    with pytest.raises(PrecisionError, match="accuracy drops by"):
        api.quantize(toy.bundle, no_drop, precision={"image": "int8", "text": "int8", "fusion": "int8"})
    assert snapshot(toy.bundle) == before
    with pytest.raises(CalibrationError, match="NaN"):
        api.quantize(toy.bundle, toy(name="nan.toml", source="with_nan"), precision={"image": "int8"})
    assert snapshot(toy.bundle) == before
    strict = toy("[tolerance.int8-cpu]\nmin_cosine = 0.999999\n", name="strict.toml")
    with pytest.raises(ParityError, match=r"image=int8-cpu .*pipeline vs eager PyTorch"):
        api.quantize(toy.bundle, strict, precision={"image": "int8-cpu", "text": "int8-cpu"}, sensitivity=False)
    assert snapshot(toy.bundle) == before
    assert not [p for p in toy.bundle.parent.iterdir() if p.name.endswith(".partial")]


def test_cli_quantize(toy, tmp_path):
    b = tmp_path / "copy"
    shutil.copytree(toy.bundle, b)
    r = run_cli("quantize", str(b), "-c", str(toy()), "-p", "image=int8", "--no-sensitivity")
    assert r.returncode == 0, r.stderr
    assert "image.int8.onnx" in r.stdout and "argmax accuracy of 'output'" in r.stdout
    r = run_cli("quantize", str(b), "-p", "image:int8")
    assert r.returncode == 2 and "COMPONENT=PRECISION" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    from models.overflow import CONFIG

    d = tmp_path_factory.mktemp("ovf")
    shutil.copy(TESTS / "models" / "overflow.py", d / "overflow.py")
    (d / "mmopt.toml").write_text(CONFIG)
    yield d, api.export(d / "mmopt.toml", d / "bundle")  # [precision] enc = "fp16": export converts too
    sys.modules.pop("overflow", None)


def test_fp16_overflow_guard_saves_the_result(overflow):
    """An intermediate of ~1e5 overflows fp16: without the guard the output is inf; with it, the squaring
    and its reader stay fp32 and the graph passes parity."""
    overflow, result = overflow
    islands = result.precision.islands["enc"]
    assert any("overflow" in why for why in islands.values())
    assert all(row["failed"] == 0 for row in result.manifest.results["parity"]["fp16"].values())

    fp32 = onnx.load(str(overflow / "bundle" / "enc.onnx"))
    x = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    ref = ranges.run_all(ranges.session(fp32, []), {"x": x})
    cases = [({"x": x}, ref)]
    tol = DEFAULT_TOLERANCES["fp16"]
    bare = fp16_stage.to_fp16(fp32, [{"x": x}], cases, tol, "enc", guard=False, fragile=False, widen=False)
    assert bare.islands == {} and any(c.metrics.inf for c in bare.checks)
    guarded = fp16_stage.to_fp16(fp32, [{"x": x}], cases, tol, "enc", fragile=False, widen=False)
    assert guarded.islands and not any(c.failed for c in guarded.checks)
    # the artifact itself (not only its emulation) computes the squaring in fp32: every island node of the
    # written graph reads and writes float32 (ONNX Runtime CPU would hide an fp16 overflow: it computes fp16
    # in fp32, so running the artifact proves nothing)
    art = onnx.shape_inference.infer_shapes(onnx.load(str(overflow / "bundle" / "enc.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*art.graph.value_info, *art.graph.input,
                                                             *art.graph.output)}
    types.update({t.name: t.data_type for t in art.graph.initializer})
    island_nodes = [n for n in art.graph.node if n.name in islands]
    assert island_nodes
    for n in island_nodes:
        assert all(types.get(t) == onnx.TensorProto.FLOAT for t in (*n.input, *n.output) if t), n.name
    emulated = ranges.run_all(ranges.session(fp16_stage.emulate(art), []), {"x": x})
    assert np.isfinite(emulated["output"]).all()


def test_widening_finds_the_overflow_without_the_guard(overflow):
    fp32 = onnx.load(str(overflow[0] / "bundle" / "enc.onnx"))
    x = np.random.default_rng(4).standard_normal((8, 8)).astype(np.float32)
    cases = [({"x": x}, ranges.run_all(ranges.session(fp32, []), {"x": x}))]
    r = fp16_stage.to_fp16(fp32, [{"x": x}], cases, DEFAULT_TOLERANCES["fp16"], "enc", guard=False, fragile=False)
    assert len(r.rounds) > 1 and r.rounds[-1]["failed_outputs"] == 0
    assert any("widened" in why for why in r.islands.values())


def heavy_tailed_matmul() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """``y = x @ w`` and four batches of normal ``x`` with two rare +-60 outliers each."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                          [onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = []
    for _ in range(4):
        x = rng.standard_normal((2048, 16)).astype(np.float32)
        x.flat[rng.integers(0, x.size, 2)] = 60.0 * rng.choice([-1.0, 1.0], 2)  # rare large outliers
        feeds.append({"x": x})
    return proto, feeds


def test_calibration_methods_really_differ_on_a_heavy_tailed_tensor(tmp_path):
    """minmax, percentile and entropy give different thresholds, and the written Q/DQ graph carries
    exactly the scale of the chosen method (the quantizer did not fall back to its own min-max)."""
    proto, feeds = heavy_tailed_matmul()
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        res = int8_stage.quantize_static_qdq(proto, feeds, method)
        q = {n.input[0]: n for n in res.proto.graph.node if n.op_type == "QuantizeLinear"}
        init = {t.name: onnx.numpy_helper.to_array(t) for t in res.proto.graph.initializer}
        scales[method] = float(init[q["x"].input[1]])
        assert scales[method] == pytest.approx(res.thresholds["x"] / 127, rel=1e-6)
        assert res.config["method"] == method and "minmax_fallback" not in res.config
    top = max(float(np.abs(f["x"]).max()) for f in feeds)
    assert scales["minmax"] == pytest.approx(top / 127, rel=1e-3)
    assert scales["percentile"] < scales["minmax"] / 5 and scales["entropy"] < scales["minmax"] / 2
    assert len({round(s, 7) for s in scales.values()}) == 3


def test_threshold_functions():
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.standard_normal(200_000), 40 * rng.standard_normal(20)]))
    counts, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    t = {m: ranges.threshold(counts, edges, m) for m in ("minmax", "percentile", "entropy")}
    assert t["minmax"] == pytest.approx(x.max())
    assert 3.5 < t["percentile"] < 5 and 5 < t["entropy"] < t["minmax"] / 2
    sparse = np.zeros(2048)
    sparse[[3, 900]] = 1  # too few values for a histogram method: the absolute maximum
    assert ranges.threshold(sparse, edges, "entropy") == edges[901]
    with pytest.raises(ValueError):
        ranges.threshold(counts, edges, "median")



def test_check_scales_refuses_a_scale_mmopt_did_not_compute():
    """A quantized activation whose scale is not threshold / 127 of mmopt's range, or that has no range at
    all, means the quantizer used its own calibration: refused, never recorded as checked."""
    from onnx import TensorProto, helper

    from mmopt.stages import int8 as int8_stage

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q = int8_stage.qdq(proto, {"x": 2.0})
    assert int8_stage.check_scales(q, {"x": 2.0 / 127}, symmetric=True) == 1
    with pytest.raises(RuntimeError, match="expected"):
        int8_stage.check_scales(q, {"x": 3.0 / 127}, symmetric=True)
    with pytest.raises(RuntimeError, match="mmopt computed no range"):
        int8_stage.check_scales(q, {}, symmetric=True)
