"""The parity metrics and gates at their edges: each gate at exactly its limit, the rows the cosine and the
norm check compare, empty and non-finite outputs, whole records. Hand-made arrays, exact values: these
are what the mutation run (benchmarks/mutation.py, group gates) leans on."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mmopt.errors import ParityError
from mmopt.judge.compare import Check, Metrics, check_all, failures, measure, merge, raise_on_failures

INF = float("inf")
TOL = {"max_abs": 0.1, "max_rel": 0.01, "min_cosine": 0.99, "min_argmax": 0.9, "max_norm_change": 0.05}


def metrics(**kw) -> Metrics:
    base = dict(name="y", shape=(2, 2), max_abs=0.0, max_rel=0.0, cos_min=1.0, cos_mean=1.0, argmax=None, nan=0,
                inf=0, norm_change=0.0)
    return Metrics(**{**base, **kw})


def test_a_shape_mismatch_is_the_worst_record_of_the_candidates_shape():
    assert measure("s", np.ones((2, 2)), np.ones((3, 2))) == Metrics("s", (3, 2), INF, INF, -1.0, -1.0, None, 0, 0, INF)
    assert measure("s", np.ones((2, 2)), np.ones((3, 2)), score=True).argmax == 0.0


def test_integer_and_boolean_outputs_compare_exactly():
    assert measure("i", np.array([1, 2, 3, 4]), np.array([1, 2, 3, 9])) == \
        Metrics("i", (4,), 5.0, 5.0, 0.75, 0.75, None, 0, 0, 0.0)
    big = np.array([2**40], np.int64)  # int64, not float32: a difference of 1 at 2**40 is seen
    assert measure("i", big, big + 1).max_abs == 1.0
    assert measure("b", np.array([True, False]), np.array([False, False])) == \
        Metrics("b", (2,), 1.0, 1.0, 0.5, 0.5, None, 0, 0, 0.0)
    empty = np.zeros((0,), np.int64)
    assert measure("e", empty, empty) == Metrics("e", (0,), 0.0, 0.0, 1.0, 1.0, None, 0, 0, 0.0)


def test_empty_float_outputs_pass():
    for shape in [(0,), (0, 3), (2, 0)]:
        z = np.zeros(shape, np.float32)
        assert measure("e", z, z) == Metrics("e", shape, 0.0, 0.0, 1.0, 1.0, None, 0, 0, 0.0)


def test_float64_precision_is_kept():
    ref = np.array([1.0, 1.0 + 1e-12])
    assert measure("d", ref, np.array([1.0, 1.0])).max_abs == pytest.approx(1e-12, rel=1e-3)


def test_rows_per_sample_or_whole():
    # rank 1: one row over the whole vector, not a sign test per element
    assert measure("v", np.array([1.0, 2.0]), np.array([2.0, 1.0])).cos_min == pytest.approx(0.8)
    assert measure("v", np.array([3.0, 4.0]), np.array([4.0, 3.0])).norm_change == 0.0
    # [batch, 1]: one column, not a row per sample
    col = measure("c", np.array([[1.0], [2.0]]), np.array([[2.0], [1.0]]))
    assert col.cos_min == pytest.approx(0.8) and col.norm_change == 0.0
    # rank 2 with two elements per sample: per sample
    rows = measure("r", np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    assert (rows.cos_min, rows.norm_change) == (1.0, 1.0)
    # rank 3: a sample is everything after the first axis
    r3 = np.arange(1, 9, dtype=np.float64).reshape(2, 2, 2)
    o3 = r3.copy()
    o3[1] *= 3
    assert measure("t", r3, o3).norm_change == pytest.approx(2.0)


def test_rows_that_are_zero_on_both_sides_agree_and_small_rows_are_not_rescaled():
    both = np.array([[0.0, 0.0], [1.0, 0.0]])
    m = measure("z", both, both)
    assert (m.cos_min, m.cos_mean) == (1.0, 1.0)
    one_side = measure("z", both, np.array([[1.0, 1.0], [1.0, 0.0]]))
    assert one_side.cos_min == 0.0 and one_side.cos_mean == 0.5
    small = np.array([[0.1, 0.1]])  # a norm product under 1 is divided by itself, not by 1
    assert measure("s", small, small).cos_min == pytest.approx(1.0)


def test_non_finite_positions():
    nan_only = measure("n", np.ones((1, 2)), np.array([[1.0, np.nan]]))
    assert (nan_only.nan, nan_only.inf, nan_only.cos_min, nan_only.max_abs) == (1, 0, -1.0, 0.0)
    inf_only = measure("n", np.ones((1, 2)), np.array([[1.0, np.inf]]))
    assert (inf_only.nan, inf_only.inf, inf_only.cos_min) == (0, 1, -1.0)
    # the norm check and the errors see only the finite positions, with the others zero on both sides
    part = measure("p", np.array([[3.0, 4.0]]), np.array([[3.0, np.nan]]))
    assert part.norm_change == 0.0 and part.max_abs == 0.0
    assert measure("p", np.array([[3.0, np.nan]]), np.array([[6.0, 4.0]])).norm_change == 1.0
    assert measure("a", np.full((2,), np.nan), np.full((2,), np.nan)).max_abs == 0.0
    assert measure("r", np.array([np.inf, 2.0]), np.array([np.inf, 3.0])).max_rel == 0.5  # scale from finite ref
    everything_bad = measure("r", np.array([np.inf]), np.array([1.0]))
    assert (everything_bad.max_abs, everything_bad.max_rel) == (0.0, 0.0) and everything_bad.inf == 1


def test_argmax_only_for_score_outputs_with_more_than_one_class_on_the_last_axis():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = ref.copy()
    out[0] = [0.9, 0.1]
    assert measure("s", ref, out, score=True).argmax == 0.75
    assert measure("s", ref, out).argmax is None
    assert measure("s", np.ones((4, 1)), np.ones((4, 1)), score=True).argmax is None
    assert measure("s", np.ones((2, 3, 1)), np.ones((2, 3, 1)), score=True).argmax is None
    assert measure("s", np.array([0.1, 0.9]), np.array([0.9, 0.1]), score=True).argmax is None  # rank 1
    # rank 3: classes on the last axis; the middle axis (tokens) would disagree here
    r = np.array([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])  # [1, 2 tokens, 3 classes]
    o = np.array([[[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]])
    assert measure("t", r, o, score=True).argmax == 1.0


@pytest.mark.parametrize("field, at, over", [
    ("cos_min", dict(cos_min=0.99), dict(cos_min=0.9899)),
    ("argmax", dict(argmax=0.9), dict(argmax=0.8999)),
    ("error", dict(max_abs=0.1, max_rel=0.5), dict(max_abs=0.1001, max_rel=0.0101)),
    ("error rel", dict(max_abs=0.5, max_rel=0.01), dict(max_abs=0.5, max_rel=0.0101)),
    ("norm", dict(norm_change=0.05, max_abs=0.2, max_rel=0.001), dict(norm_change=0.0501, max_abs=0.2,
                                                                      max_rel=0.001)),
])
def test_each_gate_passes_at_its_limit_and_fails_just_beyond(field, at, over):
    assert failures(metrics(**at), TOL) == []
    assert len(failures(metrics(**over), TOL)) == 1


def test_gate_lines_exactly():
    m = metrics(max_abs=0.5, max_rel=0.25, cos_min=0.5, argmax=0.5, nan=1, inf=2, norm_change=0.5)
    assert failures(m, TOL) == ["1 NaN / 2 Inf", "max_abs 0.5 > 0.1 and max_rel 0.25 > 0.01",
                                "cosine 0.500000 < 0.99", "argmax agreement 0.500 < 0.9",
                                "magnitude off by 50.0% > 5% (norm of the output vs eager's)"]


def test_single_values_and_the_norm_escape():
    two = metrics(shape=(2,), cos_min=0.5)
    assert failures(two, TOL) == ["cosine 0.500000 < 0.99"]  # two values: the cosine is gated
    assert failures(metrics(shape=(1, 1), cos_min=-1.0, norm_change=3.0, max_abs=0.2, max_rel=0.001), TOL) == []
    # the norm gate honours the error gate's absolute escape, and only it
    assert failures(metrics(norm_change=0.5, max_abs=0.1, max_rel=0.5), TOL) == []
    assert failures(metrics(norm_change=0.5, max_abs=0.1001, max_rel=0.001), TOL) != []
    # int8 has no absolute escape (max_abs inf): any norm change beyond the limit fails
    int8 = {**TOL, "max_abs": INF, "max_rel": INF}
    assert failures(metrics(norm_change=0.06, max_abs=1e-6), int8) != []
    # a tolerance without a norm limit (older [tolerance] tables) has no norm gate
    no_norm = {k: v for k, v in TOL.items() if k != "max_norm_change"}
    assert failures(metrics(norm_change=100.0, max_abs=1.0, max_rel=0.001), no_norm) == []


def test_check_all_records_missing_outputs_and_goes_on():
    refs = {"a": np.ones((2, 2)), "b": np.array([[0.1, 0.9], [0.8, 0.2]]), "c": np.ones((2, 2))}
    outs = {"b": np.array([[0.9, 0.1], [0.8, 0.2]]), "c": np.ones((3, 2))}
    checks = check_all("fusion", "opt", refs, outs, TOL, scores={"a", "b"})
    assert [(c.component, c.case, c.metrics.name) for c in checks] == [("fusion", "opt", "a"), ("fusion", "opt", "b"),
                                                                         ("fusion", "opt", "c")]
    missing, scored, wrong_shape = checks
    assert missing.failed == ["output missing"]
    assert missing.metrics == Metrics("a", (2, 2), 0.0, 0.0, -1.0, -1.0, 1.0, 4, 0, 0.0)
    assert scored.metrics.argmax == 0.5 and "argmax agreement 0.500 < 0.9" in scored.failed
    assert wrong_shape.failed == ["shape (3, 2) != reference (2, 2)"]
    assert check_all("x", "opt", {"a": np.ones(3)}, {"a": np.ones(3)}, TOL)[0].metrics.argmax is None


def test_records_as_json():
    c = Check("image", "real0", metrics(shape=(2, 3), argmax=0.5), ["why"])
    assert c.to_json() == {"where": "image@real0", "component": "image", "case": "real0", "name": "y",
                           "shape": [2, 3], "max_abs": 0.0, "max_rel": 0.0, "cos_min": 1.0, "cos_mean": 1.0,
                           "argmax": 0.5, "nan": 0, "inf": 0, "norm_change": 0.0, "failed": ["why"]}


def test_the_parity_table_exactly():
    good = Check("image", "opt", metrics(), [])
    bad = Check("fusion", "opt", metrics(name="logits", cos_min=0.5, max_abs=2.0), ["a", "b"])
    with pytest.raises(ParityError) as e:
        raise_on_failures([good, bad, bad], "export", "Try --no-simplify.")
    row = f"  {'fusion@opt':<28} {'logits':<28} cos  0.500000  max_abs         2  -> a; b"
    assert str(e.value) == f"export: 2 of 3 checked outputs fail parity:\n{row}\n{row}\nTry --no-simplify."
    raise_on_failures([good], "export", "unused")


def test_merge_weights_by_samples_and_keeps_the_worst():
    a = metrics(name="logits", shape=(3, 4), max_abs=0.1, max_rel=0.3, cos_min=0.9, cos_mean=0.95, argmax=1.0,
                nan=1, inf=0, norm_change=0.2)
    b = metrics(name="other", shape=(1, 5), max_abs=0.4, max_rel=0.2, cos_min=0.95, cos_mean=0.99, argmax=0.0,
                nan=2, inf=3, norm_change=0.1)
    m = merge([a, b])
    assert m == Metrics("logits", (4, 4), 0.4, 0.3, 0.9, pytest.approx((3 * 0.95 + 0.99) / 4), 0.75, 3, 3, 0.2)
    assert merge([metrics(argmax=None), metrics(argmax=1.0)]).argmax is None
    empty_batch = merge([metrics(shape=(0, 2), cos_mean=0.5), metrics(shape=(2, 2), cos_mean=1.0)])
    assert empty_batch.cos_mean == pytest.approx((0.5 + 2 * 1.0) / 3)  # an empty batch counts as one row
    scalar = merge([metrics(shape=(), cos_mean=0.5), metrics(shape=(1,), cos_mean=1.0)])
    assert scalar.cos_mean == 0.75 and scalar.shape == (2,)
    with pytest.raises(ValueError, match="^nothing to merge$"):
        merge([])
    assert math.isinf(merge([metrics(max_rel=INF)]).max_rel)
