"""Optimization profiles from captured shapes: no TensorRT needed."""
from __future__ import annotations

import dataclasses

import pytest

from mmopt.errors import BundleError, UsageError
from mmopt.spec import TensorSpec
from mmopt.trt.profiles import Profile, check_overrides, parse_profile, profiles_for, select_profile
from trt_fake_bundle import IMAGE, TEXT


def test_profile_zero_is_the_captured_range():
    (p,) = profiles_for(TEXT)
    assert p.name == "captured"
    assert p.shapes == {"input_ids": {"min": (1, 2), "opt": (4, 6), "max": (8, 12)}}


def test_extra_profile_fixes_a_named_dim_across_inputs_and_keeps_the_rest():
    captured, batch1 = profiles_for(TEXT, [{"batch": 1}])
    assert batch1.name == "batch=1"
    assert batch1.shapes["input_ids"] == {"min": (1, 2), "opt": (1, 6), "max": (1, 12)}
    _, thr = profiles_for(IMAGE, [{"batch": (4, 6, 8)}])
    assert thr.name == "batch=4:6:8"
    assert thr.shapes["pixel_values"] == {"min": (4, 3, 8, 8), "opt": (6, 3, 8, 8), "max": (8, 3, 8, 8)}


def test_profiles_that_change_nothing_here_are_dropped():
    # 'seq' exists only in the text component; the image component keeps just its captured profile
    assert [p.name for p in profiles_for(IMAGE, [{"seq": 4}])] == ["captured"]
    assert [p.name for p in profiles_for(TEXT, [{"seq": 4}, {"seq": 4}])] == ["captured", "seq=4"]


def test_parse_profile_forms_and_errors():
    assert parse_profile("batch=1") == {"batch": 1}
    assert parse_profile("batch=1:4:8, seq=16") == {"batch": (1, 4, 8), "seq": 16}
    for bad, why in [("batch", "not DIM=VALUE"), ("batch=x", "not a number"), ("batch=1:2", "1 or 3 numbers"),
                     ("", "empty")]:
        with pytest.raises(UsageError, match=why):
            parse_profile(bad)


def test_check_overrides_lists_every_problem_once():
    with pytest.raises(UsageError) as e:
        check_overrides([IMAGE, TEXT], [{"batch": 64}, {"sequence": 3}, {"seq": (8, 4, 9)}])
    msg = str(e.value)
    assert "'batch' = 64 is outside the captured range [1, 8] of image.pixel_values axis 0" in msg
    assert "outside the captured range [1, 8] of text.input_ids axis 0" in msg
    assert "no input has a dynamic dim 'sequence'. Dynamic dims in this bundle: batch, seq" in msg
    assert "'seq' needs 1 <= min <= opt <= max" in msg
    assert "[dims.batch] in mmopt.toml" in msg
    check_overrides([IMAGE, TEXT], [{"batch": 1}, {"seq": (2, 4, 12)}])  # fine


def test_inconsistent_captured_shapes_are_a_bundle_error():
    bad = dataclasses.replace(TEXT, inputs=(TensorSpec("input_ids", "int64", ("batch", 7),
                                                       {"min": (1, 7), "opt": (4, 6), "max": (2, 7)}),))
    with pytest.raises(BundleError) as e:
        profiles_for(bad)
    assert "static axis 1 is 7 but was captured as 7 / 6 / 7" in str(e.value)
    assert "axis 0 ('batch') needs 1 <= min <= opt <= max, got 1 / 4 / 2" in str(e.value)
    missing = dataclasses.replace(TEXT, inputs=(TensorSpec("input_ids", "int64", ("batch",), {"min": (1,)}),))
    with pytest.raises(BundleError, match="expected min / opt / max"):
        profiles_for(missing)


def test_select_profile_prefers_the_narrowest_fit():
    profiles = profiles_for(TEXT, [{"batch": 1}])
    assert select_profile(profiles, {"input_ids": (1, 5)}) == 1
    assert select_profile(profiles, {"input_ids": (3, 5)}) == 0
    assert select_profile(profiles, {"input_ids": (9, 5)}) is None
    assert select_profile(profiles, {"input_ids": (1, 5, 1)}) is None  # wrong rank


def test_profile_json_round_trip():
    p = profiles_for(IMAGE, [{"batch": 1}])[1]
    assert Profile.from_json(p.to_json()) == p


HINT = "write DIM=N or DIM=MIN:OPT:MAX, comma-separated, e.g. --profile batch=1 or --profile batch=8:16:32"


def test_profile_errors_exactly():
    for text, why in [("batch", "'batch' is not DIM=VALUE"), ("=3", "'=3' is not DIM=VALUE"),
                      ("batch=x", "'x' is not a number"), ("batch=1:2", "'1:2' needs 1 or 3 numbers")]:
        with pytest.raises(UsageError) as e:
            parse_profile(text)
        assert str(e.value) == f"--profile {text!r}: {why}; {HINT}."
    with pytest.raises(UsageError) as e:
        parse_profile(" , ")
    assert str(e.value) == f"--profile ' , ' is empty; {HINT}."
    assert parse_profile(" batch = 2 ") == {"batch": 2}  # the first '=' splits, spaces around names go
    with pytest.raises(UsageError, match="'=1' is not a number"):
        parse_profile("x==1")


def test_profile_names_and_slack():
    from mmopt.trt.profiles import profile_name

    assert profile_name({"batch": (1, 4, 8), "seq": 16}) == "batch=1:4:8,seq=16"
    p = profiles_for(TEXT, [{"batch": (2, 3, 5)}])[1]
    assert p.name == "batch=2:3:5" and p.shapes["input_ids"] == {"min": (2, 2), "opt": (3, 6), "max": (5, 12)}
    assert p.slack() == (5 - 2) + (12 - 2) and profiles_for(TEXT)[0].slack() == (8 - 1) + (12 - 2)
    assert p.contains({"input_ids": (2, 12)}) and not p.contains({"input_ids": (6, 2)})
    assert not p.contains({"input_ids": (1, 2)})


def test_check_overrides_messages_exactly():
    with pytest.raises(UsageError) as e:
        check_overrides([IMAGE], [{"batch": 9}, {"seq": 2}, {"batch": (0, 1, 2)}, {"batch": (1, 2)}])
    assert str(e.value).splitlines() == [
        "invalid optimization profiles:",
        "  --profile batch=9: 'batch' = 9 is outside the captured range [1, 8] of image.pixel_values axis 0; "
        "parity was only verified inside it. Re-export with a wider [dims.batch] in mmopt.toml to go beyond.",
        "  --profile seq=2: no input has a dynamic dim 'seq'. Dynamic dims in this bundle: batch.",
        "  --profile batch=0:1:2: 'batch' needs 1 <= min <= opt <= max, got (0, 1, 2)",
        "  --profile batch=1:2: 'batch' needs 1 <= min <= opt <= max, got (1, 2)"]
    static = dataclasses.replace(IMAGE, inputs=(TensorSpec("x", "float32", (2, 3), {s: (2, 3) for s in
                                                                                     ("min", "opt", "max")}),))
    with pytest.raises(UsageError, match=r"Dynamic dims in this bundle: none \(every shape is static\)\.$"):
        check_overrides([static], [{"batch": 1}])
    check_overrides([IMAGE], [{"batch": 1}, {"batch": 8}, {"batch": (1, 1, 8)}])  # the edges are inside


def test_captured_profile_errors_exactly():
    bad = dataclasses.replace(TEXT, inputs=(TensorSpec("input_ids", "int64", ("batch", "seq"),
                                                       {"min": (1,), "opt": (4, 6), "max": (8, 12)}),))
    with pytest.raises(BundleError) as e:
        profiles_for(bad)
    assert str(e.value) == ("the bundle's captured shapes cannot make a TensorRT profile:\n"
                            "  component 'text' input 'input_ids': captured shapes (1,) / (4, 6) / (8, 12) do not "
                            "match rank 2\nRe-run `mmopt export` to recapture them.")
