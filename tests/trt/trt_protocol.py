"""What TensorRT requires of the *values and order* of mmopt's calls, checked on the calls it recorded.

The checking proxy (trt_checking_proxy.py) proves that every name and signature mmopt uses exists in the
real bindings. It cannot tell ``set_shape(name, max, opt, min)`` from the right call, nor a workspace in
KiB from one in bytes. This module replays the calls one scenario made (``Checker.calls``) through a small
model of TensorRT's rules, written from its documentation (IOptimizationProfile, IBuilderConfig,
IRuntime, IExecutionContext):

* a profile's ``set_shape(name, min, opt, max)``: same rank, ``min <= opt <= max`` on every axis;
* the builder config is complete before ``build_serialized_network``: nothing sets a flag, a pool limit,
  a profile or a cache on it afterwards;
* ``set_timing_cache(cache, ignore_mismatch)``: never ignoring a mismatch (a foreign cache must be refused);
* a version-compatible plan is deserialised with ``engine_host_code_allowed`` set, and no other plan is;
* per execution context: a profile switch invalidates the input shapes; ``infer_shapes`` and
  ``execute_async_v3`` come after every input's ``set_input_shape`` since the last switch;
  ``execute_async_v3`` after ``infer_shapes`` and after every I/O tensor has an address.

``replay`` returns the violations and what each build asked for (flags, workspace bytes, profile shapes),
which the tests compare with the options the scenario gave. Runs in the driver's interpreter; the real
enum members come back as themselves, so their ``name`` is read directly.
"""
from __future__ import annotations

from typing import Any

# calls whose every argument must be a real value: TensorRT has no meaning for None in any of them (the
# bindings may still accept None, as nullptr, where the C++ takes a pointer)
NO_NONE = ("Builder.__init__", "OnnxParser.__init__", "Runtime.__init__", "Builder.build_serialized_network",
           "OnnxParser.parse_from_file", "IBuilderConfig.add_optimization_profile", "IBuilderConfig.set_timing_cache",
           "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_flag",
           "IBuilderConfig.hardware_compatibility_level=", "IBuilderConfig.builder_optimization_level=",
           "IOptimizationProfile.set_shape", "Runtime.deserialize_cuda_engine", "Runtime.engine_host_code_allowed=",
           "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_input_shape",
           "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
           "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_mode",
           "ICudaEngine.get_tensor_profile_shape", "IExecutionContext.get_tensor_shape")
CONFIG_MUTATORS = ("IBuilderConfig.set_", "IBuilderConfig.add_", "IBuilderConfig.clear_flag",
                   "IOptimizationProfile.set_")


def _name(v: Any) -> str:
    name = getattr(v, "name", None)  # a real enum member; a missing one is the proxy's Poison
    return name if isinstance(name, str) else repr(v)


def _dims(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in v)


def replay(calls: list[tuple[str, tuple, dict]], inputs: set[str] | None = None,
           version_compatible: bool | None = None, outputs: set[str] | None = None) -> dict[str, Any]:
    """The violations of TensorRT's rules in ``calls`` and the builds they made. ``inputs`` / ``outputs``: the
    engine's tensor names (for the run rules); ``version_compatible``: whether the plans being run are."""
    bad: list[str] = []
    builds: list[dict[str, Any]] = []
    config: dict[str, Any] = {"flags": set(), "workspace": None, "profiles": [], "shapes": {}}
    built = False
    host = False
    ctx: dict[str, Any] = {}

    for q, args, kwargs in calls:
        if q in NO_NONE and any(a is None for a in (*args, *kwargs.values())):
            bad.append(f"{q} given None: TensorRT needs a value there")
        if q == "Builder.create_builder_config":
            config, built = {"flags": set(), "workspace": None, "profiles": [], "shapes": {}}, False
        elif built and (q.startswith(CONFIG_MUTATORS) or (q.startswith("IBuilderConfig.") and q.endswith("="))):
            bad.append(f"{q} after build_serialized_network: the engine was built without it")
        if q == "IBuilderConfig.set_flag":
            config["flags"].add(_name(args[0]))
        elif q == "IBuilderConfig.clear_flag":
            config["flags"].discard(_name(args[0]))
        elif q == "IBuilderConfig.set_memory_pool_limit":
            if _name(args[0]) == "WORKSPACE":
                config["workspace"] = int(args[1])
        elif q == "IOptimizationProfile.set_shape":
            name, lo, opt, hi = args[0], _dims(args[1]), _dims(args[2]), _dims(args[3])
            if not len(lo) == len(opt) == len(hi):
                bad.append(f"set_shape('{name}'): ranks differ {lo} / {opt} / {hi}")
            elif not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                bad.append(f"set_shape('{name}', min={lo}, opt={opt}, max={hi}): not min <= opt <= max")
            config["shapes"][name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        elif q == "IBuilderConfig.add_optimization_profile":
            config["profiles"].append(dict(config["shapes"]))
            config["shapes"] = {}
        elif q == "IBuilderConfig.set_timing_cache":
            if (kwargs.get("cache", args[0] if args else None)) is None:
                bad.append("set_timing_cache(None, ...): no cache object, so nothing is reused or saved")
            ignore = kwargs.get("ignore_mismatch", args[1] if len(args) > 1 else None)
            if ignore is not False:
                bad.append(f"set_timing_cache(ignore_mismatch={ignore!r}): a cache from another GPU or TensorRT "
                           "version would be used silently")
        elif q == "Builder.build_serialized_network":
            if config["shapes"]:
                bad.append("build_serialized_network with a profile whose shapes were set but never added")
            builds.append({"flags": sorted(config["flags"]), "workspace": config["workspace"],
                           "profiles": config["profiles"]})
            built = True
        elif q == "Runtime.__init__":
            host = False
        elif q == "Runtime.engine_host_code_allowed=":
            host = bool(args[0])
        elif q == "Runtime.deserialize_cuda_engine":
            if version_compatible is not None and host != version_compatible:
                bad.append(f"deserialize_cuda_engine with engine_host_code_allowed={host} for a "
                           f"{'version-compatible' if version_compatible else 'plain'} plan")
        elif q == "ICudaEngine.create_execution_context":
            ctx = {"shapes": set(), "inferred": False, "addresses": set(), "profile_switches": 0}
        elif q == "IExecutionContext.set_optimization_profile_async":
            ctx["shapes"], ctx["inferred"] = set(), False  # a switch invalidates every input shape
            ctx["profile_switches"] = ctx.get("profile_switches", 0) + 1
        elif q == "IExecutionContext.set_input_shape":
            ctx.setdefault("shapes", set()).add(args[0])
            ctx["inferred"] = False
        elif q == "IExecutionContext.infer_shapes":
            missing = sorted((inputs or set()) - ctx.get("shapes", set()))
            if missing or not ctx.get("shapes"):
                bad.append(f"infer_shapes before set_input_shape of {missing or 'any input'}")
            ctx["inferred"] = True
        elif q == "IExecutionContext.set_tensor_address":
            ctx.setdefault("addresses", set()).add(args[0])
        elif q == "IExecutionContext.execute_async_v3":
            missing = sorted((inputs or set()) - ctx.get("shapes", set()))
            if missing:
                bad.append(f"execute_async_v3 without the shapes of {missing} since the last profile switch")
            if not ctx.get("inferred"):
                bad.append("execute_async_v3 before infer_shapes resolved the output shapes")
            io = (inputs or set()) | (outputs or set())
            unbound = sorted(io - ctx.get("addresses", set()))
            if unbound:
                bad.append(f"execute_async_v3 before the addresses of {unbound}")
    unique = list(dict.fromkeys(bad))
    return {"violations": unique, "builds": builds}
