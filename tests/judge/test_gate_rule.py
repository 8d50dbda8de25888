"""One gate rule for export, quantize and bench (``judge.parity.tolerance_for``): an int8 encoder that
``mmopt quantize`` passed is judged the same way by ``mmopt bench``."""
from __future__ import annotations

import dataclasses

import numpy as np

from mmopt.bench import backends
from mmopt.judge.compare import check_all
from mmopt.spec import DEFAULT_TOLERANCES, load_spec
from mmopt.judge.parity import tolerance_for


def test_encoders_are_never_argmax_gated_fusion_and_pipeline_are(toy_bundle):
    spec_like = load_spec(toy_bundle.manifest.model["config"])
    split = toy_bundle.manifest  # has .components with kinds, like a Split
    gate = tolerance_for(spec_like, split, {"image": "int8", "text": "fp16"})
    assert gate("image")["min_argmax"] == 0.0 and gate("image")["min_cosine"] == 0.98
    assert gate("text")["min_argmax"] == 0.0 and gate("text")["min_cosine"] == 0.999
    assert gate("fusion")["min_argmax"] == 1.0  # fusion at fp32
    assert gate("pipeline") == DEFAULT_TOLERANCES["int8"]  # the least faithful part decides


def test_a_feature_vector_whose_argmax_flips_passes_the_encoder_gate_in_bench(toy_bundle):
    """The case that failed `mmopt bench` right after `mmopt quantize` passed it: rows whose largest
    feature changes place while the vector stays within the int8 cosine gate."""
    spec_like = load_spec(toy_bundle.manifest.model["config"])
    ref = np.tile(np.array([[1.0, 0.999, 0.5, 0.2]], np.float32), (8, 1))
    out = ref.copy()
    out[:, [0, 1]] = out[:, [1, 0]]  # argmax flips in every row, cosine ~1
    variant = backends.Variant("onnxruntime/int8", "onnxruntime", "cpu", "int8",
                              {"image": dataclasses.replace(toy_bundle.manifest.artifact("image"), precision="int8")})
    gate = tolerance_for(spec_like, toy_bundle.manifest, variant.precisions)
    (c,) = check_all("image", "opt", {"f": ref}, {"f": out}, gate("image"))
    assert c.metrics.argmax == 0.0 and not c.failed
    (c,) = check_all("fusion", "opt", {"f": ref}, {"f": out}, gate("fusion"))
    assert c.failed  # a score output with every row flipped still fails
