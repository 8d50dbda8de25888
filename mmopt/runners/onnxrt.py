"""ONNX Runtime runner (CPU, or CUDA where onnxruntime-gpu and a GPU exist)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmopt import dtypes
from mmopt.errors import BackendUnavailable, BundleError, describe
from mmopt.runners.base import Runner
from mmopt.spec import TensorSpec

from mmopt.ort import PROVIDERS, available_devices, session


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
        self._check_io()
        self._out_names = [o.name for o in self.session.get_outputs()]
        # InferenceSession.run re-validates input names in Python on every call; the base class has
        # already checked the feeds (or the pipeline feeds captured wiring), so call the binding
        # directly when this onnxruntime exposes it: ~10% of a batch-1 pipeline on small models.
        inner = getattr(self.session, "_sess", None)
        self._run = inner.run if hasattr(inner, "run") else \
            (lambda names, feeds, options: self.session.run(names, feeds, options))

    def _check_io(self) -> None:
        """The graph must be the component's: same input names, and every output, with the spec's dtypes
        and ranks. A swapped or foreign file fails here, naming what differs, not deep in a later run."""
        problems = []
        graph_in = {i.name: i for i in self.session.get_inputs()}
        graph_out = {o.name: o for o in self.session.get_outputs()}
        for kind, want, have, exact in (("input", self.inputs, graph_in, True),
                                        ("output", self.output_specs, graph_out, False)):
            missing = [n for n in want if n not in have]
            extra = [n for n in have if n not in want] if exact else []
            if missing:
                problems.append(f"{kind}s {', '.join(missing)} missing (graph has {', '.join(have) or 'none'})")
            if extra:
                problems.append(f"unexpected {kind}s {', '.join(extra)}")
            for name, spec in want.items():
                if name not in have:
                    continue
                dtype = dtypes.ONNXRUNTIME.get(have[name].type, have[name].type)
                if dtype != spec.dtype:
                    problems.append(f"{kind} '{name}' is {dtype}, the component's is {spec.dtype}")
                shape = have[name].shape
                if shape is not None and len(shape) != len(spec.shape):
                    problems.append(f"{kind} '{name}' has rank {len(shape)}, the component's has {len(spec.shape)}")
        if problems:
            raise BundleError(f"{self.path}: is not the graph of component '{self.name}': " + "; ".join(problems)
                              + ". The file was replaced or the manifest edited: re-export the bundle.")

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._out_names, self._run(self._out_names, feeds, None)))

    def _close(self) -> None:
        self.session = None
        self._run = None  # the bound run method holds the session too
