"""``mmopt prune`` on the toy model (real Torch-Pruning, real export): the graph really shrinks, interfaces
stay, alignment holds, the plan rebuilds the model from the factory, recovery is reproducible, and bad input
or an unreachable target is a clear error that writes nothing."""
from __future__ import annotations

import copy
import json
import shutil
import sys

import onnx
import pytest
import torch
from onnx import numpy_helper

from mmopt import api
from mmopt.checkpoint import PLAN_KEY, apply_plan, build_model, prune_plan
from mmopt.errors import CheckpointError, ConfigError, UsageError
from mmopt.jobs.prune import PruneError, pruned_config_text
from mmopt.spec import load_spec
from support import TESTS

pytest.importorskip("torch_pruning", reason="the prune extra (Torch-Pruning) is part of the test extra")

CALIBRATION = """
[calibration]
source = "toydata:calibration_batches"
samples = 64
[evaluation]
source = "toydata:evaluation_batches"
output = "output"
"""


@pytest.fixture
def project(tmp_path):
    from models.toy import CONFIG

    for name in ("toy.py", "toydata.py"):
        shutil.copy(TESTS / "models" / name, tmp_path / name)

    def write(extra: str = CALIBRATION, name: str = "mmopt.toml"):
        (tmp_path / name).write_text(CONFIG.format(checkpoint="", extra=extra))
        return tmp_path / name

    write.root = tmp_path
    yield write
    for mod in ("toy", "toydata"):
        sys.modules.pop(mod, None)


def listing(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_prune_shrinks_the_graph_keeps_interfaces_and_exports(project):
    config = project()
    r = api.prune(config, {"image": 0.5}, project.root / "mmopt.pruned.toml", align=2, steps=20)
    c = r.report["components"]["image"]
    assert c["macs_kept"] <= 0.5 and c["params_after"] < c["params_before"] and c["frozen_layers"] == ["proj"]
    assert r.report["model_params"]["after"] < r.report["model_params"]["before"]
    assert set(r.report["accuracy"]) == {"metric", "samples", "original", "before_recovery", "after_recovery"}
    assert r.report["parent_checkpoint"] is None and r.report["recovery"]["steps"] == 20
    assert listing(project.root) == ["mmopt.pruned.prune.json", "mmopt.pruned.safetensors", "mmopt.pruned.toml",
                                     "mmopt.toml", "toy.py", "toydata.py"]
    assert json.loads((project.root / "mmopt.pruned.prune.json").read_text())["components"]["image"] == c

    before = api.export(config, project.root / "b0")
    after = api.export(r.config, project.root / "b1")  # parity: the ONNX equals the pruned eager model
    assert all(not ch.failed for ch in after.checks)
    for comp in ("image", "text", "fusion"):  # the interfaces the rest reads are unchanged
        assert after.manifest.components[comp].outputs == before.manifest.components[comp].outputs
        assert after.manifest.components[comp].inputs == before.manifest.components[comp].inputs
    w0, w1 = initializers(project.root / "b0" / "image.onnx"), initializers(project.root / "b1" / "image.onnx")
    conv0 = next(a for a in w0.values() if a.ndim == 4)
    conv1 = next(a for a in w1.values() if a.ndim == 4)
    assert conv1.shape[0] < conv0.shape[0] and conv1.shape[0] % 2 == 0  # whole channels gone, aligned
    assert sum(a.nbytes for a in w1.values()) < sum(a.nbytes for a in w0.values())
    assert (project.root / "b1" / "image.onnx").stat().st_size < (project.root / "b0" / "image.onnx").stat().st_size


def test_the_plan_rebuilds_the_pruned_model_from_the_factory(project):
    r = api.prune(project(), {"image": 0.5, "text": 0.7}, project.root / "p.toml", align=2, steps=5)
    plan = prune_plan(r.checkpoint)
    assert plan == r.report["plan"] and set(plan["modules"]) >= {"image_encoder.conv", "image_encoder.proj"}
    assert plan["modules"]["image_encoder.conv"]["attrs"]["out_channels"] % 2 == 0
    spec = load_spec(r.config)
    a, b = build_model(spec), build_model(spec)  # from the factory's fresh model, twice: the same model
    x = {"pixel_values": torch.randn(2, 3, 16, 16), "input_ids": torch.randint(0, 50, (2, 6)),
         "attention_mask": torch.ones(2, 6, dtype=torch.bool)}
    with torch.no_grad():
        assert torch.equal(a(**x), b(**x))
    from safetensors.torch import load_file

    saved = load_file(str(r.checkpoint))
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {k: tuple(v.shape) for k, v in saved.items()}
    # the rebuilt model is the recovered one: it scores what the report says, on the same samples
    from mmopt.capture import split as capture_split
    from mmopt.judge.accuracy import eager_predictor, evaluate

    score = evaluate(spec, {"rebuilt": (lambda i, p=eager_predictor(a, capture_split(a, spec)): p(i))})
    assert score["scores"]["rebuilt"] == r.report["accuracy"]["after_recovery"]
    import hashlib

    assert r.report["checkpoint_sha256"] == hashlib.sha256(r.checkpoint.read_bytes()).hexdigest()


def test_outputs_never_replace_the_original_weights_or_foreign_files(project):
    config = project()
    shutil.copy(TESTS / "models" / "toy.py", project.root / "notes.toml")
    with pytest.raises(UsageError, match="notes.toml exists and was not written by `mmopt prune`"):
        api.prune(config, {"image": 0.5}, project.root / "notes.toml", align=2, steps=1)
    (project.root / "w.safetensors").write_bytes(b"not mine")
    with pytest.raises(UsageError, match="w.safetensors exists and was not written by `mmopt prune`"):
        api.prune(config, {"image": 0.5}, project.root / "w.toml", align=2, steps=1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in __import__("toy").build().state_dict().items()},
              str(project.root / "toy.safetensors"))
    with_ckpt = project(name="c.toml")
    with_ckpt.write_text(with_ckpt.read_text().replace('factory = "toy:build"',
                                                       'factory = "toy:build"\ncheckpoint = "toy.safetensors"'))
    with pytest.raises(UsageError, match="its weights would be toy.safetensors, the checkpoint being pruned"):
        api.prune(with_ckpt, {"image": 0.5}, project.root / "toy.toml", align=2, steps=1)
    r = api.prune(config, {"image": 0.5}, project.root / "again.toml", align=2, steps=1)
    api.prune(config, {"image": 0.5}, r.config, align=2, steps=1)  # its own earlier output: replaced


def test_tied_weights_are_written_once_and_stay_tied(project):
    (project.root / "tied.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.image_encoder = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), "
        "torch.nn.Linear(32, 4))\n"
        "        self.head = torch.nn.Linear(4, 4)\n"
        "        self.out = torch.nn.Linear(4, 4)\n"
        "        self.out.weight = self.head.weight\n"
        "    def forward(self, x):\n"
        "        return self.out(self.head(self.image_encoder(x)))\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return M()\n"
        "def cal():\n"
        "    import numpy as np\n"
        "    for _ in range(4):\n"
        "        yield {'x': np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)}\n")
    cfg = project.root / "tied.toml"
    cfg.write_text('[model]\nfactory = "tied:build"\n[inputs.x]\nshape = ["batch", 4]\n[dims]\n'
                   'batch = { min = 1, opt = 4, max = 8 }\n[components]\nimage = "image_encoder"\n'
                   '[calibration]\nsource = "tied:cal"\nsamples = 16\n')
    r = api.prune(cfg, {"image": 0.5}, project.root / "tied.pruned.toml", align=4, steps=2)
    from safetensors.torch import load_file

    assert "out.weight" not in load_file(str(r.checkpoint))  # one name per shared tensor
    m = build_model(load_spec(r.config))
    assert m.out.weight is m.head.weight and m.image_encoder[0].out_features < 32
    sys.modules.pop("tied", None)


def test_recovery_is_seeded_and_reproducible(project):
    config = project()
    one = api.prune(config, {"image": 0.5}, project.root / "one.toml", align=2, steps=10)
    two = api.prune(config, {"image": 0.5}, project.root / "two.toml", align=2, steps=10)
    assert one.report["recovery"]["loss_last"] == two.report["recovery"]["loss_last"]
    assert one.checkpoint.read_bytes() == two.checkpoint.read_bytes()


@pytest.mark.parametrize("targets, error, message", [
    ({"audio": 0.5}, UsageError, "no component 'audio'; the components are image, text, fusion"),
    ({"image": 0.0}, UsageError, "must be between 0 and 1"),
    ({"image": 1.5}, UsageError, "must be between 0 and 1"),
    ({"fusion": 0.5}, UsageError, "is the rest of the model's forward, not one module"),
    ({}, UsageError, "nothing to prune"),
])
def test_bad_targets_are_refused_before_anything_is_written(project, targets, error, message):
    config = project()
    before = listing(project.root)
    with pytest.raises(error, match=message):
        api.prune(config, targets, project.root / "p.toml", align=2, steps=1)
    assert listing(project.root) == before


def test_output_paths_beside_the_config_only(project, tmp_path_factory):
    config = project()
    elsewhere = tmp_path_factory.mktemp("other") / "p.toml"
    with pytest.raises(UsageError, match="write the pruned config beside"):
        api.prune(config, {"image": 0.5}, elsewhere)
    with pytest.raises(UsageError, match="name the pruned config to write, a .toml file"):
        api.prune(config, {"image": 0.5}, project.root / "pruned")
    with pytest.raises(UsageError, match="that is the config being pruned"):
        api.prune(config, {"image": 0.5}, config)


def test_recovery_needs_calibration_data(project):
    config = project(extra="")
    with pytest.raises(ConfigError, match=r"no \[calibration\] table: pruning recovers the model by distilling"):
        api.prune(config, {"image": 0.5}, project.root / "p.toml")


def test_an_unreachable_target_or_budget_says_what_was_reached_and_writes_nothing(project):
    config = project()
    before = listing(project.root)
    with pytest.raises(PruneError, match=r"pruning stopped at [\d.]+% of image's MACs .* Ask for at least 0\.\d\d, "
                                         r"or lower --align\. Nothing was written\."):
        api.prune(config, {"image": 0.01}, project.root / "p.toml", align=2, steps=1)
    assert listing(project.root) == before
    tight = project(extra=CALIBRATION + "[tolerance]\nmax_accuracy_drop = 0.0\n", name="tight.toml")
    before = listing(project.root)
    with pytest.raises(PruneError, match=r"a drop of .* > \[tolerance\]\.max_accuracy_drop 0\.0\. Nothing was written"):
        api.prune(tight, {"image": 0.3}, project.root / "p.toml", align=2, steps=0)
    assert listing(project.root) == before


def test_a_component_with_nothing_prunable(project, tmp_path):
    (project.root / "lin.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.image_encoder = torch.nn.Linear(4, 4)\n"
        "        self.head = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.image_encoder(x))\n"
        "def build():\n"
        "    return M()\n"
        "def cal():\n"
        "    import numpy as np\n"
        "    for _ in range(4):\n"
        "        yield {'x': np.ones((4, 4), np.float32)}\n")
    cfg = project.root / "lin.toml"
    cfg.write_text('[model]\nfactory = "lin:build"\n[inputs.x]\nshape = ["batch", 4]\n[dims]\n'
                   'batch = { min = 1, opt = 4, max = 8 }\n[components]\nimage = "image_encoder"\n'
                   '[calibration]\nsource = "lin:cal"\nsamples = 16\n')
    with pytest.raises(PruneError, match="nothing in 'image' could be pruned"):
        api.prune(cfg, {"image": 0.5}, project.root / "lin.pruned.toml", align=1, steps=1)
    sys.modules.pop("lin", None)


def test_without_torch_pruning_the_error_says_how_to_install(project, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tp(name, *a, **k):
        if name == "torch_pruning":
            raise ImportError("No module named 'torch_pruning'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tp)
    with pytest.raises(UsageError, match=r"pip install -e '\.\[prune\]'"):
        api.prune(project(), {"image": 0.5}, project.root / "p.toml")


def test_plans_are_checked_before_they_shape_anything(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(CheckpointError, match="names module 'nope', which the factory's model does not have"):
        apply_plan(model, {"modules": {"nope": {"attrs": {"out_channels": 4}}}}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"sets '0\.out_channels' = 'x'"):
        apply_plan(model, {"modules": {"0": {"attrs": {"out_channels": "x"}}}}, tmp_path / "w.safetensors")
    # only sizes may be set, never code or other settings, and only narrowed
    for attr, value in [("forward", 4), ("no_such", 4), ("padding_mode", 4), ("stride", [2, 2]), ("groups", 1),
                        ("_version", 1), ("dilation", [1, 1]), ("out_channels", -3), ("out_channels", 0),
                        ("out_channels", 9), ("in_channels", True)]:
        with pytest.raises(CheckpointError, match=rf"sets '0\.{attr}' = .*, which that module does not have as a size"):
            apply_plan(model, {"modules": {"0": {"attrs": {attr: value}}}}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="names module '', which is not a submodule"):
        apply_plan(model, {"modules": {"": {"attrs": {}}}}, tmp_path / "w")
    with pytest.raises(CheckpointError, match="names module '0._modules'"):
        apply_plan(model, {"modules": {"0._modules": {}}}, tmp_path / "w")
    with pytest.raises(CheckpointError, match="entry for '0' is not"):
        apply_plan(model, {"modules": {"0": ["attrs"]}}, tmp_path / "w")
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(8))
    bn[0].register_buffer("scratch", torch.zeros(8), persistent=False)
    with pytest.raises(CheckpointError, match=r"shapes '0\.scratch' as \[4\], which is no parameter or saved buffer"):
        apply_plan(bn, {"modules": {"0": {"tensors": {"scratch": [4]}}}}, tmp_path / "w")
    with pytest.raises(CheckpointError, match=r"shapes '0\.weight' as \[16\], .* not a narrowing"):
        apply_plan(bn, {"modules": {"0": {"tensors": {"weight": [16]}}}}, tmp_path / "w")
    with pytest.raises(CheckpointError, match=r"shapes '0\.weight' as \[4\], but the checkpoint holds \[8\]"):
        apply_plan(bn, {"modules": {"0": {"tensors": {"weight": [4]}}}}, tmp_path / "w", {"0.weight": torch.ones(8)})
    with pytest.raises(CheckpointError, match=r"shapes '0\.training' as \[1\], which is no parameter or saved buffer"):
        apply_plan(model, {"modules": {"0": {"tensors": {"training": [1]}}}}, tmp_path / "w.safetensors")
    apply_plan(model, {"modules": {"0": {"attrs": {"out_channels": 4}, "tensors": {"weight": [4, 3, 3, 3],
                                                                                 "bias": [4]}}}}, tmp_path / "w")
    assert model[0].out_channels == 4 and model[0].weight.shape == (4, 3, 3, 3)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={PLAN_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="metadata is not JSON"):
        prune_plan(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert prune_plan(tmp_path / "plain.safetensors") is None


def test_the_pruned_config_points_at_the_pruned_weights_only(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('# top\n[model]\nfactory = "m:f"\ncheckpoint = "old.pt"\nstate_dict_key = "model"\n\n'
                   '[inputs.x]\nshape = [1]\n')
    assert pruned_config_text(cfg, "p.safetensors") == (
        '# top\n[model]\n# written by `mmopt prune`: the pruned weights (their plan shapes the factory\'s model)\n'
        'checkpoint = "p.safetensors"\nfactory = "m:f"\n\n[inputs.x]\nshape = [1]\n')
    cfg.write_text('[model]\nfactory = "m:f"\n')
    assert 'checkpoint = "p.safetensors"' in pruned_config_text(cfg, "p.safetensors")
    for odd in ('model = { factory = "m:f", checkpoint = "a.pt" }\n', 'model.factory = "m:f"\n',
                '[model]\nfactory = "m:f"\nkwargs = { sizes = [\n[1, 2]] }\ncheckpoint = "a.pt"\n'):
        cfg.write_text(odd)
        with pytest.raises(ConfigError, match="cannot edit this one line by line"):
            pruned_config_text(cfg, "p.safetensors")


HF_DATA = '''
import numpy as np


def clip():
    rng = np.random.default_rng(0)
    for _ in range(4):
        yield {"input_ids": rng.integers(0, 99, (4, 12)), "pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(
            np.float32), "attention_mask": np.ones((4, 12), np.int64)}


def audio_text():
    rng = np.random.default_rng(0)
    for _ in range(4):
        yield {"input_values": rng.uniform(-1, 1, (4, 1600)).astype(np.float32),
               "input_ids": rng.integers(0, 99, (4, 12)), "attention_mask": np.ones((4, 12), np.int64)}
'''


@pytest.mark.slow
@pytest.mark.parametrize("name, comp, block", [("clip", "image", "encoder.layers.0.self_attn"),
                                               ("audio_text", "text", "encoder.layer.0.attention.self")])
def test_hugging_face_attention_loses_whole_heads_with_its_head_count_fixed(tmp_path, name, comp, block):
    """CLIP's (num_heads / head_dim, q_proj ...) and BERT's (num_attention_heads / attention_head_size, query ...)
    attention: half the heads go, head size stays, the counts are fixed on the module, and the pruned model
    exports with parity against its eager self."""
    pytest.importorskip("transformers")
    from models.hf import CONFIGS

    shutil.copytree(TESTS / "models", tmp_path / "models")
    (tmp_path / "hfdata.py").write_text(HF_DATA)
    config = tmp_path / "mmopt.toml"
    config.write_text(CONFIGS[name] + f'[calibration]\nsource = "hfdata:{name}"\nsamples = 16\n')
    try:
        r = api.prune(config, {comp: 0.5}, tmp_path / "mmopt.pruned.toml", align=8, steps=2)
        heads = r.report["components"][comp]["attention_heads"]
        assert heads and all(h["heads_before"] == 4 and h["heads"] == 2 for h in heads)
        assert any(h["block"] == block for h in heads)
        model = build_model(load_spec(r.config))
        root = model.get_submodule({"image": "vision_model", "text": "text"}[comp])
        attn = root.get_submodule(block)
        counts = (attn.num_heads, attn.head_dim) if hasattr(attn, "head_dim") else \
            (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size)
        assert counts[:2] == (2, 8) and (len(counts) == 2 or counts[2] == 16)
        out = api.export(r.config, tmp_path / "bundle")
        assert all(not c.failed for c in out.checks)
    finally:
        for mod in [m for m in sys.modules if m in ("models", "hfdata") or m.startswith("models.")]:
            sys.modules.pop(mod)


def test_a_latency_target_prunes_until_the_measured_ratio_is_reached(project):
    """The stop rule, with a scripted measurement; the measurement itself (a real export timed on ONNX Runtime)
    is the next test."""
    import torch_pruning as tp

    from mmopt.jobs.prune import _Bound, prune_component

    from models.toy import build

    bound = _Bound(build().image_encoder, {})
    measured = iter([1.0, 0.9, 0.7, 0.4])
    r = prune_component(tp, bound, (torch.randn(2, 3, 16, 16),), 0.75, 2, lambda m: None, lambda: next(measured))
    assert r["latency_ratio_per_step"] == [1.0, 0.9, 0.7] and r["pruning_steps"] == 2


def test_the_exported_latency_ratio_is_measured_on_real_graphs(project):
    from mmopt.capture import split as capture_split
    from mmopt.jobs.prune import _onnx_latency

    spec = load_spec(project())
    model = build_model(spec)
    split = capture_split(model, spec)
    ratio = _onnx_latency(model, model, split, "image", project.root / "scratch")()
    assert 0.5 < ratio < 2.0  # the same graph twice: about 1 on a noisy machine
    with pytest.raises(UsageError, match="--target speed: choose one of macs, latency"):
        api.prune(project(), {"image": 0.5}, project.root / "p.toml", target="speed")


def test_two_four_sparsity_is_kept_through_recovery_and_found_in_the_exported_graph(project):
    from mmopt.jobs.prune import two_four_masks, two_four_pattern

    lin = torch.nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., -5, 2, 0.5, 9, 8, -7, 6]] * 3))
    (mask,) = two_four_masks(lin).values()
    assert mask[0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]  # the two largest magnitudes of each four
    with pytest.raises(PruneError, match="none can be 2:4 sparse"):  # 2 channels left: the projection reads 2
        api.prune(project(), {"image": 0.5}, project.root / "s.toml", align=2, steps=5, sparse_2_4=True)
    r = api.prune(project(), {"image": 0.6}, project.root / "s.toml", align=4, steps=5, sparse_2_4=True)
    sp = r.report["components"]["image"]["sparse_2_4"]
    assert sp["layers"] == 1 and sp["pattern_verified_in_onnx"] and "not measurable here" in sp["speed"]
    api.export(r.config, project.root / "b")
    found = two_four_pattern(project.root / "b" / "image.onnx")
    assert found["weights_2_4"] == 1  # the projection (4 inputs after pruning); the 3-channel conv is left dense
    dense = api.prune(project(), {"image": 0.6}, project.root / "d.toml", align=4, steps=5)
    api.export(dense.config, project.root / "bd")
    assert two_four_pattern(project.root / "bd" / "image.onnx")["weights_2_4"] == 0


class _Attention(torch.nn.Module):
    """CLIP-style attention (num_heads / head_dim / q_proj ...), optionally returning its attention maps or
    with narrower k / v (grouped-query)."""

    def __init__(self, maps: bool = False, kv_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim, self.maps = 4, 4, maps
        self.q_proj = torch.nn.Linear(16, 16)
        self.k_proj = torch.nn.Linear(16, kv_heads * 4)
        self.v_proj = torch.nn.Linear(16, kv_heads * 4)
        self.out_proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
        o = self.out_proj((w @ v).transpose(1, 2).reshape(b, t, -1))
        return (x + o, w) if self.maps else x + o


def test_heads_to_drop_rounds_the_share_without_float_error():
    from mmopt.jobs.prune import heads_to_drop

    cases = {(10, 0.9): 1, (5, 0.8): 1, (10, 0.8): 2, (20, 0.8): 4, (20, 0.9): 2, (4, 0.5): 2, (1, 0.1): 0,
             (4, 0.01): 3, (4, 0.99): 0}
    assert {k: heads_to_drop(*k) for k in cases} == cases


def test_the_weakest_heads_go_and_the_others_compute_as_before():
    import torch_pruning as tp

    from mmopt.jobs.prune import _Bound, attention_blocks, output_shapes, prune_heads

    torch.manual_seed(0)
    block = _Attention()
    with torch.no_grad():
        for p in (block.q_proj, block.k_proj, block.v_proj):
            p.weight[8:12] *= 1e-3  # head 2
            p.weight[0:4] *= 1e-2  # head 0
    x = torch.randn(2, 5, 16)
    reference = copy.deepcopy(block)
    with torch.no_grad():  # what heads 0 and 2 contribute, taken away by hand
        reference.v_proj.weight[0:4] = 0
        reference.v_proj.weight[8:12] = 0
        reference.v_proj.bias[0:4] = 0
        reference.v_proj.bias[8:12] = 0
        want = reference(x)
    bound = _Bound(block, {})
    history, whole = prune_heads(tp, bound, (x,), attention_blocks(bound), 0.5, [], output_shapes(bound, (x,)))
    assert whole == [] and history[0][2] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert (block.num_heads, block.head_dim, block.q_proj.out_features, block.out_proj.in_features) == (2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), want)


def test_grouped_query_blocks_and_blocks_whose_maps_are_outputs_keep_their_heads():
    import torch_pruning as tp

    from mmopt.jobs.prune import _Bound, attention_blocks, output_shapes, prune_heads

    assert attention_blocks(_Bound(_Attention(kv_heads=2), {})) == []  # k / v narrower than q: not matched
    block = _Attention(maps=True)
    bound = _Bound(block, {})
    x = torch.randn(2, 5, 16)
    history, whole = prune_heads(tp, bound, (x,), attention_blocks(bound), 0.5, [], output_shapes(bound, (x,)))
    assert history == [] and whole == [block] and block.num_heads == 4  # the maps' head axis is an output


def test_a_plan_that_changes_a_head_count_alone_is_refused(tmp_path):
    model = torch.nn.Sequential(_Attention())
    with pytest.raises(CheckpointError, match="leaves attention block '0' inconsistent"):
        apply_plan(model, {"modules": {"0": {"attrs": {"num_heads": 2}}}}, tmp_path / "w")
    mha = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4))
    with pytest.raises(CheckpointError, match="leaves attention block '0' inconsistent"):
        apply_plan(mha, {"modules": {"0": {"attrs": {"num_heads": 3}}}}, tmp_path / "w")
