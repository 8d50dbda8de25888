"""Task score of any pipeline: argmax accuracy of ``[evaluation].output`` on the user's labelled data.

The evaluation callable is iterated once; every batch goes through every predictor (eager fp32 and
each converted pipeline), so all scores come from exactly the same samples.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mmopt.judge.compare import measure
from mmopt.calibration import iterate, take
from mmopt.capture import flatten_named, to_numpy
from mmopt.errors import ConfigError
from mmopt.runners.pipeline import Pipeline
from mmopt.spec import ModelSpec

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def eager_predictor(model: torch.nn.Module, threads: int | None = 1) -> Predict:
    """Eager PyTorch on numpy inputs. One intra-op thread by default: on a shared 2-core machine a
    second busy process makes PyTorch's multi-threaded kernels up to ~8x slower, one thread never."""
    def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = model(**{n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in inputs.items()})
        finally:
            torch.set_num_threads(before)
        return {n: to_numpy(t) for n, t in flatten_named(out, "")[0] if isinstance(t, torch.Tensor)}
    return predict


def pipeline_predictor(pipe: Pipeline) -> Predict:
    return pipe.infer


def evaluate(spec: ModelSpec, predictors: dict[str, Predict], samples: int | None | str = "config",
             parity_to: str | None = None) -> dict[str, object]:
    """``{"metric", "output", "source", "samples", "scores": {label: accuracy}}`` over the same batches.

    ``samples`` defaults to ``[evaluation].samples`` (None: all). With ``parity_to`` (a predictor's label),
    ``"parity"`` holds each predictor's worst cosine and largest absolute error against that one's output.
    """
    ev = spec.evaluation
    if ev is None:
        raise ConfigError(f"{spec.path}: no [evaluation] table; add one to score pipelines on labelled data.")
    correct = {k: 0 for k in predictors}
    parity = {k: {"cos_min": 1.0, "max_abs": 0.0} for k in predictors}
    seen = 0
    limit = ev.samples if samples == "config" else samples
    for inputs, labels in take(iterate(spec, ev.source, "evaluation.source", labelled=True), limit):
        ref = None
        for label, predict in sorted(predictors.items(), key=lambda kv: kv[0] != parity_to):
            out = predict(inputs)
            if ev.output not in out:
                raise ConfigError(f"{spec.path}: field 'evaluation.output': the model has no output "
                                  f"'{ev.output}'. Its outputs are: {', '.join(out)}.")
            scores = np.asarray(out[ev.output])
            if scores.ndim < 2 or scores.shape[0] != len(labels):
                raise ConfigError(f"{spec.path}: field 'evaluation.output': '{ev.output}' has shape "
                                  f"{list(scores.shape)}; argmax accuracy needs [batch, classes] scores.")
            correct[label] += int((scores.reshape(len(labels), -1).argmax(-1) == labels).sum())
            if parity_to is not None:
                ref = scores if label == parity_to else ref
                m = measure(ev.output, ref, scores)
                parity[label] = {"cos_min": min(parity[label]["cos_min"], m.cos_min),
                                 "max_abs": max(parity[label]["max_abs"], m.max_abs)}
        seen += len(labels)
    if seen == 0:
        raise ConfigError(f"{spec.path}: field 'evaluation.source': {ev.source}() yielded no batches.")
    out = {"metric": f"argmax accuracy of '{ev.output}'", "output": ev.output, "source": ev.source,
           "samples": seen, "scores": {k: v / seen for k, v in correct.items()}}
    if parity_to is not None:
        out["parity"] = {"reference": parity_to, **parity}
    return out
