"""docs/tensorrt.md stays true: its `mmopt build` options exist, its Python compiles and imports resolve.

The commands themselves need TensorRT and a GPU, so they run only on a target device (tests/gpu).
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import typer

from mmopt.cli.build import register

DOC = (Path(__file__).resolve().parents[2] / "docs" / "tensorrt.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def _build_options() -> set[str]:
    app = typer.Typer()
    register(app)
    command = typer.main.get_command(app)
    return {opt for p in command.params for opt in p.opts + p.secondary_opts}


def test_every_mmopt_build_option_in_the_doc_exists():
    known = _build_options()
    used = set()
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.strip().startswith("mmopt build"):
                used |= {w for w in shlex.split(line.split("#")[0]) if w.startswith("--")}
    used |= set(re.findall(r"`(--[a-z0-9-]+)", DOC))
    absent = {"--fp16", "--int8"}  # the doc says these builder flags do not exist: precision is the graph's
    assert absent <= used and not absent & known
    assert used - absent <= known, used - absent - known


def test_python_examples_compile_and_their_imports_resolve():
    for block in _blocks("python"):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
