"""pybind11 signatures, read from the docstrings of NVIDIA's TensorRT bindings.

pybind11 writes each function's signature(s) as the first docstring line(s), e.g.
``set_shape(self: tensorrt.IOptimizationProfile, input: str, min: tensorrt.Dims, ...) -> None``, numbered
``1. ...`` / ``2. ...`` for overloads, and ``(arg0: X) -> R`` for property getters and setters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None


@dataclass(frozen=True)
class Signature:
    params: tuple[Param, ...]
    returns: str
    text: str


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def parse_signatures(doc: str | None) -> list[Signature]:
    """All overloads in a pybind11 docstring: ``name(a: T, b: U = d) -> R`` (optionally ``1. `` numbered)."""
    sigs = []
    for line in (doc or "").splitlines():
        line = re.sub(r"^\d+\.\s+", "", line.strip())
        m = re.match(r"^[A-Za-z_][\w.]*\(|^\(", line)
        if not m or "->" not in line or "*args, **kwargs" in line:
            continue
        start, depth = line.index("("), 0
        for i in range(start, len(line)):
            depth += line[i] in "([<"
            depth -= line[i] in ")]>"
            if depth == 0:
                break
        rest = line[i + 1:].strip()
        if not rest.startswith("->"):
            continue
        params = []
        for p in _split_top(line[start + 1:i]):
            name, _, rest_p = p.partition(":")
            typ, _, default = rest_p.partition(" = ")
            params.append(Param(name.strip(), typ.strip() or "object", default.strip() or None))
        sigs.append(Signature(tuple(params), rest[2:].strip(), line))
    return sigs
