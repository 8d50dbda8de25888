"""mmopt's TensorRT code against NVIDIA's real Python bindings of the oldest and newest supported versions.

No TensorRT library or GPU exists in CI, but the ``tensorrt-cu12-bindings`` wheels do: with stand-in
libnvinfer libraries they import with the real API surface (see trt_bindings.py). trt_conformance_driver.py then
runs mmopt's real build and runtime code paths against a checking proxy of that module
(trt_checking_proxy.py): every attribute, enum member and method mmopt touches must exist in that version,
and every call must fit one of its pybind11 signatures. Tested versions: 10.3.0 (JetPack 6, the oldest
supported) and 11.4.0.106 (the newest 11.x on PyPI when pinned; see bindings.NEWEST).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

import trt_bindings as bindings
from trt_bindings import NEWEST, OLDEST, VERSIONS

API_SOURCE = (bindings.REPO / "mmopt_runtime" / "trt" / "api.py").read_text()


@lru_cache(maxsize=None)
def report(version: str, *args: str) -> dict:
    out = bindings.run_driver(version, *args)
    assert out.returncode == 0, f"driver failed on TensorRT {version}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@lru_cache(maxsize=None)
def lean_report(version: str) -> dict:
    """The runtime's scenarios on a device with only TensorRT's lean runtime (``tensorrt_lean``)."""
    out = bindings.run_driver(version, lean=True)
    assert out.returncode == 0, f"driver failed on lean TensorRT {version}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def mutated(version: str, old: str, new: str) -> dict:
    return report(version, "--mode", "mutate", "--old", old, "--new", new)


def snippet(version: str, code: str) -> dict:
    return report(version, "--mode", "snippet", "--code", code)


def line_of(text: str) -> int:
    lines = [i for i, line in enumerate(API_SOURCE.splitlines(), 1) if text in line]
    assert len(lines) == 1, f"{text!r} found on lines {lines} of api.py"
    return lines[0]


def whats(rep: dict) -> list[str]:
    return [v["what"] for v in rep["violations"]]


# ---- the real module, made importable ----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_stand_ins_cover_every_tensorrt_library_the_bindings_need(version):
    major = version.split(".")[0]
    needed = bindings.needed_libraries(version)
    trt_libs = {n for n in needed if n.startswith("libnv")}
    assert trt_libs == {f"{lib}.so.{major}" for lib in bindings.LIBS}, needed


@pytest.mark.parametrize("version", VERSIONS)
def test_driver_reads_the_real_bindings_of_that_version(version):
    rep = report(version)
    assert rep["version"] == version
    assert rep["module_file"].startswith(str(bindings.bindings(version)))


# ---- mmopt's code conforms ---------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_and_call_in_mmopt_exists_in_that_version(version):
    rep = report(version)
    assert rep["violations"] == [], json.dumps(rep["violations"], indent=1)
    assert rep["unchecked"] == [], "types the checker could not resolve (extend trt_checking_proxy.Checker.accepts)"


@pytest.mark.parametrize("version", VERSIONS)
def test_build_and_run_scenarios_behave(version):
    s = report(version)["scenarios"]
    for name in ("build_fp16_all_options", "build_all_precisions_cache_reused", "timing_cache_mismatch",
                 "build_fp16_for_runtime", "run_image_two_profiles", "run_text_cuda_graph", "logger_sorts_messages"):
        assert s[name]["ok"], f"{name}: {s[name]}"
    built = s["build_all_precisions_cache_reused"]["detail"]
    assert [b["file"] for b in built] == ["image.fp32.engine", "image.fp16.engine", "text.fp32.engine",
                                          "text.fp16.engine"]
    io = {"image": {"inputs": {"pixel_values": "FLOAT"}, "outputs": {"image_emb": "FLOAT"}},
          "text": {"inputs": {"input_ids": "INT64"}, "outputs": {"text_hidden": "FLOAT"}}}
    assert all(b["io"] == io[b["file"].split(".")[0]] for b in built)  # the parsed network's tensors, recorded
    # the timing cache: created by the first build, reused after, replaced when TensorRT refuses it, absent
    # when disabled; saved whenever one was used
    assert [b["timing_cache"] for b in s["build_fp16_all_options"]["detail"]] == ["new", "reused"]
    assert {b["timing_cache"] for b in built} == {"reused"} and all(b["cache_written"] for b in built)
    assert [b["timing_cache"] for b in s["timing_cache_mismatch"]["detail"]] == [
        "replaced (it was made by another GPU or TensorRT version)", "reused"]
    assert [(b["timing_cache"], b["cache_written"]) for b in s["build_fp16_for_runtime"]["detail"]] == [
        ("disabled", False)] * 2
    parse = s["build_fails_parse"]
    assert parse["error"] == "OnnxParseError"
    assert "node '/text/MatMulInteger_3' (MatMulInteger): UNSUPPORTED_NODE" in parse["message"]
    assert "does not support op(s) MatMulInteger" in parse["message"]
    expected = {"build_fails_inputs": "EngineBuildError", "build_fails_profile": "EngineBuildError",
                "build_fails_build": "EngineBuildError", "run_fails_deserialize": "EngineLoadError",
                "run_fails_context": "EngineLoadError", "run_fails_dtype": "EngineLoadError",
                "run_fails_set_profile": "EngineLoadError", "run_fails_set_shape": "EngineLoadError",
                "run_fails_infer_shapes": "EngineLoadError", "run_fails_dynamic_output": "EngineLoadError",
                "run_fails_address": "EngineLoadError",
                "run_fails_execute": "EngineRunError", "load_without_tensorrt": "TensorRTUnavailable",
                "load_with_broken_tensorrt": "TensorRTUnavailable"}
    assert {k: s[k].get("error") for k in expected} == expected
    assert "neither tensorrt nor tensorrt_lean is installed" not in s["load_with_broken_tensorrt"]["message"]
    assert "tensorrt: OSError: libnvinfer.so.10: cannot open shared object file" in \
        s["load_with_broken_tensorrt"]["message"]
    image = s["run_image_two_profiles"]["detail"]
    assert image["outputs"] == [{"image_emb": [4, 4]}, {"image_emb": [1, 4]}]
    text = s["run_text_cuda_graph"]["detail"]
    assert (text["captures"], text["replays"]) == (1, 3)
    assert s["logger_sorts_messages"]["detail"] == {"errors": ["a ERROR message", "a INTERNAL_ERROR message"],
                                                  "warnings": ["a WARNING message"]}


@pytest.mark.source_text
def test_every_line_of_the_tensorrt_module_ran_against_real_bindings():
    executed = set().union(*(set(r["coverage"]["executed"]) for r in (report(OLDEST), report(NEWEST),
                                                                       lean_report(OLDEST), lean_report(NEWEST))))
    missed = [n for n in report(OLDEST)["coverage"]["executable"] if n not in executed]
    lines = API_SOURCE.splitlines()
    assert not missed, "api.py lines no scenario ran:\n" + "\n".join(f"{n}: {lines[n - 1]}" for n in missed)


# ---- explicit version branches, each exercised on its own version ------------------------------

def _calls(version: str, name: str) -> list:
    return [c for c in report(version)["calls"] if c[0] == name]


@pytest.mark.source_text
def test_network_creation_branch_strongly_typed_flag_on_10_no_flags_on_11():
    old = _calls(OLDEST, "Builder.create_network")
    new = _calls(NEWEST, "Builder.create_network")
    assert old and {tuple(c[1]) for c in old} == {("2",)}  # 1 << STRONGLY_TYPED (= 1 in 10.x)
    assert new and {tuple(c[1]) for c in new} == {("0",)}  # flag deprecated and ignored in 11
    on_10, on_11 = line_of("return 1 << int(trt.NetworkDefinitionCreationFlag"), line_of("return 0  # always")
    assert on_10 in report(OLDEST)["coverage"]["executed"] and on_10 not in report(NEWEST)["coverage"]["executed"]
    assert on_11 in report(NEWEST)["coverage"]["executed"] and on_11 not in report(OLDEST)["coverage"]["executed"]


@pytest.mark.source_text
def test_same_compute_capability_branch_refused_on_10_3_used_on_11():
    old, new = report(OLDEST)["scenarios"], report(NEWEST)["scenarios"]
    assert old["build_same_compute_capability"]["error"] == "TensorRTFeatureUnavailable"
    assert "needs TensorRT >= 10.9" in old["build_same_compute_capability"]["message"]
    assert new["build_same_compute_capability"]["ok"]
    levels = {v for c in _calls(NEWEST, "IBuilderConfig.hardware_compatibility_level=") for v in c[1]}
    assert any("SAME_COMPUTE_CAPABILITY" in v for v in levels) and any("AMPERE_PLUS" in v for v in levels)
    used = line_of("return trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY")
    assert used in report(NEWEST)["coverage"]["executed"] and used not in report(OLDEST)["coverage"]["executed"]


@pytest.mark.source_text
def test_version_specific_names_are_declared_and_nothing_else_is_missing():
    from mmopt_runtime.trt.api import SINCE

    for version in VERSIONS:
        static = report(version)["static"]
        assert set(SINCE) <= set(static["chains"]), "SINCE lists names api.py does not use"
        vt = tuple(int(p) for p in version.split(".")[:2])
        allowed = {name for name, since in SINCE.items() if vt < since}
        assert set(static["missing"]) == allowed, (version, static["missing"])


# ---- the check can fail ------------------------------------------------------------------------

FP16_FLAG = ("    config.hardware_compatibility_level = level\n",
             "    config.hardware_compatibility_level = level\n    config.set_flag(trt.BuilderFlag.FP16)\n")


@pytest.mark.source_text
def test_catches_a_removed_builder_precision_flag_in_the_real_build_path():
    new = mutated(NEWEST, *FP16_FLAG)
    assert whats(new) == [f"BuilderFlag.FP16 does not exist in TensorRT {NEWEST}"]
    inserted = line_of("config.hardware_compatibility_level = level") + 1
    assert new["violations"][0]["where"] == f"mutated_api.py:{inserted}"
    assert mutated(OLDEST, *FP16_FLAG)["violations"] == []  # still there in 10.3: the check is per version


@pytest.mark.source_text
def test_catches_a_removed_calibrator_attribute():
    calibrator = ("    config.hardware_compatibility_level = level\n",
                  "    config.hardware_compatibility_level = level\n    config.int8_calibrator = None\n")
    assert whats(mutated(NEWEST, *calibrator)) == [
        f"IBuilderConfig.int8_calibrator does not exist in TensorRT {NEWEST} (assigned None)"]
    assert mutated(OLDEST, *calibrator)["violations"] == []  # valid on 10.3 (None clears the calibrator)


@pytest.mark.source_text
def test_catches_an_enum_name_that_is_a_method_in_10_3():
    old, new = ('"code": _name(e.code())', '"code": e.code().name')
    assert any("ErrorCode.name is a method in TensorRT 10.3.0" in w for w in whats(mutated(OLDEST, old, new)))
    assert mutated(NEWEST, old, new)["violations"] == []


@pytest.mark.parametrize("version", VERSIONS)
def test_catches_calls_that_fit_no_signature(version):
    rep = snippet(version, "\n".join([
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)",  # missing pool_size
        "builder.create_network('strongly typed')",  # str for int
        "context.execute_async_v3(stream=0)",  # keyword is stream_handle
        "engine.num_io_tensors = 3",  # read-only property
        "trt.Builder(logger=trt.Logger(), verbose=True)",  # unknown keyword
    ]))
    found = whats(rep)
    assert len(found) == 5, found
    assert re.search(r"set_memory_pool_limit.*missing argument 'pool_size'", found[0])
    assert "'flags' expects" in found[1] and "no keyword argument 'stream'" in found[2]
    assert "num_io_tensors is read-only" in found[3] and "no keyword argument 'verbose'" in found[4]


def test_catches_apis_removed_in_11_that_10_3_still_has():
    code = "\n".join(["trt.BuilderFlag.INT8", "builder.platform_has_fast_fp16",
                      "trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "engine.device_memory_size"])
    assert snippet(OLDEST, code)["violations"] == []
    assert len(whats(snippet(NEWEST, code))) == 4


# ---- the device runtime: a package's engine sets, through the same real bindings -------------------

def _plan(scenario: dict) -> dict:
    assert scenario["ok"], scenario
    assert scenario["protocol"]["violations"] == [], scenario["protocol"]
    return scenario["detail"]["plan"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_runtime_runs_the_engine_set_that_matches_here_and_names_the_others(version):
    from mmopt_runtime.trt.device import platform_tag

    from trt_scenarios import FAKE_GPU_NAME

    from mmopt_runtime.engines import set_id

    s, here = report(version)["scenarios"], platform_tag()
    exact = s["package_exact_set"]
    plan = _plan(exact)
    assert plan["backend"] == "tensorrt" and plan["on_tensorrt"] == ["image", "text"] and plan["why"] == []
    this = set_id((version, FAKE_GPU_NAME, "8.7", here, False, "none"))
    h200 = f"trt{version}-sm9.0-fake-h200-{here}"
    assert plan["source"] == f"engine set {this}"  # before the version-compatible one
    assert list(plan["refused"]) == [h200]
    assert "compute capability 9.0" in plan["refused"][h200][0]
    assert exact["detail"]["outputs"] == {"image_emb": [4, 4], "text_hidden": [4, 6, 4]}
    assert exact["detail"]["memories"] == 2  # one stream and buffers per engine
    vc = _plan(s["package_version_compatible_set"])
    assert vc["source"] == f"version-compatible engine set trt10.0.1-sm8.7-fake-orin-{here}-vc"
    newer = f"trt{version.split('.')[0]}.99.0-sm8.7-fake-orin-{here}-vc"
    assert "version-compatible engines only move forward" in vc["refused"][newer][0]


@pytest.mark.parametrize("version", VERSIONS)
def test_without_a_matching_set_full_tensorrt_builds_into_the_cache_once(version):
    s = report(version)["scenarios"]["package_builds_engines_into_the_cache"]
    assert s["ok"], s
    first, second = (d["plan"] for d in s["detail"])
    assert first["source"].startswith("engines built here into ") and first["on_tensorrt"] == ["image", "text"]
    assert second["source"].startswith("engines found in the engine cache ")
    builds = s["protocol"]["builds"]
    assert len(builds) == 2, builds  # image and text, built once: the second load found them
    assert [b["flags"] for b in builds] == [[], []]  # not version-compatible: this GPU and TensorRT only
    assert [sorted(b["profiles"][0]) for b in builds] == [["pixel_values"], ["input_ids"]]
    assert builds[1]["profiles"][0]["input_ids"] == {"min": [1, 2], "opt": [4, 6], "max": [8, 12]}  # the package's


@pytest.mark.parametrize("version", VERSIONS)
def test_the_runtime_refuses_or_falls_back_saying_why(version):
    s = report(version)["scenarios"]
    refused = s["package_without_a_gpu_refused"]
    assert refused["error"] == "PackageError" and "no NVIDIA GPU 0 is visible here" in refused["message"]
    back = _plan(s["package_engine_refused_falls_back"])
    assert back["backend"] == "onnxruntime" and back["on_tensorrt"] == []
    assert "refused to deserialise the engine" in back["why"][0] and "ONNX Runtime runs every component" in back["why"][0]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_lean_runtime_runs_version_compatible_sets_only(version):
    rep = lean_report(version)
    assert rep["lean"] and rep["version"] == version and "tensorrt_lean_bindings" in rep["module_file"]
    assert rep["violations"] == [] and rep["unchecked"] == [], rep["violations"]
    s = rep["scenarios"]
    plan = _plan(s["lean_runs_a_version_compatible_set"])
    assert plan["source"].startswith("version-compatible engine set trt10.0.1-sm8.7-")
    assert any("lean runtime runs only version-compatible engines" in w for v in plan["refused"].values() for w in v)
    assert s["lean_cannot_build_refused"]["error"] == "PackageError"
    assert "lean runtime" in s["lean_cannot_build_refused"]["message"] and "cannot build" in \
        s["lean_cannot_build_refused"]["message"]
    back = _plan(s["lean_falls_back_to_onnxruntime"])
    assert back["backend"] == "onnxruntime" and "cannot build engines" in back["why"][0]
    assert s["lean_build_refused"]["error"] == "TensorRTUnavailable"


@pytest.mark.parametrize("version", VERSIONS)
def test_lean_stand_in_covers_the_library_the_lean_bindings_need(version):
    needed = bindings.needed_libraries(version, lean=True)
    assert {n for n in needed if n.startswith("libnv")} == {f"libnvinfer_lean.so.{version.split('.')[0]}"}, needed


def test_the_lean_check_can_fail():
    """A name the lean runtime lacks (its bindings have no Builder) is a violation there, not in full TensorRT."""
    code = "trt.Builder"
    out = bindings.run_driver(NEWEST, "--mode", "snippet", "--code", code, lean=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lean = json.loads(out.stdout.strip().splitlines()[-1])
    assert [v["what"] for v in lean["violations"]] == [f"tensorrt.Builder does not exist in TensorRT {NEWEST}"]
    assert snippet(NEWEST, code)["violations"] == []
