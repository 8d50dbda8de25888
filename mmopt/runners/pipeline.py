"""The recomposed model: component runners called in wiring order, any backend per component."""
from __future__ import annotations

from typing import Any

import numpy as np

from mmopt.errors import CaptureError
from mmopt.runners.base import Runner
from mmopt.spec import ComponentSpec


class Pipeline:
    """Encoders, then fusion, each fed by the captured wiring; returns the full model's outputs.

    ``runners`` maps component name to an entered runner (the caller owns their lifetime).
    """

    def __init__(self, components: dict[str, ComponentSpec], output_sources: dict[str, str],
                 runners: dict[str, Runner]):
        missing = [c for c in components if c not in runners]
        if missing:
            raise ValueError(f"pipeline needs a runner for every component; missing {missing}")
        self.components, self.output_sources, self.runners = components, output_sources, runners
        # The wiring resolved once: at batch 1 a small model spends as long in Python bookkeeping as in
        # ONNX Runtime, so infer() only looks values up (measured in benchmarks/peers.py). One step per call
        # (a component called twice runs twice), each after the calls whose outputs it reads.
        self._plan = _ordered([(key, runners[c].infer, tuple(sources.items()),
                                {t.name: f"{key}:{t.name}" for t in components[c].outputs})
                               for c in [*(c for c, s in components.items() if s.kind == "encoder"),
                                         *(c for c, s in components.items() if s.kind != "encoder")]
                               for key, sources in components[c].calls()])
        self._outputs = tuple(output_sources.items())

    def infer(self, feeds: dict[str, np.ndarray], trace: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        values = {f"input:{n}": a for n, a in feeds.items()}
        for comp, infer, sources, keys in self._plan:
            comp_feeds = {n: values[src] for n, src in sources}
            out = infer(comp_feeds, False)
            if trace is not None:
                trace[comp] = (comp_feeds, out)  # by call key
            for n, a in out.items():
                values[keys[n]] = a
        return {n: values[src] for n, src in self._outputs}


def _ordered(steps: list[tuple]) -> list[tuple]:
    """``steps`` (key, infer, sources, output keys) so that each runs after every step it reads from;
    otherwise in the given order (encoders, then fusion)."""
    made = {key for step in steps for key in step[3].values()}
    done: set[str] = set()
    out: list[tuple] = []
    pending = list(steps)
    while pending:
        ready = next((st for st in pending if all(src in done or src not in made for _, src in st[2])), None)
        if ready is None:
            raise CaptureError(f"the captured wiring has a cycle among the calls {[st[0] for st in pending]}: "
                               "each reads another's output. mmopt cannot order them; set [components] to "
                               "modules whose calls depend on each other one way only (or report this model).")
        pending.remove(ready)
        out.append(ready)
        done.update(ready[3].values())
    return out
