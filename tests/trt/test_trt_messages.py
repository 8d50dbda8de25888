"""Error messages, graph inspection, device probing and lazy imports: no TensorRT needed."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mmopt.trt import device
from mmopt.trt.errors import parser_error_message
from mmopt.trt.graph import inspect_graph
from mmopt.trt.memory import make_memory
from trt_fake_bundle import add_int8_dynamic_text, make_bundle

REPO = Path(__file__).resolve().parents[2]


def test_parser_errors_name_node_and_op_type_and_say_what_to_do():
    msg = parser_error_message("text.int8.onnx", "10.3.0", [
        {"code": "UNSUPPORTED_NODE", "desc": "No importer registered for op: Foo ", "node": 12,
         "node_name": "/encoder/Foo_1", "op": "Foo"},
        {"code": "INVALID_NODE", "desc": "bad axis", "node": 4, "node_name": "", "op": "Gather"},
        {"code": "INVALID_GRAPH", "desc": "graph broken", "node": -1, "node_name": "", "op": ""},
    ])
    assert msg.splitlines()[0] == "text.int8.onnx: TensorRT 10.3.0's ONNX parser rejected the graph:"
    assert "  node '/encoder/Foo_1' (Foo): UNSUPPORTED_NODE: No importer registered for op: Foo" in msg
    assert "  node '#4' (Gather): INVALID_NODE: bad axis" in msg
    assert "  node '(graph)': INVALID_GRAPH: graph broken" in msg
    assert "TensorRT 10.3.0 does not support op(s) Foo" in msg and "ONNX Runtime" in msg


def test_parser_errors_fall_back_to_the_logger():
    msg = parser_error_message("a.onnx", "11.4.0.106", [], ["ModelImporter.cpp:123: failed to parse"])
    assert msg == ("a.onnx: TensorRT 11.4.0.106's ONNX parser rejected the graph:\n"
                   "  ModelImporter.cpp:123: failed to parse\n"
                   "Fix the graph at the node(s) above and re-run `mmopt export`, then `mmopt build`.")
    assert parser_error_message("a.onnx", "10.3.0", []).splitlines()[1] == "  (the parser reported no details)"


def test_parser_error_message_exactly():
    msg = parser_error_message("t.onnx", "10.3.0", [
        {"code": "UNSUPPORTED_NODE_DATATYPE", "desc": " int4 weights ", "node": 0, "node_name": "", "op": "MatMul"},
        {"code": "UNSUPPORTED_GRAPH", "desc": "loop", "node_name": "", "op": ""},  # no node index
        {"desc": "odd", "node": 2, "node_name": "n2", "op": "Cast"}])  # no code
    assert msg == (
        "t.onnx: TensorRT 10.3.0's ONNX parser rejected the graph:\n"
        "  node '#0' (MatMul): UNSUPPORTED_NODE_DATATYPE: int4 weights\n"
        "  node '(graph)': UNSUPPORTED_GRAPH: loop\n"
        "  node 'n2' (Cast): ERROR: odd\n"
        "TensorRT 10.3.0 does not support op(s) ?, MatMul as used here. Re-export the component without them "
        "(see TensorRT's ONNX operator support matrix for this version), or run this component with ONNX "
        "Runtime: the pipeline mixes backends per component.")
    no_desc = parser_error_message("t.onnx", "10.3.0", [{"code": "X", "node": 1, "node_name": "a", "op": ""}])
    assert no_desc.splitlines()[1] == "  node 'a': X: "


def test_graph_precision_and_blocked_ops(tmp_path):
    b = make_bundle(tmp_path / "b")
    assert inspect_graph(b / "image.onnx")["found"] == "fp32"
    fp16 = inspect_graph(b / "image.fp16.onnx")
    assert fp16["found"] == "fp16" and fp16["inputs"] == {"pixel_values": "float32"}
    add_int8_dynamic_text(b)
    blocked = inspect_graph(b / "text.int8-dynamic.onnx")["unsupported_nodes"]
    assert blocked == [{"node": "/text/MatMulInteger_3", "op": "MatMulInteger", "domain": "ai.onnx"}]


def test_no_gpu_here_and_probe_failures_are_not_errors(monkeypatch):
    def broken(index):
        raise RuntimeError("driver missing")
    monkeypatch.setattr(device, "PROBES", (broken, lambda i: None))
    assert device.current_gpu() is None
    monkeypatch.setattr(device, "PROBES", (broken, lambda i: device.GpuInfo("X", "8.6", i)))
    assert device.current_gpu(1) == device.GpuInfo("X", "8.6", 1)


def test_nvidia_smi_probe_parses_name_and_compute_capability(monkeypatch):
    class Done:
        returncode, stdout = 0, "NVIDIA GeForce RTX 4090, 8.9\n"
    from mmopt_runtime.trt import device as rt_device

    monkeypatch.setattr(rt_device.shutil, "which", lambda exe: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(rt_device.subprocess, "run", lambda *a, **k: Done())
    assert rt_device._from_nvidia_smi(0) == device.GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 0, False, "nvidia-smi")


def test_l4t_release_and_platform_tag(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: ...\n")
    assert device.l4t_release(f) == "R36.3.0"
    assert device.l4t_release(tmp_path / "absent") is None
    import platform

    assert device.platform_tag() == f"{platform.system().lower()}-{platform.machine().lower()}"
    assert device.platform_tag() in ("linux-x86_64", "linux-aarch64") or not sys.platform.startswith("linux")


def test_memory_needs_torch_cuda_or_cuda_python():
    import torch

    from mmopt.trt.errors import TensorRTUnavailable

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: memory='torch' is available, so there is no error to check")
    with pytest.raises(TensorRTUnavailable) as e:
        make_memory("torch")
    assert "needs a CUDA build of torch" in str(e.value)
    with pytest.raises(ValueError, match="unknown memory kind"):
        make_memory("opencl")


def test_import_mmopt_trt_imports_neither_tensorrt_nor_torch():
    code = ("import sys; before = set(sys.modules); "  # a .pth file may import e.g. cuda at start-up
            "import mmopt.trt, mmopt.jobs.build, mmopt.runners.tensorrt, mmopt.cli.build; "
            "from mmopt.trt import BuildOptions; from mmopt.jobs.build import build_engines; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new & {'tensorrt', 'torch', 'cuda'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.source_text
def test_only_api_py_imports_tensorrt():
    """No module imports TensorRT but the runtime's api.py, which imports it by name (full TensorRT, else the
    lean runtime), only when an engine is built or run."""
    from mmopt_runtime.trt import api

    importers, by_name = [], []
    for path in [*(REPO / "mmopt").rglob("*.py"), *(REPO / "mmopt_runtime").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("tensorrt", "tensorrt_lean") for n in names):
                importers.append(path.relative_to(REPO).as_posix())
            if isinstance(node, ast.Attribute) and node.attr == "import_module" or \
                    isinstance(node, ast.Name) and node.id == "__import__":
                by_name.append(path.relative_to(REPO).as_posix())
    assert importers == []
    assert api.MODULES == ("tensorrt", "tensorrt_lean")
    assert "mmopt_runtime/trt/api.py" in by_name
