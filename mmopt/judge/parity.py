"""Prove artifacts match the eager model: each component alone, then the recomposed pipeline.

Fresh random full-model inputs at the min, opt and max shapes run through the eager model with hooks,
so every component is checked on the inputs it really receives (masks, token ids, encoder features),
against the outputs the eager component really produced. Then the same model inputs go through the
pipeline of artifacts and are compared with the eager model's own outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from mmopt.capture import Split
from mmopt.judge.compare import Check, check_all
from mmopt.reference import eager_io, eager_io_for
from mmopt.runners.base import Runner
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import SIZES, ModelSpec, component_of, precision_rank

VERIFY_SEED = 1000  # distinct from the capture seeds: parity is checked on inputs never traced
REAL_BATCHES = 4  # the user's batches (calibration in quantize, evaluation in bench) checked like random ones
# The eager reference (eager_io, eager_io_for) lives in mmopt.reference, below every judge and job.


def tolerance_for(spec: ModelSpec, split: Split, precisions: Mapping[str, str]) -> Callable[[str], dict[str, float]]:
    """The one gate rule, shared by export, quantize and bench: ``gate(component)`` for a pipeline whose
    components run at ``precisions`` (missing ones at fp32); ``gate("pipeline")`` is the gate of its least
    faithful precision. Argmax agreement is gated only on score outputs (``scores_of``)."""
    def gate(comp: str) -> dict[str, float]:
        if comp == "pipeline":
            worst = max(precisions.values(), key=precision_rank, default="fp32")
            return dict(spec.tolerances.get(worst, spec.tolerances["fp32"]))
        return dict(spec.tolerances.get(precisions.get(comp, "fp32"), spec.tolerances["fp32"]))

    return gate


def scores_of(spec: ModelSpec, split: Split, comp: str) -> frozenset[str]:
    """The outputs of ``comp`` ("pipeline": the model) that are class scores: the model outputs named by
    ``[evaluation].output`` and ``[tolerance] scores``, under the name the component gives them."""
    scores = spec.score_outputs & set(split.output_sources)
    if comp == "pipeline":
        return frozenset(scores)
    prefix = f"{comp}:"
    return frozenset(split.output_sources[s][len(prefix):] for s in scores if split.output_sources[s].startswith(prefix))


def verify(model: torch.nn.Module, spec: ModelSpec, split: Split, runners: dict[str, Runner],
           precisions: Mapping[str, str], seed: int = VERIFY_SEED,
           on_size: Callable[..., None] | None = None) -> list[Check]:
    """Check every component and the pipeline at min / opt / max, each gated by ``tolerance_for`` at the
    component's precision (``precisions``: component -> precision, fp32 where missing). ``on_size()`` is
    called after each size."""
    tolerance = tolerance_for(spec, split, precisions)
    checks: list[Check] = []
    pipe = Pipeline(split.components, split.output_sources, runners)
    for i, size in enumerate(SIZES):
        model_in, model_out, per_comp = eager_io(model, spec, split, size, seed + i)
        for key, (feeds, refs) in per_comp.items():  # every call of every component
            comp = component_of(key)
            checks += check_all(comp, _case(size, key), refs, runners[comp].infer(feeds), tolerance(comp),
                                scores_of(spec, split, comp))
        checks += check_all("pipeline", size, model_out, pipe.infer(model_in), tolerance("pipeline"),
                            scores_of(spec, split, "pipeline"))
        if on_size is not None:
            on_size()
    return checks


def verify_real(model: torch.nn.Module, spec: ModelSpec, split: Split, runners: dict[str, Runner],
                precisions: Mapping[str, str], batches: list[dict[str, np.ndarray]], case: str = "real"
                ) -> list[Check]:
    """As ``verify``, on the user's own full-model batches (cases ``real0``, ``real1``, ...): every
    component on what it really receives from them, and the pipeline, under the same gate."""
    tolerance = tolerance_for(spec, split, precisions)
    pipe = Pipeline(split.components, split.output_sources, runners)
    checks: list[Check] = []
    for i, batch in enumerate(batches):
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in batch.items()}
        model_in, model_out, per_comp = eager_io_for(model, spec, split, tensors, f"{case} batch {i}")
        for key, (feeds, refs) in per_comp.items():
            comp = component_of(key)
            checks += check_all(comp, _case(f"{case}{i}", key), refs, runners[comp].infer(feeds), tolerance(comp),
                                scores_of(spec, split, comp))
        checks += check_all("pipeline", f"{case}{i}", model_out, pipe.infer(model_in), tolerance("pipeline"),
                            scores_of(spec, split, "pipeline"))
    return checks


def _case(case: str, key: str) -> str:
    """The case label of one call: ``opt``, or ``opt/image@2`` for a component's second call."""
    return case if "@" not in key else f"{case}/{key}"


def summarise(checks: list[Check]) -> dict[str, dict[str, Any]]:
    """Worst figures per component (and pipeline) over sizes and outputs, for tables and the manifest."""
    out: dict[str, dict[str, Any]] = {}
    for c in checks:
        key = c.component
        m = c.metrics
        s = out.setdefault(key, {"outputs": 0, "failed": 0, "cos_min": 1.0, "max_abs": 0.0, "max_rel": 0.0,
                                 "argmax": None})
        s["outputs"] += 1
        s["failed"] += bool(c.failed)
        s["cos_min"] = min(s["cos_min"], m.cos_min)
        s["max_abs"] = max(s["max_abs"], m.max_abs)
        s["max_rel"] = max(s["max_rel"], m.max_rel)
        if m.argmax is not None:
            s["argmax"] = m.argmax if s["argmax"] is None else min(s["argmax"], m.argmax)
    return out
