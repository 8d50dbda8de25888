"""mmopt calls TensorRT with the right values in the right order (trt_protocol.py), not only with names and
signatures that exist: profiles min <= opt <= max and equal to the capture, the workspace in bytes, exactly
the flags asked for, the config complete before the build, a foreign timing cache refused, host code only
for version-compatible plans, profile -> input shapes -> infer_shapes -> addresses -> execute.

The mutation tests below plant, one at a time, the eight bugs that passed every earlier TensorRT test
(test-audit.md): each must now be caught. They run against the oldest supported bindings (10.3); the clean
run is checked on every supported version. No TensorRT library or GPU exists here: the bindings are real,
the engines are the checking proxy's placeholders (named as such in trt_scenarios.py).
"""
from __future__ import annotations

import pytest

import trt_bindings as bindings
import trt_fake_bundle as fake_bundle
from test_api_conformance import mutated, report
from trt_bindings import OLDEST, VERSIONS

API = (bindings.REPO / "mmopt_runtime" / "trt" / "api.py").read_text()
RUNNER = (bindings.REPO / "mmopt_runtime" / "trt" / "runner.py").read_text()


def violations(rep: dict) -> list[str]:
    return [f"{name}: {v}" for name, s in rep["scenarios"].items() for v in s["protocol"]["violations"]]


def builds(rep: dict, scenario: str) -> list[dict]:
    return rep["scenarios"][scenario]["protocol"]["builds"]


def captured(inputs: set[str]) -> dict:
    """The bundle's captured min / opt / max of the component with these inputs."""
    comp = next(c for c in fake_bundle.COMPONENTS.values() if {t.name for t in c.inputs} == inputs)
    return {t.name: {s: list(t.shapes[s]) for s in ("min", "opt", "max")} for t in comp.inputs}


def build_problems(rep: dict) -> list[str]:
    """What the builds asked TensorRT for, against what the scenarios' options and the capture say."""
    bad = []
    everything = builds(rep, "build_fp16_all_options")  # workspace_mib=256, sparse, version-compatible
    plain = builds(rep, "build_all_precisions_cache_reused")  # no options: no flag, no limit, captured profile
    if not everything or not plain:
        return ["a build scenario built nothing"]
    bad += [f"workspace {b['workspace']} bytes, asked 256 MiB" for b in everything if b["workspace"] != 256 * 2**20]
    bad += [f"flags {b['flags']}, asked SPARSE_WEIGHTS + VERSION_COMPATIBLE" for b in everything
            if b["flags"] != ["SPARSE_WEIGHTS", "VERSION_COMPATIBLE"]]
    bad += [f"flags {b['flags']} / workspace {b['workspace']} with no option given" for b in plain
            if b["flags"] or b["workspace"] is not None]
    bad += [f"profile {b['profiles']} is not the captured one" for b in plain
            if b["profiles"] != [captured(set(b["profiles"][0]))]]
    return bad


@pytest.mark.parametrize("version", VERSIONS)
def test_mmopts_calls_keep_tensorrts_rules(version):
    rep = report(version)
    assert violations(rep) == []
    assert build_problems(rep) == []


# ---- the eight planted bugs that used to pass ---------------------------------------------------

def _moved(source: str, line: str, before: str) -> tuple[str, str]:
    """(old, new) that moves ``line`` (a whole line of ``source``) up to just before ``before``."""
    start, end = source.index(before), source.index(line) + len(line)
    block = source[start:end]
    return block, line + block[: -len(line)]


def _caught(rep: dict, phrase: str) -> None:
    found = violations(rep)
    assert any(phrase in v for v in found), f"{phrase!r} not among {found}"


@pytest.mark.source_text
def test_profile_min_and_max_swapped_is_caught():
    rep = mutated(OLDEST, 'profile.set_shape(name, s["min"], s["opt"], s["max"])',
                  'profile.set_shape(name, s["max"], s["opt"], s["min"])')
    _caught(rep, "not min <= opt <= max")


@pytest.mark.source_text
def test_workspace_in_kib_is_caught():
    rep = mutated(OLDEST, "options.workspace_mib << 20", "options.workspace_mib << 10")
    assert any("workspace 262144 bytes, asked 256 MiB" in p for p in build_problems(rep))


@pytest.mark.source_text
def test_the_wrong_builder_flag_is_caught():
    rep = mutated(OLDEST, "config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)",
                  "config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)")
    assert any("flags ['EXCLUDE_LEAN_RUNTIME', 'SPARSE_WEIGHTS'], asked" in p for p in build_problems(rep))


@pytest.mark.source_text
def test_building_before_the_config_is_complete_is_caught():
    line = "    serialized = builder.build_serialized_network(network, config)\n"
    old, new = _moved(API, line, "    if options.workspace_mib:\n")
    _caught(mutated(OLDEST, old, new), "after build_serialized_network")


@pytest.mark.source_text
def test_host_code_never_allowed_for_version_compatible_plans_is_caught():
    rep = mutated(OLDEST, "        if allow_host_code:\n", "        if False:\n")
    _caught(rep, "engine_host_code_allowed=False for a version-compatible plan")


@pytest.mark.source_text
def test_infer_shapes_before_any_input_shape_is_caught():
    line = "        unresolved = self._context.infer_shapes()\n"
    old, new = _moved(API, line, "        for tname, shape in shapes.items():\n")
    _caught(mutated(OLDEST, old, new), "infer_shapes before set_input_shape")


@pytest.mark.source_text
def test_a_foreign_timing_cache_silently_accepted_is_caught():
    rep = mutated(OLDEST, "if config.set_timing_cache(cache, False):", "if config.set_timing_cache(cache, True):")
    _caught(rep, "set_timing_cache(ignore_mismatch=True)")


@pytest.mark.source_text
def test_set_profile_after_set_input_shapes_in_the_runner_is_caught():
    old = ("        if index != session.active_profile:\n            session.set_profile(index, mem.stream)\n"
           "        out_shapes = session.set_input_shapes(shapes)\n")
    assert old in RUNNER
    new = ("        out_shapes = session.set_input_shapes(shapes)\n        if index != session.active_profile:\n"
           "            session.set_profile(index, mem.stream)\n")
    rep = report(OLDEST, "--mode", "mutate", "--old", old, "--new", new, "--file", "mmopt_runtime/trt/runner.py")
    _caught(rep, "since the last profile switch")
