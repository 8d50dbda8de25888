"""Shared fixtures: model folders written into tmp dirs, the CLI run as a user runs it."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from support import TESTS


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
    # Every module imported from this test's folder (toy.py, data modules a test writes) is dropped:
    # the next test's file of the same name must be a fresh import, not this one from the cache.
    for name, mod in list(sys.modules.items()):
        if str(getattr(mod, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


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
