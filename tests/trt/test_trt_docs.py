"""docs/tensorrt.md stays true: its `mmopt build` options exist, its Python compiles and imports resolve.

The commands themselves need TensorRT and a GPU, so they run only on a target device (tests/gpu).
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex

import numpy as np
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


def test_the_python_example_runs_against_fakes(tmp_path, monkeypatch):
    """docs/tensorrt.md's runner example, executed as written on a built fake bundle: TensorRT and a GPU
    cannot exist here, so the engine session, the device memory and the environment are the test fakes
    (test_trt_runner's computing engine over byte-keeping memory)."""
    from test_trt_runner import HERE, BytesMemory, ComputingSession, FakeSession, expected

    from mmopt.jobs import build
    from mmopt.jobs.build import build_engines
    from mmopt.runners import tensorrt as trt_runner
    from mmopt_runtime.trt import api
    from mmopt.trt.options import BuildOptions
    from trt_fake_bundle import FAKE_ENV, FakeEngineWriter, make_bundle

    out = make_bundle(tmp_path / "out")
    monkeypatch.setattr(build, "preflight", lambda: FAKE_ENV)
    monkeypatch.setattr(api, "build_engine", FakeEngineWriter())
    build_engines(out, "fp16", BuildOptions(timing_cache=None))
    mem = BytesMemory()
    FakeSession.bundle, FakeSession.instances, ComputingSession.memory = out, [], mem
    monkeypatch.setattr(api, "EngineSession", ComputingSession)
    monkeypatch.setattr(trt_runner, "running_environment", lambda index=0: HERE)
    monkeypatch.setattr(trt_runner, "make_memory", lambda kind, index: mem)
    monkeypatch.chdir(tmp_path)  # the example names the bundle "out"
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    (block,) = [b for b in _blocks("python") if "TensorRTRunner.from_bundle" in b]
    scope = {"feeds": feeds}
    exec(compile(block, "docs/tensorrt.md", "exec"), scope)
    np.testing.assert_allclose(scope["outputs"]["image_emb"], expected(feeds, (2, 4), "float32"), rtol=1e-6)
    assert mem.captures == 1  # cuda_graph=True as written
