"""TensorRT optimization profiles, derived from the shapes captured at export. Pure: no TensorRT here.

Profile 0 is always the captured min / opt / max range, the one parity was verified on. Extra profiles
narrow named dims, e.g. ``batch=1`` for a latency profile beside the captured batch range, or
``batch=8:16:32`` for throughput; a narrow profile lets TensorRT pick kernels tuned for those sizes.
An extra profile must stay inside the captured range: sizes outside it were never checked for parity,
so widening the range is done by re-exporting with larger [dims] in mmopt.toml.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from mmopt.errors import BundleError, UsageError
from mmopt.spec import SIZES, ComponentSpec, TensorSpec
from mmopt_runtime.trt.profiles import Profile, select_profile  # noqa: F401  (the runtime's: it picks them)

Range = tuple[int, int, int]


def parse_profile(text: str) -> dict[str, int | Range]:
    """``"batch=1"`` -> ``{"batch": 1}``; ``"batch=1:4:8,seq=16"`` -> ``{"batch": (1, 4, 8), "seq": 16}``."""
    out: dict[str, int | Range] = {}
    hint = "write DIM=N or DIM=MIN:OPT:MAX, comma-separated, e.g. --profile batch=1 or --profile batch=8:16:32"
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--profile {text!r}: '{part}' is not DIM=VALUE; {hint}.")
        try:
            nums = tuple(int(v) for v in value.split(":"))
        except ValueError:
            raise UsageError(f"--profile {text!r}: '{value}' is not a number; {hint}.") from None
        if len(nums) not in (1, 3):
            raise UsageError(f"--profile {text!r}: '{value}' needs 1 or 3 numbers; {hint}.")
        out[name.strip()] = nums[0] if len(nums) == 1 else nums  # type: ignore[assignment]
    if not out:
        raise UsageError(f"--profile {text!r} is empty; {hint}.")
    return out


def profile_name(override: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in override.items())


def _as_range(value: Any) -> Range:
    return (value, value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _captured_problems(comp: ComponentSpec) -> list[str]:
    problems = []
    for t in comp.inputs:
        where = f"component '{comp.name}' input '{t.name}'"
        if set(t.shapes) != set(SIZES):
            problems.append(f"{where}: captured shapes are {sorted(t.shapes)}, expected min / opt / max")
            continue
        lo, opt, hi = (t.shapes[s] for s in SIZES)
        if not len(lo) == len(opt) == len(hi) == len(t.shape):
            problems.append(f"{where}: captured shapes {lo} / {opt} / {hi} do not match rank {len(t.shape)}")
            continue
        for axis, decl in enumerate(t.shape):
            a, o, b = lo[axis], opt[axis], hi[axis]
            if isinstance(decl, int) and not a == o == b == decl:
                problems.append(f"{where}: static axis {axis} is {decl} but was captured as {a} / {o} / {b}")
            elif not 1 <= a <= o <= b:
                problems.append(f"{where}: axis {axis} ('{decl}') needs 1 <= min <= opt <= max, got {a} / {o} / {b}")
    return problems


def _apply(t: TensorSpec, override: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = {s: list(t.shapes[s]) for s in SIZES}
    for axis, decl in enumerate(t.shape):
        if isinstance(decl, str) and decl in override:
            for s, v in zip(SIZES, _as_range(override[decl])):
                shapes[s][axis] = v
    return {s: tuple(v) for s, v in shapes.items()}


def check_overrides(components: Iterable[ComponentSpec], overrides: Sequence[Mapping[str, Any]]) -> None:
    """Every extra profile names known dynamic dims with sizes inside the captured range; raise once."""
    components = list(components)
    problems = []
    for ov in overrides:
        label = f"--profile {profile_name(ov)}"
        for dim, value in ov.items():
            rng = _as_range(value)
            if len(rng) != 3 or not all(isinstance(v, int) for v in rng) or not 1 <= rng[0] <= rng[1] <= rng[2]:
                problems.append(f"{label}: '{dim}' needs 1 <= min <= opt <= max, got {value!r}")
                continue
            seen = False
            for comp in components:
                for t in comp.inputs:
                    for axis, decl in enumerate(t.shape):
                        if decl != dim:
                            continue
                        seen = True
                        a, b = t.shapes["min"][axis], t.shapes["max"][axis]
                        if rng[0] < a or rng[2] > b:
                            problems.append(
                                f"{label}: '{dim}' = {value} is outside the captured range [{a}, {b}] of "
                                f"{comp.name}.{t.name} axis {axis}; parity was only verified inside it. "
                                f"Re-export with a wider [dims.{dim}] in mmopt.toml to go beyond.")
            if not seen:
                known = sorted({d for c in components for t in c.inputs for d in t.shape if isinstance(d, str)})
                problems.append(f"{label}: no input has a dynamic dim '{dim}'. Dynamic dims in this bundle: "
                                f"{', '.join(known) or 'none (every shape is static)'}.")
    if problems:
        raise UsageError("invalid optimization profiles:\n  " + "\n  ".join(problems))


def profiles_for(comp: ComponentSpec, overrides: Sequence[Mapping[str, Any]] = ()) -> list[Profile]:
    """The captured profile, then one per override that changes this component (duplicates dropped)."""
    problems = _captured_problems(comp)
    if problems:
        raise BundleError("the bundle's captured shapes cannot make a TensorRT profile:\n  "
                          + "\n  ".join(problems) + "\nRe-run `mmopt export` to recapture them.")
    out = [Profile("captured", {t.name: {s: tuple(t.shapes[s]) for s in SIZES} for t in comp.inputs})]
    for ov in overrides:
        p = Profile(profile_name(ov), {t.name: _apply(t, ov) for t in comp.inputs})
        if all(p.shapes != q.shapes for q in out):
            out.append(p)
    return out
