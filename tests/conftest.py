"""Shared fixtures: model folders written into tmp dirs, the CLI run as a user runs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture
def toy_dir(tmp_path: Path):
    """A folder holding toy.py and a writer for its mmopt.toml: write(checkpoint=..., extra=...)."""
    shutil.copy(TESTS / "models" / "toy.py", tmp_path / "toy.py")

    def write(checkpoint: str = "", extra: str = "", text: str | None = None) -> Path:
        from models.toy import CONFIG

        path = tmp_path / "mmopt.toml"
        path.write_text(text if text is not None else CONFIG.format(checkpoint=checkpoint, extra=extra))
        return path

    write.dir = tmp_path
    yield write
    sys.modules.pop("toy", None)  # each test's toy.py is a fresh import


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mmopt ARGS`` in a fresh process, as a user's shell would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "mmopt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory):
    """One exported toy bundle shared by read-only tests."""
    from models.toy import CONFIG

    from mmopt.api import export

    d = tmp_path_factory.mktemp("toy")
    shutil.copy(TESTS / "models" / "toy.py", d / "toy.py")
    (d / "mmopt.toml").write_text(CONFIG.format(checkpoint="", extra=""))
    result = export(d / "mmopt.toml", d / "bundle")
    sys.modules.pop("toy", None)
    return result
