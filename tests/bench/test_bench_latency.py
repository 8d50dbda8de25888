"""Pure timing helpers: statistics, interleaving order, paired ratios."""
from __future__ import annotations

import numpy as np

from mmopt.judge import latency


def test_stats_from_known_samples():
    s = latency.stats([i * 1_000_000 for i in range(1, 101)], batch=4)  # 1..100 ms
    assert s.n == 100 and s.p50 == 50.5 and s.min == 1.0 and s.mean == 50.5
    assert abs(s.p90 - 90.1) < 1e-9 and abs(s.p99 - 99.01) < 1e-9
    assert abs(s.std - np.std(np.arange(1, 101), ddof=1)) < 1e-9
    assert abs(s.throughput - 4 * 1000 / 50.5) < 1e-9


def test_interleaved_rotates_and_warms_up():
    order: list[str] = []
    timed = {k: latency.Timed(lambda k=k: order.append(k)) for k in "abc"}
    samples = latency.interleaved(timed, repeats=3, warmup=1)
    assert order == list("abc" "abc" "bca" "cab")  # warm-up, then each round starts one later
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_sync_runs_around_each_call():
    calls: list[str] = []
    t = latency.Timed(lambda: calls.append("fn"), sync=lambda: calls.append("sync"))
    latency.interleaved({"x": t}, repeats=1, warmup=0)
    assert calls == ["sync", "fn", "sync"]


def test_paired_ratio_is_median_of_rounds():
    assert latency.paired_ratio([2, 4, 100], [1, 2, 1]) == 2.0
