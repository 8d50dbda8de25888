"""A model whose encoder squares a projection: an intermediate near 1e5, beyond fp16's 65504, that is
scaled back into range before the output. fp16 without an fp32 island there gives inf."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Squarer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x) * 300.0
        return (h * h) / 1000.0


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Squarer()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def build() -> Model:
    torch.manual_seed(0)
    return Model().eval()


def calibration_batches():
    rng = np.random.default_rng(0)
    for _ in range(8):
        yield {"x": rng.standard_normal((8, 8)).astype(np.float32)}


CONFIG = """
[model]
factory = "overflow:build"
[inputs.x]
shape = ["batch", 8]
[dims]
batch = { min = 1, opt = 4, max = 16 }
[components]
enc = "enc"
[precision]
enc = "fp16"
[calibration]
source = "overflow:calibration_batches"
samples = 32
"""
