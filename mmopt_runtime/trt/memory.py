"""Device buffers and a CUDA stream for running engines, behind one small interface (torch-free).

TensorRT only ever sees int addresses and an int stream handle, so any owner of CUDA memory drives the same
engine code: cuda-python here (the path for lean edge images such as a Jetson with only JetPack), torch on
a workstation (``mmopt.trt.memory.TorchMemory``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mmopt_runtime.trt import device
from mmopt_runtime.trt.errors import CudaError, TensorRTUnavailable


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


class CudaPythonMemory(DeviceMemory):
    """cuda-python (``pip install cuda-python``) runtime API: no torch on the device."""

    kind = "cuda-python"

    def __init__(self, index: int = 0):

        self.rt = device.cudart()
        self._call(self.rt.cudaSetDevice(index), "cudaSetDevice")
        self._stream = self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream = int(self._stream)
        self.buffers: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}  # name -> ptr, capacity, shape, dtype
        self._graphs: list[tuple[Any, Any]] = []

    def _call(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            raise CudaError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}")
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
        if self._stream is None:  # closed already: each handle is released once
            return
        self.rt.cudaStreamSynchronize(self._stream)
        for graph, exe in self._graphs:
            self.rt.cudaGraphExecDestroy(exe)
            self.rt.cudaGraphDestroy(graph)
        for ptr, *_ in self.buffers.values():
            self.rt.cudaFree(ptr)
        self.rt.cudaStreamDestroy(self._stream)
        self._stream = None
        self.buffers.clear()
        self._graphs.clear()


def cuda_python_memory(index: int = 0) -> "CudaPythonMemory":
    """cuda-python device memory on GPU ``index``, or ``TensorRTUnavailable`` saying what is missing."""
    try:
        return CudaPythonMemory(index)
    except ImportError:
        raise TensorRTUnavailable("running TensorRT engines without torch needs cuda-python for device memory: "
                                  "pip install cuda-python on the device (the extras mmopt[edge] and "
                                  "mmopt-runtime[tensorrt] bring it).") from None
    except CudaError as e:  # no driver, no device
        raise TensorRTUnavailable(f"cuda-python cannot use GPU {index} here: {e}") from None
