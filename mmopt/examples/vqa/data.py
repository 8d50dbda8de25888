"""easy-vqa data for the embedded example: tokeniser, decoded splits, and the batch sources
that ``mmopt.toml`` names for calibration (train split) and evaluation (test split).

Images are decoded once per process with the stdlib PNG reader and kept as uint8; pixels are
converted to float32 in [-1, 1] (CHW) per batch. Each batch is padded to its longest question,
but never below ``MIN_SEQ`` tokens, so the shapes stay inside the declared ``seq`` dim.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


HERE = Path(__file__).resolve().parent
VOCAB_PATH = HERE / "vocab.json"
PAD, UNK = 0, 1
MIN_SEQ, MAX_SEQ = 4, 16
CALIBRATION_SEED = 1234


def normalise(question: str) -> list[str]:
    """Lower-case words of a question, without the question mark."""
    return question.lower().replace("?", " ").split()


def build_vocab(questions: Sequence[str]) -> dict[str, int]:
    """``<pad>`` = 0, ``<unk>`` = 1, then the sorted words of ``questions``."""
    words = sorted({w for q in questions for w in normalise(q)})
    return {"<pad>": PAD, "<unk>": UNK, **{w: i + 2 for i, w in enumerate(words)}}


@functools.lru_cache(maxsize=None)
def vocab() -> dict[str, int]:
    """The shipped vocabulary (``vocab.json``), built from the training questions."""
    return json.loads(VOCAB_PATH.read_text())


def write_vocab() -> dict[str, int]:
    import easy_vqa

    v = build_vocab(easy_vqa.get_train_questions()[0])
    VOCAB_PATH.write_text(json.dumps(v, indent=1) + "\n")
    vocab.cache_clear()
    return v


def encode(questions: Sequence[str], seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``int64 [B, S]`` and keep-mask ``bool [B, S]`` (True = real token).

    ``seq_len=None`` pads to the longest question, but at least ``MIN_SEQ``. Questions longer
    than ``seq_len`` are an error (the model's position table holds ``MAX_SEQ`` positions)."""
    v = vocab()
    tokens = [[v.get(w, UNK) for w in normalise(q)] for q in questions]
    longest = max((len(t) for t in tokens), default=0)
    if seq_len is None:
        seq_len = max(longest, MIN_SEQ)
    if longest > seq_len or seq_len > MAX_SEQ:
        raise ValueError(f"question of {longest} tokens does not fit seq_len={seq_len} (max {MAX_SEQ}).")
    ids = np.full((len(tokens), seq_len), PAD, np.int64)
    for row, t in enumerate(tokens):
        ids[row, :len(t)] = t
    return ids, ids != PAD


def decode(input_ids: np.ndarray) -> list[str]:
    """Token ids back to space-joined words (padding dropped)."""
    words = {i: w for w, i in vocab().items()}
    return [" ".join(words[int(i)] for i in row if i != PAD) for row in np.asarray(input_ids)]


def answers() -> list[str]:
    """The 13 answer classes, in easy-vqa's order (the label index)."""
    import easy_vqa

    return list(easy_vqa.get_answers())


@functools.lru_cache(maxsize=None)
def load_images(split: str) -> tuple[dict[int, int], np.ndarray]:
    """``(image id -> row, uint8 [N, 64, 64, 3])`` for ``split`` ("train" or "test"), decoded once."""
    import easy_vqa

    paths = {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}[split]()
    ids = sorted(paths)
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids])
    pixels.setflags(write=False)
    return {i: row for row, i in enumerate(ids)}, pixels


@functools.lru_cache(maxsize=None)
def load_questions(split: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(questions, labels int64 [Q], image rows int64 [Q])`` for ``split``."""
    import easy_vqa

    texts, ans, image_ids = {"train": easy_vqa.get_train_questions,
                             "test": easy_vqa.get_test_questions}[split]()
    index = {a: i for i, a in enumerate(answers())}
    rows, _ = load_images(split)
    labels = np.array([index[a] for a in ans], np.int64)
    image_rows = np.array([rows[i] for i in image_ids], np.int64)
    return tuple(texts), labels, image_rows


def to_pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [-1, 1]."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x * (2.0 / 255.0) - 1.0)


def make_inputs(split: str, index: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Model inputs and labels for the questions at ``index`` of ``split``."""
    texts, labels, image_rows = load_questions(split)
    _, pixels = load_images(split)
    ids, mask = encode([texts[i] for i in index])
    inputs = {"pixel_values": to_pixel_values(pixels[image_rows[index]]),
              "input_ids": ids, "attention_mask": mask}
    return inputs, labels[index]


def calibration_batches(batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Training-split inputs in a fixed shuffled order (seeded), for INT8 calibration.

    Only the train split is used, so the calibration never sees the images it is evaluated on."""
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(load_questions("train")[0]))
    for start in range(0, len(order), batch_size):
        yield make_inputs("train", order[start:start + batch_size])[0]


def evaluation_batches(batch_size: int = 250) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(inputs, labels)`` over the whole easy-vqa test split (9,673 questions), in order."""
    total = len(load_questions("test")[0])
    for start in range(0, total, batch_size):
        yield make_inputs("test", np.arange(start, min(start + batch_size, total)))
