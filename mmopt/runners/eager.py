"""Eager PyTorch runners: the full model (the reference) and a single component."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmopt.capture import flatten_named, nest
from mmopt.dtypes import to_numpy, torch_dtype
from mmopt.runners.base import Runner
from mmopt.spec import TensorSpec


def to_torch(feeds: dict[str, np.ndarray], specs: dict[str, TensorSpec], device: str) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch_dtype(specs[n].dtype))
            for n, a in feeds.items()}


class EagerRunner(Runner):
    """Runs ``module(**feeds)`` (or positionally, for component wrappers) and flattens the outputs."""

    backend = "eager"

    def __init__(self, module: torch.nn.Module, inputs: list[TensorSpec] | tuple[TensorSpec, ...],
                 outputs: list[TensorSpec] | tuple[TensorSpec, ...], device: str = "cpu",
                 positional: bool = False, name: str = "model"):
        super().__init__(name, inputs, outputs)
        self.module, self.device, self.positional = module, device, positional

    def _load(self) -> None:
        self.module.to(self.device).eval()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.forward(to_torch(feeds, self.inputs, self.device))
        if self.device != "cpu":
            torch.cuda.synchronize()
        return {n: to_numpy(t) for n, t in out.items()}

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Torch in, torch out: what the latency harness times on a GPU without host copies."""
        if self.positional:
            flat: Any = self.module(*(tensors[n] for n in self.inputs))
            return dict(zip(self.outputs, flat))
        named, _ = flatten_named(self.module(**nest(tensors)), "")
        got = dict(named)
        return {n: got[n] for n in self.outputs}
