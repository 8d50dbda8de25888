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


def test_a_component_with_nothing_to_quantize_is_not_labelled_int8(project):
    """A weightless fusion (late voting) has no Conv / MatMul / Gemm: it stays fp32 and says so, instead of
    a fusion.int8-dynamic.onnx with 0 quantized nodes benched as int8."""
    from mmopt.errors import PrecisionError

    api.export(project("voting"), project.dir / "b")
    with pytest.raises(PrecisionError, match="fusion: int8-dynamic found nothing to quantize"):
        api.quantize(project.dir / "b", precision={"fusion": "int8-dynamic"})
    r = api.quantize(project.dir / "b", precision={"image": "int8-dynamic", "fusion": "int8-dynamic"})
    assert r.policy == {"image": "int8-dynamic", "text": "fp32", "fusion": "fp32"}
    assert "nothing to quantize" in r.kept_fp32["fusion"]
    assert not (project.dir / "b" / "fusion.int8-dynamic.onnx").exists()


def test_an_export_failure_names_the_users_line_and_the_fix_without_an_fx_dump(project, capfd):
    from mmopt.errors import ExportError

    with pytest.raises(ExportError) as e:
        api.export(project("data_dependent"), project.dir / "b")
    msg = str(e.value)
    assert "component 'text'" in msg and "custom.py:" in msg and "if bool(attention_mask.all())" in msg
    assert "Fix: a Python `if`" in msg
    out, err = capfd.readouterr()
    assert "def forward(self, arg0_1" not in out + err  # torch's 60-180-line graph dump stays out
    assert not (project.dir / "b").exists()


def test_fp16_on_a_pre_layernorm_transformer(project):
    """nn.TransformerEncoderLayer(norm_first=True): LayerNorm stays fp32, and the Transpose after it used to
    meet the fp16 in-projection MatMul through a Cast, which segfaulted onnxruntime's optimiser (exit -11)
    and lost the component."""
    import onnxruntime as ort

    api.export(project("pre_ln"), project.dir / "b")
    r = api.quantize(project.dir / "b", precision={"text": "fp16"}, sensitivity=False)
    assert r.policy["text"] == "fp16" and not r.kept_fp32
    assert r.manifest.results["parity"]["fp16"]["text"]["failed"] == 0
    assert any("Cast between it and the fp16 MatMul" in why for why in r.islands["text"].values())
    ort.InferenceSession(str(project.dir / "b" / "text.fp16.onnx"), providers=["CPUExecutionProvider"])
