"""int8-cpu: static int8 in the form ONNX Runtime's CPU kernels fuse (uint8 activations, 7-bit weights,
int8 runs of convolutions, an fp32 RGB stem), checked on a small CNN graph and on the toy bundle, and
the "auto" policy search that chooses among the CPU forms."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmopt import api
from mmopt.errors import UsageError
from mmopt.manifest import Manifest
from mmopt.stages import int8 as int8_stage
from mmopt.jobs.build import source_artifacts

from test_precision import heavy_tailed_matmul, toy  # noqa: F401  (toy: the module-scoped bundle fixture)


def cnn() -> onnx.ModelProto:
    """RGB stem conv -> Relu -> MaxPool, then two conv blocks and a linear head (the VQA encoder's shape)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate([(3, 8), (8, 16), (16, 16)]):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], name=f"pool{i}", kernel_shape=[2, 2],
                                   strides=[2, 2])]
        x = f"p{i}"
    inits += [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
              numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "wl")]
    nodes += [helper.make_node("ReduceMean", [x, "axes"], ["m"], name="mean", keepdims=0),
              helper.make_node("MatMul", ["m", "wl"], ["y"], name="linear")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))


def images(n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.uniform(0, 1, (8, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], optimized: str | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_stem_rewrite_is_exact_and_keeps_the_rgb_stem_fp32():
    proto = cnn()
    rewritten, stem = int8_stage.cpu_stems(proto)
    assert stem == ("conv0", "relu0", "pool0")
    order = [n.name for n in rewritten.graph.node][:3]
    assert order == ["conv0", "pool0", "relu0"]  # Relu moved after the pool it fed
    for f in images(2):
        np.testing.assert_array_equal(run(rewritten, f), run(proto, f))  # max-pool commutes with Relu exactly


def stems(chain: bool) -> onnx.ModelProto:
    """Two RGB inputs, each conv -> Relu -> MaxPool (-> Relu -> MaxPool when ``chain``) -> mean."""
    rng = np.random.default_rng(2)
    nodes, inits, ins, outs = [], [], [], []
    for k in range(2):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), f"w{k}"))
        ins.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["n", 3, 16, 16]))
        nodes += [helper.make_node("Conv", [f"x{k}", f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("MaxPool", [f"r{k}"], [f"p{k}"], name=f"pool{k}", kernel_shape=[2, 2],
                                   strides=[2, 2])]
        last = f"p{k}"
        if chain:
            nodes += [helper.make_node("Relu", [last], [f"rb{k}"], name=f"relub{k}"),
                      helper.make_node("MaxPool", [f"rb{k}"], [f"pb{k}"], name=f"poolb{k}", kernel_shape=[3, 3],
                                       strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)]
            last = f"pb{k}"
        nodes.append(helper.make_node("ReduceMean", [last], [f"y{k}"], name=f"mean{k}", keepdims=0, axes=[2, 3]))
        outs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "stems", ins, outs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("chain", [False, True])
def test_every_stem_and_every_relu_pool_pair_is_rewritten_exactly(chain):
    proto = stems(chain)
    rewritten, kept = int8_stage.cpu_stems(proto)
    assert len(kept) == (10 if chain else 6)
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node if n.name.endswith("0")]
    assert ops == (["Conv", "MaxPool", "Relu", "MaxPool", "Relu", "ReduceMean"] if chain
                   else ["Conv", "MaxPool", "Relu", "ReduceMean"])
    rng = np.random.default_rng(3)
    feeds = {f"x{k}": rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for k in range(2)}
    for a, b in zip(run(proto, feeds), run(rewritten, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_depthwise_conv_is_no_stem():
    """Its weight reads one channel per group, but the conv reads 8: it gets quantized like the rest."""
    w = np.ones((8, 1, 3, 3), np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    assert int8_stage.cpu_stems(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))[1] == ()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "auto"])
def test_cpu_form_fuses_into_integer_kernels_after_an_fp32_stem(tmp_path, method):
    proto, feeds = cnn(), images()
    res = int8_stage.quantize_static_qdq(proto, feeds, method, form="cpu")  # every written scale checked
    q, cfg = res.proto, res.config
    assert cfg["fp32_stem_nodes"] == ["conv0", "relu0", "pool0"] and cfg["quantized_nodes"] == 3
    assert "not a TensorRT input" in cfg["format"]
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    acts = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert cfg["checked_activation_scales"] == len([n for n in acts if n.input[0] not in init]) >= 3  # each one
    assert acts and all(init[n.input[2]].dtype == np.uint8 for n in acts)  # uint8 activations
    weights = [a for a in init.values() if a.dtype == np.int8 and a.ndim == 4]
    assert len(weights) == 2 and all(np.abs(w.astype(int)).max() <= 64 for w in weights)  # 7-bit: no AVX2 saturation
    # What ONNX Runtime makes of it: the two later convs integer (QLinearConv), the stem and its pool float.
    run(q, feeds[0], optimized=str(tmp_path / "opt.onnx"))
    ops = [(n.op_type, n.name) for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert sum(op == "QLinearConv" for op, _ in ops) == 2
    assert [op for op, name in ops if "conv0" in name] == ["Conv"]
    pools = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node if n.op_type == "MaxPool"]
    made = {o: n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node for o in n.output}
    assert not any(made.get(p.input[0]) == "QuantizeLinear" for p in pools)  # no uint8 pool on the stem's 32x32 map
    err = int8_stage.output_error(proto, q, feeds)
    assert 0 < err < 0.1
    with pytest.raises(ValueError, match="use one of tensorrt, cpu"):
        int8_stage.quantize_static_qdq(proto, feeds, method, form="CPU")


def test_cpu_form_uses_the_configured_method_ranges():
    proto, feeds = heavy_tailed_matmul()
    scale = {}
    for method in ("minmax", "percentile"):
        q = int8_stage.quantize_static_qdq(proto, feeds, method, form="cpu").proto
        init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        scale[method] = float(init[node.input[1]])
    lo, hi = min(float(f["x"].min()) for f in feeds), max(float(f["x"].max()) for f in feeds)
    assert scale["minmax"] == pytest.approx((hi - lo) / 255, rel=1e-4)
    assert scale["percentile"] < scale["minmax"] / 5


def test_toy_int8_cpu_and_the_auto_search(toy):  # noqa: F811
    r = api.quantize(toy.bundle, precision={"image": "int8-cpu", "text": "auto"}, sensitivity=False)
    m = Manifest.read(toy.bundle)
    image = m.artifact("image", "int8-cpu")
    assert image.file == "image.int8-cpu.onnx" and image.parent == "image/export/fp32"
    assert image.config["fp32_stem_nodes"] == ["node_conv2d", "node_relu"]  # RGB conv; its Relu feeds a mean
    table = m.results["policy_search"]
    tried = {row["label"].split("text=")[1].split()[0]: row for row in table["candidates"]}
    assert set(tried) == {"int8-cpu", "int8-dynamic", "fp32"}
    assert all(row["latency_ms"] > 0 and "accuracy" in row for row in tried.values())
    chosen = r.policy["text"]
    assert tried[chosen]["parity_ok"] and tried[chosen]["accuracy_ok"] and table["chosen"] == r.label
    assert r.accuracy["scores"][r.label] >= 0.9
    with pytest.raises(UsageError, match="symmetric int8"):
        source_artifacts(m, "int8-cpu")
    assert "int8-cpu" not in {a.precision for a in source_artifacts(m, None)}


def test_auto_stops_when_the_fixed_part_of_the_policy_fails(toy):  # noqa: F811
    """Every combination holds the fixed components: if they fail with the auto ones at fp32, none can pass."""
    from mmopt.errors import ParityError

    tight = toy(extra="[tolerance.int8-cpu]\nmax_norm_change = 0.0\n", name="tight.toml")
    before = {p.name: p.read_bytes() for p in toy.bundle.iterdir()}
    with pytest.raises(ParityError) as e:
        api.quantize(toy.bundle, tight, precision={"image": "int8-cpu", "text": "auto"}, sensitivity=False)
    assert str(e.value).startswith("image=int8-cpu text=fp32 fusion=fp32 (the fixed part of the policy, image=int8-cpu "
                                   "fusion=fp32, with every auto component at fp32)")
    assert 'No "auto" choice can pass when the fixed components fail.' in str(e.value)
    assert {p.name: p.read_bytes() for p in toy.bundle.iterdir()} == before
