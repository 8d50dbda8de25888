"""TensorRT runner: the same ``infer(feeds) -> outputs`` interface as the other backends.

Before TensorRT sees the engine, its sidecar is checked against this machine (platform, TensorRT
version, GPU compute capability; see ``mmopt.trt.compat``) and its sha256 against the file. Each call
picks the narrowest optimization profile that fits the feed shapes, sets the input shapes, binds
device buffers (torch tensors, or cuda-python allocations on torch-free devices) and enqueues with
``execute_async_v3`` on the runner's own CUDA stream. With ``cuda_graph=True`` the enqueue is captured
once per shape and replayed, which removes launch overhead for fixed-shape serving.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmopt.errors import BundleError, UsageError
from mmopt.manifest import Manifest
from mmopt.runners.base import Runner
from mmopt.spec import SIZES, TensorSpec
from mmopt.trt import api, device
from mmopt.trt.compat import Environment, require_compatible
from mmopt.trt.errors import EngineLoadError, TensorRTUnavailable
from mmopt.trt.memory import DeviceMemory, make_memory
from mmopt.trt.profiles import Profile, select_profile


def read_sidecar(engine: Path) -> dict[str, Any]:
    path = engine.with_name(engine.name + ".json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineLoadError(f"{engine.name}: no sidecar {path.name} beside it, so mmopt cannot check that it fits "
                              "this GPU and TensorRT. Rebuild it with `mmopt build`.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineLoadError(f"{path}: not valid JSON ({e}); rebuild the engine with `mmopt build`.") from None


def running_environment(index: int = 0) -> Environment:
    """TensorRT version, GPU and platform of this process (``TensorRTUnavailable`` where one is missing)."""
    version = api.tensorrt_version()
    gpu = device.current_gpu(index)
    if gpu is None:
        raise TensorRTUnavailable(f"no NVIDIA GPU {index} is visible here: TensorRT engines only run on the GPU type "
                                  "they were built for. Run the bundle's ONNX graphs with ONNX Runtime instead.")
    return Environment(version, gpu.name, gpu.compute_capability, device.platform_tag())


class TensorRTRunner(Runner):
    """Runs one component's engine. ``memory`` is "auto", "torch", "cuda-python" or a ``DeviceMemory``."""

    backend = "tensorrt"

    def __init__(self, engine: str | Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                 name: str | None = None, sidecar: Mapping[str, Any] | None = None, device_index: int = 0,
                 memory: str | DeviceMemory = "auto", cuda_graph: bool = False):
        super().__init__(name or Path(engine).name.split(".")[0], inputs, outputs)
        self.engine_path = Path(engine)
        self.sidecar = dict(sidecar) if sidecar else None
        self.device_index, self.memory, self.cuda_graph = device_index, memory, cuda_graph
        self.warnings: list[str] = []
        self._session: api.EngineSession | None = None
        self._mem: DeviceMemory | None = None

    @classmethod
    def from_bundle(cls, bundle: str | Path, component: str, precision: str, **kwargs: Any) -> "TensorRTRunner":
        """The engine ``mmopt build`` made for ``component`` at ``precision`` in ``bundle``."""
        bundle = Path(bundle)
        manifest = Manifest.read(bundle)
        engine = manifest.find(component, precision, stage="engine")
        if engine is None:
            raise BundleError(f"{bundle}: no {precision} TensorRT engine for component '{component}'. Build it on this "
                              f"device: mmopt build {bundle} --precision {precision}")
        spec = manifest.components[component]
        return cls(manifest.file(bundle, engine), spec.inputs, spec.outputs, name=component,
                   sidecar=engine.extra or None, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------
    def _load(self) -> None:
        meta = self.sidecar or read_sidecar(self.engine_path)
        # Decide from the sidecar first: TensorRT's own refusal of a foreign engine is a bare log line.
        self.warnings = require_compatible(meta, running_environment(self.device_index), self.engine_path.name)
        try:
            data = self.engine_path.read_bytes()
        except FileNotFoundError:
            raise EngineLoadError(f"{self.engine_path}: engine file missing; rebuild with `mmopt build`.") from None
        want = meta.get("engine", {}).get("sha256")
        if want != hashlib.sha256(data).hexdigest():
            raise EngineLoadError(f"{self.engine_path.name}: sha256 differs from its sidecar (modified or from another "
                                  "build); refusing to load it. Rebuild with `mmopt build`.")
        self._mem = make_memory(self.memory, self.device_index)
        self._session = api.EngineSession(data, allow_host_code=bool(meta["build_options"]["version_compatible"]),
                                          name=self.engine_path.name)
        self._check_io()
        self._profiles = [Profile(str(i), {n: dict(zip(SIZES, s)) for n, s in p.items()})
                          for i, p in enumerate(self._session.profiles)]
        self._graph: Any = None
        self._graph_key: Any = None

    def _check_io(self) -> None:
        assert self._session is not None
        have_in = {t.name for t in self._session.io if t.is_input}
        have_out = {t.name for t in self._session.io if not t.is_input}
        problems = []
        if have_in != set(self.inputs):
            problems.append(f"inputs {sorted(have_in)}, expected {sorted(self.inputs)}")
        if not set(self.outputs) <= have_out:
            problems.append(f"outputs {sorted(have_out)}, expected {sorted(self.outputs)}")
        if problems:
            raise EngineLoadError(f"{self.engine_path.name} does not match component '{self.name}': "
                                  + "; ".join(problems) + ". Rebuild it from this bundle with `mmopt build`.")

    def _close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._mem is not None:
            self._mem.close()
        self._session = self._mem = self._graph = None

    # ---- inference --------------------------------------------------------------------------
    def profile_for(self, shapes: Mapping[str, Sequence[int]]) -> int:
        index = select_profile(self._profiles, shapes)
        if index is None:
            ranges = "; ".join(f"profile {p.name}: " + ", ".join(f"{n} {list(s['min'])}..{list(s['max'])}"
                                                                 for n, s in p.shapes.items()) for p in self._profiles)
            raise UsageError(f"tensorrt runner '{self.name}': input shapes {dict(shapes)} fit no optimization "
                             f"profile of the engine ({ranges}).")
        return index

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, mem = self._session, self._mem
        assert session is not None and mem is not None
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
