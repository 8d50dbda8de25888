"""Parity metrics between a reference output and a candidate, and the gate that judges them: the one home of
the numbers every mmopt verdict rests on (export, quantize, bench) and of the device's golden self-test.

Pure functions over numpy arrays; nothing else is imported, so the runtime stays torch-free.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class Metrics:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |a - b| / max |ref|: error relative to the output's own scale
    cos_min: float  # cosine per sample (first axis), worst and mean
    cos_mean: float
    argmax: float | None  # fraction of rows whose argmax agrees (score outputs only)
    nan: int  # positions where the candidate or the reference is NaN / Inf: a gate never passes on them
    inf: int
    # worst | ||out|| / ||ref|| - 1 | per sample (the cosine's rows; rows of a negligible norm skipped):
    # cosine and argmax are blind to a sample scaled as a whole
    norm_change: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine per sample (first axis); over the whole tensor for rank 1 and for one-element rows (a
    [batch, 1] logit or gate), whose per-row cosine would only be a sign test."""
    r = _rows(ref)
    o = out.reshape(r.shape)
    num = (r * o).sum(1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(o, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    return np.where(both_zero, 1.0, cos)


def measure(name: str, ref: np.ndarray, out: np.ndarray, score: bool = False) -> Metrics:
    """Errors and cosine of ``out`` against ``ref``; argmax agreement only for a ``score`` output (class
    scores: the argmax is a prediction), never for embeddings, hidden states or features."""
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        return Metrics(name, tuple(out.shape), float("inf"), float("inf"), -1.0, -1.0, 0.0 if score else None,
                       0, 0, float("inf"))
    if ref.dtype == np.bool_ or np.issubdtype(ref.dtype, np.integer):
        same = float((ref == out).mean()) if ref.size else 1.0
        diff = float(np.abs(ref.astype(np.int64) - out.astype(np.int64)).max(initial=0))
        return Metrics(name, tuple(ref.shape), diff, diff, same, same, None, 0, 0)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    bad_nan = int((np.isnan(o) | np.isnan(r)).sum())
    bad_inf = int((np.isinf(o) | np.isinf(r)).sum())
    finite = np.isfinite(r) & np.isfinite(o)
    diff = np.abs(r[finite] - o[finite])
    max_abs = float(diff.max(initial=0.0))
    scale = float(np.abs(r[np.isfinite(r)]).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cos = _cosines(np.where(finite, r, 0), np.where(finite, o, 0)) if r.size else np.ones(1)
    argmax = None
    if score and r.ndim >= 2 and r.shape[-1] > 1:
        argmax = float((r.argmax(-1) == o.argmax(-1)).mean())
    if bad_nan or bad_inf:
        cos = np.minimum(cos, -1.0)
    norm_change = _norm_change(np.where(finite, r, 0), np.where(finite, o, 0)) if r.size else 0.0
    return Metrics(name, tuple(r.shape), max_abs, max_rel, float(cos.min()), float(cos.mean()), argmax,
                   bad_nan, bad_inf, norm_change)


def _norm_change(ref: np.ndarray, out: np.ndarray) -> float:
    """Worst change of a row's norm, over the cosine's rows, relative to that norm or to a tenth of the
    largest row's, whichever is larger: a row far smaller than the others is judged at the output's own
    scale (as ``max_rel`` is), so quantization noise on it is not a mis-scaling. An all-zero reference
    counts any output as an infinite change."""
    r = _rows(ref)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(out.reshape(r.shape), axis=1)
    if nr.max() == 0:
        return 0.0 if no.max() == 0 else float("inf")
    return float((np.abs(no - nr) / np.maximum(nr, 0.1 * nr.max())).max())


def _rows(a: np.ndarray) -> np.ndarray:
    """The rows the cosine and the norm check compare: one per sample (first axis) for rank >= 2; the
    whole tensor as one row for rank <= 1 and for one-element samples (a [batch, 1] logit or gate)."""
    if a.ndim > 1 and int(np.prod(a.shape[1:])) > 1:
        return a.reshape(a.shape[0], -1)
    return a.reshape(1, -1)


def failures(m: Metrics, tol: dict[str, float]) -> list[str]:
    """Which gates ``m`` breaks. Error passes when small in absolute *or* in relative terms."""
    why = []
    if m.nan or m.inf:
        why.append(f"{m.nan} NaN / {m.inf} Inf")
    if m.max_abs > tol["max_abs"] and m.max_rel > tol["max_rel"]:
        why.append(f"max_abs {m.max_abs:.3g} > {tol['max_abs']:.3g} and max_rel {m.max_rel:.3g} > {tol['max_rel']:.3g}")
    # the cosine of a single value is a sign test: such an output is judged by its error alone
    if m.cos_min < tol["min_cosine"] and int(np.prod(m.shape)) > 1:
        why.append(f"cosine {m.cos_min:.6f} < {tol['min_cosine']}")
    if m.argmax is not None and m.argmax < tol["min_argmax"]:
        why.append(f"argmax agreement {m.argmax:.3f} < {tol['min_argmax']}")
    # the error gate's absolute escape applies here too (tiny outputs); int8 has none (its max_abs is inf)
    escape = tol["max_abs"] if math.isfinite(tol["max_abs"]) else 0.0
    # a single value has no scale of its own to compare to: like its cosine, it is judged by its error alone
    if m.norm_change > tol.get("max_norm_change", float("inf")) and m.max_abs > escape and int(np.prod(m.shape)) > 1:
        why.append(f"magnitude off by {m.norm_change:.1%} > {tol['max_norm_change']:.0%} (norm of the output vs "
                   "eager's)")
    return why
