"""The two real device-memory owners of the TensorRT runner, tested on the CPU side: everything but the
device calls themselves.

No GPU exists here, so the CUDA runtime is a fake: ``HostCudart`` implements the cuda-python runtime
calls mmopt makes over *host* memory (real bytes, real addresses, copies with ``ctypes.memmove``) and
checks what a GPU would refuse: the copy direction, sizes beyond an allocation, freeing twice, use after
free. ``CudaPythonMemory`` runs unchanged on it. ``TorchMemory`` runs on CPU tensors with the CUDA stream
and graph objects faked (named as such below).
"""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest

from mmopt.trt import memory
from mmopt_runtime.trt import device
from mmopt_runtime.trt import memory as rt_memory
from mmopt.trt.errors import TensorRTUnavailable


class HostCudart:
    """A fake of ``cuda.bindings.runtime`` over host memory (there is no GPU here)."""

    class cudaError_t:  # noqa: N801  (cuda-python's names)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = "HostToDevice"
        cudaMemcpyDeviceToHost = "DeviceToHost"

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = "ThreadLocal"

    def __init__(self, fail: str | None = None):
        self.device: dict[int, ctypes.Array] = {}  # address -> allocation
        self.freed: list[int] = []
        self.calls: list[tuple] = []
        self.fail = fail
        self.capturing = False

    def _ok(self, name: str, *rest):
        self.calls.append((name, *rest))
        if self.fail == name:
            return (self.cudaError_t.cudaErrorMemoryAllocation, *([None] * len(rest)))
        return (self.cudaError_t.cudaSuccess, *rest)

    def cudaGetErrorString(self, err):  # noqa: N802
        return (0, b"out of memory")

    def cudaSetDevice(self, index):  # noqa: N802
        self.device_index = index
        return self._ok("cudaSetDevice")

    def cudaStreamCreate(self):  # noqa: N802
        return self._ok("cudaStreamCreate", 0x5EED)

    def cudaMalloc(self, nbytes):  # noqa: N802
        assert nbytes >= 1, "cudaMalloc of 0 bytes gives no usable pointer"
        buf = (ctypes.c_char * nbytes)()
        self.device[ctypes.addressof(buf)] = buf
        return self._ok("cudaMalloc", ctypes.addressof(buf))

    def cudaFree(self, ptr):  # noqa: N802
        assert ptr in self.device, f"cudaFree of {ptr:#x}: not allocated (double free?)"
        self.freed.append(ptr)
        del self.device[ptr]
        return self._ok("cudaFree")

    def _span(self, ptr, nbytes) -> None:
        base = next((a for a, b in self.device.items() if a <= ptr and ptr + nbytes <= a + len(b)), None)
        assert base is not None, f"{nbytes} bytes at {ptr:#x} are not inside one live device allocation"

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        assert stream == 0x5EED, "copy queued on another stream than the runner's"
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self._span(dst, nbytes)
        else:
            assert kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost, kind
            self._span(src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return self._ok("cudaMemcpyAsync", )

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert stream == 0x5EED
        return self._ok("cudaStreamSynchronize")

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        assert stream == 0x5EED and mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.capturing = True
        return self._ok("cudaStreamBeginCapture")

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        assert self.capturing and stream == 0x5EED
        self.capturing = False
        return self._ok("cudaStreamEndCapture", "graph")

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        assert graph == "graph" and flags == 0
        return self._ok("cudaGraphInstantiate", "exec")

    def cudaGraphLaunch(self, exe, stream):  # noqa: N802
        assert exe == "exec" and stream == 0x5EED
        return self._ok("cudaGraphLaunch")

    def cudaGraphExecDestroy(self, exe):  # noqa: N802
        return self._ok("cudaGraphExecDestroy")

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return self._ok("cudaGraphDestroy")

    def cudaStreamDestroy(self, stream):  # noqa: N802
        assert stream == 0x5EED
        return self._ok("cudaStreamDestroy")


@pytest.fixture
def rt(monkeypatch):
    fake = HostCudart()
    monkeypatch.setattr(device, "cudart", lambda: fake)
    return fake


def names(rt: HostCudart) -> list[str]:
    return [c[0] for c in rt.calls]


@pytest.mark.parametrize("values, dtype", [(np.arange(12, dtype=np.float64).reshape(3, 4) / 7, "float32"),
                                           (np.arange(-6, 6).reshape(2, 6), "int64"),
                                           (np.arange(10).reshape(2, 5) % 3 == 0, "bool"),
                                           (np.linspace(-2, 2, 8).reshape(2, 4), "float16"),
                                           (np.arange(8).reshape(2, 4), "int32")])
def test_cuda_python_round_trips_real_bytes_in_the_engines_dtype(rt, values, dtype):
    mem = memory.CudaPythonMemory(0)
    assert mem.stream == 0x5EED and names(rt)[:2] == ["cudaSetDevice", "cudaStreamCreate"]
    ptr = mem.put("x", values, dtype)
    assert ptr in rt.device and len(rt.device[ptr]) == values.size * np.dtype(dtype).itemsize
    back = mem.get("x")
    assert back.dtype == np.dtype(dtype) and back.shape == values.shape
    np.testing.assert_array_equal(back, values.astype(dtype))
    assert names(rt)[-2:] == ["cudaMemcpyAsync", "cudaStreamSynchronize"]  # get waits for the stream


def test_cuda_python_reuses_a_buffer_that_fits_and_replaces_one_that_does_not(rt):
    mem = memory.CudaPythonMemory(0)
    first = mem.put("x", np.ones((4, 8), np.float32), "float32")
    assert mem.put("x", np.full((2, 8), 2, np.float32), "float32") == first  # fits: stable address for graphs
    np.testing.assert_array_equal(mem.get("x"), np.full((2, 8), 2, np.float32))  # the shape of the last put
    assert names(rt).count("cudaMalloc") == 1
    bigger = mem.put("x", np.arange(64, dtype=np.float32).reshape(8, 8), "float32")
    assert rt.freed == [first] and bigger in rt.device and names(rt).count("cudaMalloc") == 2
    np.testing.assert_array_equal(mem.get("x"), np.arange(64, dtype=np.float32).reshape(8, 8))
    out = mem.empty("y", (3, 2), "int64")
    assert mem.get("y").shape == (3, 2) and out in rt.device


def test_cuda_python_captures_replays_and_frees_everything_on_close(rt):
    mem = memory.CudaPythonMemory(0)
    mem.put("a", np.zeros(4, np.float32), "float32")
    mem.empty("b", (4,), "float32")
    queued = []
    exe = mem.capture(lambda: queued.append(rt.capturing))
    assert queued == [True] and exe == "exec"  # what fn queues is recorded inside the capture
    mem.replay(exe)
    assert names(rt)[-1] == "cudaGraphLaunch"
    before, start = list(rt.device), len(rt.calls)
    mem.close()
    assert sorted(rt.freed) == sorted(before) and rt.device == {} and mem.buffers == {}
    assert names(rt)[start:] == ["cudaStreamSynchronize", "cudaGraphExecDestroy", "cudaGraphDestroy", "cudaFree",
                                 "cudaFree", "cudaStreamDestroy"]  # finish queued work first, stream last


def test_cuda_python_errors_name_the_call_and_the_cuda_message(monkeypatch):
    fake = HostCudart(fail="cudaMalloc")
    monkeypatch.setattr(device, "cudart", lambda: fake)
    mem = memory.CudaPythonMemory(0)
    with pytest.raises(RuntimeError, match="cudaMalloc failed: out of memory"):
        mem.put("x", np.zeros(3, np.float32), "float32")
    with pytest.raises(TensorRTUnavailable, match="bfloat16 engine I/O needs torch"):
        mem.empty("y", (2,), "bfloat16")


def test_make_memory_explains_what_is_missing(monkeypatch):
    monkeypatch.setattr(memory, "_torch_cuda", lambda: False)
    with pytest.raises(TensorRTUnavailable, match="needs a CUDA build of torch"):
        memory.make_memory("torch")
    failing = HostCudart(fail="cudaSetDevice")
    monkeypatch.setattr(device, "cudart", lambda: failing)
    with pytest.raises(TensorRTUnavailable, match="cuda-python cannot use GPU 0 here: cudaSetDevice failed"):
        memory.make_memory("auto")  # no torch GPU: auto means cuda-python

    def no_cuda_python():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(device, "cudart", no_cuda_python)
    with pytest.raises(TensorRTUnavailable, match=r"mmopt\[edge\]"):
        memory.make_memory("cuda-python")
    mine = memory.DeviceMemory()
    assert memory.make_memory(mine) is mine
    with pytest.raises(ValueError, match="unknown memory kind 'opencl'"):
        memory.make_memory("opencl")


# ---- TorchMemory on CPU tensors: CUDA streams and graphs faked (no GPU here) -----------------------

class FakeStream:
    cuda_stream = 0xABC

    def __init__(self, device=None):
        self.synced = 0

    def synchronize(self):
        self.synced += 1


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def torch_mem(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: contextlib.nullcontext())
    mem = memory.TorchMemory(0)
    mem.device = torch.device("cpu")  # the buffers live in host memory here
    return mem


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "int32", "bool"])
def test_torch_memory_round_trips_in_the_engines_dtype(torch_mem, dtype):
    import torch

    values = np.arange(12).reshape(3, 4) % 5 - 2
    values = values != 0 if dtype == "bool" else values / (4 if "float" in dtype else 1)
    assert torch_mem.stream == 0xABC
    ptr = torch_mem.put("x", values, dtype)
    buf = torch_mem.buffers["x"]
    assert buf.dtype == getattr(torch, dtype) and ptr == buf.data_ptr()
    back = torch_mem.get("x")
    want = torch.from_numpy(np.asarray(values)).to(getattr(torch, dtype))
    np.testing.assert_array_equal(back, (want.float() if dtype == "bfloat16" else want).numpy())
    assert back.dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))  # numpy has no bfloat16
    assert torch_mem._stream.synced >= 1


def test_torch_memory_keeps_addresses_for_the_same_shape_and_replaces_on_change(torch_mem):
    a = torch_mem.put("x", np.ones((2, 3), np.float32), "float32")
    assert torch_mem.put("x", np.zeros((2, 3), np.float32), "float32") == a
    assert torch_mem.empty("x", (2, 3), "float32") == a
    b = torch_mem.put("x", np.ones((4, 3), np.float32), "float32")
    assert torch_mem.buffers["x"].shape == (4, 3) and torch_mem.get("x").shape == (4, 3)
    assert b == torch_mem.buffers["x"].data_ptr()
    c = torch_mem.empty("x", (4, 3), "float16")  # another dtype is another buffer
    import torch

    assert torch_mem.buffers["x"].dtype == torch.float16 and c == torch_mem.buffers["x"].data_ptr()
    graph = torch_mem.capture(lambda: None)
    torch_mem.replay(graph)
    torch_mem.replay(graph)
    assert graph.replays == 2
    torch_mem.close()
    assert torch_mem.buffers == {}


def _drive(mem: memory.CudaPythonMemory) -> None:
    """Every CUDA call the runner's memory makes, in the order a CUDA-graph run makes them."""
    mem.put("x", np.ones((2, 2), np.float32), "float32")
    mem.put("x", np.ones((4, 4), np.float32), "float32")  # grows: cudaFree + cudaMalloc
    mem.get("x")
    mem.replay(mem.capture(lambda: None))


@pytest.mark.parametrize("call", ["cudaStreamCreate", "cudaMalloc", "cudaFree", "cudaMemcpyAsync",
                                  "cudaStreamSynchronize", "cudaStreamBeginCapture", "cudaStreamEndCapture",
                                  "cudaGraphInstantiate", "cudaGraphLaunch"])
def test_a_failing_cuda_call_is_named_with_cudas_message(monkeypatch, call):
    fake = HostCudart(fail=call)
    monkeypatch.setattr(device, "cudart", lambda: fake)
    with pytest.raises(RuntimeError) as e:
        _drive(memory.CudaPythonMemory(0))
    assert str(e.value) == f"{call} failed: out of memory"


def test_sizes_devices_and_equal_sizes(rt):
    mem = memory.CudaPythonMemory(3)
    assert rt.device_index == 3
    empty = mem.empty("e", (0, 4), "float32")  # an empty tensor still gets a pointer TensorRT can bind
    assert len(rt.device[empty]) == 1 and mem.get("e").shape == (0, 4)
    a = mem.put("x", np.ones(8, np.float32), "float32")
    assert mem.put("x", np.zeros(8, np.float32), "float32") == a  # exactly the same size: no new allocation
    assert [c[0] for c in rt.calls].count("cudaMalloc") == 2 and rt.freed == []


def test_auto_memory_prefers_torch_when_it_sees_a_gpu(monkeypatch):
    made = []
    monkeypatch.setattr(memory, "_torch_cuda", lambda: True)
    monkeypatch.setattr(memory, "TorchMemory", lambda index: made.append(("torch", index)) or "torch-memory")
    assert memory.make_memory("auto", 2) == "torch-memory" and made == [("torch", 2)]
    assert memory.make_memory("torch", 1) == "torch-memory" and made[-1] == ("torch", 1)
    monkeypatch.setattr(memory, "_torch_cuda", lambda: False)
    monkeypatch.setattr(rt_memory, "CudaPythonMemory", lambda index: made.append(("cuda-python", index)) or "cp")
    assert memory.make_memory("auto", 4) == "cp" and made[-1] == ("cuda-python", 4)


def test_memory_error_messages_exactly(monkeypatch):
    monkeypatch.setattr(memory, "_torch_cuda", lambda: False)
    with pytest.raises(TensorRTUnavailable) as e:
        memory.make_memory("torch")
    assert str(e.value) == "memory='torch' needs a CUDA build of torch that sees a GPU."

    def missing():
        raise ImportError("no cuda")

    monkeypatch.setattr(device, "cudart", missing)
    with pytest.raises(TensorRTUnavailable) as e:
        memory.make_memory("cuda-python")
    assert str(e.value) == ("running TensorRT engines without torch needs cuda-python for device memory: pip install "
                            "cuda-python on the device (the extras mmopt[edge] and mmopt-runtime[tensorrt] bring it).")
    monkeypatch.setattr(device, "cudart", lambda: HostCudart())
    with pytest.raises(TensorRTUnavailable) as e:
        memory.CudaPythonMemory(0).empty("b", (2,), "bfloat16")
    assert str(e.value) == "bfloat16 engine I/O needs torch (numpy has no bfloat16): run with memory='torch'."


def test_torch_memory_uses_the_asked_device_and_its_own_stream(monkeypatch):
    import torch

    made = []

    class Stream(FakeStream):
        def __init__(self, device=None):
            super().__init__()
            made.append(device)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    mem = memory.TorchMemory(2)
    assert mem.device == torch.device("cuda", 2) and made == [torch.device("cuda", 2)]
    assert mem.stream == 0xABC and mem.buffers == {} and mem.kind == "torch"
