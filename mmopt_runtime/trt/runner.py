"""One engine on one CUDA stream, run like any other step of the pipeline: ``infer(feeds) -> outputs``.

Each call picks the narrowest optimization profile that fits the feed shapes, sets the input shapes, binds
device buffers and enqueues with ``execute_async_v3`` on the memory's stream. With ``cuda_graph=True`` the
enqueue is captured once per shape and replayed, which removes launch overhead for fixed-shape serving.
mmopt's ``TensorRTRunner`` (a bundle's engine) and the device runtime's package both run engines through
this. Torch-free: the memory is any ``DeviceMemory`` (cuda-python on a device, torch on a workstation).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mmopt_runtime.trt import api
from mmopt_runtime.trt.errors import EngineLoadError, NoProfileFits
from mmopt_runtime.trt.memory import DeviceMemory
from mmopt_runtime.trt.profiles import Profile, select_profile

SIZES = ("min", "opt", "max")


class EngineRunner:
    """``data``: a serialised engine whose sha256 the caller has checked; ``allow_host_code`` for a
    version-compatible plan (it carries TensorRT's lean runtime, i.e. code); ``inputs`` / ``outputs``: the
    tensor names the engine must have (outputs: those returned)."""

    def __init__(self, data: bytes, name: str, memory: DeviceMemory, inputs: Sequence[str], outputs: Sequence[str],
                 *, allow_host_code: bool = False, cuda_graph: bool = False, what: str = "its component",
                 fix: str = "Rebuild the engine from the same ONNX graph."):
        self.name, self.memory, self.outputs, self.cuda_graph = name, memory, tuple(outputs), cuda_graph
        self.session = api.EngineSession(data, allow_host_code=allow_host_code, name=name)
        have_in = {t.name for t in self.session.io if t.is_input}
        have_out = {t.name for t in self.session.io if not t.is_input}
        problems = []
        if have_in != set(inputs):
            problems.append(f"inputs {sorted(have_in)}, expected {sorted(inputs)}")
        if not set(outputs) <= have_out:
            problems.append(f"outputs {sorted(have_out)}, expected {sorted(outputs)}")
        if problems:
            self.session.close()  # the memory is the caller's: it closes that
            raise EngineLoadError(f"{name} does not match {what}: " + "; ".join(problems) + f". {fix}")
        self.profiles = [Profile(str(i), {n: dict(zip(SIZES, s)) for n, s in p.items()})
                         for i, p in enumerate(self.session.profiles)]
        self._graph: Any = None
        self._graph_key: Any = None

    def profile_for(self, shapes: Mapping[str, Sequence[int]]) -> int:
        index = select_profile(self.profiles, shapes)
        if index is None:
            ranges = "; ".join(f"profile {p.name}: " + ", ".join(f"{n} {list(s['min'])}..{list(s['max'])}"
                                                                 for n, s in p.shapes.items()) for p in self.profiles)
            raise NoProfileFits(f"{self.name}: input shapes {dict(shapes)} fit no optimization profile of the "
                                  f"engine ({ranges}).")
        return index

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        session, mem = self.session, self.memory
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        index = self.profile_for(shapes)
        if index != session.active_profile:
            session.set_profile(index, mem.stream)
        out_shapes = session.set_input_shapes(shapes)
        for t in session.io:
            address = mem.put(t.name, feeds[t.name], t.dtype) if t.is_input else \
                mem.empty(t.name, out_shapes[t.name], t.dtype)
            session.bind(t.name, address)
        if self.cuda_graph:
            key = (index, tuple(sorted(shapes.items())))
            if key != self._graph_key:
                session.enqueue(mem.stream)  # once outside capture: TensorRT finishes deferred setup here
                self._graph = mem.capture(lambda: session.enqueue(mem.stream))
                self._graph_key = key
            mem.replay(self._graph)
        else:
            session.enqueue(mem.stream)
        return {name: mem.get(name) for name in self.outputs}

    def close(self) -> None:
        self.session.close()
        self.memory.close()
        self._graph = None
