"""Helpers shared by test modules (import from here, not from conftest: tests/trt has its own)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mmopt ARGS`` in a fresh process, as a user's shell would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "mmopt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
