"""The recomposed model from a bundle's captured components: ``mmopt_runtime.pipeline`` (the one pipeline,
shared with the device runtime) fed by ComponentSpecs and mmopt's runners."""
from __future__ import annotations

from mmopt.errors import CaptureError
from mmopt.runners.base import Runner
from mmopt.spec import ComponentSpec
from mmopt_runtime import pipeline as _runtime


class Pipeline(_runtime.Pipeline):
    """Encoders, then fusion, each fed by the captured wiring; returns the full model's outputs.

    ``runners`` maps component name to an entered runner (the caller owns their lifetime). One step per call
    (a component called twice runs twice), each after the calls whose outputs it reads.
    """

    def __init__(self, components: dict[str, ComponentSpec], output_sources: dict[str, str],
                 runners: dict[str, Runner]):
        missing = [c for c in components if c not in runners]
        if missing:
            raise ValueError(f"pipeline needs a runner for every component; missing {missing}")
        self.components, self.output_sources, self.runners = components, output_sources, runners
        steps = [(key, runners[c].infer, tuple(sources.items()),
                  {t.name: f"{key}:{t.name}" for t in components[c].outputs})
                 for c in [*(c for c, s in components.items() if s.kind == "encoder"),
                           *(c for c, s in components.items() if s.kind != "encoder")]
                 for key, sources in components[c].calls()]
        try:
            super().__init__(steps, output_sources)
        except _runtime.WiringError as e:
            raise CaptureError(f"{e}. mmopt cannot order them; set [components] to modules whose calls depend on each "
                               "other one way only (or report this model).") from None
