"""BuildOptions: where the timing cache lives, which values are refused (at their boundaries), and the
exact record each engine's sidecar keeps."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmopt.errors import UsageError
from mmopt.trt.options import HARDWARE_COMPAT, BuildOptions, default_timing_cache


def test_the_timing_cache_lives_under_xdg_cache_home_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_timing_cache() == tmp_path / "xdg" / "mmopt" / "trt-timing.cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_timing_cache() == tmp_path / "home" / ".cache" / "mmopt" / "trt-timing.cache"
    assert BuildOptions().timing_cache == default_timing_cache()


@pytest.mark.parametrize("options", [BuildOptions(workspace_mib=1), BuildOptions(optimization_level=0),
                                     BuildOptions(optimization_level=5), BuildOptions(workspace_mib=None),
                                     *(BuildOptions(hardware_compatibility=h) for h in HARDWARE_COMPAT)])
def test_values_at_the_edges_are_accepted(options):
    assert options.validate() is options


@pytest.mark.parametrize("options, message", [
    (BuildOptions(workspace_mib=0), "--workspace-mib must be a positive number of MiB, got 0."),
    (BuildOptions(optimization_level=-1), "--opt-level must be 0..5 (TensorRT's default is 3), got -1."),
    (BuildOptions(optimization_level=6), "--opt-level must be 0..5 (TensorRT's default is 3), got 6."),
    (BuildOptions(hardware_compatibility="turing+"),
     f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, got 'turing+'."),
])
def test_bad_values_are_refused_with_what_is_allowed(options, message):
    with pytest.raises(UsageError) as e:
        options.validate()
    assert str(e.value) == "invalid build options:\n  " + message


def test_every_problem_is_listed_at_once():
    with pytest.raises(UsageError) as e:
        BuildOptions(workspace_mib=0, optimization_level=9).validate()
    assert str(e.value).count("\n  ") == 2


def test_the_sidecar_record_is_exact():
    opts = BuildOptions(workspace_mib=256, timing_cache=Path("/c/t.cache"), profiles=({"batch": 1},),
                        sparse_weights=True, hardware_compatibility="ampere+", version_compatible=True,
                        optimization_level=4)
    assert opts.to_json() == {"workspace_mib": 256, "timing_cache": "/c/t.cache", "profiles": [{"batch": 1}],
                              "sparse_weights": True, "hardware_compatibility": "ampere+",
                              "version_compatible": True, "optimization_level": 4, "strongly_typed": True}
    assert BuildOptions(timing_cache=None).to_json()["timing_cache"] is None
