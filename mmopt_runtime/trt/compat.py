"""May this engine run here? Decided from what its build recorded, before TensorRT deserialises it. Pure.

TensorRT's own refusal of a foreign engine is a terse log line (or a crash on some versions); this
decides first, from what the sidecar recorded at build time, and says what to do. The rules follow
NVIDIA's documentation:

* platform: an engine never moves between OS / CPU architectures (x86_64 vs aarch64, Linux vs Windows);
* TensorRT version: a plain engine loads only in the TensorRT version that built it (major, minor,
  patch and build all equal). A version-compatible engine (``--version-compatible``) loads in the same
  or a later TensorRT of the same major version, and TensorRT 10 ones also in TensorRT 11;
* GPU: a plain engine needs the compute capability it was built on, and is tuned for the exact GPU
  model (another model with the same compute capability runs it, with a warning);
  ``same_compute_capability`` makes that portability explicit (no warning); ``ampere+`` runs on any
  GPU of compute capability 8.0 or newer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mmopt_runtime.trt.errors import EngineIncompatible

# (build major, runtime major) pairs across which version-compatible engines load, per NVIDIA.
CROSS_MAJOR = {(8, 10), (10, 11)}


@dataclass(frozen=True)
class Environment:
    """The running side: TensorRT version, GPU and platform."""

    tensorrt: str
    gpu_name: str
    compute_capability: str
    platform: str


@dataclass
class Decision:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_version(text: str) -> tuple[int, ...]:
    """``"11.4.0.106"`` -> ``(11, 4, 0, 106)``; stops at the first non-numeric part (``.post1``)."""
    parts = []
    for p in str(text).split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def parse_cc(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def version_problem(built: str, running: str, version_compatible: bool) -> str | None:
    """Why an engine built by TensorRT ``built`` cannot load in TensorRT ``running``; None when it can."""
    b, r = parse_version(built), parse_version(running)
    n = min(len(b), len(r))
    if not version_compatible:
        if b[:n] != r[:n]:
            return (f"the engine was built with TensorRT {built} but this is TensorRT {running}; a TensorRT "
                    "engine loads only in the exact version that built it. Rebuild it here with `mmopt build`, "
                    "or build it with --version-compatible to ship one engine to later TensorRT versions.")
        return None
    if r[:n] < b[:n]:
        return (f"the engine was built with TensorRT {built}, newer than this TensorRT {running}; "
                "version-compatible engines only move forward. Upgrade TensorRT here or rebuild here.")
    if b[0] != r[0] and (b[0], r[0]) not in CROSS_MAJOR:
        return (f"the version-compatible engine was built with TensorRT {built}; TensorRT {running} cannot "
                f"load engines of TensorRT {b[0]}.x. Rebuild it here with `mmopt build`.")
    if b[:2] < (8, 6):
        return f"TensorRT {built} predates version-compatible engines (8.6); rebuild it here."
    return None


def _gpu_problems(meta: Mapping[str, Any], env: Environment, level: str, d: Decision) -> None:
    gpu = meta["gpu"]
    built_cc, run_cc = parse_cc(gpu["compute_capability"]), parse_cc(env.compute_capability)
    where = (f"built on {gpu['name']} (compute capability {gpu['compute_capability']}), "
             f"this is {env.gpu_name} (compute capability {env.compute_capability})")
    if level == "ampere+":
        if run_cc < (8, 0):
            d.errors.append(f"the engine was built for Ampere and newer GPUs (compute capability >= 8.0), "
                            f"{where}. Rebuild it here with `mmopt build`.")
    elif level in ("none", "same_compute_capability"):
        if built_cc != run_cc:
            d.errors.append(f"the engine only runs on GPUs of its compute capability: {where}. Rebuild it on "
                            "this device with `mmopt build`, or build with --hardware-compat ampere+ for "
                            "engines that move between Ampere-or-newer GPUs.")
        elif level == "none" and gpu["name"] != env.gpu_name:
            d.warnings.append(f"the engine was tuned on {gpu['name']} and runs here on {env.gpu_name}; it should "
                              "work (same compute capability) but may be slower. Rebuild here for best speed.")
    else:
        d.errors.append(f"unknown hardware_compatibility {level!r} in the sidecar; rebuild the engine.")


def decide(meta: Mapping[str, Any], env: Environment) -> Decision:
    """Every reason the engine described by ``meta`` (its sidecar) cannot run in ``env``."""
    d = Decision()
    try:
        built_version = meta["tensorrt"]["version"]
        options = meta["build_options"]
        level, vc = options["hardware_compatibility"], bool(options["version_compatible"])
        meta["gpu"]["name"], meta["gpu"]["compute_capability"]
        built_platform = meta["platform"]
    except (KeyError, TypeError) as e:
        d.errors.append(f"the engine's sidecar lacks {e}; it was not written by this mmopt. Rebuild the engine.")
        return d
    if built_platform != env.platform:
        d.errors.append(f"the engine was built on {built_platform}, this is {env.platform}; engines never move "
                        "between platforms. Build it on the target device with `mmopt build`.")
    problem = version_problem(built_version, env.tensorrt, vc)
    if problem:
        d.errors.append(problem)
    _gpu_problems(meta, env, level, d)
    return d


def require_compatible(meta: Mapping[str, Any], env: Environment, engine: str) -> list[str]:
    """Raise ``EngineIncompatible`` listing every problem; return the warnings otherwise."""
    d = decide(meta, env)
    if not d.ok:
        raise EngineIncompatible(f"{engine} cannot run here:\n  " + "\n  ".join(d.errors))
    return d.warnings
