"""Calibration data for the transformers test models: random pixels / token ids with padding masks."""
from __future__ import annotations

import numpy as np


def clip_batches():
    rng = np.random.default_rng(0)
    for _ in range(8):
        seq = int(rng.integers(5, 33))
        keep = rng.integers(seq // 2 + 1, seq + 1, (8, 1))
        yield {"input_ids": rng.integers(0, 100, (8, seq)),
               "pixel_values": rng.standard_normal((8, 3, 32, 32)).astype(np.float32),
               "attention_mask": (np.arange(seq)[None] < keep).astype(np.int64)}
