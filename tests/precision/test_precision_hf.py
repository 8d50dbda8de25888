"""fp16 and int8 on a transformers architecture with an attention mask (HF CLIP, remainder fusion).

Random weights (no hub here): the int8 gate is looser than the default, and what is checked is that the
quantization leaves the mask path alone and keeps the pipeline close, while fp16 must meet the default
gate by keeping the finfo.min mask arithmetic in fp32.
"""
from __future__ import annotations

import json

import shutil
import sys

import onnx
import pytest

pytest.importorskip("transformers")

from support import TESTS  # noqa: E402
from models.hf import CONFIGS  # noqa: E402

from mmopt import api  # noqa: E402

pytestmark = pytest.mark.slow

EXTRA = """
[calibration]
source = "models.hfdata:clip_batches"
samples = 32
method = "percentile"
"""


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    shutil.copytree(TESTS / "models", d / "models")
    (d / "mmopt.toml").write_text(CONFIGS["clip"] + EXTRA)
    api.export(d / "mmopt.toml", d / "bundle")
    yield d / "bundle"
    for mod in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        sys.modules.pop(mod)


def test_clip_fp16_keeps_the_mask_arithmetic_in_fp32(clip):
    r = api.quantize(clip, precision={"image": "fp16", "text": "fp16", "fusion": "fp16"})
    parity = r.manifest.results["parity"]["fp16"]
    assert all(row["failed"] == 0 for row in parity.values()) and parity["pipeline"]["cos_min"] > 0.999
    text = r.islands["text"]
    assert any(why.startswith("Softmax") and "overflow" in why for why in text.values())
    assert any("3.4e+38" in why for why in text.values())  # the finfo(float32).min additive mask


def test_clip_int8_quantizes_compute_ops_only(clip):
    """At the default gates. With random weights the similarity logits of near-orthogonal embeddings are
    fragile: int8 on both encoders misses the pipeline's cosine gate, and the error names the nodes to keep
    fp32 (verified); with them excluded, as a user pastes them, int8 passes every default gate."""
    from mmopt.errors import ParityError

    config = clip.parent / "mmopt.toml"
    try:
        r = api.quantize(clip, precision={"image": "int8", "text": "int8"}, sensitivity=False)
    except ParityError as e:
        assert e.exclude and "passes every parity gate (converted and judged just now)" in str(e)
        config.write_text(config.read_text() + "\n[precision.exclude]\n" + "".join(
            f"{c} = {json.dumps(n)}\n" for c, n in e.exclude.items()))
        r = api.quantize(clip, precision={"image": "int8", "text": "int8"}, sensitivity=False)
    parity = r.manifest.results["parity"]["int8"]
    assert all(row["failed"] == 0 for row in parity.values())
    assert parity["text"]["cos_min"] > 0.98 and parity["image"]["cos_min"] > 0.98  # default int8 gate
    q = onnx.load(str(clip / "text.int8.onnx"))
    made = {o: n for n in q.graph.node for o in n.output}
    readers = {n.op_type for n in q.graph.node
               if any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in n.input)}
    assert readers == {"MatMul", "Gemm"} or readers == {"MatMul"}
    assert r.manifest.artifact("text", "int8").config["method"] == "percentile"


def test_clip_fusion_int8_with_its_sensitivity_report(clip):
    """CLIP's fusion head quantizes tensors that are also graph outputs (image_embeds, text_embeds): the
    quantizer renames them, which crashed the per-node report after parity had passed. The embeddings are
    features: no argmax gate applies to them (the default int8 gate, no min_argmax override)."""
    r = api.quantize(clip, precision={"fusion": "int8"})
    assert r.sensitivity["fusion"]["quantized_nodes"] >= 1
    worst = r.sensitivity["fusion"]["worst_nodes"]
    assert worst and all(row["argmax"] is None for row in worst)  # no score outputs declared
    parity = r.manifest.results["parity"]["int8"]
    assert parity["fusion"]["argmax"] is None and parity["fusion"]["failed"] == 0
