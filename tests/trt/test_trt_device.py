"""The GPU probes (torch, cuda-python, nvidia-smi) on fakes of what each reads: there is no GPU here.
Each must return the GPU exactly, say None (never raise) when there is none, and ask for the right one."""
from __future__ import annotations

import types

import pytest

from mmopt.trt import device
from mmopt_runtime.trt import device as rt_device


class FakeRuntime:
    """cuda-python's runtime API answering device queries (a fake: no GPU here)."""

    class cudaError_t:  # noqa: N801
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    def __init__(self, count=2, name=b"Orin\x00\x00", major=8, minor=7, integrated=1, fail=None):
        self.count, self.fail, self.asked = count, fail, []
        self.prop = types.SimpleNamespace(name=name, major=major, minor=minor, integrated=integrated)

    def cudaGetDeviceCount(self):  # noqa: N802
        return (self.cudaError_t.cudaErrorNoDevice if self.fail == "count" else 0, self.count)

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        self.asked.append(index)
        return (self.cudaError_t.cudaErrorNoDevice if self.fail == "props" else 0, self.prop)


def test_cuda_python_probe_reads_name_capability_and_integrated(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(rt_device, "cudart", lambda: rt)
    assert rt_device._from_cuda_python(1) == device.GpuInfo("Orin", "8.7", 1, True, "cuda-python")
    assert rt.asked == [1]
    rt.prop.name, rt.prop.integrated = "A100-SXM4", 0  # older cuda-python gives str
    assert rt_device._from_cuda_python(0) == device.GpuInfo("A100-SXM4", "8.7", 0, False, "cuda-python")


@pytest.mark.parametrize("rt, index", [(FakeRuntime(count=1), 1), (FakeRuntime(count=0), 0),
                                       (FakeRuntime(fail="count"), 0), (FakeRuntime(fail="props"), 0)])
def test_cuda_python_probe_says_none_without_that_gpu(monkeypatch, rt, index):
    monkeypatch.setattr(rt_device, "cudart", lambda: rt)
    assert rt_device._from_cuda_python(index) is None


def test_torch_probe(monkeypatch):
    import torch

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, is_integrated=False)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: asked.append(i) or props)
    assert device._from_torch(1) == device.GpuInfo("NVIDIA H200", "9.0", 1, False, "torch")
    assert asked == [1]
    assert device._from_torch(2) is None  # only two devices
    props.is_integrated = True
    assert device._from_torch(0).integrated is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device._from_torch(0) is None


def test_nvidia_smi_probe_asks_for_that_gpu_and_refuses_bad_output(monkeypatch):
    seen = []

    class Done:
        def __init__(self, code, out):
            self.returncode, self.stdout = code, out

    answers = iter([Done(0, "NVIDIA L4, 8.9\nNVIDIA L4, 8.9\n"), Done(1, "NVIDIA L4, 8.9\n"), Done(0, "no comma\n")])
    monkeypatch.setattr(rt_device.shutil, "which", lambda exe: "/usr/bin/nvidia-smi" if exe == "nvidia-smi" else None)
    monkeypatch.setattr(rt_device.subprocess, "run", lambda cmd, **k: seen.append((cmd, k)) or next(answers))
    assert rt_device._from_nvidia_smi(3) == device.GpuInfo("NVIDIA L4", "8.9", 3, False, "nvidia-smi")
    cmd, kwargs = seen[0]
    assert cmd == ["/usr/bin/nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "3"]
    assert kwargs["capture_output"] and kwargs["text"] and kwargs["timeout"] > 0
    assert rt_device._from_nvidia_smi(0) is None  # nvidia-smi failed
    assert rt_device._from_nvidia_smi(0) is None  # output it cannot read
    monkeypatch.setattr(rt_device.shutil, "which", lambda exe: None)
    assert rt_device._from_nvidia_smi(0) is None


def test_probes_are_tried_in_order_and_the_first_answer_wins(monkeypatch):
    order = []

    def probe(name, answer):
        def p(index):
            order.append((name, index))
            return answer
        return p

    gpu = device.GpuInfo("X", "8.6", 2, False, "second")
    monkeypatch.setattr(device, "PROBES", (probe("a", None), probe("b", gpu), probe("c", None)))
    assert device.current_gpu(2) is gpu and order == [("a", 2), ("b", 2)]
    assert gpu.to_json() == {"name": "X", "compute_capability": "8.6", "index": 2, "integrated": False,
                             "source": "second"}


def test_l4t_release_reads_jetson_linux(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    assert device.l4t_release(f) == "R35.4.1"
    f.write_text("garbage\n")
    assert device.l4t_release(f) is None
    f.write_text("")
    assert device.l4t_release(f) is None
    f.write_text("# R32 (release)\n")
    assert device.l4t_release(f) == "R32"
