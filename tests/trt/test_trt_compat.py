"""May an engine run here? Decisions from sidecar metadata alone: no TensorRT needed."""
from __future__ import annotations

import copy

import pytest

from mmopt_runtime.trt.compat import Environment, decide, parse_version, require_compatible
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


# ---- the exact words of every refusal (a message is the user's only guide on the device) ---------

def only_error(meta, env=ORIN) -> str:
    d = decide(meta, env)
    assert len(d.errors) == 1, d.errors
    return d.errors[0]


def test_every_refusal_says_exactly_what_and_what_to_do():
    assert only_error(sidecar(version="10.3.0.26")) == (
        "the engine was built with TensorRT 10.3.0.26 but this is TensorRT 10.3.0.30; a TensorRT engine loads "
        "only in the exact version that built it. Rebuild it here with `mmopt build`, or build it with "
        "--version-compatible to ship one engine to later TensorRT versions.")
    assert only_error(sidecar(version="10.4.0", vc=True)) == (
        "the engine was built with TensorRT 10.4.0, newer than this TensorRT 10.3.0.30; version-compatible "
        "engines only move forward. Upgrade TensorRT here or rebuild here.")
    assert only_error(sidecar(version="9.2.0", vc=True)) == (
        "the version-compatible engine was built with TensorRT 9.2.0; TensorRT 10.3.0.30 cannot load engines "
        "of TensorRT 9.x. Rebuild it here with `mmopt build`.")
    old = Environment("8.5.3", "Orin", "8.7", "linux-aarch64")
    assert only_error(sidecar(version="8.5.1", vc=True), old) == (
        "TensorRT 8.5.1 predates version-compatible engines (8.6); rebuild it here.")
    assert decide(sidecar(version="8.6.1", vc=True), Environment("8.6.1", "Orin", "8.7", "linux-aarch64")).ok
    assert decide(sidecar(version="8.6.1", vc=True), ORIN).ok  # 8 -> 10 is a supported cross-major move
    assert not decide(sidecar(version="10.3.0", vc=True), Environment("12.0.0", "Orin", "8.7", "linux-aarch64")).ok
    assert only_error(sidecar(platform="linux-x86_64")) == (
        "the engine was built on linux-x86_64, this is linux-aarch64; engines never move between platforms. "
        "Build it on the target device with `mmopt build`.")
    assert only_error(sidecar(cc="8.6", gpu="A10")) == (
        "the engine only runs on GPUs of its compute capability: built on A10 (compute capability 8.6), this is "
        "Orin (compute capability 8.7). Rebuild it on this device with `mmopt build`, or build with "
        "--hardware-compat ampere+ for engines that move between Ampere-or-newer GPUs.")
    turing = Environment("10.3.0.30", "T4", "7.5", "linux-aarch64")
    assert only_error(sidecar(level="ampere+"), turing) == (
        "the engine was built for Ampere and newer GPUs (compute capability >= 8.0), built on Orin (compute "
        "capability 8.7), this is T4 (compute capability 7.5). Rebuild it here with `mmopt build`.")
    assert decide(sidecar(level="ampere+", cc="8.0"), Environment("10.3.0.30", "X", "8.0", "linux-aarch64")).ok
    assert only_error(sidecar(level="turing+")) == (
        "unknown hardware_compatibility 'turing+' in the sidecar; rebuild the engine.")
    twin = decide(sidecar(gpu="Orin NX"), ORIN)
    assert twin.ok and twin.warnings == [
        "the engine was tuned on Orin NX and runs here on Orin; it should work (same compute capability) but "
        "may be slower. Rebuild here for best speed."]
    assert decide(sidecar(gpu="Orin NX", level="same_compute_capability"), ORIN).warnings == []


def test_require_compatible_lists_every_problem_under_the_engine_name():
    with pytest.raises(EngineIncompatible) as e:
        require_compatible(sidecar(platform="linux-x86_64", version="10.4.0"), ORIN, "image.fp16.engine")
    lines = str(e.value).splitlines()
    assert lines[0] == "image.fp16.engine cannot run here:" and len(lines) == 3
    assert all(line.startswith("  the engine was built") for line in lines[1:])
    assert require_compatible(sidecar(gpu="Orin NX"), ORIN, "e") == decide(sidecar(gpu="Orin NX"), ORIN).warnings


def test_compute_capability_and_versions_parse_exactly():
    from mmopt_runtime.trt.compat import parse_cc

    assert parse_cc("8.7") == (8, 7) and parse_cc("9") == (9, 0) and parse_cc("10.0") == (10, 0)
    with pytest.raises(ValueError, match="not a version: 'x1'"):
        parse_version("x1")
