"""TensorRT runner: the same ``infer(feeds) -> outputs`` interface as the other backends.

Before TensorRT sees the engine, its sidecar is checked against this machine (platform, TensorRT
version, GPU compute capability; see ``mmopt_runtime.trt.compat``) and its sha256 against the file. Then the
device runtime's ``EngineRunner`` runs it (profile per call, shapes, bindings, ``execute_async_v3``, optional
CUDA graph), with device buffers from torch tensors, or cuda-python allocations on torch-free devices.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmopt.errors import BundleError
from mmopt.manifest import Manifest
from mmopt.runners.base import Runner
from mmopt.spec import TensorSpec
from mmopt.trt import device
from mmopt.trt.memory import DeviceMemory, make_memory
from mmopt_runtime.trt import api
from mmopt_runtime.trt.compat import Environment, require_compatible
from mmopt_runtime.trt.errors import EngineLoadError, TensorRTUnavailable
from mmopt_runtime.trt.runner import EngineRunner


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
    gpu = device.current_gpu(index)  # mmopt's probes: torch first
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
        self._engine: EngineRunner | None = None

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
        mem = make_memory(self.memory, self.device_index)
        try:
            self._engine = EngineRunner(data, self.engine_path.name, mem, list(self.inputs), list(self.outputs),
                                        allow_host_code=bool(meta["build_options"]["version_compatible"]),
                                        cuda_graph=self.cuda_graph,
                                        what=f"component '{self.name}'",
                                        fix="Rebuild it from this bundle with `mmopt build`.")
        except BaseException:
            mem.close()
            raise

    def _close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None

    # ---- inference --------------------------------------------------------------------------
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._engine is not None
        return self._engine.infer(feeds)
