"""Task score of any pipeline: argmax accuracy of ``[evaluation].output`` on the user's labelled data.

The evaluation callable is iterated once; every batch goes through every predictor (eager fp32 and
each converted pipeline), so all scores come from exactly the same samples.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from mmopt.judge.compare import measure
from mmopt.data import read
from mmopt.capture import Split
from mmopt.errors import ConfigError
from mmopt.runners.eager import EagerRunner
from mmopt.spec import ModelSpec

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def eager_predictor(model: torch.nn.Module, split: Split, threads: int | None = 1) -> Predict:
    """Eager PyTorch (an ``EagerRunner`` of the whole model) as a predictor on numpy inputs. One intra-op
    thread by default: on a shared 2-core machine a second busy process makes PyTorch's multi-threaded
    kernels up to ~8x slower, one thread never."""
    runner = EagerRunner(model, split.model_inputs, split.model_outputs).__enter__()  # holds no resources

    def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return runner.infer(inputs, check=False)
        finally:
            torch.set_num_threads(before)
    predict.memo_key = ("eager", id(model))  # type: ignore[attr-defined]
    predict.keeps = model  # type: ignore[attr-defined]  # alive while memoised: its id is never reused
    return predict


def memo_key(predict: Predict) -> tuple | None:
    """What identifies a predictor's outputs: eager on one model object, or a pipeline of given graph files
    (``Pipeline.memo_key``). None: not memoised (e.g. the policy search's shared-runner pipelines)."""
    owner = getattr(predict, "__self__", None)
    return getattr(predict, "memo_key", None) or getattr(owner, "memo_key", None)


# (predictor key, data source, its folder, output, sample limit) -> (digest per batch, scores per batch, model)
_SCORES: dict[tuple, tuple[list[str], list[np.ndarray], object]] = {}
_SCORES_MAX = 16


def _digest(inputs: dict[str, np.ndarray], labels: np.ndarray) -> str:
    h = hashlib.sha1()
    for name in sorted(inputs):
        h.update(name.encode())
        h.update(np.ascontiguousarray(inputs[name]).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _batches(spec: ModelSpec, predictors: dict[str, Predict], limit: int | None,
             on_batch: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Labels and each predictor's score output per batch. The data is read every time; a predictor scored
    before in this process on the very same batches (same key, same digest of every batch's inputs and
    labels) is not run again."""
    ev = spec.evaluation
    where = (ev.source, str(spec.root), ev.output, limit)
    keys = {label: memo_key(p) for label, p in predictors.items()}
    cached = {label: _SCORES.get((k, *where)) for label, k in keys.items() if k is not None}
    labels_seen: list[np.ndarray] = []
    digests: list[str] = []
    scores: dict[str, list[np.ndarray]] = {label: [] for label in predictors}
    for inputs, labels in read(spec, "evaluation", limit):
        i, digest = len(digests), _digest(inputs, labels)
        labels_seen.append(labels)
        digests.append(digest)
        for label, predict in predictors.items():
            hit = cached.get(label)
            if hit is not None and i < len(hit[0]) and hit[0][i] == digest:
                scores[label].append(hit[1][i])
                continue
            out = predict(inputs)
            if ev.output not in out:
                raise ConfigError(f"{spec.path}: field 'evaluation.output': the model has no output "
                                  f"'{ev.output}'. Its outputs are: {', '.join(out)}.")
            s = np.asarray(out[ev.output])
            if s.ndim < 2 or s.shape[0] != len(labels):
                raise ConfigError(f"{spec.path}: field 'evaluation.output': '{ev.output}' has shape "
                                  f"{list(s.shape)}; argmax accuracy needs [batch, classes] scores.")
            scores[label].append(s.reshape(len(labels), -1))
        if on_batch is not None:
            on_batch(len(labels))
    for label, p in predictors.items():
        if keys[label] is not None:
            if len(_SCORES) >= _SCORES_MAX:
                _SCORES.pop(next(iter(_SCORES)))
            # an eager entry keeps its model alive, so its id() is never reused; pipelines are keyed by content
            _SCORES[(keys[label], *where)] = (digests, scores[label], getattr(p, "keeps", None))
    return labels_seen, scores


def evaluate(spec: ModelSpec, predictors: dict[str, Predict], samples: int | None | str = "config",
             parity_to: str | None = None, on_batch: Callable[[int], None] | None = None) -> dict[str, object]:
    """``{"metric", "output", "source", "samples", "scores": {label: accuracy}}`` over the same batches.

    ``samples`` defaults to ``[evaluation].samples`` (None: all). With ``parity_to`` (a predictor's label),
    ``"parity"`` holds each predictor's worst cosine and largest absolute error against that one's output.
    ``on_batch(n)`` is called after each batch every predictor has scored, with its sample count.
    """
    ev = spec.evaluation
    if ev is None:
        raise ConfigError(f"{spec.path}: no [evaluation] table; add one to score pipelines on labelled data.")
    limit = ev.samples if samples == "config" else samples
    labels_seen, scores = _batches(spec, predictors, limit, on_batch)
    correct = {k: sum(int((s.argmax(-1) == y).sum()) for s, y in zip(scores[k], labels_seen)) for k in predictors}
    parity = {k: {"cos_min": 1.0, "max_abs": 0.0} for k in predictors}
    if parity_to is not None:
        for label in predictors:
            for ref, s in zip(scores[parity_to], scores[label]):
                m = measure(ev.output, ref, s)
                parity[label] = {"cos_min": min(parity[label]["cos_min"], m.cos_min),
                                 "max_abs": max(parity[label]["max_abs"], m.max_abs)}
    seen = sum(len(y) for y in labels_seen)
    if seen == 0:
        raise ConfigError(f"{spec.path}: field 'evaluation.source': {ev.source}() yielded no batches.")
    out = {"metric": f"argmax accuracy of '{ev.output}'", "output": ev.output, "source": ev.source,
           "samples": seen, "scores": {k: v / seen for k, v in correct.items()}}
    if parity_to is not None:
        out["parity"] = {"reference": parity_to, **parity}
    return out
