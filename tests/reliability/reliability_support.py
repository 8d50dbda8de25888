"""Helpers of the bad-input and fault suite (its fixtures are in conftest.py).

Each case gets a private copy of the project (toy.py, toydata.py, mmopt.toml, checkpoint) and of the
bundle (its manifest re-pointed at the copied config and checkpoint), so a case may break anything
without touching another. ``snapshot`` and ``litter`` prove a failed command changed nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path


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


