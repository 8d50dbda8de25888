"""Pure timing: warm-up, then interleaved repeats of several callables, and their statistics.

Callables that are compared (eager vs each artifact) run round-robin in the same process, the
starting one rotating every round, so slow drift of a noisy machine (frequency scaling, neighbours)
hits all of them alike. Ratios are the median of per-round ratios: paired samples cancel most of
that drift. A callable on a GPU passes ``sync`` (e.g. ``torch.cuda.synchronize``), which runs
before the clock is read at both ends, so queued asynchronous work is never half-counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Timed:
    """One thing to time: ``fn()`` does one inference of ``batch`` samples; ``sync()`` waits for the device."""

    fn: Callable[[], Any]
    batch: int = 1
    sync: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Stats:
    """Latency of one callable, in milliseconds per call (``throughput`` in samples/s)."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    throughput: float

    def to_json(self) -> dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def stats(samples_ns: list[int] | np.ndarray, batch: int = 1) -> Stats:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    mean = float(ms.mean())
    return Stats(int(ms.size), p50, p90, p99, mean, float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
                 float(ms.min()), batch * 1000.0 / p50 if p50 > 0 else math.inf)


def _once(t: Timed) -> int:
    if t.sync:
        t.sync()
    start = time.perf_counter_ns()
    t.fn()
    if t.sync:
        t.sync()
    return time.perf_counter_ns() - start


_ALLOCATOR: list[str] = []


def steady_allocator() -> str:
    """Keep freed memory in the process (glibc: trim threshold 1 GiB, mmap threshold 32 MiB), once per
    process, before anything is timed. By default glibc hands large freed blocks back to the kernel, so
    every eager forward at a large batch faults its activations in again: measured on the VQA model, eager
    at batch 32 took 40 ms in the first bench of a process and 28 ms in the next, which moved every ratio
    to eager by 40% between two runs of the same bundle. Returns what was set (recorded in reports)."""
    if not _ALLOCATOR:
        import ctypes
        import ctypes.util

        how = "default (not glibc)"
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if libc.mallopt(-1, 1 << 30) == 1 and libc.mallopt(-3, 32 << 20) == 1:  # M_TRIM / M_MMAP_THRESHOLD
                how = "glibc: freed memory kept (trim threshold 1 GiB, mmap threshold 32 MiB)"
        except (OSError, AttributeError):
            pass
        _ALLOCATOR.append(how)
    return _ALLOCATOR[0]


def interleaved(timed: dict[str, Timed], repeats: int, warmup: int = 3,
                budget_s: float | None = None) -> dict[str, list[int]]:
    """Nanosecond samples per callable: ``warmup`` untimed rounds, then up to ``repeats`` rounds in
    which every callable runs once (rotating which goes first). ``budget_s`` stops early after at
    least 3 rounds once exceeded, so one slow graph cannot stall a whole sweep."""
    steady_allocator()
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(timed)
    for _ in range(warmup):
        for n in names:
            _once(timed[n])
    samples: dict[str, list[int]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(_once(timed[n]))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def median_ms(calls: dict[Any, Callable[[], Any]], rounds: int = 15, warmup: int = 2) -> dict[Any, float]:
    """p50 in milliseconds of each call, from ``interleaved`` rounds (for choosing between candidates)."""
    samples = interleaved({k: Timed(fn) for k, fn in calls.items()}, rounds, warmup)
    return {k: stats(v).p50 for k, v in samples.items()}


def paired_ratio(samples: list[int], reference: list[int]) -> float:
    """Median over rounds of sample / reference-sample from the same round."""
    n = min(len(samples), len(reference))
    if n == 0:
        return math.nan
    a = np.asarray(samples[:n], dtype=np.float64)
    b = np.asarray(reference[:n], dtype=np.float64)
    return float(np.median(a / np.maximum(b, 1.0)))


def paired_ratio_interval(samples: list[int], reference: list[int], confidence: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``paired_ratio``: the spread this very run measured. Rounds are resampled
    with replacement (seeded: the same samples give the same interval)."""
    n = min(len(samples), len(reference))
    if n == 0:
        return math.nan, math.nan
    ratios = np.asarray(samples[:n], dtype=np.float64) / np.maximum(np.asarray(reference[:n], dtype=np.float64), 1.0)
    if n == 1:
        return float(ratios[0]), float(ratios[0])
    picks = np.random.default_rng(seed).integers(0, n, (resamples, n))
    medians = np.median(ratios[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def cuda_event_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Device-side time per call from CUDA events (torch), for GPU paths: what the GPU spent, without
    the host's launch jitter. Complements the synchronised wall-clock figure of ``interleaved``."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(float(start.elapsed_time(end)))
    return out
