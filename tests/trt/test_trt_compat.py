"""May an engine run here? Decisions from sidecar metadata alone: no TensorRT needed."""
from __future__ import annotations

import copy

import pytest

from mmopt.trt.compat import Environment, decide, parse_version, require_compatible
from mmopt.trt.errors import EngineIncompatible

ORIN = Environment("10.3.0.30", "Orin", "8.7", "linux-aarch64")


def sidecar(version="10.3.0.30", gpu="Orin", cc="8.7", platform="linux-aarch64", level="none", vc=False):
    return {"tensorrt": {"version": version}, "gpu": {"name": gpu, "compute_capability": cc},
            "platform": platform, "build_options": {"hardware_compatibility": level, "version_compatible": vc}}


def test_same_device_and_version_runs_cleanly():
    d = decide(sidecar(), ORIN)
    assert d.ok and not d.warnings


def test_parse_version():
    assert parse_version("11.4.0.106") == (11, 4, 0, 106)
    assert parse_version("10.13.3.9.post1") == (10, 13, 3, 9)
    assert parse_version("10.3.0") == (10, 3, 0)
    with pytest.raises(ValueError):
        parse_version("dev")


@pytest.mark.parametrize("built,running,ok", [
    ("10.3.0.30", "10.3.0.30", True),
    ("10.3.0", "10.3.0.30", True),  # pip bindings report 3 parts; compared on the common prefix
    ("10.3.0.26", "10.3.0.30", False),  # build number differs: NVIDIA requires an exact match
    ("10.3.0", "10.4.0", False),
    ("10.4.0", "10.3.0", False),
])
def test_plain_engines_need_the_exact_tensorrt_version(built, running, ok):
    d = decide(sidecar(version=built), Environment(running, "Orin", "8.7", "linux-aarch64"))
    assert d.ok is ok
    if not ok:
        assert "--version-compatible" in d.errors[0] and "Rebuild it here" in d.errors[0]


@pytest.mark.parametrize("built,running,ok", [
    ("10.3.0", "10.8.0", True), ("10.3.0", "11.4.0.106", True),  # 10 -> 11 is supported
    ("11.4.0", "11.1.0", False),  # never backwards
    ("10.3.0", "12.0.0", False),  # only one major forward
    ("11.0.0", "11.4.0.106", True),
])
def test_version_compatible_engines_move_forward_only(built, running, ok):
    d = decide(sidecar(version=built, vc=True), Environment(running, "Orin", "8.7", "linux-aarch64"))
    assert d.ok is ok, d.errors


def test_gpu_rules_per_hardware_compatibility_level():
    a100 = Environment("10.3.0.30", "NVIDIA A100", "8.0", "linux-aarch64")
    t4 = Environment("10.3.0.30", "Tesla T4", "7.5", "linux-aarch64")
    other_87 = Environment("10.3.0.30", "Orin NX", "8.7", "linux-aarch64")
    assert "only runs on GPUs of its compute capability" in decide(sidecar(), a100).errors[0]
    same_cc = decide(sidecar(), other_87)
    assert same_cc.ok and "tuned on Orin" in same_cc.warnings[0]
    assert decide(sidecar(level="same_compute_capability"), other_87).warnings == []
    assert not decide(sidecar(level="same_compute_capability"), a100).ok
    assert decide(sidecar(level="ampere+"), a100).ok
    assert "Ampere and newer" in decide(sidecar(level="ampere+"), t4).errors[0]
    assert "unknown hardware_compatibility" in decide(sidecar(level="turing+"), a100).errors[0]


def test_platform_never_changes_and_every_problem_is_listed_once():
    x86 = Environment("10.4.0", "RTX 4090", "8.9", "linux-x86_64")
    with pytest.raises(EngineIncompatible) as e:
        require_compatible(sidecar(), x86, "image.fp16.engine")
    msg = str(e.value)
    assert msg.startswith("image.fp16.engine cannot run here:")
    assert "built on linux-aarch64, this is linux-x86_64" in msg
    assert "TensorRT 10.3.0.30 but this is TensorRT 10.4.0" in msg
    assert "compute capability 8.7), this is RTX 4090 (compute capability 8.9)" in msg


def test_a_sidecar_missing_fields_is_refused():
    meta = copy.deepcopy(sidecar())
    del meta["gpu"]["compute_capability"]
    d = decide(meta, ORIN)
    assert not d.ok and "sidecar lacks 'compute_capability'" in d.errors[0]
