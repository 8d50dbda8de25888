"""The bad-input and fault suite's fixtures: one exported bundle shared by every case, copied per case.

Each case gets a private copy of the project (toy.py, toydata.py, mmopt.toml, checkpoint) and of the
bundle (its manifest re-pointed at the copied config and checkpoint), so a case may break anything
without touching another. ``snapshot`` and ``litter`` prove a failed command changed nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import TESTS

CALIBRATION = '''
[calibration]
source = "toydata:calibration_batches"
samples = 16
method = "minmax"
'''


@dataclass
class Result:
    code: int | None  # None: an exception escaped main() (a traceback)
    out: str
    err: str

    @property
    def text(self) -> str:
        return " ".join((self.out + "\n" + self.err).split())  # rich may wrap; compare on single spaces


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    """``mmopt ARGS`` in this process (Typer's app behind mmopt's own error handler), as a shell runs it."""
    from mmopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["mmopt", *map(str, args)]
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code: int | None = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is what this suite exists to catch
                code = None
                err.write(traceback.format_exc())
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def litter(parent: Path) -> list[str]:
    """What a writer left beside its target: hidden .partial / .old folders, temporary files."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(".") and (p.name.endswith(".partial") or ".old" in p.name
                                                 or p.name.endswith(".tmp")))


def refused(r: Result, *names: str, codes: tuple[int, ...] = (1, 2)) -> None:
    """A clean failure: exit 1 or 2, no traceback, and the message names each of ``names``."""
    assert r.code in codes, f"exit {r.code}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.out + r.err, r.err
    for name in names:
        assert " ".join(str(name).split()) in r.text, f"{name!r} not in:\n{r.err}"


@dataclass
class Project:
    root: Path
    bundle: Path

    @property
    def config(self) -> Path:
        return self.root / "mmopt.toml"

    @property
    def manifest(self) -> Path:
        return self.bundle / "manifest.json"

    def read(self) -> dict:
        return json.loads(self.manifest.read_text())

    def write(self, data: object) -> None:
        self.manifest.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Project:
    """The toy project with a trained-looking checkpoint, exported once for the whole suite."""
    import torch
    from safetensors.torch import save_file

    from mmopt.api import export

    root = tmp_path_factory.mktemp("reliability-project")
    shutil.copy(TESTS / "models" / "toy.py", root / "toy.py")
    shutil.copy(TESTS / "models" / "toydata.py", root / "toydata.py")
    sys.path.insert(0, str(root))
    import toy

    torch.manual_seed(7)
    save_file(toy.Toy().state_dict(), str(root / "toy.safetensors"))
    from models.toy import CONFIG

    (root / "mmopt.toml").write_text(CONFIG.format(checkpoint='checkpoint = "toy.safetensors"', extra=CALIBRATION))
    export(root / "mmopt.toml", root / "bundle")
    _forget_modules(root)
    return Project(root, root / "bundle")


def _forget_modules(root: Path) -> None:
    sys.path[:] = [p for p in sys.path if p != str(root)]
    for name, mod in list(sys.modules.items()):
        if str(getattr(mod, "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]


@pytest.fixture
def project(exported: Project, tmp_path: Path) -> Project:
    """A private copy of the project and its bundle (manifest re-pointed at the copies)."""
    root = tmp_path / "proj"
    shutil.copytree(exported.root, root, symlinks=True)
    p = Project(root, root / "bundle")
    m = p.read()
    m["model"]["config"] = str(p.config)
    m["model"]["checkpoint"] = str(root / "toy.safetensors")
    p.write(m)
    yield p
    _forget_modules(root)
