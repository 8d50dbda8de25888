"""Custom multimodal models as users write them (tests/models/custom.py), through export: dataclass and
NamedTuple outputs, a parent forward that reads its encoders' attributes, tied weights."""
from __future__ import annotations

import shutil
import sys

import pytest
from support import TESTS

from mmopt import api
from models.custom import CONFIG


@pytest.fixture
def project(tmp_path):
    shutil.copytree(TESTS / "models", tmp_path / "models")
    sys.path.insert(0, str(tmp_path))

    def write(factory: str, checkpoint: str = "", extra: str = ""):
        path = tmp_path / "mmopt.toml"
        path.write_text(CONFIG.format(factory=factory, checkpoint=checkpoint, extra=extra))
        return path

    write.dir = tmp_path
    yield write
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        sys.modules.pop(name)


def test_dataclass_and_namedtuple_outputs_are_containers(project):
    r = api.export(project("containers"), project.dir / "b")
    m = r.manifest
    assert [o.name for o in m.components["image"].outputs] == ["features", "pooled"]
    assert [o.name for o in m.components["text"].outputs] == ["tokens", "pooled"]
    assert [o.name for o in m.model_outputs] == ["logits", "image_embeds"]
    assert m.results["parity"]["fp32"]["pipeline"]["failed"] == 0


def test_the_parent_may_read_its_encoders_attributes(project):
    r = api.export(project("reads_attributes"), project.dir / "b")
    assert r.manifest.results["parity"]["fp32"]["pipeline"]["failed"] == 0


def test_a_checkpoint_without_tied_aliases_loads(project):
    from safetensors.torch import save_model

    from models.custom import tied

    save_model(tied(), str(project.dir / "tied.safetensors"))  # drops lm_head.weight (an alias of embed)
    r = api.export(project("tied", checkpoint='checkpoint = "tied.safetensors"'), project.dir / "b")
    assert r.manifest.results["parity"]["fp32"]["pipeline"]["failed"] == 0
