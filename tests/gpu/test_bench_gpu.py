"""GPU paths of mmopt bench: eager on CUDA with host-to-device copies reported, ONNX Runtime CUDA.
Skipped cleanly on machines without a CUDA device (development and CI)."""
from __future__ import annotations

import pytest
import torch

from mmopt.api import bench
from mmopt.bench.backends import unavailable
from mmopt.manifest import Manifest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA PyTorch")]


def test_eager_cuda_group_reports_copies_and_device_memory(toy_bundle, tmp_path):
    result = bench(toy_bundle.bundle, tmp_path / "rep", backends=["eager-cuda"], batches=[1, 8], repeats=5, warmup=2)
    r = result.report
    cuda = [x for x in r["latency"] if x["device"] == "cuda" and x["graph"] == "pipeline"]
    assert cuda and all("h2d_ms" in x and x["h2d_ms"] > 0 for x in cuda)
    assert all(0 < x["device_p50_ms"] for x in cuda)  # CUDA-event time of the forward alone
    assert {x["variant"] for x in cuda} == {"eager-cuda"}  # the GPU group's reference (its ratio is 1 by definition)
    v = next(v for v in r["variants"] if v["id"] == "eager-cuda")
    assert v["failed"] == 0 and isinstance(v["memory"]["gpu_used_delta_mb"], (int, float))
    assert r["machine"]["gpu"]["name"] and r["memory"]["gpu_peak_allocated_mb"] > 0  # the model's weights at least


def test_onnxruntime_cuda(toy_bundle, tmp_path):
    why = unavailable("onnxruntime-cuda", Manifest.read(toy_bundle.bundle))
    if why:
        pytest.skip(why)
    r = bench(toy_bundle.bundle, tmp_path / "rep", backends=["onnxruntime-cuda", "eager-cuda"], batches=[8],
              repeats=5, warmup=2).report
    ids = {v["id"]: v for v in r["variants"]}
    assert ids["onnxruntime-cuda/fp32"]["failed"] == 0
    rows = [x for x in r["latency"] if x["variant"] == "onnxruntime-cuda/fp32" and x["graph"] == "pipeline"]
    assert rows and rows[0]["device"] == "cuda" and "h2d_ms" in rows[0]
    import math

    assert all(math.isfinite(x["ratio_vs_eager"]) and x["ratio_vs_eager"] > 0 for x in rows)  # vs eager-cuda


def test_a_package_serves_on_onnx_runtimes_cuda_provider(toy_bundle, tmp_path):
    """``mmopt-run --backend onnxruntime-cuda``: the package's graphs on onnxruntime-gpu, golden self-test
    included (no TensorRT needed)."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from mmopt.api import package
    from mmopt_runtime import Package

    r = package(toy_bundle.bundle, None, tmp_path / "pkg")
    with Package.load(r.folder, backend="onnxruntime-cuda") as pkg:
        assert pkg.plan.ort_device == "cuda" and pkg.selftest_result["passed"]
        assert pkg.selftest_result["backend"]["onnxruntime"] == "cuda"
