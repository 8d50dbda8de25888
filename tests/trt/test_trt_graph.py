"""inspect_graph / unsupported_message: the precision TensorRT will see in a graph, and the nodes it cannot
import, on small hand-built graphs (subgraphs, custom domains, external weights, bf16)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmopt.trt.graph import inspect_graph, unsupported_message


def _save(tmp_path, nodes, inits=(), value_info=(), elem=TensorProto.FLOAT, name="g.onnx", **save):
    x = helper.make_tensor_value_info("x", elem, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    g = helper.make_graph(nodes, "g", [x], [y], list(inits), value_info=list(value_info))
    path = tmp_path / name
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)]), str(path), **save)
    return path


def test_fp32_with_io_dtypes(tmp_path):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    r = inspect_graph(_save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [w]))
    assert r == {"found": "fp32", "initializer_dtypes": {"float32": 1}, "qdq_nodes": 0,
                 "inputs": {"x": "float32"}, "outputs": {"y": "float32"}, "unsupported_nodes": []}


def test_fp16_found_by_weights_or_by_intermediate_types(tmp_path):
    w16 = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w")
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Cast", ["m"], ["y"], to=1)]
    assert inspect_graph(_save(tmp_path, nodes, [w16]))["found"] == "fp16"
    only_types = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    vi = [helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, 4])]
    r = inspect_graph(_save(tmp_path, only_types, value_info=vi, name="t.onnx"))
    assert r["found"] == "fp16" and r["initializer_dtypes"] == {}
    bf = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    bf.data_type, bf.raw_data = TensorProto.BFLOAT16, b"\0" * 8
    r = inspect_graph(_save(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [bf], name="bf.onnx"))
    assert r["found"] == "bf16" and r["initializer_dtypes"] == {"bfloat16": 1}


def test_int8_is_qdq_counted(tmp_path):
    s, z = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    r = inspect_graph(_save(tmp_path, nodes, [s, z]))
    assert r["found"] == "int8" and r["qdq_nodes"] == 2


def test_blocked_ops_are_found_inside_subgraphs_and_custom_domains(tmp_path):
    then = helper.make_graph([helper.make_node("MatMulInteger", ["x", "x"], ["t"], name="inner")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.INT32, [2, 2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])])
    cond = numpy_helper.from_array(np.array(True), "c")
    nodes = [helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=other, name="if"),
             helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft"),  # unnamed
             helper.make_node("QLinearConv", ["x"], ["z"], name="qc")]
    r = inspect_graph(_save(tmp_path, nodes, [cond]))
    assert r["unsupported_nodes"] == [{"node": "inner", "op": "MatMulInteger", "domain": "ai.onnx"},
                                      {"node": "(unnamed)", "op": "FusedMatMul", "domain": "com.microsoft"},
                                      {"node": "qc", "op": "QLinearConv", "domain": "ai.onnx"}]


def test_weights_on_disk_are_not_loaded(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], [w], save_as_external_data=True,
                 location="g.data", size_threshold=0)
    (tmp_path / "g.data").unlink()  # inspecting reads only the graph
    assert inspect_graph(path)["found"] == "fp32"


def test_unsupported_message_lists_twenty_nodes_and_counts_the_rest():
    one = unsupported_message("t.onnx", [{"node": "n", "op": "MatMulInteger", "domain": "ai.onnx"}])
    assert one == ("t.onnx: TensorRT cannot import 1 node(s) of op type MatMulInteger:\n"
                   "  node 'n' (MatMulInteger, domain ai.onnx)\n"
                   "These are ONNX Runtime-specific ops (integer-arithmetic or contrib quantization). TensorRT's "
                   "int8 is static Q/DQ: build the int8 (not int8-dynamic) precision, or fp16 / fp32.")
    many = [{"node": f"n{i}", "op": "QLinearConv" if i % 2 else "ConvInteger", "domain": "ai.onnx"} for i in range(25)]
    msg = unsupported_message("c.onnx", many)
    assert "25 node(s) of op type ConvInteger, QLinearConv:" in msg
    assert msg.count("\n  node '") == 20 and "node 'n19'" in msg and "node 'n20'" not in msg
    assert "\n  ... and 5 more\n" in msg
    exactly = unsupported_message("c.onnx", many[:20])
    assert "more" not in exactly and exactly.count("\n  node '") == 20
