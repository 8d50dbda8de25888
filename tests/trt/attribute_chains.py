"""``name.A.B...`` attribute chains written in a source file, and those a real module lacks: how the
TensorRT and cuda-python tests check every name mmopt uses against NVIDIA's real packages."""
from __future__ import annotations

import ast


def chains(source: str, root: str) -> set[str]:
    """Maximal attribute chains on ``root`` (``root.A.B`` and ``self.root.A.B``), without the root."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        parts.reverse()
        if isinstance(cur, ast.Name) and cur.id == "self" and parts[:1] == [root]:
            parts = parts[1:]
        elif not (isinstance(cur, ast.Name) and cur.id == root):
            continue
        if parts:
            out.add(".".join(parts))
    return {c for c in out if not any(o.startswith(c + ".") for o in out)}  # root.A.B implies root.A


def missing(module: object, found: set[str]) -> list[str]:
    """The chains in ``found`` that ``module`` does not have."""
    lacking = []
    for chain in sorted(found):
        obj = module
        for part in chain.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                lacking.append(chain)
                break
    return lacking
