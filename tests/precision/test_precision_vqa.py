"""fp16 and int8 on the embedded, trained VQA model, judged on the easy-vqa test split.

CI scores a fixed subset (the first 1,500 test questions); benchmarks/precision_vqa.py scores the
whole split. Calibration uses training images and questions only.
"""
from __future__ import annotations

import re

import onnx
import pytest

pytest.importorskip("easy_vqa")

from mmopt import api  # noqa: E402
from mmopt.examples.vqa import data  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = data.HERE / "mmopt.toml"


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa")
    text = CONFIG.read_text().replace('checkpoint = "vqa.safetensors"',
                                      f'checkpoint = "{data.HERE / "vqa.safetensors"}"')
    text = re.sub(r"samples = 512", "samples = 256", text)
    text += "samples = 1500\n[tolerance]\nmax_accuracy_drop = 0.01\n"
    (d / "mmopt.toml").write_text(text)
    api.export(d / "mmopt.toml", d / "bundle")
    return d


def test_the_example_ships_calibration_on_train_and_evaluation_on_test(monkeypatch):
    from mmopt.spec import load_spec

    spec = load_spec(CONFIG)
    assert spec.calibration.source.endswith("data:calibration_batches")
    assert spec.evaluation.source.endswith("data:evaluation_batches") and spec.evaluation.output == "output"
    seen = []
    make = data.make_inputs
    monkeypatch.setattr(data, "make_inputs", lambda split, index: (seen.append(split), make(split, index))[1])
    next(data.calibration_batches())
    next(data.evaluation_batches())
    assert seen == ["train", "test"]


def test_vqa_fp16_keeps_test_accuracy(vqa):
    r = api.quantize(vqa / "bundle", vqa / "mmopt.toml", precision={"image": "fp16", "text": "fp16",
                                                                     "fusion": "fp16"})
    scores = r.accuracy["scores"]
    assert r.accuracy["samples"] == 1500
    assert abs(scores[r.label] - scores["eager fp32"]) <= 0.002  # within 0.2 points
    assert scores["eager fp32"] > 0.98
    assert any("Softmax" in why for why in r.islands["text"].values())


def test_vqa_int8_within_one_point_with_tensorrt_qdq(vqa):
    r = api.quantize(vqa / "bundle", vqa / "mmopt.toml",
                     precision={"image": "int8", "text": "int8", "fusion": "int8-dynamic"})
    scores = r.accuracy["scores"]
    assert scores["eager fp32"] - scores[r.label] <= 0.01
    image = r.manifest.artifact("image", "int8").config
    assert image["quantized_nodes"] == 5 and image["method_search"]["chosen"] in ("minmax", "percentile")
    assert image["method_search"]["relative_error"]["entropy"] > image["method_search"]["relative_error"]["minmax"]
    q = onnx.load(str(vqa / "bundle" / "image.int8.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 5
    sens = r.sensitivity["image"]
    assert sens["quantized_nodes"] == 5 and len(sens["worst_nodes"]) == 5
    assert r.manifest.artifact("fusion", "int8-dynamic").config["quantized_nodes"] == 2


def test_vqa_int8_cpu_within_one_point_with_an_fp32_stem(vqa):
    r = api.quantize(vqa / "bundle", vqa / "mmopt.toml", precision={"image": "int8-cpu"}, sensitivity=False)
    scores = r.accuracy["scores"]
    assert scores["eager fp32"] - scores[r.label] <= 0.01
    image = r.manifest.artifact("image", "int8-cpu").config
    assert image["fp32_stem_nodes"] == ["node_Conv_63", "node_relu", "node_max_pool2d"]
    assert image["quantized_nodes"] == 4  # the three later convs and the projection
    assert image["method_search"]["relative_error"][image["method"]] < 0.03
