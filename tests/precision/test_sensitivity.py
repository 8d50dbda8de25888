"""The graph surgery the sensitivity report and the exclusion search stand on: ``only`` keeps the Q/DQ of one
node, ``without`` removes the Q/DQ of some nodes and nothing else (same scales elsewhere)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmopt.ort import session
from mmopt.precision.sensitivity import only, without
from mmopt.stages import int8 as int8_stage


def _two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def _dq_fed(proto: onnx.ModelProto) -> set[str]:
    made = {o: n for n in proto.graph.node for o in n.output}
    return {n.name for n in proto.graph.node if n.op_type == "MatMul"
            and any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in n.input)}


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(proto, threads=1).run(None, {"x": x})[0]


def test_only_and_without_touch_exactly_the_named_nodes():
    fp32 = _two_matmuls()
    q = int8_stage.qdq(fp32, {"x": 3.0, "r": 6.0})
    assert _dq_fed(q) == {"mm1", "mm2"}
    assert _dq_fed(only(fp32, q, "mm2")) == {"mm2"}
    assert _dq_fed(without(fp32, q, ["mm2"])) == {"mm1"}
    assert _dq_fed(without(fp32, q, ["mm1", "mm2"])) == set()
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    ref, full = _run(fp32, x), _run(q, x)
    assert not np.allclose(full, ref, atol=1e-4)  # int8 changed the output
    np.testing.assert_allclose(_run(without(fp32, q, ["mm1", "mm2"]), x), ref, rtol=1e-5, atol=1e-5)
    # removing one node's Q/DQ changes nothing else: the same as quantizing only the other node
    np.testing.assert_allclose(_run(without(fp32, q, ["mm2"]), x), _run(only(fp32, q, "mm1"), x), rtol=1e-5,
                               atol=1e-5)


def test_fp16_emulation_rounds_every_node_like_numpy_float16():
    """ORT CPU computes an fp16 graph in fp32 and drops the roundings in between; ``emulate`` keeps them.
    Reference: numpy float16, rounding after every op (each op computed exactly, then rounded)."""
    from mmopt.stages import fp16 as fp16_stage

    f16 = TensorProto.FLOAT16
    x = helper.make_tensor_value_info("x", f16, ["n", 64])
    y = helper.make_tensor_value_info("y", f16, ["n", 64])
    a = numpy_helper.from_array(np.float16(1.0009765625), "a")  # 1 + 2^-10: the smallest step above 1
    b = numpy_helper.from_array(np.float16(2048.0), "b")
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"], name="mul"), helper.make_node("Add", ["m", "b"], ["s"], name="add"),
             helper.make_node("Sub", ["s", "b"], ["y"], name="sub")]
    vi = [helper.make_tensor_value_info(n, f16, ["n", 64]) for n in ("m", "s")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [a, b], value_info=vi),
                              opset_imports=[helper.make_opsetid("", 17)])
    xs = np.random.default_rng(0).uniform(-4, 4, (8, 64)).astype(np.float16)
    def rounded(v):  # each op exact in fp32, then rounded to fp16, as a GPU's fp16 kernels do
        return v.astype(np.float16).astype(np.float32)

    ref = rounded(rounded(rounded(xs.astype(np.float32) * np.float32(1.0009765625)) + 2048) - 2048)
    emulated = session(fp16_stage.emulate(proto), threads=1).run(None, {"x": xs})[0]
    np.testing.assert_array_equal(emulated.astype(np.float32), ref)
    plain = session(proto, threads=1).run(None, {"x": xs})[0]  # what ORT CPU computes without emulation
    assert (plain.astype(np.float32) != ref).mean() > 0.5  # near 2048 an fp16 step is 2: the roundings matter
