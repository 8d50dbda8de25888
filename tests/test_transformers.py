"""Real transformers architectures, each a multimodal model with its own wiring, exported end to end.

transformers is a test extra: these tests skip without it. Random weights (no hub here), so parity
is gated on cosine and relative error as well as absolute error.
"""
from __future__ import annotations

import shutil
import sys

import pytest

pytest.importorskip("transformers")

from support import TESTS  # noqa: E402
from models.hf import CONFIGS  # noqa: E402

from mmopt import api  # noqa: E402
from mmopt.api import export  # noqa: E402

pytestmark = pytest.mark.slow


def _export(name, tmp_path):
    shutil.copytree(TESTS / "models", tmp_path / "models")
    (tmp_path / "mmopt.toml").write_text(CONFIGS[name])
    try:
        return export(tmp_path / "mmopt.toml", tmp_path / "bundle")
    finally:
        for mod in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
            sys.modules.pop(mod)


def _passed(result):
    parity = result.manifest.results["parity"]["fp32"]
    assert all(p["failed"] == 0 for p in parity.values()), parity
    assert parity["pipeline"]["cos_min"] > 0.9999
    return parity


def test_clip_remainder_fusion(tmp_path):
    r = _export("clip", tmp_path)
    m = r.manifest
    assert set(m.components) == {"image", "text", "fusion"}
    fusion = m.components["fusion"]
    assert fusion.module == ""  # the rest of CLIPModel.forward: projections, normalisation, logits
    assert fusion.sources == {"image.pooler_output": "image:pooler_output",
                              "text.pooler_output": "text:pooler_output"}
    src = m.model["output_sources"]
    assert src["logits_per_image"] == "fusion:logits_per_image"
    assert src["vision_model_output.last_hidden_state"] == "image:last_hidden_state"
    text_in = {t.name: t for t in m.components["text"].inputs}
    assert text_in["input_ids"].shape == ("batch", "seq")
    assert m.components["fusion"].outputs[0].shape == ("batch", "batch")  # logits_per_image
    _passed(r)
    # served by Triton: a validated repository; the fusion's [batch, batch] logits forbid merging requests
    # (tests/test_triton_server.py serves the toy; CLIP served equal to the pipeline too, see docs/triton.md)
    repo = api.triton(r.bundle, None, tmp_path / "repo")
    assert sorted(repo.report.models) == ["clip", "clip_fusion", "clip_image", "clip_text"]
    fusion = repo.plan.members["fusion"]
    assert not fusion.dynamic_batching and "logits_per_image" in fusion.note
    assert repo.plan.members["image"].dynamic_batching and repo.plan.max_batch_size == 8  # [dims] batch max


def test_wav2vec2_audio_plus_bert_text(tmp_path):
    r = _export("audio_text", tmp_path)
    audio = r.manifest.components["audio"]
    assert audio.inputs[0].shape == ("batch", "samples")
    frames = audio.outputs[0].shape[1]
    assert isinstance(frames, str)  # derived dynamic axis: frames follow samples through the conv stack
    assert audio.outputs[0].shapes["max"][1] > audio.outputs[0].shapes["min"][1]
    assert r.manifest.components["fusion"].sources == {"audio.last_hidden_state": "audio:last_hidden_state",
                                                       "text.pooler_output": "text:pooler_output"}
    _passed(r)


def test_three_encoders_named_head(tmp_path):
    r = _export("three", tmp_path)
    m = r.manifest
    assert set(m.components) == {"image", "text", "speech", "fusion"}
    assert m.components["fusion"].module == "head"
    assert m.components["fusion"].sources == {"image": "image:pooler_output", "text": "text:pooler_output",
                                              "audio": "speech:last_hidden_state"}
    assert m.components["speech"].inputs[0].shape == ("batch", 16, 64)
    _passed(r)
