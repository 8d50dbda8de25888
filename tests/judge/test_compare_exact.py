"""The parity metrics and gates, exactly, on hand-made arrays (fast: the mutation runs lean on these)."""
from __future__ import annotations

import numpy as np
import pytest

from mmopt.judge.compare import Check, check_all, failures, measure, merge, raise_on_failures
from mmopt.errors import ParityError

TOL = {"max_abs": 0.1, "max_rel": 0.01, "min_cosine": 0.99, "min_argmax": 0.9, "max_norm_change": 0.05}


def test_metrics_of_a_known_difference():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    out = np.array([[3.0, 4.5], [1.0, 0.0]], np.float32)
    m = measure("y", ref, out, score=True)
    assert m.shape == (2, 2) and m.max_abs == pytest.approx(0.5) and m.max_rel == pytest.approx(0.5 / 4)
    row0 = (9 + 18) / (5 * np.hypot(3, 4.5))
    assert m.cos_min == pytest.approx(row0) and m.cos_mean == pytest.approx((row0 + 1) / 2)
    assert m.argmax == 1.0 and (m.nan, m.inf) == (0, 0)
    assert m.norm_change == pytest.approx(np.hypot(3, 4.5) / 5 - 1)  # the worst row: row 0
    assert measure("y", ref, out).argmax is None  # not a score output


def test_special_cases():
    zeros = np.zeros((2, 3), np.float32)
    m = measure("z", zeros, zeros)
    assert (m.max_abs, m.max_rel, m.cos_min, m.norm_change) == (0.0, 0.0, 1.0, 0.0)
    m = measure("z", zeros, zeros + 1)
    assert m.max_rel == float("inf") and m.norm_change == float("inf") and m.cos_min == 0.0
    bad = measure("s", np.ones((2, 2)), np.ones((3, 2)), score=True)
    assert (bad.max_abs, bad.cos_min, bad.argmax, bad.norm_change) == (float("inf"), -1.0, 0.0, float("inf"))
    ints = measure("i", np.array([1, 2, 3]), np.array([1, 2, 5]))
    assert (ints.max_abs, ints.cos_min, ints.argmax) == (2.0, pytest.approx(2 / 3), None)
    nan = measure("n", np.ones((2, 2)), np.array([[1.0, np.nan], [np.inf, 1.0]]))
    assert (nan.nan, nan.inf, nan.cos_min) == (1, 1, -1.0)
    one = measure("g", np.array([[2.0], [-1.0]]), np.array([[2.0], [1.0]]))  # [batch, 1]: one column cosine
    assert one.cos_min == pytest.approx((4 - 1) / 5)
    vec = measure("v", np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert vec.cos_min == 0.0


def test_the_norm_gate_is_per_sample_and_ignores_noise_level_rows():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 16)).astype(np.float32)
    one_row = ref.copy()
    one_row[3] *= 5  # one sample scaled as a whole: cosine 1.0 everywhere, whole-tensor norm barely moves
    m = measure("e", ref, one_row)
    assert m.cos_min == pytest.approx(1.0) and m.norm_change == pytest.approx(4.0)
    assert any("magnitude off by 400.0%" in w for w in failures(m, {**TOL, "max_abs": float("inf"),
                                                                    "max_rel": float("inf")}))
    quiet = ref.copy()
    quiet[5] = 1e-6 * rng.standard_normal(16)  # a row at noise level, relative to the others
    noisy = quiet.copy()
    noisy[5] *= 3
    assert measure("e", quiet, noisy).norm_change < 1e-3  # judged at a tenth of the largest row's norm
    small = ref.copy()
    small[5] *= 0.05  # a row a twentieth of the others, scaled 1.5x: 2.5% of the output's scale
    scaled_small = small.copy()
    scaled_small[5] *= 1.5
    assert measure("e", small, scaled_small).norm_change == pytest.approx(
        0.5 * np.linalg.norm(small[5]) / (0.1 * np.linalg.norm(small, axis=1).max()), rel=1e-5)
    tiny = failures(measure("s", np.array([1e-4]), np.array([1.2e-4])), {**TOL, "max_abs": 1e-3})
    assert tiny == []  # off by 20%, but within the absolute tolerance: the error gate's escape applies
    assert failures(measure("s", np.array([0.0]), np.array([1e-9])), {**TOL, "max_abs": 1e-3}) == []
    int8 = {**TOL, "max_abs": float("inf"), "max_rel": float("inf")}
    assert failures(measure("s", np.array([[0.37]]), np.array([[0.25]])), int8) == []  # one value: error alone
    assert failures(measure("c", np.array([[0.37], [0.5]]), np.array([[0.74], [1.0]])), int8)  # a column 2x off


def test_each_gate_fires_alone_and_says_why():
    ref = np.linspace(1, 2, 20, dtype=np.float32).reshape(2, 10)
    assert failures(measure("y", ref, ref), TOL) == []
    assert failures(measure("y", ref, ref + 0.05), TOL) == []  # small absolute error: passes (abs OR rel)
    big = failures(measure("y", ref, ref + np.array([0.5] + [0] * 9, np.float32)), TOL)
    assert big == ["max_abs 0.5 > 0.1 and max_rel 0.25 > 0.01"]
    swapped = ref.copy()
    swapped[:, [0, -1]] = swapped[:, [-1, 0]]  # argmax flips, cosine drops a little
    why = failures(measure("y", ref, swapped, score=True), {**TOL, "max_abs": 9, "min_cosine": 0.5})
    assert why == ["argmax agreement 0.000 < 0.9"]
    low = failures(measure("y", ref, -ref), {**TOL, "max_abs": 99})
    assert low == ["cosine -1.000000 < 0.99"]
    no_error_gate = {**TOL, "max_abs": float("inf"), "max_rel": float("inf")}  # as int8's defaults
    scaled = failures(measure("y", ref, ref * 1.1), no_error_gate)
    assert scaled == ["magnitude off by 10.0% > 5% (norm of the output vs eager's)"]
    assert failures(measure("y", ref, ref * 1.04), no_error_gate) == []
    assert failures(measure("y", ref, ref * 1.1), {**TOL, "max_abs": 99}) == []  # within the absolute escape
    single = failures(measure("s", np.array([[1.0]]), np.array([[-1.0]])), {**TOL, "max_abs": 9, "max_norm_change": 9})
    assert single == []  # a single value's cosine is a sign test: judged by its error alone
    assert failures(measure("n", ref, ref * np.nan), TOL)[0] == "20 NaN / 0 Inf"


def test_check_all_and_the_raised_table():
    ref = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    checks = check_all("image", "opt", ref, {"a": np.ones((2, 2), np.float32)}, TOL)
    assert [c.where for c in checks] == ["image@opt", "image@opt"] and checks[0].failed == []
    assert checks[1].failed == ["output missing"]
    wrong = check_all("x", "min", {"a": np.ones((2, 2))}, {"a": np.ones((2, 3))}, TOL)
    assert wrong[0].failed == ["shape (2, 3) != reference (2, 2)"]
    with pytest.raises(ParityError) as e:
        raise_on_failures(checks, "image pipeline", "Fix it.")
    lines = str(e.value).splitlines()
    assert lines[0] == "image pipeline: 1 of 2 checked outputs fail parity:"
    assert lines[1].startswith("  image@opt") and lines[1].endswith("-> output missing") and lines[-1] == "Fix it."
    raise_on_failures(checks[:1], "fine", "unused")  # nothing failed: no error
    assert Check("c", "real0", checks[0].metrics, []).to_json()["where"] == "c@real0"


def test_merge_takes_the_worst_and_weights_by_rows():
    a = measure("y", np.ones((2, 3)), np.ones((2, 3)), score=True)
    b = measure("y", np.ones((6, 3)), np.full((6, 3), 1.5), score=True)
    m = merge([a, b])
    assert m.shape == (8, 3) and m.max_abs == 0.5 and m.max_rel == 0.5 and m.norm_change == pytest.approx(0.5)
    assert m.cos_mean == pytest.approx(1.0) and m.argmax == 1.0
    assert merge([a, measure("y", np.ones((2, 3)), np.ones((2, 3)))]).argmax is None
    with pytest.raises(ValueError):
        merge([])
