"""The one interface every backend implements: a context manager with ``infer(feeds) -> outputs``.

The base class checks every feed against the component's captured spec (names, dtypes, static axes,
profile range of dynamic axes) before a backend sees it, so each backend reports bad input the same
way. Timing lives in ``mmopt.bench``, never in runners.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mmopt import dtypes
from mmopt.errors import UsageError
from mmopt.spec import TensorSpec
from mmopt_runtime.feeds import axis_problems



class Runner:
    """Runs one graph. Subclasses implement ``_load``, ``_infer`` and optionally ``_close``."""

    backend = "base"

    def __init__(self, name: str, inputs: list[TensorSpec] | tuple[TensorSpec, ...],
                 outputs: list[TensorSpec] | tuple[TensorSpec, ...]):
        self.name = name
        self.inputs = {t.name: t for t in inputs}
        self.outputs = [t.name for t in outputs]
        self.output_specs = {t.name: t for t in outputs}
        self._active = False

    def __enter__(self) -> "Runner":
        self._load()
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        self._close()

    def infer(self, feeds: dict[str, np.ndarray], check: bool = True) -> dict[str, np.ndarray]:
        if not self._active:
            raise RuntimeError(f"{type(self).__name__} '{self.name}' used outside its `with` block")
        if check:
            self.check_feeds(feeds)
        return self._infer(feeds)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        problems = []
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing:
            problems.append(f"missing inputs: {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected inputs: {', '.join(extra)}")
        for name, spec in self.inputs.items():
            if name not in feeds:
                continue
            arr = feeds[name]
            want = dtypes.NUMPY[spec.dtype]
            if arr.dtype != want:
                problems.append(f"{name}: dtype {arr.dtype}, expected {np.dtype(want).name}")
            if arr.ndim != len(spec.shape):
                problems.append(f"{name}: rank {arr.ndim}, expected {len(spec.shape)} {list(spec.shape)}")
                continue
            problems += axis_problems(name, spec.shape, spec.shapes["min"], spec.shapes["max"], arr.shape)
        if problems:
            raise UsageError(f"{self.backend} runner '{self.name}': bad feeds:\n  " + "\n  ".join(problems))

    # ---- backend hooks --------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        pass
