"""Safe checkpoint loading: safetensors and weights_only; every mismatch in one error."""
from __future__ import annotations

import pytest
import torch
from support import run_cli
from safetensors.torch import save_file

from mmopt.checkpoint import build_model
from mmopt.errors import CheckpointError, ConfigError
from mmopt.spec import load_spec


def _state(toy_dir):
    import sys

    sys.path.insert(0, str(toy_dir.dir))
    import toy

    torch.manual_seed(1)
    return toy.Toy().state_dict()


def test_safetensors_loads_trained_weights(toy_dir):
    sd = _state(toy_dir)
    save_file(sd, str(toy_dir.dir / "w.safetensors"))
    model = build_model(load_spec(toy_dir(checkpoint='checkpoint = "w.safetensors"')))
    assert torch.equal(model.head.weight, sd["head.weight"])
    assert not model.training


def test_pt_with_state_dict_key(toy_dir):
    sd = _state(toy_dir)
    torch.save({"model": sd, "epoch": 3}, toy_dir.dir / "run.pt")
    model = build_model(load_spec(toy_dir(checkpoint='checkpoint = "run.pt"\nstate_dict_key = "model"')))
    assert torch.equal(model.head.bias, sd["head.bias"])
    with pytest.raises(CheckpointError, match="state_dict_key"):
        build_model(load_spec(toy_dir(checkpoint='checkpoint = "run.pt"')))
    with pytest.raises(CheckpointError, match="no key 'weights'"):
        build_model(load_spec(toy_dir(checkpoint='checkpoint = "run.pt"\nstate_dict_key = "weights"')))


def test_pickled_code_is_refused_unless_trusted(toy_dir):
    import sys

    _state(toy_dir)  # puts the toy folder on sys.path and imports toy
    pickled = sys.modules["toy"].build()
    with torch.no_grad():  # other weights than the factory's seeded build: the file's must be the ones loaded
        for p in pickled.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(123)))
    torch.save(pickled, toy_dir.dir / "full.pt")  # a whole pickled module
    spec = load_spec(toy_dir(checkpoint='checkpoint = "full.pt"'))
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        build_model(spec)
    loaded = build_model(spec, trust_checkpoint=True)
    factory = sys.modules["toy"].build()
    mine, theirs = dict(loaded.named_parameters()), dict(pickled.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not all(torch.equal(mine[k], p) for k, p in factory.named_parameters())


def test_mismatches_are_listed_together(toy_dir):
    sd = _state(toy_dir)
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(5, 7)
    save_file(sd, str(toy_dir.dir / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        build_model(load_spec(toy_dir(checkpoint='checkpoint = "bad.safetensors"')))
    msg = str(e.value)
    assert "missing keys (1): head.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatch for head.weight: checkpoint (5, 7), model (5, 32)" in msg


@pytest.mark.parametrize("name, data", [("w.safetensors", b"\x00garbage" * 10), ("w.pt", b"PK\x03\x04broken")])
def test_corrupt_file(toy_dir, name, data):
    (toy_dir.dir / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt"):
        build_model(load_spec(toy_dir(checkpoint=f'checkpoint = "{name}"')))


def test_missing_checkpoint_and_bad_factory(toy_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(load_spec(toy_dir(checkpoint='checkpoint = "nope.safetensors"')))
    from models.toy import CONFIG

    base = CONFIG.format(checkpoint="", extra="")
    for factory, needle in [("nomodule:build", "cannot import module 'nomodule'"),
                            ("toy:nothing", "has no attribute 'nothing'"),
                            ("toy:not_a_module", "not a torch.nn.Module")]:
        with pytest.raises(ConfigError, match=needle):
            build_model(load_spec(toy_dir(text=base.replace("toy:build", factory))))
    with pytest.raises(ConfigError, match="model.kwargs"):
        build_model(load_spec(toy_dir(text=base.replace("[inputs.pixel_values]",
                                                        "[model.kwargs]\ncolour = 3\n[inputs.pixel_values]"))))


def test_cli_prints_error_without_traceback(toy_dir, tmp_path):
    (toy_dir.dir / "w.safetensors").write_bytes(b"junk")
    cfg = toy_dir(checkpoint='checkpoint = "w.safetensors"')
    r = run_cli("export", str(cfg), "-o", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "w.safetensors" in r.stderr and "corrupt" in r.stderr
    assert not (tmp_path / "out").exists()
