"""Capture: names, dtypes, dynamic axes, profiles and wiring derived from three eager runs."""
from __future__ import annotations

import pytest

from mmopt.capture import split
from mmopt.checkpoint import build_model
from mmopt.errors import CaptureError
from mmopt.spec import load_spec


def _split(cfg):
    spec = load_spec(cfg)
    return split(build_model(spec), spec)


def test_toy_specs_and_wiring(toy_dir):
    s = _split(toy_dir())
    image, text, fusion = (s.components[c] for c in ("image", "text", "fusion"))
    assert image.sources == {"x": "input:pixel_values"}
    assert text.sources == {"input_ids": "input:input_ids", "attention_mask": "input:attention_mask"}
    # the dict output is flattened by key; only the leaf the parent reads feeds the fusion graph
    assert [o.name for o in text.outputs] == ["pooled", "tokens"]
    assert fusion.sources == {"image.output": "image:output", "text.pooled": "text:pooled"}
    assert s.output_sources == {"output": "fusion:output"}
    ids = text.inputs[0]
    assert ids.dtype == "int64" and ids.shape == ("batch", "seq") and ids.range == (0, 49)
    # the profile keeps the declared batch min of 1 even though capture ran at 2
    assert ids.shapes == {"min": (1, 4), "opt": (8, 8), "max": (32, 16)}
    assert text.outputs[1].shape == ("batch", "seq", 16)
    assert fusion.outputs[0].shape == ("batch", 5)
    assert text.inputs[1].dtype == "bool"


def test_unknown_submodule_lists_real_ones(toy_dir):
    cfg = toy_dir(text=open(toy_dir()).read().replace('"text_encoder"', '"txt_encoder"'))
    with pytest.raises(CaptureError) as e:
        _split(cfg)
    assert "components.text" in str(e.value) and "text_encoder" in str(e.value)


def test_named_fusion_with_glue_in_between_says_where(toy_dir):
    with pytest.raises(CaptureError) as e:
        _split(toy_dir(text=open(toy_dir()).read().replace('text = "text_encoder"',
                                                             'text = "text_encoder"\nfusion = "head"')))
    msg = str(e.value)
    assert "components.fusion" in msg and "cat" in msg and "Remove `fusion = ...`" in msg


def test_component_called_twice(toy_dir):
    with pytest.raises(CaptureError, match="called 2 times"):
        _split(toy_dir(text=open(toy_dir()).read().replace("toy:build", "toy:twice")))


def test_forward_failure_names_sizes(toy_dir):
    cfg = toy_dir(text=open(toy_dir()).read().replace("seq = { min = 4, opt = 8, max = 16 }",
                                                         "seq = { min = 4, opt = 8, max = 40 }"))
    with pytest.raises(CaptureError, match="forward failed at the max size"):
        _split(cfg)


def test_a_bug_in_mmopts_hooks_keeps_its_traceback(toy_dir, monkeypatch):
    """mmopt's own hook failing is mmopt's bug: it surfaces as itself, not as "check [inputs]"."""
    import mmopt.capture as capture

    monkeypatch.setattr(capture, "_key_name", None)  # the injected bug: flatten_call (in a hook) calls None
    with pytest.raises(TypeError, match="not callable"):
        _split(toy_dir())


def test_the_users_failing_op_is_a_user_error_though_mmopts_mode_forwards_it(toy_dir):
    """The recording TorchFunctionMode is the innermost Python frame of a failing torch op: still the user's."""
    from mmopt.errors import raised_by_mmopt

    cfg = toy_dir(text=open(toy_dir()).read().replace("seq = { min = 4, opt = 8, max = 16 }",
                                                         "seq = { min = 4, opt = 8, max = 40 }"))
    with pytest.raises(CaptureError, match="forward failed") as e:
        _split(cfg)
    assert not raised_by_mmopt(e.value)


def test_an_input_the_forward_does_not_take_is_the_users_error(toy_dir):
    """torch raises it before the user's forward has a frame: the only mmopt frame is the one that caught it."""
    cfg = toy_dir(text=open(toy_dir()).read().replace("[inputs.pixel_values]", "[inputs.image]"))
    assert "[inputs.image]" in open(cfg).read()
    with pytest.raises(CaptureError, match="forward failed.*unexpected keyword argument 'image'"):
        _split(cfg)


def test_ops_are_named_as_the_user_wrote_them():
    import torch

    from mmopt.capture import public_name

    assert public_name(torch.ones) == "torch.ones"
    assert public_name(torch.Tensor.div) == "Tensor.div"
    assert "`/`" in public_name(torch.Tensor.__truediv__)
    assert public_name(torch.nn.functional.layer_norm) == "torch.nn.functional.layer_norm"
