"""``mmopt build``: one TensorRT engine per component of a bundle, built on the GPU that will run it.

Each engine is built from the bundle's final ONNX graph at a precision, as a strongly typed network
(precision comes from the graph), with the captured min / opt / max profile plus any extra ones, and
lands in the bundle as ``<component>.<precision>.engine`` beside a ``.engine.json`` sidecar that
records everything the runtime checks before loading it. The bundle is updated atomically.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmopt.errors import BundleError, UsageError
from mmopt.manifest import Artifact, Manifest, staged_bundle
from mmopt.progress import Progress
from mmopt.spec import CPU_ONLY
from mmopt.store import atomic_write
from mmopt.trt import device
from mmopt.trt.errors import HOW_TO_BUILD, OnnxParseError, TensorRTUnavailable
from mmopt_runtime.trt import api
from mmopt_runtime.trt.compat import parse_cc
from mmopt.trt.graph import inspect_graph, unsupported_message
from mmopt.trt.options import BuildOptions
from mmopt.trt.profiles import Profile, check_overrides, profiles_for

SIDECAR_SCHEMA = 1


@dataclass(frozen=True)
class BuildEnvironment:
    """The machine an engine is built on, as recorded in its sidecar."""

    tensorrt: str
    gpu: device.GpuInfo
    platform: str
    l4t: str | None = None


def preflight() -> BuildEnvironment:
    """TensorRT importable and an NVIDIA GPU present, else ``TensorRTUnavailable`` (exit 1) saying how
    to build on the target device. Runs before anything else in ``build_engines``."""
    problems, version = [], None
    try:
        version = api.tensorrt_version()
    except TensorRTUnavailable as e:
        problems.append(getattr(e, "reason", str(e).splitlines()[0]))
    gpu = device.current_gpu()
    if gpu is None:
        problems.append("no NVIDIA GPU is visible (torch, cuda-python and nvidia-smi found no CUDA device)")
    if problems or version is None or gpu is None:
        raise TensorRTUnavailable("mmopt build needs TensorRT and an NVIDIA GPU on this machine:\n  - "
                                  + "\n  - ".join(problems) + "\n" + HOW_TO_BUILD)
    return BuildEnvironment(version, gpu, device.platform_tag(), device.l4t_release())


def source_artifacts(manifest: Manifest, precision: str | None) -> list[Artifact]:
    """The newest ONNX artifact (any stage but "engine") per component at ``precision``, or at every
    precision the bundle holds when None (except the ONNX Runtime CPU forms, which TensorRT cannot run)."""
    if precision == "int8-dynamic":
        raise UsageError("int8-dynamic graphs use ONNX Runtime's integer ops (MatMulInteger, ConvInteger, "
                         "DynamicQuantizeLinear), which TensorRT does not import. Build --precision int8 (static "
                         "Q/DQ) or fp16 instead.")
    if precision == "int8-cpu":
        raise UsageError("int8-cpu graphs quantize activations to uint8 with zero points, a form TensorRT does not "
                         "take (it needs symmetric int8). Build --precision int8 (TensorRT's Q/DQ form) instead.")
    wanted = [precision] if precision else [p for p in manifest.precisions() if p not in CPU_ONLY]
    found, missing = [], []
    for comp in manifest.components:
        for prec in wanted:
            art = manifest.find(comp, prec)
            if art is not None:
                found.append(art)
            elif precision:
                missing.append(comp)
    if missing or not found:
        have = sorted({f"{a.component}/{a.precision}" for a in manifest.artifacts if a.stage != "engine"})
        raise BundleError(f"the bundle has no {precision or ''} ONNX graph for component(s) "
                          f"{', '.join(missing) or 'any'}. It has: {', '.join(have) or 'nothing'}. "
                          "Produce that precision first, or pass one of those with --precision.")
    return found


def _read_cache(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        return b""


def _sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data else None


def _precision_warnings(requested: str, graph: dict[str, Any]) -> list[str]:
    found = graph["found"]
    if requested == "fp16" and found != "fp16":
        return [f"the fp16 graph holds no float16 tensors; the strongly typed engine runs it as {found}."]
    if requested == "int8" and not graph["qdq_nodes"]:
        return [f"the int8 graph has no Q/DQ nodes; the strongly typed engine runs it as {found}."]
    return []


def make_sidecar(src: Artifact, engine_file: str, built: api.BuiltEngine, env: BuildEnvironment,
                 profiles: list[Profile], options: BuildOptions, graph: dict[str, Any], seconds: float,
                 cache_before: bytes | None) -> dict[str, Any]:
    """What the runtime checks before loading the engine, and what a reader needs to trust it."""
    return {
        "schema": SIDECAR_SCHEMA,
        "engine": {"component": src.component, "precision": src.precision, "file": engine_file,
                   "sha256": _sha(built.engine), "bytes": len(built.engine)},
        "source_onnx": {"artifact": src.id, "file": src.file, "sha256": src.sha256},
        "tensorrt": {"version": env.tensorrt},
        "gpu": {"name": env.gpu.name, "compute_capability": env.gpu.compute_capability,
                "integrated": env.gpu.integrated},
        "platform": env.platform,
        "l4t": env.l4t,
        "profiles": [p.to_json() for p in profiles],
        "graph_precision": {"requested": src.precision, "found": graph["found"], "qdq_nodes": graph["qdq_nodes"],
                            "initializer_dtypes": graph["initializer_dtypes"]},
        "io": {"inputs": built.inputs, "outputs": built.outputs},
        "build_options": options.to_json(),
        "timing_cache": {"path": str(options.timing_cache) if options.timing_cache else None,
                         "sha256_before": _sha(cache_before), "sha256": _sha(built.timing_cache),
                         "status": built.timing_cache_note},
        "build_seconds": round(seconds, 3),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "warnings": _precision_warnings(src.precision, graph) + built.warnings[:20],
    }


def build_engines(bundle: str | Path, precision: str | None = None, options: BuildOptions | None = None,
                  progress: Any = None) -> list[Artifact]:
    """Build an engine per component (at ``precision``, or every precision the bundle has) into ``bundle``.

    Refuses to start without TensorRT and a GPU (``TensorRTUnavailable``). Everything that can be
    checked without building (options, profiles, ops TensorRT cannot import) is checked for every
    component first; then each engine is built and the bundle replaced in one step at the end.
    """
    env = preflight()
    options = (options or BuildOptions()).validate()
    progress = progress or Progress()
    bundle = Path(bundle).resolve()
    Manifest.read_verified(bundle)  # a bad bundle fails before the lock is waited for
    if options.hardware_compatibility == "ampere+" and parse_cc(env.gpu.compute_capability) < (8, 0):
        raise UsageError(f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; this "
                         f"{env.gpu.name} has compute capability {env.gpu.compute_capability}.")
    with staged_bundle(bundle, keep_existing=True) as stage:
        # Sources, checks and sidecar hashes come from the manifest read under the lock.
        out = Manifest.read_verified(stage)
        sources = source_artifacts(out, precision)
        check_overrides([out.components[c] for c in dict.fromkeys(a.component for a in sources)], options.profiles)
        profiles = {a.component: profiles_for(out.components[a.component], options.profiles) for a in sources}
        graphs = {a.id: inspect_graph(out.file(stage, a)) for a in sources}
        blocked = [unsupported_message(a.file, graphs[a.id]["unsupported_nodes"]) for a in sources
                   if graphs[a.id]["unsupported_nodes"]]
        if blocked:
            raise OnnxParseError("\n".join(blocked))
        cache = _read_cache(options.timing_cache)
        with progress.task(f"build TensorRT {env.tensorrt} engines on {env.gpu.name}", len(sources)) as advance:
            built = _build_all(out, stage, sources, profiles, graphs, options, env, cache, progress, advance)
        out.tools["tensorrt"] = env.tensorrt
        out.write(stage)
    return built


def _build_all(out: Manifest, stage: Path, sources: list[Artifact], profiles: dict, graphs: dict,
               options: BuildOptions, env: BuildEnvironment, cache: bytes | None, progress: Any,
               advance: Any) -> list[Artifact]:
    """Build every source's engine into ``stage`` and record it in ``out``."""
    built = []
    for src in sources:
        progress.log(f"{src.component} ({src.precision}): building from {src.file}")
        t0 = time.perf_counter()
        result = api.build_engine(out.file(stage, src), profiles[src.component], options, cache)
        seconds = time.perf_counter() - t0
        engine_file = f"{src.component}.{src.precision}.engine"
        atomic_write(stage / engine_file, result.engine)
        sidecar = make_sidecar(src, engine_file, result, env, profiles[src.component], options,
                               graphs[src.id], seconds, cache)
        atomic_write(stage / f"{engine_file}.json", (json.dumps(sidecar, indent=2) + "\n").encode())
        if result.timing_cache is not None and options.timing_cache is not None:
            cache = result.timing_cache
            atomic_write(Path(options.timing_cache).expanduser(), cache)
        built.append(out.add(stage, src.component, "engine", src.precision, engine_file, parent=src.id,
                             config=options.to_json(), **sidecar))
        advance(1)
    return built
