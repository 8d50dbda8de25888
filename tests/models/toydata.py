"""Calibration / evaluation callables for the toy model, good ones and ones that are wrong on purpose."""
from __future__ import annotations

import numpy as np
import torch


def _batch(rng: np.random.Generator, batch: int = 8, seq: int | None = None) -> dict[str, np.ndarray]:
    seq = int(rng.integers(4, 17)) if seq is None else seq
    keep = rng.integers(seq // 2 + 1, seq + 1, (batch, 1))
    return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(0, 50, (batch, seq)), "attention_mask": np.arange(seq)[None] < keep}


def calibration_batches():
    rng = np.random.default_rng(0)
    for _ in range(100):
        yield _batch(rng)


def torch_batches():
    for b in calibration_batches():
        yield {k: torch.from_numpy(v) for k, v in b.items()}


def big_batches():
    """Batches of 70 rows: more than the batch dim's max (32), so they are split."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        yield _batch(rng, 70)


def short():
    rng = np.random.default_rng(0)
    for _ in range(2):
        yield _batch(rng)


def wrong_names():
    b = _batch(np.random.default_rng(0))
    b["mask"] = b.pop("attention_mask")
    yield b


def wrong_dtype():
    b = _batch(np.random.default_rng(0))
    b["pixel_values"] = b["pixel_values"].astype(np.float64)
    yield b


def wrong_shape():
    b = _batch(np.random.default_rng(0), seq=20)
    b["pixel_values"] = b["pixel_values"][:, :, :, :8]
    yield b


def with_nan():
    rng = np.random.default_rng(0)
    yield _batch(rng)
    b = _batch(rng)
    b["pixel_values"][0, 0, 0, 0] = np.nan
    yield b


def bad_ids():
    b = _batch(np.random.default_rng(0))
    b["input_ids"][0, 0] = 50
    yield b


def not_dicts():
    yield [1, 2, 3]


def raises():
    yield _batch(np.random.default_rng(0))
    raise RuntimeError("disk on fire")


def evaluation_batches():
    """(inputs, labels) where the labels are what the eager toy predicts, so eager fp32 scores 100%."""
    from toy import build  # toy.py is copied beside this file and the config

    model = build()
    rng = np.random.default_rng(5)
    for _ in range(8):
        b = _batch(rng, 32)
        with torch.no_grad():
            labels = model(**{k: torch.from_numpy(v) for k, v in b.items()}).argmax(-1).numpy()
        yield b, labels


def bad_labels():
    b = _batch(np.random.default_rng(0))
    yield b, np.zeros((8, 2), np.float32)
