"""Device buffers and a CUDA stream for the TensorRT runner, behind one small interface.

Two owners of CUDA memory: torch (buffers are torch tensors; the usual path on a workstation) and
cuda-python (no torch needed; the path for lean edge images such as a Jetson with only JetPack).
TensorRT only ever sees int addresses and an int stream handle, so both drive the same engine code.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mmopt.trt.errors import TensorRTUnavailable


class DeviceMemory:
    """Named device buffers reused across calls (stable addresses for CUDA graphs) and one stream."""

    kind = "base"
    stream: int = 0

    def put(self, name: str, array: np.ndarray, dtype: str) -> int:
        """Copy ``array`` (converted to ``dtype``) into buffer ``name``; returns its device address."""
        raise NotImplementedError

    def empty(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        """Buffer ``name`` copied to the host after everything queued so far (synchronises)."""
        raise NotImplementedError

    def capture(self, fn: Callable[[], None]) -> Any:
        """Record what ``fn`` queues on the stream as a CUDA graph."""
        raise NotImplementedError

    def replay(self, graph: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchMemory(DeviceMemory):
    kind = "torch"

    def __init__(self, index: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", index)
        self._stream = torch.cuda.Stream(self.device)
        self.stream = int(self._stream.cuda_stream)
        self.buffers: dict[str, Any] = {}

    def _dtype(self, dtype: str) -> Any:
        return getattr(self.torch, dtype)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        t = self.buffers.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != self._dtype(dtype):
            t = self.buffers[name] = self.torch.empty(tuple(shape), dtype=self._dtype(dtype), device=self.device)
        return t

    def put(self, name: str, array: np.ndarray, dtype: str) -> int:
        t = self._buffer(name, array.shape, dtype)
        with self.torch.cuda.stream(self._stream):
            t.copy_(self.torch.from_numpy(np.ascontiguousarray(array)))  # converts dtype (e.g. to bfloat16)
        return int(t.data_ptr())

    def empty(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        return int(self._buffer(name, shape, dtype).data_ptr())

    def get(self, name: str) -> np.ndarray:
        t = self.buffers[name]
        with self.torch.cuda.stream(self._stream):
            host = t.float() if t.dtype == self.torch.bfloat16 else t
            out = host.to("cpu")
        self._stream.synchronize()
        return out.numpy()

    def capture(self, fn: Callable[[], None]) -> Any:
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self._stream):
            fn()
        return graph

    def replay(self, graph: Any) -> None:
        with self.torch.cuda.stream(self._stream):
            graph.replay()

    def close(self) -> None:
        self._stream.synchronize()
        self.buffers.clear()


class CudaPythonMemory(DeviceMemory):
    """cuda-python (``pip install cuda-python``) runtime API: no torch on the device."""

    kind = "cuda-python"

    def __init__(self, index: int = 0):
        from mmopt.trt.device import cudart

        self.rt = cudart()
        self._call(self.rt.cudaSetDevice(index), "cudaSetDevice")
        self._stream = self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream = int(self._stream)
        self.buffers: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}  # name -> ptr, capacity, shape, dtype
        self._graphs: list[tuple[Any, Any]] = []

    def _call(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        if dtype == "bfloat16":
            raise TensorRTUnavailable("bfloat16 engine I/O needs torch (numpy has no bfloat16): "
                                      "run with memory='torch'.")
        np_dtype = np.dtype(dtype)
        nbytes = max(1, math.prod(shape) * np_dtype.itemsize)
        ptr, cap, _, _ = self.buffers.get(name, (0, 0, (), np_dtype))
        if cap < nbytes:
            if ptr:
                self._call(self.rt.cudaFree(ptr), "cudaFree")
            ptr, cap = int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc")), nbytes
        self.buffers[name] = (ptr, cap, tuple(shape), np_dtype)
        return ptr

    def put(self, name: str, array: np.ndarray, dtype: str) -> int:
        host = np.ascontiguousarray(array, dtype=np.dtype(dtype))
        ptr = self._buffer(name, host.shape, dtype)
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                   "cudaMemcpyAsync")  # from pageable memory: staged before it returns, so `host` may go
        return ptr

    def empty(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        return self._buffer(name, shape, dtype)

    def get(self, name: str) -> np.ndarray:
        ptr, _, shape, dtype = self.buffers[name]
        out = np.empty(shape, dtype)
        self._call(self.rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                   "cudaMemcpyAsync")
        self._call(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return out

    def capture(self, fn: Callable[[], None]) -> Any:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(self.rt.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        fn()
        graph = self._call(self.rt.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        exe = self._call(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self._graphs.append((graph, exe))
        return exe

    def replay(self, graph: Any) -> None:
        self._call(self.rt.cudaGraphLaunch(graph, self._stream), "cudaGraphLaunch")

    def close(self) -> None:
        self.rt.cudaStreamSynchronize(self._stream)
        for graph, exe in self._graphs:
            self.rt.cudaGraphExecDestroy(exe)
            self.rt.cudaGraphDestroy(graph)
        for ptr, *_ in self.buffers.values():
            self.rt.cudaFree(ptr)
        self.rt.cudaStreamDestroy(self._stream)
        self.buffers.clear()
        self._graphs.clear()


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_memory(kind: str | DeviceMemory = "auto", index: int = 0) -> DeviceMemory:
    """``"torch"``, ``"cuda-python"``, ``"auto"`` (torch when it sees a GPU, else cuda-python), or an instance."""
    if not isinstance(kind, str):  # any object with DeviceMemory's methods
        return kind
    if kind == "auto":
        kind = "torch" if _torch_cuda() else "cuda-python"
    if kind == "torch":
        if not _torch_cuda():
            raise TensorRTUnavailable("memory='torch' needs a CUDA build of torch that sees a GPU.")
        return TorchMemory(index)
    if kind == "cuda-python":
        try:
            return CudaPythonMemory(index)
        except ImportError:
            raise TensorRTUnavailable("the TensorRT runner needs torch with CUDA or cuda-python for device memory: "
                                      "pip install 'mmopt[edge]' (cuda-python) on the device.") from None
        except RuntimeError as e:  # no driver, no device
            raise TensorRTUnavailable(f"cuda-python cannot use GPU {index} here: {e}") from None
    raise ValueError(f"unknown memory kind {kind!r}; use 'auto', 'torch' or 'cuda-python'")
