"""``mmopt.trt.api`` in this process, against ``FakeTensorRT``: a FAKE of the ``tensorrt`` module (TensorRT's
libraries and a GPU cannot exist here). It implements only what api.py calls, with TensorRT's documented
behaviour where mmopt depends on it:

* the first logger a process hands TensorRT receives every later message (so a logger per call hears
  nothing);
* a builder, parser, runtime or context refuses by returning None / False / -1 and logging an error;
* enum members print as ``Type.MEMBER``.

The names and signatures api.py uses are checked against NVIDIA's real bindings by test_api_conformance.py
and the call order by test_trt_protocol.py (both in a child process per version); these tests pin the values
and every message, where mutation testing found the child-process tests blind."""
from __future__ import annotations

import enum
from pathlib import Path

import pytest

from mmopt_runtime.trt import api
from mmopt.trt.errors import (EngineBuildError, EngineLoadError, OnnxParseError, TensorRTFeatureUnavailable,
                              TensorRTUnavailable)
from mmopt.trt.options import BuildOptions
from mmopt.trt.profiles import Profile


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 2
    FP8 = 3  # a type mmopt cannot feed from numpy


class FakeTensorRT:
    """A FAKE ``tensorrt`` module (see the module text). ``fail`` names the one call that refuses."""

    DataType = DataType

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 2

    class HardwareCompatibilityLevel(enum.Enum):
        NONE = 0
        AMPERE_PLUS = 1
        SAME_COMPUTE_CAPABILITY = 2

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class BuilderFlag(enum.Enum):
        SPARSE_WEIGHTS = 0
        VERSION_COMPATIBLE = 1

    class TensorIOMode(enum.Enum):
        INPUT = 0
        OUTPUT = 1

    class ErrorCode(enum.Enum):
        UNSUPPORTED_NODE = 8

    def __init__(self, version: str = "10.3.0", fail: str | None = None, **knobs):
        self.__version__, self.fail, self.knobs = version, fail, knobs
        self.calls: list[tuple] = []
        self.heard: list = []  # TensorRT keeps the first logger it is given
        trt = self

        class ILogger:
            class Severity(enum.Enum):
                INTERNAL_ERROR = 0
                ERROR = 1
                WARNING = 2
                INFO = 3

            def __init__(self) -> None:
                pass

        self.ILogger = ILogger

        def hear(logger):
            if not trt.heard:
                trt.heard.append(logger)

        def log(level, msg):
            trt.heard[0].log(level, msg)

        def refuse(name, what, default=None):
            trt.calls.append((name,))
            if trt.fail == name:
                log(ILogger.Severity.ERROR, f"{name} failed: {what}")
                log(ILogger.Severity.INFO, "info is dropped")
                return True
            return False

        class Tensor:
            def __init__(self, name, dtype):
                self.name, self.dtype = name, dtype

        class Network:
            num_inputs, num_outputs = 2, 1

            def __init__(self, flags):
                self.flags = flags

            def get_input(self, i):
                return [Tensor("image", DataType.FLOAT), Tensor("ids", DataType.INT64)][i]

            def get_output(self, i):
                return Tensor("logits", DataType.HALF)

        class ParserError:
            def code(self):
                return FakeTensorRT.ErrorCode.UNSUPPORTED_NODE

            def desc(self):
                return "no importer for op NonMaxSuppression "

            def node(self):
                return 7

            def node_name(self):
                return "nms_1"

            def node_operator(self):
                return "NonMaxSuppression"

        class OnnxParser:
            def __init__(self, network, logger):
                hear(logger)
                trt.calls.append(("OnnxParser", network, logger))
                self.num_errors = 0

            def parse_from_file(self, path):
                if refuse("parse_from_file", path):
                    self.num_errors = trt.knobs.get("parser_errors", 1)
                    return False
                return True

            def get_error(self, i):
                return ParserError()

        class TimingCache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return memoryview(self.blob + b"+tuned")

        class Config:
            def __init__(self):
                self.flags, self.pool, self.profiles, self.cache = [], {}, [], None
                self.builder_optimization_level = 3
                self.hardware_compatibility_level = FakeTensorRT.HardwareCompatibilityLevel.NONE

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                self.flags.append(flag)

            def add_optimization_profile(self, profile):
                if refuse("add_optimization_profile", "min > max"):
                    return -1
                self.profiles.append(profile.shapes)
                return len(self.profiles) - 1

            def create_timing_cache(self, blob):
                return TimingCache(bytes(blob))

            def set_timing_cache(self, cache, ignore_mismatch):
                assert ignore_mismatch is False, "a foreign cache must be refused, not ignored"
                trt.calls.append(("set_timing_cache", cache.blob))
                if cache.blob == b"foreign":
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class OptimizationProfile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger):
                hear(logger)
                trt.builder = self

            def create_network(self, flags):
                self.network = Network(flags)
                return self.network

            def create_builder_config(self):
                self.config = Config()
                return self.config

            def create_optimization_profile(self):
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                trt.calls.append(("build", network, config))
                log(ILogger.Severity.WARNING, "weights are small")
                if refuse("build_serialized_network", "out of workspace"):
                    return None
                return memoryview(b"PLAN")

        class Context:
            def __init__(self):
                self.shapes = {}

            def set_optimization_profile_async(self, index, stream):
                return not refuse("set_optimization_profile_async", f"profile {index}")

            def set_input_shape(self, name, shape):
                self.shapes[name] = shape
                return not refuse("set_input_shape", f"{name} {shape}")

            def infer_shapes(self):
                return trt.knobs.get("unresolved", [])

            def get_tensor_shape(self, name):
                return trt.knobs.get("output_shape", (self.shapes["image"][0], 10))

            def set_tensor_address(self, name, address):
                return not refuse("set_tensor_address", name)

            def execute_async_v3(self, stream):
                return not refuse("execute_async_v3", "illegal address")

        class Engine:
            num_optimization_profiles = 2
            device_memory_size_v2 = 12345

            def __init__(self):
                self.names = ["image", "ids", "logits"]
                self.types = {"image": DataType.FLOAT, "ids": DataType.INT64,
                              "logits": trt.knobs.get("output_type", DataType.HALF)}
                self.num_io_tensors = 3

            def create_execution_context(self):
                return None if refuse("create_execution_context", "out of memory") else Context()

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_dtype(self, name):
                return self.types[name]

            def get_tensor_shape(self, name):
                return {"image": (-1, 3), "ids": (-1, 4), "logits": (-1, 10)}[name]

            def get_tensor_mode(self, name):
                return FakeTensorRT.TensorIOMode.OUTPUT if name == "logits" else FakeTensorRT.TensorIOMode.INPUT

            def get_tensor_profile_shape(self, name, p):
                width = 3 if name == "image" else 4
                return [[1 + p, width], [2 + p, width], [4 + p, width]]

        class Runtime:
            def __init__(self, logger):
                hear(logger)
                self.engine_host_code_allowed = False
                trt.runtime = self

            def deserialize_cuda_engine(self, blob):
                trt.calls.append(("deserialize", bytes(blob), self.engine_host_code_allowed))
                return None if refuse("deserialize_cuda_engine", "version mismatch") else Engine()

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeTensorRT as the module api.load() returns; returns a maker (version, fail, knobs)."""
    def make(version: str = "10.3.0", fail: str | None = None, **knobs) -> FakeTensorRT:
        trt = FakeTensorRT(version, fail, **knobs)
        monkeypatch.setattr(api, "load", lambda: trt)
        monkeypatch.setattr(api, "_state", {})
        return trt
    return make


PROFILE = Profile("captured", {"image": {"min": (1, 3), "opt": (2, 3), "max": (4, 3)},
                               "ids": {"min": (1, 4), "opt": (2, 4), "max": (4, 4)}})


def build(trt, options=BuildOptions(timing_cache=None), cache=None, profiles=(PROFILE,)):
    return api.build_engine(Path("/x/fusion.onnx"), profiles, options, cache)


# ---- build --------------------------------------------------------------------------------------

def test_a_build_returns_the_plan_the_io_types_and_the_warnings(fake):
    trt = fake()
    built = build(trt)
    assert built == api.BuiltEngine(b"PLAN", None, "disabled", {"image": "FLOAT", "ids": "INT64"},
                                    {"logits": "HALF"}, ["weights are small"])
    assert type(built.engine) is bytes
    config = trt.builder.config
    assert config.profiles == [{"image": ((1, 3), (2, 3), (4, 3)), "ids": ((1, 4), (2, 4), (4, 4))}]
    assert (config.flags, config.pool, config.builder_optimization_level) == ([], {}, 3)
    assert config.hardware_compatibility_level is FakeTensorRT.HardwareCompatibilityLevel.NONE
    parser_call = next(c for c in trt.calls if c[0] == "OnnxParser")
    assert parser_call[1] is trt.builder.network and parser_call[2] is trt.heard[0]
    assert next(c for c in trt.calls if c[0] == "build")[1:] == (trt.builder.network, config)


def test_options_reach_the_config(fake):
    trt = fake()
    opts = BuildOptions(timing_cache=None, workspace_mib=3, optimization_level=5, sparse_weights=True,
                        version_compatible=True, hardware_compatibility="ampere+")
    build(trt, opts)
    config = trt.builder.config
    assert config.pool == {FakeTensorRT.MemoryPoolType.WORKSPACE: 3 * 2**20}
    assert config.builder_optimization_level == 5
    assert config.flags == [FakeTensorRT.BuilderFlag.SPARSE_WEIGHTS, FakeTensorRT.BuilderFlag.VERSION_COMPATIBLE]
    assert config.hardware_compatibility_level is FakeTensorRT.HardwareCompatibilityLevel.AMPERE_PLUS
    build(trt, BuildOptions(timing_cache=None, optimization_level=0))
    assert trt.builder.config.builder_optimization_level == 0  # 0 is a level, not "unset"


@pytest.mark.parametrize("version, flags", [("10.3.0", 1 << 2), ("10.13.2", 1 << 2), ("11.0.0", 0), ("11.4.1", 0),
                                            ("12.0.0", 0)])
def test_networks_are_strongly_typed_by_flag_before_11_and_by_default_from_11(fake, version, flags):
    trt = fake(version)
    build(trt)
    assert trt.builder.network.flags == flags


@pytest.mark.parametrize("version, ok", [("10.3.0", False), ("10.8.9", False), ("10.9.0", True), ("10.10.0", True),
                                         ("11.0.0", True), ("9.10.0", False)])
def test_same_compute_capability_needs_10_9(fake, version, ok):
    trt = fake(version)
    opts = BuildOptions(timing_cache=None, hardware_compatibility="same_compute_capability")
    if ok:
        build(trt, opts)
        assert trt.builder.config.hardware_compatibility_level is \
            FakeTensorRT.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
        return
    with pytest.raises(TensorRTFeatureUnavailable) as e:
        build(trt, opts)
    assert str(e.value) == (f"--hardware-compat same_compute_capability needs TensorRT >= 10.9; this is TensorRT "
                            f"{version} (JetPack 6 ships 10.3). Use the default (none: this GPU's compute capability "
                            "with a warning on other models) or ampere+.")


@pytest.mark.parametrize("given, note, saved", [
    (None, "disabled", None),
    (b"", "new", b"+tuned"),
    (b"old", "reused", b"old+tuned"),
    (b"foreign", "replaced (it was made by another GPU or TensorRT version)", b"+tuned"),
])
def test_the_timing_cache(fake, given, note, saved):
    trt = fake()
    built = build(trt, cache=given)
    assert (built.timing_cache_note, built.timing_cache) == (note, saved)
    sets = [c[1] for c in trt.calls if c[0] == "set_timing_cache"]
    assert sets == ([] if given is None else [given] if given != b"foreign" else [b"foreign", b""])


def test_a_parser_failure_names_node_op_and_version(fake):
    trt = fake(fail="parse_from_file")
    with pytest.raises(OnnxParseError) as e:
        build(trt)
    msg = str(e.value)
    assert msg.startswith("fusion.onnx: TensorRT 10.3.0's ONNX parser rejected the graph:\n"
                          "  node 'nms_1' (NonMaxSuppression): UNSUPPORTED_NODE: no importer for op NonMaxSuppression\n"
                          "TensorRT 10.3.0 does not support op(s) NonMaxSuppression")
    trt = fake(fail="parse_from_file", parser_errors=0)  # no parser detail: the logger's errors instead
    with pytest.raises(OnnxParseError) as e:
        build(trt)
    assert "\n  parse_from_file failed: /x/fusion.onnx\n" in str(e.value)


def test_inputs_that_differ_from_the_capture_are_refused(fake):
    trt = fake()
    other = Profile("captured", {"image": PROFILE.shapes["image"]})
    with pytest.raises(EngineBuildError) as e:
        build(trt, profiles=(other,))
    assert str(e.value) == ("fusion.onnx: the graph's inputs ['ids', 'image'] differ from the bundle's captured inputs "
                            "['image']; re-run `mmopt export`.")


def test_a_refused_profile_and_a_failed_build_say_what_tensorrt_logged(fake):
    with pytest.raises(EngineBuildError) as e:
        build(fake(fail="add_optimization_profile"))
    assert str(e.value) == "fusion.onnx: TensorRT rejected profile 'captured': add_optimization_profile failed: min > max"
    with pytest.raises(EngineBuildError) as e:
        build(fake(fail="build_serialized_network"))
    assert str(e.value) == ("fusion.onnx: TensorRT 10.3.0 could not build an engine:\n"
                            "  build_serialized_network failed: out of workspace\n"
                            "A smaller --workspace-mib limit or a narrower --profile can cause this; so can an op "
                            "TensorRT parses but cannot run at this precision on this GPU.")


def test_one_logger_per_process_collects_errors_and_warnings_only(fake):
    trt = fake()
    logger = api._logger(trt)
    assert api._logger(trt) is logger
    sev = trt.ILogger.Severity
    for level, msg in [(sev.INTERNAL_ERROR, "a"), (sev.ERROR, "b"), (sev.WARNING, "c"), (sev.INFO, "d")]:
        logger.log(level, msg)
    assert logger.drain() == (["a", "b"], ["c"])
    assert logger.drain() == ([], [])
    # messages from an earlier call do not leak into the next build's
    logger.log(sev.ERROR, "stale")
    assert build(trt).warnings == ["weights are small"]


def test_load_says_how_to_build_when_tensorrt_is_missing(monkeypatch):
    real_import = api.importlib.import_module

    def no_tensorrt(name, *a, **k):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file")
        if name == "tensorrt_lean":
            raise ImportError("No module named 'tensorrt_lean'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(api.importlib, "import_module", no_tensorrt)
    with pytest.raises(TensorRTUnavailable) as e:
        api.load()
    assert str(e.value).startswith("TensorRT cannot be imported here (tensorrt: OSError: libnvinfer.so.10: cannot "
                                   "open shared object file; tensorrt_lean: ImportError: No module named "
                                   "'tensorrt_lean').\nInstall TensorRT's Python bindings")
    assert e.value.reason == "TensorRT cannot be imported (OSError: libnvinfer.so.10: cannot open shared object file)"


# ---- run ----------------------------------------------------------------------------------------

def test_a_session_reads_io_profiles_and_memory(fake):
    trt = fake()
    s = api.EngineSession(b"PLAN", name="fusion.fp16")
    assert trt.calls[-1] == ("create_execution_context",)
    assert ("deserialize", b"PLAN", False) in trt.calls
    assert s.io == [api.IOTensor("image", "float32", (-1, 3), True), api.IOTensor("ids", "int64", (-1, 4), True),
                    api.IOTensor("logits", "float16", (-1, 10), False)]
    assert s.profiles == [{"image": ((1, 3), (2, 3), (4, 3)), "ids": ((1, 4), (2, 4), (4, 4))},
                          {"image": ((2, 3), (3, 3), (5, 3)), "ids": ((2, 4), (3, 4), (5, 4))}]
    assert (s.device_memory_bytes, s.active_profile, s.name) == (12345, 0, "fusion.fp16")
    assert api.EngineSession(b"PLAN").name == "engine"


def test_host_code_only_when_asked(fake):
    trt = fake()
    api.EngineSession(b"PLAN", allow_host_code=True)
    assert ("deserialize", b"PLAN", True) in trt.calls and trt.runtime.engine_host_code_allowed is True
    api.EngineSession(b"PLAN")
    assert trt.runtime.engine_host_code_allowed is False


def test_load_refusals_exactly(fake):
    fake(fail="deserialize_cuda_engine")
    with pytest.raises(EngineLoadError) as e:
        api.EngineSession(b"PLAN", name="fusion.fp16")
    assert str(e.value) == ("fusion.fp16: TensorRT 10.3.0 refused to deserialise the engine:\n"
                            "  deserialize_cuda_engine failed: version mismatch\n"
                            "Rebuild it on this device with `mmopt build`.")
    fake(fail="create_execution_context")
    with pytest.raises(EngineLoadError) as e:
        api.EngineSession(b"PLAN", name="x")
    assert str(e.value) == ("x: TensorRT could not create an execution context (GPU memory full?): "
                            "create_execution_context failed: out of memory")
    fake(output_type=DataType.FP8)
    with pytest.raises(EngineLoadError) as e:
        api.EngineSession(b"PLAN", name="x")
    assert str(e.value).startswith("x: I/O tensor 'logits' has TensorRT type FP8, which mmopt cannot feed from numpy (")


def test_running_steps_and_their_refusals(fake):
    fake()
    s = api.EngineSession(b"PLAN", name="x")
    s.set_profile(1, stream=7)
    assert s.active_profile == 1
    assert s.set_input_shapes({"image": [3, 3], "ids": (3, 4)}) == {"logits": (3, 10)}
    assert s._context.shapes == {"image": (3, 3), "ids": (3, 4)}
    s.bind("image", 0x1000)
    s.enqueue(7)
    s.close()
    assert (s._context, s._engine, s._runtime) == (None, None, None)

    def session(**kw):
        fake(**kw)
        return api.EngineSession(b"PLAN", name="x")

    with pytest.raises(EngineLoadError) as e:
        session(fail="set_optimization_profile_async").set_profile(1, 0)
    assert str(e.value) == "x: TensorRT refused optimization profile 1: set_optimization_profile_async failed: profile 1"
    s = session(fail="set_input_shape")
    s.set_profile(1, 0)
    with pytest.raises(EngineLoadError) as e:
        s.set_input_shapes({"image": [9, 3]})
    assert str(e.value) == ("x: TensorRT refused shape (9, 3) for 'image' in profile 1: "
                            "set_input_shape failed: image (9, 3)")
    with pytest.raises(EngineLoadError) as e:
        session(unresolved=["ids"]).set_input_shapes({"image": [1, 3]})
    assert str(e.value) == "x: output shapes not computable; missing shapes for ['ids']."
    with pytest.raises(EngineLoadError) as e:
        session(output_shape=(-1, 10)).set_input_shapes({"image": [1, 3]})
    assert str(e.value) == ("x: outputs ['logits'] have data-dependent shapes (e.g. after NonZero); mmopt's runner "
                            "needs output shapes that follow from the input shapes.")
    assert session(output_shape=(0, 10)).set_input_shapes({"image": [1, 3]}) == {"logits": (0, 10)}  # empty is fine
    with pytest.raises(EngineLoadError) as e:
        session(fail="set_tensor_address").bind("ids", 1)
    assert str(e.value) == "x: TensorRT refused the device address of 'ids'."
    with pytest.raises(RuntimeError) as e:
        session(fail="execute_async_v3").enqueue(0)
    assert str(e.value) == "x: TensorRT execute_async_v3 failed: execute_async_v3 failed: illegal address"


def test_enum_names():
    assert api._name(DataType.HALF) == "HALF"
    assert api._name("ErrorCode.UNSUPPORTED_NODE") == "UNSUPPORTED_NODE"
