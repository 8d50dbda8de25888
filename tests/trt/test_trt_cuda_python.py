"""The torch-free device-memory path against the real cuda-python (``cuda.bindings.runtime``).

Skipped where cuda-python is not installed; CI's TensorRT job installs it. No GPU here, so this checks
the names mmopt uses exist and that a missing driver gives a clear error rather than a crash.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from attribute_chains import chains
from attribute_chains import missing as lacking

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")

from mmopt_runtime.trt import device  # noqa: E402
from mmopt.trt.errors import TensorRTUnavailable  # noqa: E402
from mmopt.trt.memory import make_memory  # noqa: E402

TRT = Path(__file__).resolve().parents[2] / "mmopt_runtime" / "trt"


def test_every_cuda_runtime_name_mmopt_uses_exists():
    used = chains((TRT / "memory.py").read_text(), "rt") | chains((TRT / "device.py").read_text(), "rt")
    assert "cudaGraphLaunch" in used and "cudaMemcpyKind.cudaMemcpyHostToDevice" in used
    missing = lacking(rt, used)
    assert not missing, f"cuda-python {rt.__name__} lacks {missing}"
    assert {"name", "major", "minor", "integrated"} <= set(dir(rt.cudaDeviceProp()))


def test_without_a_driver_there_is_no_gpu_and_a_clear_error():
    err, _ = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess:
        pytest.skip("a CUDA driver is present")
    assert device._from_cuda_python(0) is None
    with pytest.raises(TensorRTUnavailable, match="cuda-python cannot use GPU 0 here: cudaSetDevice failed"):
        make_memory("cuda-python")
