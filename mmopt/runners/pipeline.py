"""The recomposed model: component runners called in wiring order, any backend per component."""
from __future__ import annotations

from typing import Any

import numpy as np

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
        self.order = [c for c, s in components.items() if s.kind == "encoder"] + \
                     [c for c, s in components.items() if s.kind != "encoder"]

    def infer(self, feeds: dict[str, np.ndarray], trace: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        values = {f"input:{n}": a for n, a in feeds.items()}
        for comp in self.order:
            spec = self.components[comp]
            comp_feeds = {n: values[src] for n, src in spec.sources.items()}
            out = self.runners[comp].infer(comp_feeds, check=False)
            if trace is not None:
                trace[comp] = (comp_feeds, out)
            values.update({f"{comp}:{n}": a for n, a in out.items()})
        return {n: values[src] for n, src in self.output_sources.items()}
