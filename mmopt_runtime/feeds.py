"""One rule for an array's axes against a tensor's declaration: a static size must be equal, a named (dynamic)
size within the exported min..max. mmopt's runners check a component's feeds with it and the device runtime a
package's inputs, so both refuse the same shapes in the same words. Pure."""
from __future__ import annotations

from typing import Sequence


def axis_problems(name: str, declared: Sequence[int | str], lo: Sequence[int], hi: Sequence[int],
                  shape: Sequence[int]) -> list[str]:
    """Every axis of ``shape`` that does not fit ``declared`` (ints static, strings dynamic within lo..hi)."""
    out = []
    for axis, (size, decl) in enumerate(zip(shape, declared)):
        if isinstance(decl, int) and size != decl:
            out.append(f"{name}: axis {axis} is {size}, expected {decl}")
        elif isinstance(decl, str) and not lo[axis] <= size <= hi[axis]:
            out.append(f"{name}: axis {axis} ('{decl}') is {size}, outside the exported range "
                       f"[{lo[axis]}, {hi[axis]}]")
    return out
