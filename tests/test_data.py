"""Calibration and evaluation data: every batch checked against [inputs], with errors that say what to fix."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from support import TESTS

from mmopt import calibration, data
from mmopt.capture import split as capture_split
from mmopt.checkpoint import build_model
from mmopt.errors import CalibrationError, ConfigError
from mmopt.spec import load_spec


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(write(source, samples) -> spec, model, split) for the toy model, data module beside the config."""
    from models.toy import CONFIG

    d = tmp_path_factory.mktemp("calib")
    for f in ("toy.py", "toydata.py"):
        shutil.copy(TESTS / "models" / f, d / f)

    def write(source: str = "calibration_batches", samples: int = 40, extra: str = ""):
        path = d / "mmopt.toml"
        path.write_text(CONFIG.format(checkpoint="", extra=extra) +
                        f'[calibration]\nsource = "toydata:{source}"\nsamples = {samples}\nmethod = "minmax"\n')
        return load_spec(path)

    spec = write()
    model = build_model(spec)
    yield write, model, capture_split(model, spec)
    for mod in ("toy", "toydata"):
        sys.modules.pop(mod, None)


def test_load_collects_exactly_the_samples_and_each_components_real_inputs(toy):
    write, model, split = toy
    spec = write(samples=20)
    cal = calibration.load(model, spec, split)
    assert cal.samples == 20 and [len(b["input_ids"]) for b in cal.batches] == [8, 8, 4]
    image_in, image_out = cal.feeds["image"][2]
    assert set(image_in) == {"x"} and image_in["x"].shape == (4, 3, 16, 16)
    fusion_in, _ = cal.feeds["fusion"][0]  # the fusion head is calibrated on the encoders' real outputs
    assert set(fusion_in) == {"image.output", "text.pooled"}
    np.testing.assert_array_equal(fusion_in["image.output"], cal.feeds["image"][0][1]["output"])


def test_torch_tensors_are_accepted_and_big_batches_split(toy):
    write, model, split = toy
    cal = calibration.load(model, write("torch_batches", 16), split)
    assert all(isinstance(v, np.ndarray) for b in cal.batches for v in b.values())
    cal = calibration.load(model, write("big_batches", 150), split)
    assert [len(b["input_ids"]) for b in cal.batches] == [32, 32, 6, 32, 32, 6, 10]


@pytest.mark.parametrize("source, expected", [
    ("wrong_names", ["missing inputs: attention_mask", "unexpected inputs: mask"]),
    ("wrong_dtype", ["pixel_values: dtype float64, expected float32", ".astype(np.float32)"]),
    ("wrong_shape", ["pixel_values: axis 3 is 8, expected 16", "axis 1 ('seq') is 20, outside [dims].seq = [4, 16]"]),
    ("with_nan", ["batch 1 from toydata:with_nan()", "pixel_values: 1 NaN and 0 Inf values"]),
    ("bad_ids", ["input_ids: values span [0, 50], outside [0, 49]"]),
    ("not_dicts", ["batch 0 from toydata:not_dicts() is a list; it must be a dict"]),
    ("raises", ["toydata:raises() raised RuntimeError: disk on fire while producing batch 1"]),
    ("short", ["yielded only 16 samples, fewer than the 40 asked for", "lower [calibration].samples"]),
])
def test_bad_calibration_data_is_a_clear_error(toy, source, expected):
    write, model, split = toy
    with pytest.raises(CalibrationError) as e:
        calibration.load(model, write(source), split)
    for text in expected:
        assert text in str(e.value)
    assert "field 'calibration" in str(e.value)


def test_missing_callable_and_missing_table(toy):
    write, model, split = toy
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        calibration.load(model, write("nope"), split)
    with pytest.raises(CalibrationError, match=r"add a \[calibration\] table"):
        calibration.load(model, write().replace(calibration=None), split)


def test_evaluation_batches_need_integer_labels(toy):
    write, _, _ = toy
    spec = write()
    got = list(data.take(data.iterate(spec, "toydata:evaluation_batches", "evaluation.source",
                                                    labelled=True), 40))
    assert [len(lab) for _, lab in got] == [32, 8]
    with pytest.raises(CalibrationError, match=r"labels must be integer class ids of shape \[8\]"):
        list(data.iterate(spec, "toydata:bad_labels", "evaluation.source", labelled=True))
