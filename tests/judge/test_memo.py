"""What one process computes once, and when it must compute again: the eager reference of a bundle and
the task scores of a predictor (``mmopt demo`` runs export, quantize x3 and bench in one process)."""
from __future__ import annotations

import numpy as np
import torch

from mmopt import reference
from mmopt.api import export
from mmopt.judge import accuracy
from mmopt.manifest import Manifest
from mmopt.spec import load_spec

SHUFFLED = '''
import numpy as np
from toydata import evaluation_batches

CALLS = [0]

def shuffled():
    """The same samples in another order on every call (a DataLoader with shuffle=True)."""
    CALLS[0] += 1
    rng = np.random.default_rng(CALLS[0])
    for inputs, labels in evaluation_batches():
        order = rng.permutation(len(labels))
        yield {k: v[order] for k, v in inputs.items()}, labels[order]
'''


def test_the_reference_is_reused_only_for_the_bundle_it_was_exported_to(toy_dir, tmp_path):
    cfg = toy_dir()
    spec = load_spec(cfg)
    first = export(cfg, tmp_path / "a")
    ref = reference.build(first.bundle, Manifest.read(first.bundle), spec)
    again = reference.build(first.bundle, Manifest.read(first.bundle), spec)
    assert ref.model is again.model  # quantize and bench after export: built once

    toy = (toy_dir.dir / "toy.py")
    toy.write_text(toy.read_text().replace("torch.manual_seed(0)\n    return Toy()", "torch.manual_seed(1)\n    return Toy()"))
    import sys
    sys.modules.pop("toy", None)
    second = export(cfg, tmp_path / "b")  # the factory now builds other weights: same config and no checkpoint
    other = reference.build(second.bundle, Manifest.read(second.bundle), load_spec(cfg))
    assert other.model is not ref.model
    assert not torch.equal(other.model.head.weight, ref.model.head.weight)
    old = reference.build(first.bundle, Manifest.read(first.bundle), load_spec(cfg))  # the old bundle: rebuilt
    assert old.model is not other.model


def test_cached_scores_are_used_only_on_the_same_batches(toy_dir, tmp_path):
    import shutil

    from support import TESTS

    shutil.copy(TESTS / "models" / "toydata.py", toy_dir.dir / "toydata.py")
    (toy_dir.dir / "shuffled.py").write_text(SHUFFLED)
    spec = load_spec(toy_dir(extra='[evaluation]\nsource = "shuffled:shuffled"\noutput = "output"'))
    import sys
    sys.path.insert(0, str(toy_dir.dir))
    from toy import build

    from mmopt.capture import split as capture_split

    model = build()
    s = capture_split(model, spec)
    eager = accuracy.eager_predictor(model, s)
    first = accuracy.evaluate(spec, {"eager": eager, "copy": accuracy.eager_predictor(build(), s)},
                              parity_to="eager")
    second = accuracy.evaluate(spec, {"eager": eager, "copy": accuracy.eager_predictor(build(), s)},
                               parity_to="eager")
    assert first["scores"]["eager"] == second["scores"]["eager"] == 1.0  # labels are what eager predicts
    assert second["parity"]["copy"]["cos_min"] > 0.99999


def test_a_pipeline_of_other_weights_is_not_taken_from_the_cache():
    key_a = ("onnx", (("image", "a" * 64, None, False),))
    key_b = ("onnx", (("image", "b" * 64, None, False),))
    assert key_a != key_b
    assert accuracy.memo_key(type("P", (), {"memo_key": key_a, "infer": lambda self, x: x})().infer) == key_a
    assert accuracy.memo_key(lambda x: x) is None
    np.testing.assert_equal(accuracy._digest({"x": np.ones(3)}, np.zeros(3)), accuracy._digest({"x": np.ones(3)},
                                                                                                  np.zeros(3)))
    assert accuracy._digest({"x": np.ones(3)}, np.zeros(3)) != accuracy._digest({"x": np.ones(3)}, np.ones(3))


def test_eager_io_runs_the_model_once_per_inputs(toy_dir):
    """judge, the fp16 cases, the auto search and every bench variant ask for the same (size, seed): the
    model runs once; other inputs, or another capture of the model, run again."""
    from mmopt.capture import split as capture_split
    from mmopt.checkpoint import build_model

    spec = load_spec(toy_dir())
    model = build_model(spec)
    s = capture_split(model, spec)
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    first = reference.eager_io(model, spec, s, "opt", 4242)
    assert calls == [1]
    again = reference.eager_io(model, spec, s, "opt", 4242)
    assert calls == [1] and again[1] is first[1]
    reference.eager_io(model, spec, s, "opt", 4243)  # other inputs
    assert calls == [2]
    other = capture_split(model, spec)
    calls[0] = 0
    reference.eager_io(model, spec, other, "opt", 4242)  # the capture is part of the key
    assert calls == [1]
    fresh = reference._run_eager(model, spec, s, reference.random_inputs(
        spec, {n: spec.input_shape(n, "opt") for n in spec.inputs}, 4242), "opt")
    for name, a in fresh[1].items():
        assert np.array_equal(a, first[1][name])  # what the memo holds is what the model gives


def test_eager_io_lets_go_of_a_model_the_process_no_longer_holds(toy_dir):
    from mmopt.capture import split as capture_split
    from mmopt.checkpoint import build_model

    spec = load_spec(toy_dir())
    model, other = build_model(spec), build_model(spec)
    s = capture_split(model, spec)
    reference.eager_io(model, spec, s, "opt", 7)
    reference.eager_io(other, spec, capture_split(other, spec), "opt", 7)
    reference._forget(keep=model)  # what building or remembering a model does
    owners = [v[2][0] for v in reference._IO.values()]
    assert any(o is model for o in owners) and not any(o is other for o in owners)
