"""Identical inputs for every runner of one comparison: random from the captured specs, or the user's data.

Full-model inputs are made once per batch size (numpy), then run through the eager model with hooks
so each component is fed what it really receives there. Every runner, eager or artifact, sees the
very same arrays. The batch axis is the dim that is axis 0 of every model input; the sweep covers
its declared range (powers of two plus min / opt / max).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmopt.capture import Split, random_inputs
from mmopt.data import batch_dim, read
from mmopt.errors import UsageError
from mmopt.runners.eager import to_torch
from mmopt.spec import ModelSpec
from mmopt.reference import eager_io_for

SOURCES = ("random", "calibration", "evaluation")
LATENCY_SEED = 2000  # distinct from capture (0..) and export verification (1000..) seeds


def batch_sizes(spec: ModelSpec, requested: list[int] | None) -> list[int]:
    """The sweep: requested sizes checked against the declared range, else powers of two in it."""
    dim = batch_dim(spec)
    if dim is None:
        if requested:
            raise UsageError(f"{spec.path}: no dim is the first axis of every input, so there is no batch "
                             "size to choose; run without --batch.")
        return [0]  # 0: every dim at its opt size
    d = spec.dims[dim]
    if requested:
        bad = [b for b in requested if not d.min <= b <= d.max]
        if bad:
            raise UsageError(f"--batch {', '.join(map(str, bad))}: outside the exported range of dim '{dim}' "
                             f"[{d.min}, {d.max}] ({spec.path}). Re-export with a wider [dims] {dim} to bench "
                             "larger batches.")
        return sorted(set(requested))
    sweep = {d.min, d.opt, d.max} | {2 ** k for k in range(12) if d.min <= 2 ** k <= d.max}
    return sorted(sweep)


def _shapes(spec: ModelSpec, batch: int) -> dict[str, tuple[int, ...]]:
    dim = batch_dim(spec)
    return {n: tuple(batch if (d == dim and batch) else (spec.dims[d].opt if isinstance(d, str) else d)
                     for d in i.shape) for n, i in spec.inputs.items()}


@dataclass
class Feeds:
    """One comparison's inputs: full-model arrays, each component's arrays, and eager's outputs."""

    batch: int
    model: dict[str, np.ndarray]
    model_out: dict[str, np.ndarray]
    components: dict[str, dict[str, np.ndarray]]


class InputMaker:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, split: Split, source: str = "random"):
        if source not in SOURCES:
            raise UsageError(f"--inputs {source}: choose one of {', '.join(SOURCES)}.")
        self.model, self.spec, self.split, self.source = model, spec, split, source
        self._sample: dict[str, np.ndarray] | None = None
        self._specs = {t.name: t for t in split.model_inputs}

    def model_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        if self.source == "random":
            return random_inputs(self.spec, _shapes(self.spec, batch), LATENCY_SEED + batch)
        if self._sample is None:
            self._sample = next(iter(read(self.spec, self.source)))[0]
        n = len(next(iter(self._sample.values())))
        take = np.resize(np.arange(n), batch) if batch else np.arange(n)  # tile when the batch is short
        return to_torch({k: np.ascontiguousarray(a[take]) for k, a in self._sample.items()}, self._specs, "cpu")

    def feeds(self, batch: int) -> Feeds:
        model_in, model_out, per = eager_io_for(self.model, self.spec, self.split, self.model_inputs(batch),
                                                f"batch {batch}")
        return Feeds(batch, model_in, model_out, {c: f for c, (f, _) in per.items()})
