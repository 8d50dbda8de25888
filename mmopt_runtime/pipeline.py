"""The recomposed model: one step per component call, in wiring order, any backend per step.

The one pipeline of mmopt and of its device runtime: mmopt builds it from a bundle's captured components
(``mmopt.runners.pipeline``), the runtime from a package's manifest. Torch-free.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

Infer = Callable[[dict[str, np.ndarray], bool], dict[str, np.ndarray]]


class WiringError(ValueError):
    """The calls cannot be ordered: each reads another's output."""


class Pipeline:
    """``steps``: (call key, infer, sources as (input name, "input:<model input>" | "<call>:<output>") pairs,
    {output name: "<call key>:<output name>"}), encoders first; ``outputs``: model output -> source.
    The wiring is resolved once: at batch 1 a small model spends as long in Python bookkeeping as in the
    backend, so ``infer`` only looks values up."""

    def __init__(self, steps: list[tuple[str, Infer, tuple[tuple[str, str], ...], dict[str, str]]],
                 outputs: dict[str, str]):
        self._plan = ordered(steps)
        self._outputs = tuple(outputs.items())

    def infer(self, feeds: dict[str, np.ndarray], trace: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        values = {f"input:{n}": a for n, a in feeds.items()}
        for key, infer, sources, keys in self._plan:
            step_feeds = {n: values[src] for n, src in sources}
            out = infer(step_feeds, False)
            if trace is not None:
                trace[key] = (step_feeds, out)
            for n, a in out.items():
                values[keys[n]] = a
        return {n: values[src] for n, src in self._outputs}


def manifest_calls(components: dict[str, Any]) -> list[tuple[str, str, tuple[tuple[str, str], ...], dict[str, str]]]:
    """Each call of a package manifest's components as a step of ``ordered``'s shape: (call key, component,
    (input, source) pairs, {output: "<call key>:<output>"}), in manifest order. The runtime's pipeline, the
    merged graph and Triton's ensemble all read the wiring through this."""
    return [(key, comp, tuple(sources.items()), {t["name"]: f"{key}:{t['name']}" for t in spec["outputs"]})
            for comp, spec in components.items() for key, sources in spec["calls"]]


def ordered(steps: list[tuple]) -> list[tuple]:
    """``steps`` so that each runs after every step it reads from; otherwise in the given order."""
    made = {key for step in steps for key in step[3].values()}
    done: set[str] = set()
    out: list[tuple] = []
    pending = list(steps)
    while pending:
        ready = next((st for st in pending if all(src in done or src not in made for _, src in st[2])), None)
        if ready is None:
            raise WiringError(f"the captured wiring has a cycle among the calls {[st[0] for st in pending]}: "
                              "each reads another's output")
        pending.remove(ready)
        out.append(ready)
        done.update(ready[3].values())
    return out
