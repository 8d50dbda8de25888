"""The one module that touches ``tensorrt``: building a serialized engine, and running one.

Kept thin so that every TensorRT name used here can be checked, in CI, against NVIDIA's real Python
bindings of the oldest and newest supported versions (tests/trt/test_api_conformance.py runs these
functions against a checking proxy of the real module). Version differences are explicit branches on
``trt.__version__``, never ``hasattr`` guesses:

* TensorRT 11 networks are always strongly typed and the ``STRONGLY_TYPED`` creation flag is deprecated
  (ignored), so 11.x creates networks with no flags; 10.x must pass ``STRONGLY_TYPED``.
* ``HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY`` exists from 10.9 (not in JetPack 6's 10.3).
* Builder precision flags (``BuilderFlag.FP16/INT8``), calibrators and ``platform_has_fast_fp16`` are gone
  in 11 and never used: precision comes from the ONNX graph.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmopt_runtime.trt.compat import parse_version
from mmopt_runtime.trt.errors import (EngineBuildError, EngineLoadError, EngineRunError, OnnxParseError,
                                      TensorRTFeatureUnavailable, TensorRTUnavailable, parser_error_message)
from mmopt_runtime.trt.profiles import Profile

# API present only from some TensorRT version on: name -> first version that has it. The conformance
# test requires every ``trt.`` name used here that a tested version lacks to be listed, and guarded.
SINCE: dict[str, tuple[int, int]] = {"HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY": (10, 9)}

# TensorRT's DataType names -> numpy dtype names (bfloat16 only through torch memory: numpy has none)
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
MODULES = ("tensorrt", "tensorrt_lean")  # full TensorRT first; the lean runtime runs version-compatible plans
HOW_TO_INSTALL = ("Install TensorRT's Python bindings where the engines run (JetPack: `sudo apt install "
                  "python3-libnvinfer` and a venv made with --system-site-packages; x86_64: pip install tensorrt, or "
                  "tensorrt-lean for version-compatible engines) with cuda-python, or run the ONNX graphs on ONNX "
                  "Runtime.")

_state: dict[str, Any] = {}


def load() -> Any:
    """The ``tensorrt`` module, else the lean runtime's ``tensorrt_lean``, else ``TensorRTUnavailable`` saying
    what is missing."""
    problems, broken = [], []
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as e:  # OSError: bindings present, libnvinfer missing
            problems.append(f"{name}: {type(e).__name__}: {e}")
            if not isinstance(e, ModuleNotFoundError) or e.name != name:  # installed, but broken
                broken.append(f"{type(e).__name__}: {e}")
    err = TensorRTUnavailable(f"TensorRT cannot be imported here ({'; '.join(problems)}).\n{HOW_TO_INSTALL}")
    err.reason = f"TensorRT cannot be imported ({broken[0]})" if broken else \
        f"TensorRT cannot be imported: neither {' nor '.join(MODULES)} is installed"
    raise err from None


def is_lean(trt: Any) -> bool:
    """The lean runtime: it deserialises and runs version-compatible engines; it cannot build or parse ONNX."""
    return trt is sys.modules.get("tensorrt_lean")


def version(trt: Any) -> tuple[int, ...]:
    return parse_version(trt.__version__)


def _at_least(trt: Any, since: tuple[int, int]) -> bool:
    return version(trt)[:2] >= since


def _logger(trt: Any) -> Any:
    """One process-wide logger that keeps TensorRT's errors for mmopt's messages.

    TensorRT registers the first logger a process passes it and keeps using that one, so a fresh
    logger per build would silently receive nothing: this is created once and drained per call.
    """
    if "logger" not in _state:
        errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
        warning = trt.ILogger.Severity.WARNING

        class CollectingLogger(trt.ILogger):
            def __init__(self) -> None:
                super().__init__()
                self.errors: list[str] = []
                self.warnings: list[str] = []

            def log(self, level: Any, msg: str) -> None:
                if level in errors:
                    self.errors.append(msg)
                elif level == warning:
                    self.warnings.append(msg)

            def drain(self) -> tuple[list[str], list[str]]:
                out = (self.errors, self.warnings)
                self.errors, self.warnings = [], []
                return out

        _state["logger"] = CollectingLogger()
    return _state["logger"]


def tensorrt_version() -> str:
    return str(load().__version__)


# ---- build --------------------------------------------------------------------------------------

@dataclass
class BuiltEngine:
    engine: bytes
    timing_cache: bytes | None
    timing_cache_note: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def _network_flags(trt: Any) -> int:
    if version(trt)[0] >= 11:
        return 0  # always strongly typed; the flag is deprecated and ignored in 11
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _hardware_level(trt: Any, level: str) -> Any:
    if level == "none":
        return trt.HardwareCompatibilityLevel.NONE
    if level == "ampere+":
        return trt.HardwareCompatibilityLevel.AMPERE_PLUS
    since = SINCE["HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"]
    if not _at_least(trt, since):
        raise TensorRTFeatureUnavailable(
            f"--hardware-compat same_compute_capability needs TensorRT >= {since[0]}.{since[1]}; this is TensorRT "
            f"{trt.__version__} (JetPack 6 ships 10.3). Use the default (none: this GPU's compute capability "
            "with a warning on other models) or ampere+.")
    return trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


def _name(member: Any) -> str:
    """An enum member's name. Not ``.name``: that is a method on 10.x's parser ``ErrorCode``."""
    return str(member).rsplit(".", 1)[-1]


def _parser_errors(parser: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append({"code": _name(e.code()), "desc": e.desc(), "node": e.node(), "node_name": e.node_name(),
                    "op": e.node_operator()})
    return out


def _tensors(count: int, get: Any) -> dict[str, str]:
    return {t.name: _name(t.dtype) for t in (get(i) for i in range(count))}


def _attach_timing_cache(config: Any, blob: bytes) -> str:
    cache = config.create_timing_cache(blob)
    if config.set_timing_cache(cache, False):
        return "reused" if blob else "new"
    # A cache made by another GPU or TensorRT version is rejected: tune from scratch, then replace it.
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return "replaced (it was made by another GPU or TensorRT version)"


def build_engine(onnx_path: Path, profiles: Sequence[Profile], options: Any,
                 timing_cache: bytes | None) -> BuiltEngine:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine.

    ``options`` has ``mmopt.trt.options.BuildOptions``' fields (workspace_mib, optimization_level,
    sparse_weights, version_compatible, hardware_compatibility). ``timing_cache`` is the persistent cache's
    content (``b""`` for a new one, None for none); the updated cache comes back in the result for the caller
    to save.
    """
    trt = load()
    if is_lean(trt):
        raise TensorRTUnavailable(f"only TensorRT's lean runtime ({trt.__version__}) is installed here: it runs "
                                  "version-compatible engines but cannot build one. Building needs full TensorRT.")
    logger = _logger(trt)
    logger.drain()
    level = _hardware_level(trt, options.hardware_compatibility)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise OnnxParseError(parser_error_message(Path(onnx_path).name, trt.__version__, _parser_errors(parser),
                                                  logger.drain()[0]))
    inputs = _tensors(network.num_inputs, network.get_input)
    outputs = _tensors(network.num_outputs, network.get_output)
    for p in profiles:
        if set(p.shapes) != set(inputs):
            raise EngineBuildError(f"{Path(onnx_path).name}: the graph's inputs {sorted(inputs)} differ from the "
                                   f"bundle's captured inputs {sorted(p.shapes)}; re-run `mmopt export`.")

    config = builder.create_builder_config()
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.hardware_compatibility_level = level
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, s in p.shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"{Path(onnx_path).name}: TensorRT rejected profile '{p.name}': "
                                   + "; ".join(logger.drain()[0]))
    note = "disabled" if timing_cache is None else _attach_timing_cache(config, timing_cache)

    serialized = builder.build_serialized_network(network, config)
    errors, warnings = logger.drain()
    if serialized is None:
        raise EngineBuildError(f"{Path(onnx_path).name}: TensorRT {trt.__version__} could not build an engine:\n  "
                               + "\n  ".join(errors or ["(no error was logged)"])
                               + "\nA smaller --workspace-mib limit or a narrower --profile can cause this; so can "
                                 "an op TensorRT parses but cannot run at this precision on this GPU.")
    cache = bytes(config.get_timing_cache().serialize()) if timing_cache is not None else None
    return BuiltEngine(bytes(serialized), cache, note, inputs, outputs, warnings)


# ---- run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IOTensor:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # -1 for dynamic axes
    is_input: bool


class EngineSession:
    """A deserialised engine with one execution context. TensorRT calls only: memory is the caller's.

    Addresses and stream handles are plain ints, so any CUDA memory owner (torch, cuda-python) works.
    """

    def __init__(self, engine: bytes, allow_host_code: bool = False, name: str = "engine"):
        trt = load()
        self.name = name
        self._logger = _logger(trt)
        self._logger.drain()
        self._runtime = trt.Runtime(self._logger)
        if allow_host_code:
            # Version-compatible plans carry TensorRT's lean runtime, i.e. code: allowed only for plans
            # whose sha256 matched their sidecar.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise EngineLoadError(f"{name}: TensorRT {trt.__version__} refused to deserialise the engine:\n  "
                                  + "\n  ".join(self._logger.drain()[0] or ["(no error was logged)"])
                                  + "\nRebuild it on this device with `mmopt build`.")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineLoadError(f"{name}: TensorRT could not create an execution context (GPU memory full?): "
                                  + "; ".join(self._logger.drain()[0]))
        engine_ = self._engine
        self.io: list[IOTensor] = []
        for tname in (engine_.get_tensor_name(i) for i in range(engine_.num_io_tensors)):
            dtype = _name(engine_.get_tensor_dtype(tname))
            if dtype not in DTYPES:
                raise EngineLoadError(f"{name}: I/O tensor '{tname}' has TensorRT type {dtype}, which mmopt "
                                      f"cannot feed from numpy ({', '.join(DTYPES)}).")
            self.io.append(IOTensor(tname, DTYPES[dtype], tuple(engine_.get_tensor_shape(tname)),
                                    engine_.get_tensor_mode(tname) == trt.TensorIOMode.INPUT))
        self.profiles = [{t.name: tuple(tuple(d) for d in engine_.get_tensor_profile_shape(t.name, p))
                          for t in self.io if t.is_input} for p in range(engine_.num_optimization_profiles)]
        self.device_memory_bytes = int(engine_.device_memory_size_v2)
        self.active_profile = 0

    def set_profile(self, index: int, stream: int) -> None:
        if not self._context.set_optimization_profile_async(index, stream):
            raise EngineLoadError(f"{self.name}: TensorRT refused optimization profile {index}: "
                                  + "; ".join(self._logger.drain()[0]))
        self.active_profile = index

    def set_input_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """Set every input's shape for the next call; returns every output's resulting shape."""
        for tname, shape in shapes.items():
            if not self._context.set_input_shape(tname, tuple(int(s) for s in shape)):
                raise EngineLoadError(f"{self.name}: TensorRT refused shape {tuple(shape)} for '{tname}' in profile "
                                      f"{self.active_profile}: " + "; ".join(self._logger.drain()[0]))
        unresolved = self._context.infer_shapes()
        if unresolved:
            raise EngineLoadError(f"{self.name}: output shapes not computable; missing shapes for {unresolved}.")
        out = {t.name: tuple(self._context.get_tensor_shape(t.name)) for t in self.io if not t.is_input}
        unknown = sorted(n for n, shape in out.items() if any(d < 0 for d in shape))
        if unknown:
            raise EngineLoadError(f"{self.name}: outputs {unknown} have data-dependent shapes (e.g. after NonZero); "
                                  "mmopt's runner needs output shapes that follow from the input shapes.")
        return out

    def bind(self, tname: str, address: int) -> None:
        if not self._context.set_tensor_address(tname, address):
            raise EngineLoadError(f"{self.name}: TensorRT refused the device address of '{tname}'.")

    def enqueue(self, stream: int) -> None:
        """Queue one inference on ``stream`` (``execute_async_v3``); the caller synchronises."""
        if not self._context.execute_async_v3(stream):
            raise EngineRunError(f"{self.name}: TensorRT execute_async_v3 failed: "
                                 + "; ".join(self._logger.drain()[0]))

    def close(self) -> None:
        self._context = self._engine = self._runtime = None
