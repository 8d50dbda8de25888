"""ONNX Runtime runner (CPU, or CUDA where onnxruntime-gpu and a GPU exist)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmopt.errors import BackendUnavailable, BundleError, describe
from mmopt.runners.base import Runner
from mmopt.spec import TensorSpec

from mmopt.ort import PROVIDERS, available_devices, fast_run, io_problems, session


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"
    level = "ORT_ENABLE_ALL"  # graph optimisation level; a subclass may need a safer one

    def __init__(self, path: str | Path, inputs: list[TensorSpec] | tuple[TensorSpec, ...],
                 outputs: list[TensorSpec] | tuple[TensorSpec, ...], device: str = "cpu",
                 threads: int | None = None, name: str | None = None, config: dict[str, str] | None = None):
        super().__init__(name or Path(path).stem, inputs, outputs)
        self.path, self.device, self.threads = Path(path), device, threads
        self.config = dict(config or {})  # session config entries, e.g. {"session.intra_op.allow_spinning": "0"}
        if device not in PROVIDERS:
            raise BackendUnavailable(f"unknown onnxruntime device '{device}'; use one of {', '.join(PROVIDERS)}.")
        self.session = None

    def _load(self) -> None:
        if self.device not in available_devices():
            raise BackendUnavailable(
                f"onnxruntime here has no {PROVIDERS[self.device]} (available: {', '.join(available_devices())}). "
                "Install onnxruntime-gpu on a machine with an NVIDIA GPU for --device cuda.")
        try:
            self.session = session(self.path, self.device, self.threads, self.level, self.config)
        except Exception as e:  # not ONNX, truncated, or an op this onnxruntime lacks
            raise BundleError(f"{self.path}: ONNX Runtime cannot load this graph of component '{self.name}' "
                              f"({describe(e)}). Re-export the bundle.") from None
        problems = io_problems(self.session, {n: (t.dtype, len(t.shape)) for n, t in self.inputs.items()},
                               {n: (t.dtype, len(t.shape)) for n, t in self.output_specs.items()})
        if problems:
            raise BundleError(f"{self.path}: is not the graph of component '{self.name}': " + "; ".join(problems)
                              + ". The file was replaced or the manifest edited: re-export the bundle.")
        self._out_names = [o.name for o in self.session.get_outputs()]
        self._run = fast_run(self.session)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._out_names, self._run(self._out_names, feeds, None)))

    def _close(self) -> None:
        self.session = None
        self._run = None  # the bound run method holds the session too
