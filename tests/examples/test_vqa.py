"""The embedded easy-vqa example: PNG reader, tokeniser, batch sources, shipped checkpoint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

easy_vqa = pytest.importorskip("easy_vqa")

from mmopt.examples.vqa import data  # noqa: E402
from mmopt.examples.vqa.model import VOCAB_SIZE, build_model  # noqa: E402
from mmopt.spec import load_spec  # noqa: E402

HERE = Path(data.__file__).parent


# --------------------------------------------------------------------------------------- images

def test_images_decode_with_pillow_to_uint8_rgb():
    ids, pixels = data.load_images("test")
    assert pixels.dtype == np.uint8 and pixels.shape == (len(ids), 64, 64, 3)
    assert len(np.unique(pixels[:20])) > 2  # shapes in colours on a background, not a blank image


# ---------------------------------------------------------------------------------- tokeniser

def test_vocab_is_built_from_training_questions():
    shipped = json.loads((HERE / "vocab.json").read_text())
    assert shipped == data.build_vocab(easy_vqa.get_train_questions()[0])
    assert shipped["<pad>"] == 0 and shipped["<unk>"] == 1 and len(shipped) == VOCAB_SIZE
    spec = load_spec(HERE / "mmopt.toml")
    assert spec.inputs["input_ids"].range == (2, VOCAB_SIZE - 1)


def test_tokeniser_round_trip_padding_and_mask():
    questions = ["What color is the shape?", "Is there a red circle in the image?", "is it blue"]
    ids, mask = data.encode(questions)
    assert ids.dtype == np.int64 and mask.dtype == np.bool_ and ids.shape == mask.shape == (3, 8)
    np.testing.assert_array_equal(mask.sum(1), [5, 8, 3])
    assert (ids[~mask] == data.PAD).all() and (ids[mask] >= data.UNK).all()
    assert data.decode(ids)[:2] == ["what color is the shape", "is there a red circle in the image"]
    assert data.decode(ids)[2] == "is <unk> blue"  # "it" is not in the training questions
    short_ids, short_mask = data.encode(["what shape"])
    assert short_ids.shape == (1, data.MIN_SEQ) and short_mask.tolist() == [[True, True, False, False]]
    assert data.encode(questions, seq_len=16)[0].shape == (3, 16)
    with pytest.raises(ValueError):
        data.encode(questions, seq_len=4)


# ------------------------------------------------------------------------------ batch sources

def _hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def _as_uint8(pixel_values: np.ndarray) -> np.ndarray:
    return np.rint((pixel_values.transpose(0, 2, 3, 1) + 1.0) * 127.5).astype(np.uint8)


def test_calibration_batches_come_from_the_train_split_only():
    train = set(_hashes(data.load_images("train")[1]))
    test = set(_hashes(data.load_images("test")[1]))
    batches = data.calibration_batches(batch_size=32)
    first = [next(batches) for _ in range(4)]
    for batch in first:
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
        assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape == (32, 3, 64, 64)
        assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
        assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == np.bool_
        b, s = batch["input_ids"].shape
        assert b == 32 and 4 <= s <= 16 and batch["attention_mask"].shape == (b, s)
        assert batch["attention_mask"][:, 0].all()
        hashes = set(_hashes(_as_uint8(batch["pixel_values"])))
        assert hashes <= train and not hashes & test
    again = next(data.calibration_batches(batch_size=32))  # deterministic order
    np.testing.assert_array_equal(again["input_ids"], first[0]["input_ids"])


def test_evaluation_batches_cover_the_test_split():
    sizes, labels = [], []
    for inputs, y in data.evaluation_batches(batch_size=2500):
        assert y.dtype == np.int64 and len(y) == len(inputs["pixel_values"]) == len(inputs["input_ids"])
        sizes.append(len(y))
        labels.append(y)
    assert sum(sizes) == 9673 and sizes[0] == 2500
    answers = easy_vqa.get_answers()
    assert [answers[i] for i in np.concatenate(labels)] == list(easy_vqa.get_test_questions()[1])


# --------------------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def trained():
    model = build_model()
    model.load_state_dict(load_file(str(HERE / "vqa.safetensors")), strict=True)
    return model.eval()


def test_shipped_checkpoint_is_small_and_accurate(trained):
    assert (HERE / "vqa.safetensors").stat().st_size < 2_000_000
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in data.evaluation_batches(batch_size=250):
            logits = trained(**{k: torch.from_numpy(v) for k, v in inputs.items()})
            correct += int((logits.argmax(-1).numpy() == labels).sum())
            total += len(labels)
            if total >= 1000:
                break
    assert total == 1000 and correct / total >= 0.98  # the README says 99.5% on the test split


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("seq", [4, 8, 16])
def test_forward_shapes_and_padding_invariance(trained, batch, seq):
    inputs, _ = data.make_inputs("test", np.arange(batch))
    ids, mask = data.encode([q for q in data.load_questions("test")[0][:batch]], seq_len=max(seq, 9))
    if seq < 9:  # short sequences: keep the first `seq` tokens of each question
        ids, mask = ids[:, :seq], mask[:, :seq]
    args = {"pixel_values": torch.from_numpy(inputs["pixel_values"]),
            "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        logits = trained(**args)
        assert logits.shape == (batch, 13) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        # padding is invisible. Below the position table's length: PAD columns appended (masked out) give
        # the same logits; at its length: the trailing all-PAD columns trimmed do. Every case compares two
        # different widths, never a forward pass with itself.
        extra = min(4, data.MAX_SEQ - ids.shape[1])
        if extra:
            other_ids = torch.cat([args["input_ids"], torch.full((batch, extra), data.PAD)], 1)
            other_mask = torch.cat([args["attention_mask"], torch.zeros(batch, extra, dtype=torch.bool)], 1)
        else:
            length = int(mask.sum(1).max())
            other_ids, other_mask = args["input_ids"][:, :length], args["attention_mask"][:, :length]
        assert other_ids.shape[1] != ids.shape[1]
        other = trained(args["pixel_values"], other_ids, other_mask)
    torch.testing.assert_close(logits, other, atol=1e-4, rtol=1e-4)


def test_forward_passes_inputs_unchanged_to_the_encoders(trained):
    inputs, _ = data.make_inputs("test", np.arange(2))
    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    seen = {}
    hooks = [trained.image_encoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("image", a)),
             trained.text_encoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("text", a))]
    try:
        with torch.no_grad():
            trained(**args)
    finally:
        for h in hooks:
            h.remove()
    assert seen["image"][0] is args["pixel_values"]
    assert seen["text"][0] is args["input_ids"] and seen["text"][1] is args["attention_mask"]
