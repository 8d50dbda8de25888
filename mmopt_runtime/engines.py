"""Which backend runs each component of a package on this device: the runtime's decision order.

1. ``backend="onnxruntime"``: every graph on ONNX Runtime's CPU provider (the merged graph where there is one);
   ``"onnxruntime-cuda"``: on its CUDA provider (onnxruntime-gpu), refused where this onnxruntime lacks it.
2. Otherwise TensorRT, where it can be imported (full ``tensorrt``, else the lean runtime's ``tensorrt_lean``)
   and a GPU is visible:
   a. an engine set that exactly matches this GPU's compute capability, this TensorRT version and this
      platform (``mmopt_runtime.trt.compat.decide``: the rules mmopt's own runner applies);
   b. else a version-compatible set the package allows here (built with ``--version-compatible`` by an
      equal or older TensorRT; the only kind the lean runtime can run);
   c. else, with full TensorRT, engines built here from the package's ONNX graphs into a cache keyed by the
      graph's sha256, the TensorRT version, the compute capability, the platform and the build flags
      (``engine_cache``; a later load finds them there);
3. else ONNX Runtime, and the plan says why (every set refused, with what did not match).

Components in a CPU-only precision (ONNX Runtime's integer forms) always run on ONNX Runtime. A component the
chosen set lacks is built into the cache where full TensorRT is present, else ONNX Runtime runs it. With
``backend="tensorrt"`` every other component must run on TensorRT: the load is refused instead of falling back.
Torch-free; TensorRT is imported only when a plan asks for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmopt_runtime.errors import MmoptError
from mmopt_runtime.paths import cache_dir, escape
from mmopt_runtime.trt.compat import Environment, decide

CPU_ONLY = ("int8-dynamic", "int8-cpu")  # ONNX Runtime forms TensorRT does not import
BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda")
HARDWARE_LEVELS = ("none", "ampere+", "same_compute_capability")  # what `mmopt build --hardware-compat` records
CACHE_SCHEMA = 2  # 2: the GPU model joined the key


class NoEngine(MmoptError):
    """``backend="tensorrt"`` was asked for and no engine can run here; the message says why."""


@dataclass
class Plan:
    """What runs each component: ``engines`` (component -> (engine bytes, allow host code)) on TensorRT, the
    rest on ONNX Runtime. ``source`` says where the engines come from; ``why`` why anything runs on ONNX
    Runtime; ``refused`` each engine set that cannot run here and why; ``warnings`` from the chosen set."""

    backend: str  # "tensorrt" (some or all components) or "onnxruntime"
    engines: dict[str, tuple[bytes, bool]] = field(default_factory=dict)
    source: str = ""
    why: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tensorrt: str | None = None
    ort_device: str = "cpu"  # ONNX Runtime's provider for what does not run on TensorRT: "cpu" or "cuda"

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "tensorrt": self.tensorrt, "onnxruntime": self.ort_device,
                "source": self.source,
                "on_tensorrt": sorted(self.engines), "why": self.why, "refused": self.refused,
                "warnings": self.warnings}


def default_cache() -> Path:
    """``$MMOPT_ENGINE_CACHE``, else ``~/.cache/mmopt/engines`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("MMOPT_ENGINE_CACHE"):
        return Path(os.environ["MMOPT_ENGINE_CACHE"])
    return cache_dir() / "engines"


def environment(index: int = 0) -> tuple[Any, Environment]:
    """The TensorRT module and this device's environment, or ``TensorRTUnavailable`` saying what is missing:
    TensorRT, cuda-python (the runtime's device memory: without it no engine could run, so none is chosen or
    built), or a GPU."""
    from mmopt_runtime.trt import api, device
    from mmopt_runtime.trt.errors import TensorRTUnavailable

    trt = api.load()
    try:
        device.cudart()
    except ImportError:
        err = TensorRTUnavailable("TensorRT is here but cuda-python is not (the runtime's device memory for "
                                  "engines): pip install cuda-python")
        err.reason = str(err)
        raise err from None
    gpu = device.current_gpu(index)
    if gpu is None:
        err = TensorRTUnavailable(f"no NVIDIA GPU {index} is visible here (cuda-python and nvidia-smi found none)")
        err.reason = str(err)
        raise err
    return trt, Environment(str(trt.__version__), gpu.name, gpu.compute_capability, device.platform_tag())


def set_key(record: dict[str, Any]) -> tuple:
    """What decides where an engine runs, read from its build record (a ``mmopt build`` sidecar) or from a
    package's engine set (the same fields): TensorRT version, GPU name and compute capability, platform,
    version- and hardware-compatibility. Engines with one key form one set."""
    return (record["tensorrt"]["version"], record["gpu"]["name"], record["gpu"]["compute_capability"],
            record["platform"], bool(record["build_options"]["version_compatible"]),
            record["build_options"]["hardware_compatibility"])


def set_id(key: tuple) -> str:
    """``trt10.3.0.30-sm8.7-orin-linux-aarch64``: TensorRT, compute capability, the GPU's name (so an AGX and
    a Nano of one compute capability get two sets), platform; ``-vc`` when version-compatible, ``-ampere+`` etc.
    for hardware-compatible sets. Safe as a folder name."""
    version, gpu, cc, platform, vc, hw = key
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", str(gpu).lower())).strip("-")[:32] or "gpu"
    return f"trt{version}-sm{cc}-{slug}-{platform}" + ("-vc" if vc else "") + ("" if hw == "none" else f"-{hw}")


def preference(s: dict[str, Any], warnings: list[str] = ()) -> tuple:
    """How much a loadable engine set is preferred (smaller first): one made for exactly this TensorRT before a
    version-compatible one, one for this GPU model before a hardware-compatible or another model's, the newest
    TensorRT among version-compatible ones. ``choose_set`` and Triton's plan members rank sets by it."""
    from mmopt_runtime.trt.compat import parse_version

    return (bool(s["build_options"]["version_compatible"]), s["build_options"]["hardware_compatibility"] != "none",
            len(warnings), tuple(-v for v in parse_version(s["tensorrt"]["version"])))


def choose_set(sets: list[dict[str, Any]], env: Environment, lean: bool,
               able: list[str] | None = None) -> tuple[dict[str, Any] | None, list[str], dict[str, list[str]]]:
    """The engine set to run here: of those that may (``compat.decide``; the lean runtime runs only
    version-compatible ones), the one covering most of the TensorRT-able components ``able``, then by
    ``preference``. Returns (the set or None, its warnings, {set id: why it was refused})."""
    refused: dict[str, list[str]] = {}
    ok = []
    for s in sets:
        d = decide(s, env)
        problems = list(d.errors)
        if lean and not s["build_options"]["version_compatible"]:
            problems.append("TensorRT's lean runtime runs only version-compatible engines; this set was built "
                            "without --version-compatible")
        if problems:
            refused[s["id"]] = problems
        else:
            ok.append((s, d.warnings))
    cover = (lambda s: len(set(s["components"]) & set(able))) if able is not None else (lambda s: 1)
    ok = [p for p in ok if cover(p[0])]  # a set with none of the components TensorRT can run here runs nothing
    if not ok:
        return None, [], refused
    s, warnings = min(ok, key=lambda p: (-cover(p[0]), preference(*p)))
    return s, warnings, refused


def plan(manifest: dict[str, Any], data: dict[str, bytes], backend: str, device_index: int = 0,
         engine_cache: Path | None = None, log: Callable[[str], None] | None = None) -> Plan:
    """The decision order above, for a package whose files ``data`` holds (hash-checked bytes). ``log`` hears
    of engines being built here (minutes each on a Jetson)."""
    from mmopt_runtime.trt import api
    from mmopt_runtime.trt.errors import TensorRTUnavailable

    if backend not in BACKENDS:
        raise MmoptError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    comps = manifest["components"]
    if backend == "onnxruntime":
        return Plan("onnxruntime", why=["asked for ONNX Runtime"])
    if backend == "onnxruntime-cuda":
        from mmopt_runtime.ort import available_devices

        if "cuda" not in available_devices():
            import onnxruntime

            raise NoEngine(f"--backend onnxruntime-cuda: onnxruntime {onnxruntime.__version__} here has no "
                           f"CUDAExecutionProvider ({', '.join(onnxruntime.get_available_providers())}). Install "
                           "onnxruntime-gpu (on a Jetson, NVIDIA's Jetson wheel), or use --backend auto.")
        return Plan("onnxruntime", why=["asked for ONNX Runtime's CUDA provider"], ort_device="cuda")
    able = [c for c, spec in comps.items() if spec.get("precision") not in CPU_ONLY]
    if not able:
        return _fallback(backend, "every component is in an ONNX Runtime-only precision "
                                  f"({', '.join(sorted({comps[c]['precision'] for c in comps}))})")
    try:
        trt, env = environment(device_index)
    except TensorRTUnavailable as e:
        return _fallback(backend, e.reason or str(e).splitlines()[0])
    lean = api.is_lean(trt)
    chosen, warnings, refused = choose_set(manifest.get("engines") or [], env, lean, able)
    engines: dict[str, tuple[bytes, bool]] = {}
    source = []
    if chosen is not None:
        vc = bool(chosen["build_options"]["version_compatible"])
        engines = {c: (data[e["file"]], vc) for c, e in chosen["components"].items() if c in able}
        source.append(f"{'version-compatible engine set' if vc else 'engine set'} {chosen['id']}")
    missing = [c for c in able if c not in engines]
    sets = "no engine set" if not manifest.get("engines") else \
        "no engine set that runs here" if chosen is None else f"no engine for {', '.join(missing)}"
    reason = None  # why the missing components cannot run on TensorRT here
    if missing and lean:
        reason = f"the package holds {sets}, and TensorRT's lean runtime {env.tensorrt} cannot build engines"
    elif missing:
        cache = Path(engine_cache) if engine_cache is not None else default_cache()
        built: list[str] = []
        try:
            for c in missing:
                engines[c] = (cached_engine(manifest, data, c, env, cache, log, built), False)
        except Exception as e:  # noqa: BLE001  TensorRT's own errors too (nullptr, CUDA): ONNX Runtime serves
            what = e if isinstance(e, MmoptError) else f"{type(e).__name__}: {e}"
            reason = f"the package holds {sets}, and building engines here from its ONNX graphs failed: {what}"
            for c in missing:
                engines.pop(c, None)
        else:
            how = f"built here into {cache}" if built else f"found in the engine cache {cache}"
            source.append(f"engines for {', '.join(missing)} {how} ({sets} in the package)" if chosen is not None
                          else f"engines {how} ({sets} in the package)")
    why: list[str] = []
    if reason is not None:
        if not engines or backend == "tensorrt":  # nothing left on TensorRT, or all of it was asked for
            return _fallback(backend, reason, refused)
        why.append(f"{reason}: ONNX Runtime runs {', '.join(missing)}")
    p = Plan("tensorrt", engines, "; ".join(source), why=why, refused=refused, warnings=warnings,
             tensorrt=env.tensorrt)
    return _cpu_only_note(p, comps)


def _cpu_only_note(p: Plan, comps: dict[str, Any]) -> Plan:
    for c, spec in comps.items():
        if spec.get("precision") in CPU_ONLY:
            p.why.append(f"{c} is {spec['precision']}, an ONNX Runtime-only precision: ONNX Runtime runs it")
    return p


def _fallback(backend: str, why: str, refused: dict[str, list[str]] | None = None) -> Plan:
    """ONNX Runtime for everything, saying why; under ``backend="tensorrt"`` the refusal instead."""
    refused = refused or {}
    if backend == "tensorrt":
        rows = "".join(f"\n  engine set {k}: " + "; ".join(v) for k, v in refused.items())
        raise NoEngine(f"--backend tensorrt: no TensorRT engine can run here: {why}.{rows}\nBuild engines on a "
                       "device like this one (`mmopt build`, then `mmopt package ... --engines`), or run on ONNX "
                       "Runtime (--backend auto or onnxruntime).")
    return Plan("onnxruntime", why=[why], refused=refused)


# ---- engines built here, cached --------------------------------------------------------------------

@dataclass(frozen=True)
class _CacheBuild:
    """The build options of a cached engine: TensorRT's defaults, strongly typed (precision is the graph's)."""

    workspace_mib: int | None = None
    optimization_level: int | None = None
    sparse_weights: bool = False
    version_compatible: bool = False
    hardware_compatibility: str = "none"


def cache_key(onnx_sha256: str, env: Environment, profile: dict[str, Any]) -> str:
    """The cache entry's name: the graph's sha256, TensorRT version, GPU model and compute capability, platform,
    build flags and the profile (the package's min / opt / max). The GPU model too: a cache shared between an
    AGX Orin and an Orin Nano must not hand one the other's tuned engine."""
    flags = {k: getattr(_CacheBuild(), k) for k in _CacheBuild.__dataclass_fields__}
    text = json.dumps({"schema": CACHE_SCHEMA, "onnx": onnx_sha256, "tensorrt": env.tensorrt, "gpu": env.gpu_name,
                       "sm": env.compute_capability, "platform": env.platform, "flags": flags, "profile": profile},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def cached_engine(manifest: dict[str, Any], data: dict[str, bytes], comp: str, env: Environment,
                  cache: Path, log: Callable[[str], None] | None = None, built: list[str] | None = None) -> bytes:
    """Component ``comp``'s engine for this device: from ``cache`` when an entry there checks out (its record
    names this key and the engine's sha256 matches), else built now from the package's hash-checked ONNX bytes
    and put in place whole (``built`` gets ``comp`` then). One process builds a key at a time (a lock file per
    key: a second load waits for the first build instead of running a second one beside it, which could run a
    Jetson out of memory) and the entry is checked again once the lock is held."""
    spec = manifest["components"][comp]
    onnx_sha = manifest["files"][spec["file"]]
    shapes = {t["name"]: {s: tuple(t["shapes"][s]) for s in ("min", "opt", "max")} for t in spec["inputs"]}
    from mmopt_runtime.trt.profiles import Profile

    profile = Profile("package", shapes)
    key = cache_key(onnx_sha, env, profile.to_json())
    entry = cache / key  # names only the key (hex): nothing from the manifest becomes a path here
    found = _cached(entry, key)
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f".{key}.lock", "a+b")
    except OSError as e:
        raise MmoptError(f"engine cache {cache}: cannot be written ({e.strerror}); set MMOPT_ENGINE_CACHE to a "
                         "writable folder.") from None
    with lock:
        held = _lock(lock, log, f"waiting for another process building the {comp} engine into {cache} ...")
        found = _cached(entry, key)  # built by the process we waited for
        if found is not None:
            return found
        engine = _build_entry(spec, data, comp, env, cache, entry, key, profile, onnx_sha, log, sweep=held)
    if built is not None:
        built.append(comp)
    return engine


def _cached(entry: Path, key: str) -> bytes | None:
    try:
        record = json.loads((entry / "record.json").read_text())
        engine = (entry / "engine.plan").read_bytes()
    except (OSError, ValueError):
        return None  # absent, half-written by a killed build, or foreign: build it again
    if isinstance(record, dict) and record.get("key") == key and \
            record.get("engine_sha256") == hashlib.sha256(engine).hexdigest():
        return engine
    return None


def _lock(f: Any, log: Callable[[str], None] | None, waiting: str) -> bool:
    """Hold ``f``'s exclusive lock (waiting for another holder, saying so); False where no lock can be had."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, a second build may run beside the first (both entries are whole)
        return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if log is not None:
            log(waiting)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except OSError as e:  # e.g. no locks on an NFS cache: build without one (each entry is still put in whole)
        if log is not None:
            log(f"engine cache: cannot lock {f.name} ({e.strerror}); building without the lock")
        return False
    return True


def _build_entry(spec: dict[str, Any], data: dict[str, bytes], comp: str, env: Environment, cache: Path,
                 entry: Path, key: str, profile: Any, onnx_sha: str, log: Callable[[str], None] | None,
                 sweep: bool = False) -> bytes:
    from mmopt_runtime.trt import api

    if sweep:  # holding the key's lock: what other builds of this key left is dead (killed, e.g. out of memory)
        for left in [*cache.glob(f".{key}.*.partial"), *cache.glob(f".{key}.*.stale")]:
            _remove(left)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{key}.", suffix=".partial"))
    tomb = work.with_suffix(".stale")  # unique: work's name is
    try:
        src = work / "onnx"  # the bytes whose sha256 was checked, never the package's own paths
        graph = src / Path(spec["file"]).name
        src.mkdir()
        graph.write_bytes(data[spec["file"]])
        for loc, rel in spec.get("external_data", {}).items():
            target, problem = escape(src, loc, "graph's folder")
            if problem:
                raise MmoptError(f"component '{comp}': external data '{loc}' {problem}; rebuild the package.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[rel])
        if log is not None:
            log(f"building the {comp} engine for {env.gpu_name} with TensorRT {env.tensorrt}, once: it is kept in "
                f"{cache}")
        built = api.build_engine(graph, [profile], _CacheBuild(), None)
        shutil.rmtree(src)
        (work / "engine.plan").write_bytes(built.engine)
        (work / "record.json").write_text(json.dumps({
            "key": key, "component": comp, "onnx_sha256": onnx_sha, "engine_sha256": hashlib.sha256(
                built.engine).hexdigest(), "tensorrt": {"version": env.tensorrt},
            "gpu": {"name": env.gpu_name, "compute_capability": env.compute_capability}, "platform": env.platform,
            "profile": profile.to_json(), "warnings": built.warnings[:20]}, indent=1))
        if entry.exists() or entry.is_symlink():  # a stale or broken entry: moved aside in one step, then removed
            os.replace(entry, tomb)
        try:
            os.replace(work, entry)
        except OSError:
            found = _cached(entry, key)  # another builder (no lock on this system) put a whole entry there first
            if found is not None:
                return found
            raise
        return built.engine
    finally:
        _remove(work)
        _remove(tomb)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
