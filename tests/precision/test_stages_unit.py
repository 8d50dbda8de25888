"""The int8 and fp16 stages and their ranges, part by part, on hand-built ONNX graphs of a few nodes run by
the real ONNX Runtime (fast and exact: the mutation run's group precision-stages leans on these; the
end-to-end precision tests beside this file export real models)."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmopt.errors import ConfigError, PrecisionError
from mmopt.stages import fp16, int8, ranges

RNG = np.random.default_rng(0)
TOL = {"max_abs": 1e-3, "max_rel": 1e-3, "min_cosine": 0.999, "min_argmax": 0.9, "max_norm_change": 0.05}


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws its data from a fresh generator: results do not depend on which tests ran before."""
    global RNG
    RNG = np.random.default_rng(0)


def model(nodes, inputs, outputs, inits=(), opset=17, check=True) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m)
    return m


def vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


W1 = RNG.standard_normal((8, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 4)).astype(np.float32)


def mlp() -> onnx.ModelProto:
    """x -MatMul-> a -Relu-> b -MatMul-> c -Softmax-> y, and an int64 Shape on the side."""
    return model([helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
                  helper.make_node("Relu", ["a"], ["b"], name="relu"),
                  helper.make_node("MatMul", ["b", "w2"], ["c"], name="mm2"),
                  helper.make_node("Softmax", ["c"], ["y"], name="soft", axis=-1),
                  helper.make_node("Shape", ["c"], ["s"], name="shape")],
                 [vi("x", ["n", 8])], [vi("y", ["n", 4]), vi("s", [2], TensorProto.INT64)],
                 [("w1", W1), ("w2", W2)])


def feeds(n=4, rows=16, scale=1.0):
    return [{"x": (scale * RNG.standard_normal((rows, 8))).astype(np.float32)} for _ in range(n)]


# ---- ranges ------------------------------------------------------------------------------------

def test_float_tensors_are_float32_tensors_with_their_producers():
    assert ranges.float_tensors(mlp()) == {"x": "", "a": "mm1", "b": "relu", "c": "mm2", "y": "soft"}


def test_extrema_and_absmax_over_every_feed_finite_values_only():
    m = model([helper.make_node("Mul", ["x", "k"], ["a"], name="mul"), helper.make_node("Relu", ["a"], ["y"])],
              [vi("x", [3])], [vi("y", [3])], [("k", np.array([2.0], np.float32))])
    fs = [{"x": np.array([1.0, -3.0, -np.inf], np.float32)}, {"x": np.array([0.5, 4.0, np.nan], np.float32)}]
    assert ranges.extrema(m, ["a"], fs) == {"a": (-6.0, 8.0)}
    assert ranges.absmax(m, ["a"], fs) == {"a": 8.0}
    nothing = [{"x": np.array([np.inf, -np.inf, np.nan], np.float32)}]
    assert ranges.extrema(m, ["a"], nothing) == {"a": (0.0, 0.0)}


def test_histograms_count_every_finite_value_over_zero_to_absmax():
    m = model([helper.make_node("Identity", ["x"], ["a"], name="id"), helper.make_node("Relu", ["a"], ["y"])],
              [vi("x", [4])], [vi("y", [4])])
    fs = [{"x": np.array([-4.0, 1.0, 2.0, np.inf], np.float32)}, {"x": np.array([0.0, 0.0, 3.0, 4.0], np.float32)}]
    counts, edges = ranges.histograms(m, ["a"], fs, bins=4)["a"]
    assert counts.tolist() == [2.0, 1.0, 1.0, 3.0] and edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    zeros = [{"x": np.zeros(4, np.float32)}]
    counts, edges = ranges.histograms(m, ["a"], zeros, bins=2)["a"]  # an all-zero tensor: range [0, 1]
    assert counts.tolist() == [4.0, 0.0] and edges.tolist() == [0.0, 0.5, 1.0]
    given = ranges.histograms(m, ["a"], fs, bins=2, top={"a": 8.0})["a"]
    assert given[1].tolist() == [0.0, 4.0, 8.0] and given[0].tolist() == [5.0, 2.0]


def test_thresholds_per_method():
    edges = np.linspace(0.0, 10.0, 11)
    few = np.array([5, 0, 3, 0, 0, 1, 0, 0, 0, 0], np.float64)
    assert ranges.threshold(few, edges, "minmax") == 6.0  # the upper edge of the last non-empty bin
    assert ranges.threshold(few, edges, "percentile") == 6.0  # too few values: the maximum
    assert ranges.threshold(np.zeros(10), edges, "entropy") == 10.0
    assert ranges.threshold(few, np.zeros(11), "entropy") == 0.0
    many = np.zeros(2048)
    many[:1000] = 100.0
    many[2000] = 1.0  # one outlier among 100,001 values
    e = np.linspace(0.0, 2048.0, 2049)
    assert ranges.threshold(many, e, "minmax") == 2001.0
    assert ranges.threshold(many, e, "percentile", 99.99) == 1000.0
    assert ranges.threshold(many, e, "percentile", 100.0) == 2001.0
    assert ranges.threshold(many, e, "percentile", 50.0) == 501.0  # the bin where the cdf reaches 50%, its top
    assert ranges.threshold(many, e, "entropy") == e[ranges._kl_bins(many)]
    with pytest.raises(ValueError, match="^unknown calibration method 'mse'$"):
        ranges.threshold(many, e, "mse")


def test_the_entropy_search():
    assert ranges._kl_bins(np.ones(100)) == 100  # no more bins than levels: nothing to clip
    flat = np.ones(1024)
    assert ranges._kl_bins(flat) == 1024  # uniform: every threshold loses nothing; ties go to the larger
    laplace = np.histogram(np.abs(np.random.default_rng(1).laplace(size=200000)), bins=2048)[0].astype(np.float64)
    assert ranges._kl_bins(laplace) == 1556  # a long tail is clipped: 3/4 of the range
    zero_heavy = laplace.copy()
    zero_heavy[0] = 1e9  # exact zeros (ReLU) are set to bin 1's count, not allowed to dominate
    assert ranges._kl_bins(zero_heavy) == 1556
    p = np.array([0.0, 2.0, 0.0, 2.0])
    s = ranges._smooth(p)
    assert s.sum() == pytest.approx(4.0) and s[0] == 1e-4 and s[1] == pytest.approx(2.0 - 1e-4)
    assert ranges._kl(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == 0.0
    assert ranges._kl(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(np.log(2.0))


# ---- int8 --------------------------------------------------------------------------------------

def test_calibrated_tensors_are_the_float_activations_compute_ops_read():
    assert int8.calibrated_tensors(mlp()) == ["b", "x"]


def test_sparse_tensors_fall_back_except_under_minmax():
    hists = {"a": (np.full(4, 10.0), np.linspace(0, 4, 5)), "b": (np.full(4, 1e5), np.linspace(0, 4, 5))}
    th, sparse = int8.thresholds_and_fallbacks(hists, "percentile")
    assert sparse == ["a"] and th["a"] == 4.0
    assert int8.thresholds_and_fallbacks(hists, "minmax")[1] == []


def test_check_exclude_names_the_compute_nodes_and_a_near_miss():
    int8.check_exclude(mlp(), ("mm1",), "text", "mmopt.toml")
    with pytest.raises(ConfigError) as e:
        int8.check_exclude(mlp(), ("mm3", "zzz"), "text", "mmopt.toml")
    assert str(e.value) == ("mmopt.toml: field 'precision.exclude.text': no node named 'mm3' (did you mean 'mm2'?), "
                            "'zzz' in text's graph. Its Conv / MatMul / Gemm nodes are: mm1, mm2. The sensitivity "
                            "report names the nodes to exclude.")


def test_tensorrt_form_qdq_placement_and_scales():
    out = int8.qdq(mlp(), {"x": 2.54, "b": 1.27})
    q = [n for n in out.graph.node if n.op_type == "QuantizeLinear"]
    init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    acts = {n.input[0]: float(init[n.input[1]]) for n in q if n.input[0] not in init}
    assert acts == {"x": pytest.approx(0.02), "b": pytest.approx(0.01)}  # only the compute ops' inputs
    assert all(init[n.input[2]].dtype == np.int8 and not init[n.input[2]].any() for n in q if len(n.input) > 2)
    assert [n.name for n in int8.graph.quantized_nodes(out, int8.COMPUTE_OPS)] == ["mm1", "mm2"]
    assert int8.check_scales(out, {"x": 0.02, "b": 0.01}, symmetric=True) == 2
    excluded = int8.qdq(mlp(), {"x": 2.54, "b": 1.27}, exclude=("mm2",))
    assert [n.name for n in int8.graph.quantized_nodes(excluded, int8.COMPUTE_OPS)] == ["mm1"]


def test_check_scales_refuses_other_scales_unranged_tensors_and_zero_points():
    out = int8.qdq(mlp(), {"x": 2.54, "b": 1.27})
    with pytest.raises(RuntimeError, match=r"^int8: quantizer wrote scale 0\.00999999\d* / zero point 0 for b, "
                                           r"expected 0\.011 / 0 from the computed ranges$"):
        int8.check_scales(out, {"x": 0.02, "b": 0.011}, symmetric=True)
    with pytest.raises(RuntimeError, match="^int8: the quantizer quantized 'b', for which mmopt computed no range"):
        int8.check_scales(out, {"x": 0.02}, symmetric=True)
    zp = next(t for t in out.graph.initializer if t.name.endswith("zero_point") and "b" in t.name)
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    with pytest.raises(RuntimeError, match=r"expected 0\.01 / 0 from the computed ranges$"):
        int8.check_scales(out, {"x": 0.02, "b": 0.01}, symmetric=True)
    assert int8.check_scales(out, {"x": 0.02, "b": 0.01}, symmetric=False) == 2
    assert int8.check_scales(mlp(), {}, symmetric=True) == 0


def test_cpu_form_ranges_are_clipped_and_pools_take_their_inputs_range():
    m = model([helper.make_node("Relu", ["x"], ["a"], name="r"),
               helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2]),
               helper.make_node("MaxPool", ["p"], ["y"], name="pool2", kernel_shape=[1])],
              [vi("x", [1, 1, 4])], [vi("y", [1, 1, 3])])
    lohi = {"x": (-5.0, 5.0), "a": (0.0, 5.0), "p": (0.0, 9.0), "y": (0.0, 9.0)}
    th = {"x": 3.0, "a": 4.0, "p": 9.0, "y": 9.0}
    assert int8.clipped(m, lohi, th, ()) == {"x": (-3.0, 3.0), "a": (0.0, 4.0), "p": (0.0, 4.0), "y": (0.0, 4.0)}
    assert int8.clipped(m, lohi, th, ("pool",))["p"] == (0.0, 9.0)
    assert int8.clipped(m, lohi, th, ("pool",))["y"] == (0.0, 9.0)
    assert int8.cpu_tensors(m, ()) == ["a", "p", "x", "y"] and int8.cpu_tensors(m, ("r", "pool")) == ["p", "y"]


def conv_net(cin: int) -> onnx.ModelProto:
    w = RNG.standard_normal((4, cin, 1, 1)).astype(np.float32)
    return model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                  helper.make_node("Relu", ["c"], ["r"], name="relu"),
                  helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2])],
                 [vi("x", [1, cin, 4, 4])], [vi("y", [1, 4, 3, 3])], [("w", w)])


def test_cpu_stems_keep_the_rgb_stem_fp32_and_pool_before_the_relu():
    net = conv_net(3)
    out, keep = int8.cpu_stems(net)
    assert keep == ("conv", "relu", "pool")
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == [
        ("Conv", ["x", "w"], ["c"]), ("MaxPool", ["c"], ["r"]), ("Relu", ["r"], ["y"])]
    x = {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    ref = ranges.run_all(ranges.session(net, []), x)["y"]
    assert np.array_equal(ranges.run_all(ranges.session(out, []), x)["y"], ref)  # exact: max commutes with Relu
    assert int8.cpu_stems(conv_net(4))[1] == ("conv", "relu", "pool")
    wide, keep = int8.cpu_stems(conv_net(8))
    assert keep == () and [n.op_type for n in wide.graph.node] == ["Conv", "Relu", "MaxPool"]


def test_gemm_becomes_matmul_and_add_with_the_same_values():
    w = RNG.standard_normal((4, 8)).astype(np.float32)
    bias = RNG.standard_normal(4).astype(np.float32)

    def gemm(**attrs):
        return model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, **attrs)],
                     [vi("x", [2, 8])], [vi("y", [2, 4])], [("w", w), ("b", bias)])

    out = int8.gemm_as_matmul(gemm())
    assert [(n.op_type, n.name) for n in out.graph.node] == [("MatMul", "fc"), ("Add", "fc__bias")]
    assert {t.name for t in out.graph.initializer} == {"w__kn", "b"}
    x = {"x": RNG.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(ranges.run_all(ranges.session(out, []), x)["y"], x["x"] @ w.T + bias, rtol=1e-5)
    for attrs in ({"alpha": 2.0}, {"beta": 0.5}, {"transA": 0, "alpha": 1.0, "beta": 1.0}):
        kept = [n.op_type for n in int8.gemm_as_matmul(gemm(**attrs)).graph.node]
        assert kept == (["MatMul", "Add"] if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                        else ["Gemm"])
    no_bias = model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [vi("x", [2, 8])], [vi("y", [2, 8])],
                    [("w", W1)])
    assert [(n.op_type, list(n.output)) for n in int8.gemm_as_matmul(no_bias).graph.node] == [("MatMul", ["y"])]


def test_output_error_is_the_worst_relative_rms_error():
    scaled = mlp()
    w2 = next(t for t in scaled.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(W2 * 1.0, "w2"))
    assert int8.output_error(mlp(), scaled, feeds(2)) == 0.0
    half = model([helper.make_node("Mul", ["x", "k"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                 [("k", np.array([0.5], np.float32))])
    same = model([helper.make_node("Mul", ["x", "k"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                 [("k", np.array([1.0], np.float32))])
    assert int8.output_error(same, half, [{"x": np.array([1.0, 3.0], np.float32)}]) == pytest.approx(0.5)


def test_static_int8_end_to_end_records_what_it_did():
    res = int8.quantize_static_qdq(mlp(), feeds(4, rows=1024), "percentile", samples=64)
    c = res.config
    assert (c["method"], c["samples"], c["quantized_nodes"], c["checked_activation_scales"]) == ("percentile", 64, 2, 2)
    assert c["percentile"] == ranges.PERCENTILE and c["excluded_nodes"] == [] and "minmax_fallback" not in c
    assert set(c["activation_thresholds"]) == {"b", "x"} == set(res.thresholds)
    assert c["op_types"] == ["Conv", "MatMul", "Gemm"] and c["format"].startswith("QDQ (symmetric int8")
    sparse = int8.quantize_static_qdq(mlp(), feeds(1, rows=4), "entropy")
    assert sparse.config["minmax_fallback"]["tensors"] == ["b", "x"] and "percentile" not in sparse.config
    assert sparse.config["minmax_fallback"]["why"] == ("seen in fewer than 16384 calibration values: too few for "
                                                       "entropy's histogram")
    with pytest.raises(ValueError, match="^int8 form 'gpu': use one of tensorrt, cpu$"):
        int8.quantize_static_qdq(mlp(), feeds(1), "minmax", form="gpu")


def test_auto_holds_out_the_last_quarter_and_keeps_the_closest_method():
    res = int8.quantize_static_qdq(mlp(), feeds(8, rows=512), "auto")
    search = res.config["method_search"]
    assert search["held_out_batches"] == 2 and set(search["relative_error"]) == {"minmax", "percentile", "entropy"}
    errors = search["relative_error"]
    assert search["chosen"] == min(errors, key=errors.get) == res.config["method"]
    assert int8.quantize_static_qdq(mlp(), feeds(1), "auto").config["method_search"]["held_out_batches"] == 1


def test_cpu_form_end_to_end():
    res = int8.quantize_static_qdq(conv_net(8), [{"x": RNG.standard_normal((1, 8, 4, 4)).astype(np.float32)}
                                                  for _ in range(3)], "minmax", form="cpu")
    assert res.config["op_types"] == list(int8.CPU_OPS) and "fp32_stem_nodes" not in res.config
    assert res.config["checked_activation_scales"] >= 1
    stem = int8.quantize_static_qdq(conv_net(3), [{"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)}],
                                    "minmax", form="cpu")
    assert stem.config["fp32_stem_nodes"] == ["conv", "relu", "pool"] and stem.config["quantized_nodes"] == 0


def test_dynamic_int8_counts_its_quantized_matmuls():
    res = int8.quantize_dynamic_int8(mlp())
    assert res.config["quantized_nodes"] == 2 and res.thresholds == {}
    assert int8.quantize_dynamic_int8(mlp(), exclude=("mm2",)).config["quantized_nodes"] == 1


# ---- fp16 --------------------------------------------------------------------------------------

def fragile_net() -> onnx.ModelProto:
    return model([helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
                  helper.make_node("ReduceMean", ["a"], ["m"], name="mean", axes=[-1], keepdims=1),
                  helper.make_node("Pow", ["m", "two"], ["p"], name="pow"),
                  helper.make_node("Softmax", ["a"], ["s"], name="soft", axis=-1),
                  helper.make_node("Mul", ["s", "p"], ["y"], name="mul")],
                 [vi("x", ["n", 8])], [vi("y", ["n", 8])], [("w1", W1), ("two", np.array([2.0], np.float32))])


def test_islands_for_overflow_underflow_and_fragile_nodes():
    m = fragile_net()
    floats = ranges.float_tensors(m)
    top = {"x": 1.0, "a": 20000.0, "m": 1e-6, "p": 1.0, "s": 1.0, "y": 1.0}
    got = fp16.plan_islands(m, floats, top)
    assert got == {
        "mm": "overflow: 'a' reaches |x| 2e+04 (fp16 max 65504, kept 4x headroom)",
        "mean": "overflow: 'a' reaches |x| 2e+04 (fp16 max 65504, kept 4x headroom)",
        "soft": "overflow: 'a' reaches |x| 2e+04 (fp16 max 65504, kept 4x headroom)",
        "pow": "underflow: 'm' peaks at |x| 1e-06, below fp16's normal range (6.1e-05)"}
    calm = {**top, "a": 16.0, "m": 0.5}
    assert fp16.plan_islands(m, floats, calm) == {
        "mean": "fragile: ReduceMean (a reduction over many values: fp16 accumulates it with too few bits)",
        "pow": "fragile: Pow"}
    hot = {**calm, "a": 16.5}
    assert fp16.plan_islands(m, floats, hot)["soft"] == "fragile: Softmax input reaches |x| 16.5 (> 16, coarse fp16 steps)"
    assert fp16.plan_islands(m, floats, top, guard=False) == {
        **fp16.plan_islands(m, floats, calm), "soft": "fragile: Softmax input reaches |x| 2e+04 (> 16, coarse fp16 steps)"}
    assert fp16.plan_islands(m, floats, calm, fragile=False) == {}
    edge = {**calm, "a": fp16.FP16_MAX / fp16.HEADROOM, "m": fp16.FP16_MIN_NORMAL}
    assert fp16.plan_islands(m, floats, edge, fragile=False) == {}  # at the limits: still fp16
    assert fp16.plan_islands(m, floats, {**calm, "m": 0.0}, fragile=False) == {}  # all zeros: no underflow


def test_transposes_beside_fp32_matmuls_join_them():
    m = model([helper.make_node("LayerNormalization", ["x", "g"], ["n"], name="ln", axis=-1),
               helper.make_node("Transpose", ["n"], ["t"], name="tr"),
               helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")],
              [vi("x", [8, 8])], [vi("y", [8, 8])], [("g", np.ones(8, np.float32)), ("w", W1)])
    assert fp16.legalise(m, {"ln": "fragile"}) == {
        "ln": "fragile", "tr": "joins the fp32 LayerNormalization that feeds it (onnxruntime's CPU optimiser crashes "
                               "on a Cast between it and the fp16 MatMul)"}
    assert fp16.legalise(m, {"mm": "widened"}) == {
        "mm": "widened", "tr": "joins the fp32 MatMul it feeds (onnxruntime's CPU optimiser crashes on the mixed "
                               "pattern)"}
    assert fp16.legalise(m, {}) == {}
    assert fp16.legalise(m, {"tr": "kept"}) == {"tr": "kept"}


def test_join_islands_passes_fp32_values_between_fp32_nodes():
    m = model([helper.make_node("Cast", ["x"], ["h"], name="c1", to=TensorProto.FLOAT16),
               helper.make_node("Cast", ["h"], ["y"], name="c2", to=TensorProto.FLOAT),
               helper.make_node("Cast", ["i"], ["ih"], name="c3", to=TensorProto.FLOAT16),
               helper.make_node("Cast", ["ih"], ["z"], name="c4", to=TensorProto.FLOAT)],
              [vi("x", [2]), vi("i", [2], TensorProto.INT64)], [vi("y", [2]), vi("z", [2])])
    fp16.join_islands(m)
    assert [(n.name, n.op_type, list(n.input)) for n in m.graph.node] == [
        ("c2", "Identity", ["x"]), ("c3", "Cast", ["i"]), ("c4", "Cast", ["ih"])]  # c1 read by nothing: pruned
    x = np.array([1.0001, 3.14159], np.float32)
    assert np.array_equal(ranges.run_all(ranges.session(m, []), {"x": x, "i": np.array([1, 2])})["y"], x)


def test_emulation_stores_every_tensor_in_fp16_and_leaves_exact_ops_alone():
    m = model([helper.make_node("Add", ["x", "x"], ["a"], name="add"),
               helper.make_node("Relu", ["a"], ["r"], name="relu"),
               helper.make_node("Mul", ["r", "r"], ["y"], name="mul")],
              [vi("x", [4], TensorProto.FLOAT16)], [vi("y", [4], TensorProto.FLOAT16)])
    emu = fp16.emulate(m)
    ops = [(n.op_type, n.name) for n in emu.graph.node]
    assert ops == [("Cast", "add__emu_in0"), ("Add", "add"), ("Cast", "add__emu_out0"), ("Relu", "relu"),
                   ("Cast", "mul__emu_in0"), ("Mul", "mul"), ("Cast", "mul__emu_out0")]
    add = next(n for n in emu.graph.node if n.name == "add")
    assert list(add.input) == ["x__emu32_add", "x__emu32_add"]  # one cast per distinct input
    x = np.array([1.0009765625, 100.0, -2.0, 0.1], np.float16)
    a = np.float16(x.astype(np.float32) * 2)
    want = np.float16(np.maximum(a, 0).astype(np.float32) ** 2)
    assert np.array_equal(ranges.run_all(ranges.session(emu, []), {"x": x})["y"], want)
    assert list(emu.graph.value_info) == []


def test_relative_error():
    assert fp16._rel(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0
    assert fp16._rel(np.array([2.0, 2.0]), np.array([1.0, 1.0])) == 1.0
    assert fp16._rel(np.array([np.inf, 1.0]), np.array([1.0, 1.0])) == float("inf")
    assert fp16._rel(np.array([np.inf, 2.0]), np.array([np.inf, 1.0])) == 1.0  # non-finite reference skipped
    assert fp16._rel(np.array([0.0]), np.array([0.0])) == 0.0 and fp16._rel(np.array([1.0]), np.array([0.0])) == 1.0
    assert fp16._rel(np.array([5.0]), np.array([np.nan])) == 0.0


def test_fp16_conversion_keeps_io_types_and_passes_on_a_calm_graph():
    calm = feeds(2, scale=0.2)  # Softmax inputs well under 16: no fragile island
    res = fp16.to_fp16(mlp(), calm, [(f, ranges.run_all(ranges.session(mlp(), []), f)) for f in calm],
                       {**TOL, "max_abs": 0.05, "max_rel": 0.05, "min_cosine": 0.99}, "text")
    assert res.islands == {} and res.rounds == [{"fp32_nodes": 0, "failed_outputs": 0}]
    assert [i.type.tensor_type.elem_type for i in res.proto.graph.input] == [TensorProto.FLOAT]
    assert all(not c.failed for c in res.checks) and {c.case for c in res.checks} == {"case0", "case1"}


def test_fp16_widens_the_nodes_that_add_most_error_until_parity_holds():
    big = (RNG.standard_normal((8, 8)) * 30).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
               helper.make_node("Sin", ["a"], ["y"], name="sin")],  # sin of large values: fp16 rounding shows
              [vi("x", ["n", 8])], [vi("y", ["n", 8])], [("w", big)])
    fs = feeds(1, rows=8, scale=10.0)
    cases = [(f, ranges.run_all(ranges.session(m, []), f)) for f in fs]
    tight = {**TOL, "max_abs": 1e-4, "max_rel": 1e-4}
    res = fp16.to_fp16(m, fs, cases, tight, "text")
    assert len(res.rounds) >= 2 and res.rounds[-1]["failed_outputs"] == 0
    assert res.rounds[0] == {"fp32_nodes": 0, "failed_outputs": 1}
    assert all(why.startswith("widened in parity round ") for why in res.islands.values())
    once = fp16.to_fp16(m, fs, cases, tight, "text", widen=False)
    assert len(once.rounds) == 1 and any(c.failed for c in once.checks)
    impossible = {**tight, "min_cosine": 1.5}
    with pytest.raises(PrecisionError) as e:
        fp16.to_fp16(m, fs, cases, impossible, "text")
    assert str(e.value).startswith("component 'text': fp16 misses [tolerance.fp16] even with every one of its 2 "
                                   "computing nodes kept in fp32:\n  text@case0 y: cosine")
    assert str(e.value).endswith('Loosen [tolerance.fp16] or set text = "fp32" under [precision].')


def test_added_error_ranks_by_the_error_a_node_adds():
    big = (RNG.standard_normal((8, 8)) * 30).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
               helper.make_node("Sin", ["a"], ["s"], name="sin"),
               helper.make_node("Relu", ["s"], ["y"], name="relu")],
              [vi("x", ["n", 8])], [vi("y", ["n", 8])], [("w", big)])
    floats = ranges.float_tensors(m)
    half = fp16.convert(m, set())
    ranked = fp16.added_error(m, half, floats, feeds(1, rows=8, scale=10.0)[0], ["mm", "sin", "relu"])
    assert [n for n, _ in ranked][0] == "sin" and set(dict(ranked)) == {"mm", "sin", "relu"}
    assert ranked == sorted(ranked, key=lambda x: -x[1])


def test_an_fp16_graph_onnxruntime_cannot_load_is_an_error(tmp_path):
    broken = mlp()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(PrecisionError, match=r"^component 'text': onnxruntime cannot load the fp16 graph \(.+\)\. "
                                             r"Set text = \"fp32\" under \[precision\] and report the graph\.$"):
        fp16.loads_in_onnxruntime(broken, "text")
    fp16.loads_in_onnxruntime(mlp(), "text")


# ---- what the quantizers are asked for, seen in the graphs they write ---------------------------

def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def qlinear(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "QuantizeLinear"]


def conv_bias_net(cin: int = 8) -> onnx.ModelProto:
    w = RNG.standard_normal((4, cin, 1, 1)).astype(np.float32)
    return model([helper.make_node("Conv", ["x", "w", "bias"], ["c"], name="conv"),
                  helper.make_node("Relu", ["c"], ["y"], name="relu")],
                 [vi("x", [1, cin, 4, 4])], [vi("y", [1, 4, 4, 4])],
                 [("w", w), ("bias", RNG.standard_normal(4).astype(np.float32))])


def test_tensorrt_form_weights_symmetric_per_channel_bias_float_one_pair_per_reader():
    shared = model([helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
                    helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
                    helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=-1)],
                   [vi("x", ["n", 8])], [vi("y", ["n", 12])], [("w1", W1), ("w2", W2)])
    out = int8.qdq(shared, {"x": 1.27})
    acts = [n for n in qlinear(out) if n.input[0] == "x"]
    assert len(acts) == 2  # a dedicated Q/DQ pair for each reader of x
    conv = int8.qdq(conv_bias_net(), {"x": 1.27})
    init = inits(conv)
    weight_q = [n for n in qlinear(conv) if n.input[0] in init]
    if weight_q:  # weights as QuantizeLinear(initializer)
        scale, zp = init[weight_q[0].input[1]], init[weight_q[0].input[2]]
    else:  # or already as int8 initializers behind a DequantizeLinear
        dq = next(n for n in conv.graph.node if n.op_type == "DequantizeLinear" and init[n.input[0]].dtype == np.int8
                  and init[n.input[0]].ndim == 4)
        scale, zp = init[dq.input[1]], init[dq.input[2]]
    assert scale.shape == (4,) and zp.dtype == np.int8 and not zp.any()  # per output channel, symmetric
    node = next(n for n in conv.graph.node if n.op_type == "Conv")
    made = int8.graph.producers(conv.graph)
    assert node.input[2] not in made and init[node.input[2]].dtype == np.float32  # bias stays float


def test_cpu_form_is_uint8_activations_with_7_bit_weights():
    cpu = int8.qdq_cpu(conv_bias_net(), {"x": (-1.0, 1.0), "c": (-2.0, 2.0), "y": (0.0, 2.0)}, ())
    init = inits(cpu)
    act = next(n for n in qlinear(cpu) if n.input[0] == "x")
    assert init[act.input[2]].dtype == np.uint8
    q_weights = [a for a in init.values() if a.dtype == np.int8 and a.ndim == 4]
    assert q_weights and all(np.abs(a.astype(int)).max() <= 64 for a in q_weights)  # reduce_range: 7 bits
    two_acts = model([helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")], [vi("x", [2, 2]), vi("z", [2, 2])],
                     [vi("y", [2, 2])])
    # a MatMul of two activations (attention scores) is quantized too: onnxruntime's QDQ quantizer has no
    # "constant B only" mode (it ignores MatMulConstBOnly); the parity gates judge it
    assert [n.name for n in int8.graph.quantized_nodes(
        int8.qdq_cpu(two_acts, {"x": (-1, 1), "z": (-1, 1), "y": (-2, 2)}, ()), int8.CPU_OPS)] == ["mm"]


def test_dynamic_int8_quantizes_matmul_weights_per_tensor_and_says_so():
    res = int8.quantize_dynamic_int8(mlp(), exclude=("mm2",))
    assert isinstance(res.proto, onnx.ModelProto) and res.thresholds == {}
    assert res.config == {"format": "dynamic int8 (weights int8, activations quantized at run time; CPU only, not a "
                                    "TensorRT input)", "op_types": ["MatMul", "Gemm (as MatMul + Add)"],
                          "quantized_nodes": 1, "excluded_nodes": ["mm2"]}
    init = inits(res.proto)
    scales = [a for n, a in init.items() if n.endswith("_scale")]
    assert scales and all(a.size == 1 for a in scales)  # per tensor
    conv = int8.quantize_dynamic_int8(conv_bias_net())
    assert conv.config["quantized_nodes"] == 0 and [n.op_type for n in conv.proto.graph.node] == ["Conv", "Relu"]


def test_static_int8_config_exactly():
    res = int8.quantize_static_qdq(mlp(), feeds(2), "minmax", exclude=("mm2",))
    assert isinstance(res.proto, onnx.ModelProto)
    c = res.config
    assert {k: c[k] for k in ("format", "method", "samples", "op_types", "quantized_nodes", "excluded_nodes")} == {
        "format": "QDQ (symmetric int8, per-channel weights, float bias)", "method": "minmax", "samples": 0,
        "op_types": ["Conv", "MatMul", "Gemm"], "quantized_nodes": 1, "excluded_nodes": ["mm2"]}
    cpu = int8.quantize_static_qdq(conv_bias_net(), [{"x": RNG.standard_normal((1, 8, 4, 4)).astype(np.float32)}],
                                   "minmax", form="cpu")
    assert cpu.config["format"] == ("QDQ for ONNX Runtime CPU (uint8 asymmetric activations, 7-bit per-channel int8 "
                                    "weights, Relu / MaxPool quantized; not a TensorRT input)")


def test_thresholds_cover_negative_extremes_and_every_feed():
    fs = [{"x": np.full((4, 8), 0.5, np.float32)}, {"x": np.full((4, 8), -40.0, np.float32)}]
    res = int8.quantize_static_qdq(mlp(), fs, "minmax")
    assert res.thresholds["x"] == pytest.approx(40.0)  # |x| of the last feed: a histogram over [0, 40]


def test_held_out_batches_for_auto():
    for n, held in [(2, 1), (4, 1), (8, 2), (12, 3)]:
        res = int8.quantize_static_qdq(mlp(), feeds(n), "auto")
        assert res.config["method_search"]["held_out_batches"] == held
    errors = res.config["method_search"]["relative_error"]
    assert all(round(e, 6) == e for e in errors.values())
    # too few values for percentile and entropy: every method is minmax, and the first tried wins the tie
    tie = int8.quantize_static_qdq(mlp(), feeds(2, rows=2), "auto").config
    assert len(set(tie["method_search"]["relative_error"].values())) == 1 and tie["method"] == "minmax"


def test_the_sparse_limit_is_exclusive():
    at = {"a": (np.full(4, ranges.MIN_VALUES / 4), np.linspace(0, 4, 5))}
    assert int8.thresholds_and_fallbacks(at, "entropy")[1] == []
    below = {"a": (np.full(4, ranges.MIN_VALUES / 4 - 0.25), np.linspace(0, 4, 5))}
    assert int8.thresholds_and_fallbacks(below, "entropy")[1] == ["a"]


def test_cpu_scales_are_checked_on_positive_small_and_all_zero_ranges():
    net = conv_net(8)
    small = [{"x": RNG.uniform(0.01, 0.5, (1, 8, 4, 4)).astype(np.float32)} for _ in range(2)]
    assert int8.quantize_static_qdq(net, small, "minmax", form="cpu").config["checked_activation_scales"] >= 1
    negative = [{"x": -RNG.uniform(0.1, 1.0, (1, 8, 4, 4)).astype(np.float32)}]
    res = int8.quantize_static_qdq(model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                                          helper.make_node("Conv", ["r", "w"], ["y"], name="conv")],
                                         [vi("x", [1, 8, 4, 4])], [vi("y", [1, 4, 4, 4])],
                                         [("w", RNG.standard_normal((4, 8, 1, 1)).astype(np.float32))]),
                                   negative, "minmax", form="cpu")
    assert res.config["checked_activation_scales"] >= 1  # r is all zeros: scale 1.0, as onnxruntime writes


def test_asymmetric_scale_mismatch_message():
    cpu = int8.qdq_cpu(conv_bias_net(), {"x": (-1.0, 1.0), "c": (-2.0, 2.0), "y": (0.0, 2.0)}, ())
    with pytest.raises(RuntimeError, match=r"for x, expected 0\.5 from the computed ranges$"):
        int8.check_scales(cpu, {"x": 0.5, "c": 4 / 255, "y": 2 / 255}, symmetric=False)


def test_exclusion_hints_list_at_most_30_nodes():
    def chain(n):
        nodes = [helper.make_node("MatMul", [f"t{i}", "w"], [f"t{i + 1}"], name=f"mm{i:02d}") for i in range(n)]
        return model(nodes, [vi("t0", [8, 8])], [vi(f"t{n}", [8, 8])], [("w", W1)])

    for n, tail in [(30, ""), (31, " ...")]:
        with pytest.raises(ConfigError) as e:
            int8.check_exclude(chain(n), ("nope",), "text", "c.toml")
        listed = str(e.value).split("nodes are: ")[1].split(". The sensitivity")[0]
        assert listed == ", ".join(f"mm{i:02d}" for i in range(30)) + tail


def test_stems_are_convolutions_only_counting_input_channels_across_groups():
    assert int8.cpu_stems(mlp())[1] == ()  # a MatMul with a 4-wide weight is no stem
    depthwise = model([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8)], [vi("x", [1, 8, 4, 4])],
                      [vi("y", [1, 8, 4, 4])], [("w", RNG.standard_normal((8, 1, 1, 1)).astype(np.float32))])
    assert int8.cpu_stems(depthwise)[1] == ()  # 1 channel per group, 8 in all
    pool_first = model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2]),
                        helper.make_node("Relu", ["p"], ["y"], name="relu")],
                       [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 3, 3])],
                       [("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32))])
    out, keep = int8.cpu_stems(pool_first)
    assert keep == ("conv", "pool", "relu") and [n.op_type for n in out.graph.node] == ["Conv", "MaxPool", "Relu"]
    typed = onnx.shape_inference.infer_shapes(conv_net(3))
    swapped, _ = int8.cpu_stems(typed)
    assert {v.name for v in swapped.graph.value_info} == {v.name for v in typed.graph.value_info} - {"r"}


def test_gemm_rewrite_keeps_orientation_and_skips_what_it_cannot_rewrite():
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    plain = model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [vi("x", [2, 8])], [vi("y", [2, 4])],
                  [("w", w)])
    x = {"x": RNG.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(ranges.run_all(ranges.session(int8.gemm_as_matmul(plain), []), x)["y"], x["x"] @ w,
                               rtol=1e-5)
    trans_a = model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)], [vi("x", [8, 2])],
                    [vi("y", [2, 4])], [("w", w)])
    assert [n.op_type for n in int8.gemm_as_matmul(trans_a).graph.node] == ["Gemm"]
    live_b = model([helper.make_node("Gemm", ["x", "z"], ["y"], name="fc")], [vi("x", [2, 8]), vi("z", [8, 4])],
                   [vi("y", [2, 4])])
    assert [n.op_type for n in int8.gemm_as_matmul(live_b).graph.node] == ["Gemm"]


# ---- fp16, more exactly ------------------------------------------------------------------------

def test_islands_for_graph_inputs_outputs_and_tensors_without_a_maximum():
    m = fragile_net()
    floats = ranges.float_tensors(m)
    over_in = fp16.plan_islands(m, floats, {"x": 1e5}, fragile=False)
    assert set(over_in) == {"mm"}  # a graph input has no producer: only its readers
    over_out = fp16.plan_islands(m, floats, {"y": 1e5}, fragile=False)
    assert set(over_out) == {"mul"}  # a graph output has no readers: only its producer
    assert fp16.plan_islands(m, floats, {}) == {"mean": fp16.plan_islands(m, floats, {})["mean"], "pow": "fragile: Pow"}


def test_legalise_looks_at_every_input_and_gemm_too():
    m = model([helper.make_node("LayerNormalization", ["x", "g"], ["n"], name="ln", axis=-1),
               helper.make_node("Relu", ["x"], ["r"], name="relu"),
               helper.make_node("Transpose", ["n"], ["t"], name="tr"),
               helper.make_node("MatMul", ["r", "t"], ["y"], name="mm")],
              [vi("x", [8, 8])], [vi("y", [8, 8])], [("g", np.ones(8, np.float32))])
    assert set(fp16.legalise(m, {"ln": "fragile"})) == {"ln", "tr"}  # the Transpose is the second input
    assert set(fp16.legalise(m, {"mm": "widened"})) == {"mm", "tr"}  # the Relu is no Transpose: left alone
    g = model([helper.make_node("Transpose", ["x"], ["t"], name="tr"),
               helper.make_node("Gemm", ["t", "w"], ["y"], name="fc")],
              [vi("x", [8, 8])], [vi("y", [8, 8])], [("w", W1)])
    assert set(fp16.legalise(g, {"fc": "widened"})) == {"fc", "tr"}


def test_join_islands_goes_on_past_casts_it_cannot_join():
    m = model([helper.make_node("Cast", ["i"], ["ih"], name="c3", to=TensorProto.FLOAT16),
               helper.make_node("Cast", ["ih"], ["z"], name="c4", to=TensorProto.FLOAT),
               helper.make_node("Relu", ["x"], ["xr"], name="relu"),
               helper.make_node("Cast", ["xr"], ["h"], name="c1", to=TensorProto.FLOAT16),
               helper.make_node("Cast", ["h"], ["y"], name="c2", to=TensorProto.FLOAT)],
              [vi("x", [2]), vi("i", [2], TensorProto.INT64)], [vi("y", [2]), vi("z", [2])])
    fp16.join_islands(m)
    assert [(n.name, n.op_type) for n in m.graph.node] == [("c3", "Cast"), ("c4", "Cast"), ("relu", "Relu"),
                                                           ("c2", "Identity")]


def test_emulation_casts_only_fp16_inputs_of_standard_domain_nodes():
    m = model([helper.make_node("Pow", ["x", "e"], ["p"], name="pow"),
               helper.make_node("Add", ["p", "p"], ["y"], name="add")],
              [vi("x", [4], TensorProto.FLOAT16), vi("e", [1])], [vi("y", [4], TensorProto.FLOAT16)])
    emu = fp16.emulate(m)
    assert [(n.op_type, n.name) for n in emu.graph.node] == [
        ("Cast", "pow__emu_in0"), ("Pow", "pow"), ("Cast", "pow__emu_out0"), ("Cast", "add__emu_in0"), ("Add", "add"),
        ("Cast", "add__emu_out0")]


def test_relative_error_scales():
    assert fp16._rel(np.array([4.0, 4.0]), np.array([2.0, 2.0])) == 1.0  # RMS, not a higher moment
    assert fp16._rel(np.array([0.75]), np.array([0.5])) == 0.5  # a scale under 1 still divides


def test_check_gates_argmax_on_score_outputs():
    m = mlp()
    f = feeds(1)[0]
    ref = ranges.run_all(ranges.session(m, []), f)
    half = fp16.convert(m, set())
    assert fp16.check(half, [(f, ref)], TOL, "text", frozenset({"y"}))[0].metrics.argmax is not None
    assert all(c.metrics.argmax is None for c in fp16.check(half, [(f, ref)], TOL, "text"))


def test_widening_doubles_the_nodes_per_round_and_says_what_each_added():
    big = (RNG.standard_normal((8, 8)) * 30).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t0"], name="mm")]
    nodes += [helper.make_node("Sin", [f"t{i}"], [f"t{i + 1}"], name=f"sin{i}") for i in range(6)]
    nodes += [helper.make_node("Mul", ["t6", "k"], ["y"], name="scale")]
    m = model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 8])], [("w", big), ("k", np.array([100.0], np.float32))])
    fs = feeds(1, rows=8, scale=10.0)
    cases = [(f, ranges.run_all(ranges.session(m, []), f)) for f in fs]
    res = fp16.to_fp16(m, fs, cases, {**TOL, "max_abs": 1e-6, "max_rel": 1e-6, "min_cosine": 0.999999}, "text")
    counts = [r["fp32_nodes"] for r in res.rounds]
    assert counts[:3] == [0, 1, 3] and counts == sorted(counts)  # 1, then 2, then 4 more nodes a round
    first = [why for why in res.islands.values() if why.startswith("widened in parity round 1")]
    assert len(first) == 1 and re.fullmatch(r"widened in parity round 1: adds relative error [0-9.e+-]+", first[0])


def test_defaults_guard_and_fragile():
    m = fragile_net()
    fs = feeds(1, rows=4, scale=0.2)
    ref = ranges.run_all(ranges.session(m, []), fs[0])
    res = fp16.to_fp16(m, fs, [(fs[0], ref)], {**TOL, "max_abs": 0.05, "max_rel": 0.05, "min_cosine": 0.99}, "text")
    assert {"mean", "pow"} <= set(res.islands)  # fragile nodes are kept by default


def test_the_impossible_gate_lists_each_failing_check_on_its_own_line():
    m = model([helper.make_node("Sin", ["x"], ["y"], name="sin")], [vi("x", ["n", 8])], [vi("y", ["n", 8])])
    fs = feeds(2, rows=4)
    cases = [(f, ranges.run_all(ranges.session(m, []), f)) for f in fs]
    with pytest.raises(PrecisionError) as e:
        fp16.to_fp16(m, fs, cases, {**TOL, "min_cosine": 1.5, "max_abs": -1.0, "max_rel": -1.0}, "text")
    lines = str(e.value).splitlines()
    assert lines[1].startswith("  text@case0 y: max_abs ") and "; cosine " in lines[1]
    assert lines[2].startswith("  text@case1 y: max_abs ")
