"""Rich tables for the CLI. Rendering only: every figure comes from the manifest or a report."""
from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from mmopt.manifest import Manifest


def _shape(shape: Any) -> str:
    return escape("[" + ", ".join(map(str, shape)) + "]")


def components_table(m: Manifest) -> Table:
    t = Table(title="components", title_justify="left")
    for col in ("component", "module", "inputs (shape, dtype, source)", "outputs"):
        t.add_column(col)
    for name, c in m.components.items():
        ins = "\n".join(f"{escape(i.name)} {_shape(i.shape)} {i.dtype} <- {escape(c.sources[i.name])}"
                        for i in c.inputs)
        outs = "\n".join(f"{escape(o.name)} {_shape(o.shape)} {o.dtype}" for o in c.outputs)
        t.add_row(escape(name), escape(c.module or "(rest of forward)"), ins, outs)
    return t


def summary_table(m: Manifest) -> Table:
    t = Table(title="artifacts", title_justify="left")
    for col in ("artifact", "file", "size", "sha256", "note"):
        t.add_column(col)
    for a in m.artifacts:
        note = a.config.get("simplify") or a.config.get("note") or ""
        t.add_row(escape(a.id), escape(a.file), f"{a.bytes / 1024:.0f} KiB", a.sha256[:12], escape(str(note)))
    return t


def parity_table(parity: dict[str, dict[str, dict[str, Any]]]) -> Table:
    t = Table(title="parity vs eager PyTorch (worst over min/opt/max shapes and outputs)", title_justify="left")
    for col in ("precision", "graph", "outputs", "cos min", "max abs", "max rel", "argmax", "status"):
        t.add_column(col, justify="right" if col not in ("precision", "graph", "status") else "left")
    for precision, rows in parity.items():
        for where, s in rows.items():
            status = "[green]pass[/]" if not s["failed"] else f"[red]{s['failed']} failed[/]"
            arg = "-" if s["argmax"] is None else f"{s['argmax']:.3f}"
            t.add_row(escape(precision), escape(where), str(s["outputs"]), f"{s['cos_min']:.5f}", f"{s['max_abs']:.2e}",
                      f"{s['max_rel']:.2e}", arg, status)
    return t
