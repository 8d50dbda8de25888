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


def test_a_forward_taking_one_dict(tmp_path):
    """Lightning style forward(batch): [inputs.batch.pixel_values] names batch["pixel_values"], and the data
    callable may yield the nested dict the model takes."""
    (tmp_path / "dictmodel.py").write_text(DICT_MODEL)
    cfg = tmp_path / "mmopt.toml"
    cfg.write_text(DICT_CONFIG)
    sys.path.insert(0, str(tmp_path))
    try:
        r = api.export(cfg, tmp_path / "b")
        assert [t.name for t in r.manifest.model_inputs] == ["batch.pixel_values", "batch.input_ids"]
        assert r.manifest.components["image"].sources == {"input": "input:batch.pixel_values"}
        q = api.quantize(tmp_path / "b", precision={"image": "int8"}, sensitivity=False)
        assert q.manifest.results["parity"]["int8"]["image"]["failed"] == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dictmodel", None)


DICT_MODEL = """
import numpy as np
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.text = nn.EmbeddingBag(20, 8, mode="mean")
        self.head = nn.Linear(16, 3)

    def forward(self, batch):
        return self.head(torch.cat([self.image(batch["pixel_values"]), self.text(batch["input_ids"])], -1))


def build():
    torch.manual_seed(0)
    return M().eval()


def batches():
    rng = np.random.default_rng(0)
    for _ in range(4):
        yield {"batch": {"pixel_values": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
                         "input_ids": rng.integers(0, 20, (4, 5))}}
"""

DICT_CONFIG = """
[model]
factory = "dictmodel:build"
[inputs.batch.pixel_values]
shape = ["batch", 3, 8, 8]
[inputs.batch.input_ids]
shape = ["batch", 5]
dtype = "int64"
range = [0, 19]
[dims]
batch = { min = 1, opt = 4, max = 8 }
[components]
image = "image"
text = "text"
[calibration]
source = "dictmodel:batches"
samples = 16
"""


def test_glue_in_the_parent_goes_into_the_consuming_encoders_graph(project):
    """Pixel normalisation before the image encoder, and a mask built with torch.ones from the image
    features before the text encoder, were refused ("computed in the model's forward"). Each encoder's
    graph now starts at the model inputs and holds that glue; the wiring names the real sources."""
    import onnx

    r = api.export(project("glue"), project.dir / "b")
    m = r.manifest
    assert m.components["image"].glue and m.components["text"].glue
    assert set(m.components["image"].sources.values()) >= {"input:pixel_values"}
    # the text encoder reads the image features by value: wired from the image graph, not recomputed
    assert m.components["text"].sources["image.pooled"] == "image:pooled"
    assert m.results["parity"]["fp32"]["pipeline"]["failed"] == 0
    image = onnx.load(str(project.dir / "b" / "image.onnx"))
    assert not any(n.op_type == "Gather" for n in image.graph.node)  # the text path is not in it
    text = onnx.load(str(project.dir / "b" / "text.onnx"))
    assert not any(n.op_type == "Conv" for n in text.graph.node)  # nor the image encoder in the text graph
    q = api.quantize(project.dir / "b", precision={"image": "int8-dynamic", "text": "fp16"}, sensitivity=False)
    assert all(row["failed"] == 0 for row in q.manifest.results["parity"]["mixed"].values())


def test_an_export_whose_precision_table_converts_nothing_still_writes_the_fp32_bundle(project):
    r = api.export(project("voting", extra='[precision]\nfusion = "int8-dynamic"\n'), project.dir / "b")
    assert r.precision is None and "nothing to quantize" in r.manifest.results["kept_fp32"]["[precision]"]
    assert (project.dir / "b" / "fusion.onnx").exists() and not (project.dir / "b" / "fusion.int8-dynamic.onnx").exists()


SIAMESE = CONFIG.replace("[inputs.input_ids]", "[inputs.reference]\nshape = [\"batch\", 3, 16, 16]\n[inputs.input_ids]")


def test_a_component_called_more_than_once_is_one_graph_run_once_per_call(project):
    """A siamese tower (two views through one image encoder) and a shared block applied twice were refused
    ("called 2 times in one forward"). Each is one graph now, run once per call by the pipeline; the
    second call of the block reads the first call's output."""
    path = project.dir / "mmopt.toml"
    path.write_text(SIAMESE.format(factory="siamese", checkpoint="", extra='refine = "refine"\n' + CALIBRATED.replace(
        "models.toydata:calibration_batches", "models.custom:siamese_batches")))
    r = api.export(path, project.dir / "b")
    m = r.manifest
    image, refine = m.components["image"], m.components["refine"]
    assert image.sources == {"pixel_values": "input:pixel_values"}
    assert image.repeats == ({"pixel_values": "input:reference"},)
    assert refine.sources == {"input": "text:pooled"} and refine.repeats == ({"input": "refine:output"},)
    assert "image@2:pooled" in m.components["fusion"].sources.values()
    assert [a.file for a in m.artifacts if a.component == "image"] == ["image.onnx"]  # one graph
    assert m.results["parity"]["fp32"]["pipeline"]["failed"] == 0
    q = api.quantize(project.dir / "b", precision={"image": "int8-dynamic", "refine": "fp16"}, sensitivity=False)
    assert all(row["failed"] == 0 for row in q.manifest.results["parity"]["mixed"].values())
    # static int8 is calibrated on every call, and every call of the component is checked
    s = api.quantize(project.dir / "b", precision={"image": "int8", "refine": "int8"}, sensitivity=False)
    assert {c.case.split("/")[-1] for c in s.checks if "/" in c.case} >= {"image@2", "refine@2"}
    assert all(row["failed"] == 0 for row in s.manifest.results["parity"]["int8"].values())


def test_two_names_for_one_module_are_refused(project):
    from mmopt.errors import CaptureError

    path = project.dir / "mmopt.toml"
    path.write_text(SIAMESE.format(factory="siamese", checkpoint="", extra='query = "image_encoder"\n'))
    with pytest.raises(CaptureError, match="components 'image' and 'query' name the same module"):
        api.export(path, project.dir / "b")


def test_a_glued_encoder_between_two_calls_keeps_the_call_order(project):
    r = api.export(project("glue_between_calls", extra='refine = "refine"\n'), project.dir / "b")
    text = r.manifest.components["text"]
    assert text.glue and "refine:output" in text.sources.values()
    assert not any(v.startswith("refine@2") for v in text.sources.values())  # a later call is not its input
    assert r.manifest.components["refine"].repeats == ({"input": "text:pooled"},)
    assert r.manifest.results["parity"]["fp32"]["pipeline"]["failed"] == 0


def test_calls_of_different_shapes_are_refused(project):
    """The siamese tower given a query image and a smaller reference image: one graph, two shapes."""
    from mmopt.errors import CaptureError

    path = project.dir / "mmopt.toml"
    small = SIAMESE.replace('[inputs.reference]\nshape = ["batch", 3, 16, 16]', '[inputs.reference]\nshape = ["batch", 3, 8, 8]')
    assert small != SIAMESE
    path.write_text(small.format(factory="siamese", checkpoint="", extra=""))
    with pytest.raises(CaptureError) as e:
        api.export(path, project.dir / "b")
    assert str(e.value).endswith("is called 2 times, and its input 'pixel_values' differs between calls (call 1: "
                                 "float32 ['batch', 3, 16, 16], call 2: float32 ['batch', 3, 8, 8], from "
                                 "input:reference). mmopt exports one graph per component: every call must pass "
                                 "tensors of the same dtype and shape (the same [dims]).")


def test_a_component_called_on_slices_of_one_input_is_refused_with_what_to_do(project):
    from mmopt.errors import CaptureError

    with pytest.raises(CaptureError) as e:
        api.export(project("frames"), project.dir / "b")
    msg = str(e.value)
    assert "'image_encoder' is called 2 times" in msg and "(by the operator `[...]`" in msg
    assert "pass each view as its own model input" in msg
    assert not (project.dir / "b").exists()


CALIBRATED = '[calibration]\nsource = "models.toydata:calibration_batches"\nsamples = 64\nmethod = "minmax"\n'


def test_failed_int8_names_the_nodes_to_keep_fp32_and_that_fix_passes(project):
    """A transformer MLP with outlier channels fails int8 (one per-tensor scale for the down-projection's
    input). The error used to say "see the sensitivity report of a passing run"; it now names the nodes
    whose exclusion was converted and judged to pass, as a [precision.exclude] table to paste."""
    from mmopt.errors import ParityError

    def snapshot(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    path = project("outliers", extra=CALIBRATED)
    api.export(path, project.dir / "b")
    before = snapshot(project.dir / "b")
    with pytest.raises(ParityError) as e:
        api.quantize(project.dir / "b", precision={"text": "int8"}, sensitivity=False)
    msg = str(e.value)
    assert "passes every parity gate (converted and judged just now)" in msg and "[precision.exclude]\n  text = [" in msg
    assert e.value.exclude and set(e.value.exclude) == {"text"} and len(e.value.exclude["text"]) <= 4
    assert snapshot(project.dir / "b") == before  # nothing written
    block = msg[msg.index("[precision.exclude]"):].split("\n(replacing")[0].replace("\n  ", "\n")
    path.write_text(path.read_text() + "\n" + block + "\n")  # the user pastes it, and it is not stale
    r = api.quantize(project.dir / "b", precision={"text": "int8"}, sensitivity=False)
    assert r.manifest.results["parity"]["int8"]["pipeline"]["failed"] == 0
