"""Device memory for the TensorRT runner: torch tensors on a workstation, else cuda-python (the device
runtime's ``mmopt_runtime.trt.memory``, home of the interface). TensorRT only sees int addresses and an int
stream handle, so both drive the same engine code.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mmopt_runtime.trt.errors import TensorRTUnavailable
from mmopt_runtime.trt.memory import CudaPythonMemory, DeviceMemory, cuda_python_memory  # noqa: F401


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
        return cuda_python_memory(index)
    raise ValueError(f"unknown memory kind {kind!r}; use 'auto', 'torch' or 'cuda-python'")
