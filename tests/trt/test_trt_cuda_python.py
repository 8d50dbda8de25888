"""The torch-free device-memory path against the real cuda-python (``cuda.bindings.runtime``).

Skipped where cuda-python is not installed; CI's TensorRT job installs it. No GPU here, so this checks
the names mmopt uses exist and that a missing driver gives a clear error rather than a crash.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")

from mmopt.trt import device  # noqa: E402
from mmopt.trt.errors import TensorRTUnavailable  # noqa: E402
from mmopt.trt.memory import make_memory  # noqa: E402

TRT = Path(__file__).resolve().parents[2] / "mmopt" / "trt"


def _chains(path: Path) -> set[str]:
    """Attribute chains on the runtime module: ``self.rt.X.Y`` and ``rt.X.Y``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        parts.reverse()
        if isinstance(cur, ast.Name) and cur.id == "self" and parts[:1] == ["rt"]:
            parts = parts[1:]
        elif not (isinstance(cur, ast.Name) and cur.id == "rt"):
            continue
        if parts:
            out.add(".".join(parts))
    return {c for c in out if not any(o.startswith(c + ".") for o in out)}


def test_every_cuda_runtime_name_mmopt_uses_exists():
    used = _chains(TRT / "memory.py") | _chains(TRT / "device.py")
    assert "cudaGraphLaunch" in used and "cudaMemcpyKind.cudaMemcpyHostToDevice" in used
    missing = []
    for chain in sorted(used):
        obj = rt
        for part in chain.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(chain)
                break
    assert not missing, f"cuda-python {rt.__name__} lacks {missing}"
    assert {"name", "major", "minor", "integrated"} <= set(dir(rt.cudaDeviceProp()))


def test_without_a_driver_there_is_no_gpu_and_a_clear_error():
    err, _ = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess:
        pytest.skip("a CUDA driver is present")
    assert device._from_cuda_python(0) is None
    with pytest.raises(TensorRTUnavailable, match="cuda-python cannot use GPU 0 here: cudaSetDevice failed"):
        make_memory("cuda-python")
