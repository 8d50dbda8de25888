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
