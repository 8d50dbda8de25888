"""The layer contract in pyproject.toml ([tool.importlinter]) holds, covers every module, and can fail."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

from support import ROOT


def _lint(root, config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def test_the_layer_contract_is_kept():
    r = _lint(ROOT, ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_every_module_sits_in_a_layer():
    import grimp

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    names = [n.strip() for layer in layers for n in layer.replace("|", ":").split(":")]
    graph = grimp.build_graph("mmopt")
    packages = {m.rsplit(".", 1)[0] for m in graph.modules}
    loose = [m for m in sorted(graph.modules) if m not in packages and not m.startswith("mmopt.examples")
             and not any(m == n or m.startswith(n + ".") for n in names)]
    assert loose == [], f"modules outside every layer (add them to [tool.importlinter]): {loose}"


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "mmopt", tmp_path / "mmopt", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mmopt" / "store.py", "a") as f:
        f.write("\n\ndef _upward():\n    from mmopt import api  # noqa: F401\n")
    r = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert r.returncode == 1 and "mmopt.store -> mmopt.api" in r.stdout, r.stdout + r.stderr


def test_names_from_the_trt_package_are_imported_only_by_the_cli():
    """``mmopt.trt`` re-exports names lazily (importlib strings the contract cannot see): only the CLI may
    use them; everything else imports TensorRT's modules by name, which the contract checks."""
    import ast

    trt = ROOT / "mmopt" / "trt"
    hidden = []
    for path in (ROOT / "mmopt").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "mmopt").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mmopt.trt":
                hidden += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if not (trt / f"{a.name}.py").exists()]
    assert hidden == []
