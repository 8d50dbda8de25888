"""mmopt.toml parsing: every bad field is named with its file and a fix."""
from __future__ import annotations

import pytest

from mmopt.errors import ConfigError
from mmopt.spec import load_spec


def test_toy_config_parses(toy_dir):
    spec = load_spec(toy_dir())
    assert list(spec.inputs) == ["pixel_values", "input_ids", "attention_mask"]
    assert spec.dims["batch"].min == 1 and spec.dims["seq"].max == 16
    assert spec.components == {"image": "image_encoder", "text": "text_encoder"}
    assert spec.fusion is None
    assert spec.input_shape("input_ids", "max") == (32, 16)
    assert spec.tolerances["fp32"]["min_cosine"] > 0.999


@pytest.mark.parametrize("edit, needle", [
    (("batch = { min = 1, opt = 8, max = 32 }", 'batch = "eight"'), "dims.batch"),
    (("batch = { min = 1, opt = 8, max = 32 }", "batch = { min = 9, opt = 8, max = 32 }"), "min <= opt <= max"),
    (('factory = "toy:build"', 'factory = "toy.build"'), "model.factory"),
    (('factory = "toy:build"', "factory = 3"), "model.factory"),
    (('dtype = "int64"\nrange = [0, 49]', 'dtype = "int64"'), "inputs.input_ids.range"),
    (('dtype = "bool"', 'dtype = "boolean"'), "inputs.attention_mask.dtype"),
    (('shape = ["batch", 3, 16, 16]', 'shape = ["batch", 3, "height", 16]'), "dim 'height'"),
    (('image = "image_encoder"', 'image = "image_encoder"\nimage_size = 3'), "components.image_size"),
    (("[components]", "[component]"), "did you mean 'components'"),
    (("[dims]", "[dims]\nunused = 4"), "dims.unused"),
])
def test_bad_field_is_named(toy_dir, edit, needle):
    from models.toy import CONFIG

    text = CONFIG.format(checkpoint="", extra="")
    assert edit[0] in text
    path = toy_dir(text=text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_invalid_toml_names_the_file(toy_dir):
    path = toy_dir(text="[model\nfactory = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_spec(tmp_path / "nope.toml")


def test_precision_and_tolerance_sections(toy_dir):
    spec = load_spec(toy_dir(extra='[precision]\nimage = "int8"\ntext = "fp16"\n'
                                  '[tolerance]\nmax_accuracy_drop = 0.01\n[tolerance.fp16]\nmin_cosine = 0.99\n'))
    assert spec.precision == {"image": "int8", "text": "fp16"}
    assert spec.tolerances["fp16"]["min_cosine"] == 0.99
    assert spec.max_accuracy_drop == 0.01
    with pytest.raises(ConfigError, match="precision.audio"):
        load_spec(toy_dir(extra='[precision]\naudio = "int8"\n'))
    with pytest.raises(ConfigError, match="precision.image"):
        load_spec(toy_dir(extra='[precision]\nimage = "int4"\n'))
