"""The build and run scenarios the conformance driver plays through mmopt's real code.

Runs inside the driver's interpreter, where ``tensorrt`` is the checking proxy. A ``World`` answers
the values a real TensorRT would compute (the parsed graph's tensors, engine I/O, output shapes) from
the fake bundle, and can be told to fail one call (``world.fail``) to walk mmopt's error paths.
Nothing here pretends to build or run an engine: the engine bytes are the proxy's placeholder.
"""
from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

import trt_fake_bundle as fake_bundle
import trt_protocol as protocol
from trt_checking_proxy import Checker, parse_signatures

FAKE_GPU_NAME = "FAKE GPU (conformance test: no GPU exists here)"
ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64",
               onnx.TensorProto.INT32: "INT32", onnx.TensorProto.BOOL: "BOOL"}


class FakeDeviceMemory:
    """Stands in for torch / cuda-python device memory: numbered fake addresses, zero outputs."""

    kind = "fake"
    stream = 0x5EED

    def __init__(self) -> None:
        self.buffers: dict[str, tuple[tuple[int, ...], str]] = {}
        self.addresses: dict[str, int] = {}
        self.captures = self.replays = 0

    def put(self, name: str, array: np.ndarray, dtype: str) -> int:
        return self.empty(name, tuple(array.shape), dtype)

    def empty(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        self.buffers[name] = (tuple(shape), dtype)
        return self.addresses.setdefault(name, 0x1000 * (len(self.addresses) + 1))

    def get(self, name: str) -> np.ndarray:
        shape, dtype = self.buffers[name]
        return np.zeros(shape, dtype)

    def capture(self, fn: Callable[[], None]) -> str:
        fn()
        self.captures += 1
        return "fake-graph"

    def replay(self, graph: Any) -> None:
        self.replays += 1

    def close(self) -> None:
        pass


class World:
    def __init__(self, checker: Checker, real: Any):
        self.c, self.real = checker, real
        self.fail: set[str] = set()
        self.graph: onnx.GraphProto | None = None
        self.component = "image"
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        # Engines and contexts a package loads, by id: (component, its profiles). A package holds several
        # engines at once, so each answers for its own component; an engine run from a bundle answers for
        # ``self.component``. ``load_order``: the components whose engines a package loads next, in order
        # (what an engine built into the runtime's cache, whose bytes are the proxy's placeholder, is).
        self.owner: dict[int, tuple[str, list[dict]]] = {}
        self.load_order: list[str] = []

    def _dtype(self, elem: int) -> Any:
        return getattr(self.real.DataType, ONNX_TO_TRT[elem])

    def _tensor(self, value: onnx.ValueInfoProto) -> Any:
        name = "renamed_by_tensorrt" if "inputs" in self.fail else value.name
        return self.c.instance("ITensor", name=name, dtype=self._dtype(value.type.tensor_type.elem_type))

    def _comp(self, obj: Any = None) -> str:
        return self.owner.get(id(obj), (self.component, None))[0]

    def _io(self, obj: Any = None) -> list[tuple[Any, bool]]:
        comp = fake_bundle.COMPONENTS[self._comp(obj)]
        return [(t, True) for t in comp.inputs] + [(t, False) for t in comp.outputs]

    def _spec(self, name: str) -> Any:  # tensor names are unique across the fake components
        return next(t for c in fake_bundle.COMPONENTS.values() for t in (*c.inputs, *c.outputs) if t.name == name)

    def _engine(self, data: Any) -> Any:
        """The engine TensorRT would deserialise from ``data``: a package's FAKE engine names its component;
        one built into the runtime's cache is the next graph built; else the scenario's component."""
        engine = self.c.instance("ICudaEngine")
        raw = bytes(data)
        if raw.startswith(b"FAKE ENGINE from "):
            comp = raw[len(b"FAKE ENGINE from "):].decode().split(".")[0]
            self.load_order = [c for c in self.load_order if c != comp]
        elif self.load_order:
            comp = self.load_order.pop(0)
        else:
            return engine
        spec = fake_bundle.COMPONENTS[comp]
        self.owner[id(engine)] = (comp, [{"shapes": {t.name: dict(t.shapes) for t in spec.inputs}}])
        return engine

    def _context(self, engine: Any) -> Any:
        ctx = self.c.instance("IExecutionContext")
        if id(engine) in self.owner:
            self.owner[id(ctx)] = self.owner[id(engine)]
        return ctx

    def _output_shape(self, ctx: Any, name: str) -> Any:
        sizes = {}
        for t in fake_bundle.COMPONENTS[self._comp(ctx)].inputs:
            for d, s in zip(t.shape, self.input_shapes[t.name]):
                sizes[d] = s
        if "dynamic_output" in self.fail:
            return self.real.Dims([-1 for _ in self._spec(name).shape])
        return self.real.Dims([sizes.get(d, d) for d in self._spec(name).shape])

    def _parse(self, parser: Any, path: str) -> bool:
        self.graph = onnx.load(path, load_external_data=False).graph
        return "parse" not in self.fail

    def _set_cache(self, config: Any, cache: Any, ignore_mismatch: bool) -> bool:
        if "cache" in self.fail:  # reject the stored cache once, as TensorRT does one from another GPU
            self.fail.discard("cache")
            return False
        return True

    def _set_shape(self, ctx: Any, name: str, shape: tuple) -> bool:
        self.input_shapes[name] = tuple(shape)
        return "set_shape" not in self.fail

    def overrides(self) -> dict[str, Any]:
        r, c, f = self.real, self.c, self.fail
        io = self._io
        return {
            "OnnxParser.parse_from_file": self._parse,
            "OnnxParser.num_errors": lambda p: 2 if "parse" in f else 0,
            "OnnxParser.get_error": lambda p, i: c.instance("ParserError"),
            "ParserError.code": lambda e: r.ErrorCode.UNSUPPORTED_NODE,
            "ParserError.desc": "No importer registered for op: MatMulInteger",
            "ParserError.node": 3,
            "ParserError.node_name": "/text/MatMulInteger_3",
            "ParserError.node_operator": "MatMulInteger",
            "INetworkDefinition.num_inputs": lambda n: len(self.graph.input),
            "INetworkDefinition.num_outputs": lambda n: len(self.graph.output),
            "INetworkDefinition.get_input": lambda n, i: self._tensor(self.graph.input[i]),
            "INetworkDefinition.get_output": lambda n, i: self._tensor(self.graph.output[i]),
            "IBuilderConfig.add_optimization_profile": lambda cfg, p: -1 if "profile" in f else 0,
            "IBuilderConfig.set_timing_cache": self._set_cache,
            "Builder.build_serialized_network": lambda b, *a: None if "build" in f else c.instance("IHostMemory"),
            "Runtime.deserialize_cuda_engine": lambda rt, data: None if "deserialize" in f else self._engine(data),
            "ICudaEngine.create_execution_context": lambda e, *a: None if "context" in f else self._context(e),
            "ICudaEngine.num_io_tensors": lambda e: len(io(e)),
            "ICudaEngine.get_tensor_name": lambda e, i: io(e)[i][0].name,
            "ICudaEngine.get_tensor_mode": lambda e, n: r.TensorIOMode.INPUT if any(
                t.name == n and is_in for t, is_in in io(e)) else r.TensorIOMode.OUTPUT,
            "ICudaEngine.get_tensor_dtype": lambda e, n: r.DataType.FP8 if "dtype" in f else getattr(
                r.DataType, {"float32": "FLOAT", "int64": "INT64"}[self._spec(n).dtype]),
            "ICudaEngine.get_tensor_shape": lambda e, n: r.Dims([-1 if isinstance(d, str) else d
                                                                 for d in self._spec(n).shape]),
            "ICudaEngine.num_optimization_profiles": lambda e: len(self.profiles(e)),
            "ICudaEngine.get_tensor_profile_shape": lambda e, n, p: [
                r.Dims(list(self.profiles(e)[p]["shapes"][n][s])) for s in ("min", "opt", "max")],
            "ICudaEngine.device_memory_size_v2": 1 << 20,
            "IExecutionContext.set_optimization_profile_async": lambda ctx, i, s: "set_profile" not in f,
            "IExecutionContext.set_input_shape": self._set_shape,
            "IExecutionContext.infer_shapes": lambda ctx: ["text_hidden"] if "infer_shapes" in f else [],
            "IExecutionContext.get_tensor_shape": lambda ctx, n: self._output_shape(ctx, n),
            "IExecutionContext.set_tensor_address": lambda ctx, n, a: "address" not in f,
            "IExecutionContext.execute_async_v3": lambda ctx, s: "execute" not in f,
        }

    def profiles(self, engine: Any = None) -> list[dict]:
        if id(engine) in self.owner:
            return self.owner[id(engine)][1]
        return json.loads((self.bundle / f"{self.component}.fp16.engine.json").read_text())["profiles"]


def sample_objects(checker: Checker) -> dict[str, Any]:
    """Objects a snippet can use: one proxy per main TensorRT class."""
    names = {"builder": "Builder", "network": "INetworkDefinition", "config": "IBuilderConfig",
             "parser": "OnnxParser", "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext"}
    return {k: checker.instance(v) for k, v in names.items() if hasattr(checker.real, v)}  # lean: run classes only


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        detail = fn()
        return {"ok": True, "detail": detail}
    except Exception as e:  # recorded; the test decides which outcomes are expected
        return {"ok": False, "error": type(e).__name__, "message": str(e)[:1500],
                "trace": traceback.format_exc(limit=-3)[-1500:]}


def run_all(checker: Checker) -> dict[str, Any]:
    import tensorrt as trt_proxy

    from mmopt.runners.tensorrt import TensorRTRunner
    from mmopt.trt import device
    from mmopt_runtime.trt import api
    from mmopt.jobs.build import build_engines
    from mmopt.trt.options import BuildOptions

    real = checker.real
    world = World(checker, real)
    checker.overrides.update(world.overrides())
    device.current_gpu = lambda index=0: device.GpuInfo(FAKE_GPU_NAME, "8.7", index, True, "fake")
    tmp = Path(tempfile.mkdtemp(prefix="mmopt-trt-conformance-"))
    bundle = world.bundle = fake_bundle.make_bundle(tmp / "bundle")
    cache = tmp / "cache" / "trt-timing.cache"
    out: dict[str, Any] = {}

    def play(fn: Callable[[], Any]) -> dict[str, Any]:
        """The scenario's outcome, and TensorRT's rules replayed on the calls it made (trt_protocol)."""
        first = len(checker.calls)
        world.component = "image"
        result = _outcome(fn)
        sidecar = bundle / f"{world.component}.fp16.engine.json"
        vc = json.loads(sidecar.read_text())["build_options"]["version_compatible"] if sidecar.exists() else None
        comp = fake_bundle.COMPONENTS[world.component]
        result["protocol"] = protocol.replay(checker.calls[first:], {t.name for t in comp.inputs}, vc,
                                             {t.name for t in comp.outputs})
        return result

    def build(precision: str | None, **kw: Any) -> list[dict]:
        """What each engine's sidecar recorded of its build (the values api.build_engine returned)."""
        out = []
        for a in build_engines(bundle, precision, BuildOptions(**kw)):
            side = json.loads((bundle / f"{a.file}.json").read_text())
            out.append({"file": a.file, "io": side["io"], "timing_cache": side["timing_cache"]["status"],
                        "cache_written": side["timing_cache"]["sha256"] is not None})
        return out

    def failing(flag: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            world.fail.add(flag)
            try:
                return fn()
            finally:
                world.fail.clear()
        return run

    out["build_fp16_all_options"] = play(lambda: build(
        "fp16", workspace_mib=256, optimization_level=2, sparse_weights=True, version_compatible=True,
        hardware_compatibility="ampere+", profiles=({"batch": 1},), timing_cache=cache))
    out["build_all_precisions_cache_reused"] = play(lambda: build(None, timing_cache=cache))
    out["build_same_compute_capability"] = play(lambda: build(
        "fp32", hardware_compatibility="same_compute_capability", timing_cache=None))
    out["timing_cache_mismatch"] = play(failing("cache", lambda: build("fp32", timing_cache=cache)))
    for flag in ("parse", "inputs", "profile", "build"):
        out[f"build_fails_{flag}"] = play(failing(flag, lambda: build("fp32", timing_cache=None)))
    out["build_fp16_for_runtime"] = play(lambda: build(
        "fp16", version_compatible=True, profiles=({"batch": 1},), timing_cache=None))

    def run(component: str, shapes: list[dict[str, tuple[int, ...]]], cuda_graph: bool = False) -> dict:
        world.component = component
        mem = FakeDeviceMemory()
        runner = TensorRTRunner.from_bundle(bundle, component, "fp16", memory=mem, cuda_graph=cuda_graph)
        results = []
        with runner:
            for feed_shapes in shapes:
                feeds = {n: np.zeros(s, np.float32 if component == "image" else np.int64)
                         for n, s in feed_shapes.items()}
                results.append({k: list(v.shape) for k, v in runner.infer(feeds).items()})
        return {"outputs": results, "captures": mem.captures, "replays": mem.replays, "warnings": runner.warnings}

    out["run_image_two_profiles"] = play(lambda: run("image", [{"pixel_values": (4, 3, 8, 8)},
                                                                   {"pixel_values": (1, 3, 8, 8)}]))
    out["run_text_cuda_graph"] = play(lambda: run("text", [{"input_ids": (2, 5)}] * 3, cuda_graph=True))
    for flag in ("deserialize", "context", "dtype", "set_profile", "set_shape", "infer_shapes", "dynamic_output",
                 "address", "execute"):
        out[f"run_fails_{flag}"] = play(failing(flag, lambda: run("image", [{"pixel_values": (4, 3, 8, 8)},
                                                                               {"pixel_values": (1, 3, 8, 8)}])))

    def logger() -> dict:
        lg = api._logger(trt_proxy)
        lg.drain()
        for sev in ("ERROR", "INTERNAL_ERROR", "WARNING", "INFO", "VERBOSE"):
            lg.log(getattr(real.ILogger.Severity, sev), f"a {sev} message")
        errors, warnings = lg.drain()
        return {"errors": errors, "warnings": warnings}

    out["logger_sorts_messages"] = play(logger)
    _check_logger_overrides(checker, type(api._state["logger"]), real.ILogger)

    def no_tensorrt() -> None:
        saved = sys.modules["tensorrt"]
        sys.modules["tensorrt"] = None  # makes `import tensorrt` raise ImportError
        try:
            api.load()
        finally:
            sys.modules["tensorrt"] = saved

    out["load_without_tensorrt"] = play(no_tensorrt)

    def broken_tensorrt() -> None:
        """The bindings present but libnvinfer missing: the import itself fails with OSError."""
        import importlib.abc

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):  # noqa: ANN001
                if name == "tensorrt":
                    raise OSError("libnvinfer.so.10: cannot open shared object file")
                return None

        saved = sys.modules.pop("tensorrt")
        sys.meta_path.insert(0, Broken())
        try:
            api.load()
        finally:
            sys.meta_path.pop(0)
            sys.modules["tensorrt"] = saved

    out["load_with_broken_tensorrt"] = play(broken_tensorrt)
    out.update(package_scenarios(checker, world, tmp, lean=False))
    return out


def run_lean(checker: Checker) -> dict[str, Any]:
    """A device with only TensorRT's lean runtime (``tensorrt_lean``): it runs version-compatible engine sets,
    refuses the others by name, cannot build, and falls back to ONNX Runtime saying so."""
    from mmopt_runtime.trt import api

    world = World(checker, checker.real)
    checker.overrides.update(world.overrides())
    tmp = Path(tempfile.mkdtemp(prefix="mmopt-trt-lean-"))
    world.bundle = fake_bundle.make_bundle(tmp / "bundle")
    out = package_scenarios(checker, world, tmp, lean=True)

    def build() -> None:
        api.build_engine(world.bundle / "image.onnx", [], None, None)

    out["lean_build_refused"] = _outcome(build)
    return out


def package_scenarios(checker: Checker, world: World, tmp: Path, lean: bool) -> dict[str, Any]:
    """The device runtime's decision order on packages of the fake bundle whose engine sets name this (FAKE)
    GPU and the bindings' TensorRT version, or another one; engines built into the runtime's cache."""
    from mmopt_runtime import Package
    from mmopt_runtime.trt import device as rt_device
    from mmopt_runtime.trt import memory as rt_memory

    gpu = [rt_device.GpuInfo(FAKE_GPU_NAME, "8.7", 0, True, "fake")]
    rt_device.current_gpu = lambda index=0: gpu[0]
    mems: list[FakeDeviceMemory] = []
    rt_memory.cuda_python_memory = lambda index=0: mems.append(FakeDeviceMemory()) or mems[-1]
    version, platform = checker.real.__version__, rt_device.platform_tag()
    major = int(version.split(".")[0])
    here = fake_bundle.fake_engine_set(version, "8.7", platform, gpu=FAKE_GPU_NAME)
    other_sm = fake_bundle.fake_engine_set(version, "9.0", platform, gpu="FAKE H200")
    older_vc = fake_bundle.fake_engine_set("10.0.1" if major >= 10 else "8.6.1", "8.7", platform, vc=True)
    newer = fake_bundle.fake_engine_set(f"{major}.99.0", "8.7", platform, vc=True)
    cache = tmp / "engine-cache"
    feeds = {"pixel_values": np.zeros((4, 3, 8, 8), np.float32), "input_ids": np.zeros((4, 6), np.int64)}
    count = [0]

    def load(sets: list[tuple], **kw: Any) -> dict[str, Any]:
        count[0] += 1
        folder = tmp / f"pkg-{count[0]}"
        fake_bundle.make_package(folder, world.bundle, sets)
        world.load_order = ["image", "text"]
        mems.clear()
        with Package.load(folder, selftest=False, engine_cache=cache, **kw) as pkg:
            outputs = {k: list(v.shape) for k, v in pkg.infer(feeds).items()}
            plan = pkg.plan.to_json()
        return {"plan": plan, "outputs": outputs, "memories": len(mems)}

    def play(fn: Callable[[], Any], vc: bool | None = None) -> dict[str, Any]:
        first = len(checker.calls)
        result = _outcome(fn)
        # two engines run interleaved, so the per-context rules are replayed without tensor names
        result["protocol"] = protocol.replay(checker.calls[first:], None, vc, None)
        return result

    out: dict[str, Any] = {}
    if not lean:
        out["package_exact_set"] = play(lambda: load([other_sm, older_vc, here], backend="tensorrt"), vc=False)
        out["package_version_compatible_set"] = play(lambda: load([other_sm, newer, older_vc]), vc=True)
        out["package_builds_engines_into_the_cache"] = play(lambda: [load([other_sm], backend="tensorrt"),
                                                                     load([], backend="tensorrt")], vc=False)

        def no_gpu() -> dict[str, Any]:
            gpu[0] = None
            try:
                return load([here], backend="tensorrt")
            finally:
                gpu[0] = rt_device.GpuInfo(FAKE_GPU_NAME, "8.7", 0, True, "fake")

        out["package_without_a_gpu_refused"] = play(no_gpu)

        def refused_engine() -> dict[str, Any]:
            world.fail.add("deserialize")
            try:
                return load([here])
            finally:
                world.fail.clear()

        out["package_engine_refused_falls_back"] = play(refused_engine)
    else:
        out["lean_runs_a_version_compatible_set"] = play(lambda: load([here, older_vc], backend="tensorrt"), vc=True)
        out["lean_cannot_build_refused"] = play(lambda: load([here], backend="tensorrt"))
        out["lean_falls_back_to_onnxruntime"] = play(lambda: load([here]))
    return out


def _check_logger_overrides(checker: Checker, cls: type, base: type) -> None:
    """mmopt's Python ILogger subclass: what it overrides must exist on the real ILogger, same arity."""
    for name, fn in vars(cls).items():
        if name.startswith("_") or not callable(fn) or name == "drain":  # drain is mmopt's own
            continue
        real = getattr(base, name, None)
        if real is None:
            checker.violate(f"ILogger.{name} (overridden by mmopt's logger) does not exist in "
                            f"TensorRT {checker.version}")
            continue
        sigs = parse_signatures(real.__doc__)
        if sigs and all(len(s.params) != fn.__code__.co_argcount for s in sigs):
            checker.violate(f"mmopt's logger overrides ILogger.{name} with {fn.__code__.co_argcount} parameters; "
                            f"TensorRT {checker.version} calls {sigs[0].text}")
