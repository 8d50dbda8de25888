"""The bad-input and fault suite's fixtures: one exported bundle shared by every case, copied per case.

Each case gets a private copy of the project (toy.py, toydata.py, mmopt.toml, checkpoint) and of the
bundle (its manifest re-pointed at the copied config and checkpoint), so a case may break anything
without touching another. Helpers (``cli``, ``snapshot``, ``litter``, ``refused``) are in
reliability_support.py: a module named conftest would collide with tests/trt's.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from reliability_support import CALIBRATION, Project

from support import TESTS


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
    m["model"]["config"] = m["model"]["config_absolute"] = str(p.config)
    m["model"]["checkpoint"] = str(root / "toy.safetensors")
    p.write(m)
    yield p
    _forget_modules(root)


def pytest_collection_modifyitems(items) -> None:
    """Cases that export a model (slow) are marked ``exports``; the store's mutation run deselects them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents and {"project", "exported"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.exports)
