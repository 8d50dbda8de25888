"""Value ranges of a graph's tensors on real data, and the int8 thresholds derived from them.

The fp32 graph runs under ONNX Runtime with the chosen intermediate tensors exposed as outputs
(graph optimisations off, so every tensor keeps its name). Two streaming passes over the
calibration feeds: the finite absolute maximum of each tensor, then a histogram of |x| over
[0, absmax]. From the histogram a threshold (the clipping range of symmetric int8) is computed:

- ``minmax``: the absolute maximum;
- ``percentile``: the given percentile of |x| (99.99 by default);
- ``entropy``: TensorRT's KL-divergence search, the threshold whose 128-level quantisation of the
  clipped histogram loses least information.

Both need a populated histogram: a tensor seen in fewer than ``MIN_VALUES`` values falls back to its
absolute maximum (reported by the int8 stage).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

BINS = 2048
LEVELS = 128  # symmetric int8: 127 positive levels plus zero
PERCENTILE = 99.99
# Entropy and percentile need a populated histogram; a tensor seen in fewer values (pooled features
# of a small calibration set) gets its absolute maximum instead, and the config says so.
MIN_VALUES = 8 * BINS
STRIDE = 4  # entropy tries every 4th bin as the threshold: at most 0.2% of the range off, 4x faster


def float_tensors(proto: onnx.ModelProto) -> dict[str, str]:
    """Every float32 tensor a node produces or a graph input carries -> the producing node ('' for inputs)."""
    typed = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
    out = {i.name: "" for i in proto.graph.input if types.get(i.name) == onnx.TensorProto.FLOAT}
    for node in proto.graph.node:
        for name in node.output:
            if name and types.get(name) == onnx.TensorProto.FLOAT:
                out[name] = node.name
    return out


def session(proto: onnx.ModelProto, names: Iterable[str]):
    """An ORT CPU session on ``proto`` returning the graph outputs plus ``names`` (unoptimised)."""
    from mmopt.ort import session as ort_session

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    have = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in have:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return ort_session(exposed, level="ORT_DISABLE_ALL", config={"session.intra_op.allow_spinning": "0"})


def run_all(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def extrema(proto: onnx.ModelProto, names: list[str],
            feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Finite minimum and maximum of each named tensor over all feeds (-inf masks do not count);
    (0, 0) for a tensor with no finite value."""
    sess = session(proto, names)
    lo, hi = {n: np.inf for n in names}, {n: -np.inf for n in names}
    for f in feeds:
        got = run_all(sess, f)
        for n in names:
            a = got[n][np.isfinite(got[n])]
            if a.size:
                lo[n], hi[n] = min(lo[n], float(a.min())), max(hi[n], float(a.max()))
    return {n: (lo[n], hi[n]) if lo[n] <= hi[n] else (0.0, 0.0) for n in names}


def absmax(proto: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Finite absolute maximum of each named tensor over all feeds (-inf masks do not count)."""
    return {n: max(hi, -lo) for n, (lo, hi) in extrema(proto, names, feeds).items()}


def histograms(proto: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]],
               bins: int = BINS, top: dict[str, float] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (counts, edges)`` of |x| over [0, absmax] (two passes over the feeds; one when ``top``,
    the absolute maxima, is given)."""
    top = top if top is not None else absmax(proto, names, feeds)
    sess = session(proto, names)
    hist = {n: np.zeros(bins, np.float64) for n in names}
    for f in feeds:
        got = run_all(sess, f)
        for n in names:
            a = np.abs(got[n][np.isfinite(got[n])]).ravel()
            hist[n] += np.histogram(a, bins=bins, range=(0.0, top[n] or 1.0))[0]
    return {n: (hist[n], np.linspace(0.0, top[n] or 1.0, bins + 1)) for n in names}


def threshold(counts: np.ndarray, edges: np.ndarray, method: str, percentile: float = PERCENTILE) -> float:
    """The clipping threshold of a |x| histogram for ``method`` (minmax | percentile | entropy)."""
    total = counts.sum()
    if total == 0 or edges[-1] == 0:
        return float(edges[-1])
    if method == "minmax" or total < MIN_VALUES:
        nz = np.nonzero(counts)[0]
        return float(edges[nz[-1] + 1])
    if method == "percentile":
        cdf = np.cumsum(counts) / total
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(edges[min(i + 1, len(edges) - 1)])
    if method == "entropy":
        return float(edges[_kl_bins(counts)])
    raise ValueError(f"unknown calibration method {method!r}")


def _kl_bins(counts: np.ndarray) -> int:
    """TensorRT's entropy calibration (as published, and as MXNet implements it): the number of
    histogram bins ``i`` (threshold = edges[i]) whose clipped distribution P (outliers folded into bin
    i-1) is best approximated, in KL divergence, by its quantisation Q into ``LEVELS`` levels (each
    level's mass spread evenly over its bins that are non-empty in P; zeros smoothed)."""
    hist = counts.astype(np.float64).copy()
    hist[0] = hist[1]  # exact zeros (ReLU, padding) would dominate bin 0 and drag the threshold down
    n = len(hist)
    if n <= LEVELS:
        return n
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])
    best, best_i = np.inf, n
    for i in [*range(LEVELS, n, STRIDE), n]:
        p = hist[:i].copy()
        p[-1] += suffix[i]
        nonzero = p > 0
        group = (np.arange(i) * LEVELS) // i
        mass = np.bincount(group, weights=hist[:i], minlength=LEVELS)
        count = np.bincount(group, weights=nonzero.astype(np.float64), minlength=LEVELS)
        q = np.where(nonzero, mass[group] / np.maximum(count[group], 1), 0.0)
        if not q.any():
            continue
        kl = _kl(_smooth(p), _smooth(q))
        if kl <= best:  # ties go to the larger threshold
            best, best_i = kl, i
    return best_i


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Move a little mass onto the empty bins so that KL stays finite."""
    zeros = p == 0
    nz = p.size - int(zeros.sum())
    return p + eps * zeros - (eps * zeros.sum() / nz) * ~zeros


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))
