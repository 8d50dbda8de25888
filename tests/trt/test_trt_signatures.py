"""The conformance checker's docstring-signature parser, on docstrings copied from the real bindings."""
from __future__ import annotations

from trt_signatures import parse_signatures

OVERLOADED = """create_execution_context(*args, **kwargs)
Overloaded function.

1. create_execution_context(self: tensorrt_bindings.tensorrt.ICudaEngine, strategy: tensorrt_bindings.tensorrt.\
ExecutionContextAllocationStrategy = <ExecutionContextAllocationStrategy.STATIC: 0>) -> tensorrt_bindings.tensorrt.\
IExecutionContext

2. create_execution_context(self: tensorrt_bindings.tensorrt.ICudaEngine, runtime_config: tensorrt_bindings.tensorrt.\
IRuntimeConfig = None) -> tensorrt_bindings.tensorrt.IExecutionContext
"""


def test_overloads_defaults_and_returns():
    one, two = parse_signatures(OVERLOADED)
    assert [p.name for p in one.params] == ["self", "strategy"]
    assert one.params[1].default == "<ExecutionContextAllocationStrategy.STATIC: 0>"
    assert one.returns == "tensorrt_bindings.tensorrt.IExecutionContext"
    assert two.params[1].default == "None"


def test_nested_types_and_property_signatures():
    (sig,) = parse_signatures("get_tensor_profile_shape(self: tensorrt.ICudaEngine, name: str, profile_index: "
                              "typing.SupportsInt) -> list[tensorrt.Dims]\n\n    Get the profile shape.\n")
    assert [(p.name, p.type) for p in sig.params][1:] == [("name", "str"), ("profile_index", "typing.SupportsInt")]
    assert sig.returns == "list[tensorrt.Dims]"
    (prop,) = parse_signatures("(arg0: tensorrt.IBuilderConfig, arg1: typing.SupportsInt) -> None\n")
    assert [p.name for p in prop.params] == ["arg0", "arg1"] and prop.returns == "None"
    assert parse_signatures("Plain prose, no signature.") == [] and parse_signatures(None) == []


def test_offline_ci_fails_instead_of_skipping_the_conformance(monkeypatch, tmp_path):
    """Without the bindings wheels and without PyPI, a developer machine skips the conformance tests; CI
    (CI=true) fails them, saying what to provide."""
    import subprocess

    import pytest

    import trt_bindings as bindings

    class Offline:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version: Network is unreachable"

    monkeypatch.setenv("MMOPT_TEST_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Offline())
    monkeypatch.setattr(bindings, "_OFFLINE", ("Network is unreachable",))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PyPI is unreachable"):
        bindings.bindings(bindings.OLDEST)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="In CI .* need these wheels"):
        bindings.bindings(bindings.OLDEST)
