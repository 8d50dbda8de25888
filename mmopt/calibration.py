"""Calibration data for precision work: ``[calibration].samples`` rows read by ``mmopt.data`` (the one
reader and validation of the user's callables), then run through the eager model with hooks, so every
component (encoders *and* fusion) is calibrated on the values it really receives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmopt.capture import Split
from mmopt.data import read
from mmopt.errors import CalibrationError
from mmopt.reference import eager_io_for
from mmopt.spec import ModelSpec, component_of


@dataclass
class CalibrationData:
    """Validated calibration batches, and what each component receives when the eager model runs them."""

    source: str
    samples: int
    batches: list[dict[str, np.ndarray]]
    feeds: dict[str, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]  # component -> [(inputs, outputs)]
    model_outputs: list[dict[str, np.ndarray]]


def load(model: torch.nn.Module, spec: ModelSpec, split: Split) -> CalibrationData:
    """Collect ``[calibration].samples`` rows from the callable, then run them through the eager model."""
    cal = spec.calibration
    if cal is None:
        raise CalibrationError(f"{spec.path}: int8 needs calibration data: add a [calibration] table, e.g.\n"
                               '  [calibration]\n  source = "my_project.data:calibration_batches"\n  samples = 512\n'
                               '  method = "entropy"')
    batches, got = [], 0
    for inputs, _ in read(spec, "calibration", cal.samples):
        batches.append(inputs)
        got += len(next(iter(inputs.values())))
    if got < cal.samples:
        raise CalibrationError(f"{spec.path}: field 'calibration.samples': {cal.source}() yielded only {got} "
                               f"samples, fewer than the {cal.samples} asked for. Yield more data or lower "
                               "[calibration].samples.")
    feeds: dict[str, list] = {c: [] for c in split.components}
    outputs = []
    for i, batch in enumerate(batches):
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in batch.items()}
        _, model_out, per_comp = eager_io_for(model, spec, split, tensors, f"calibration batch {i}")
        for key, io in per_comp.items():  # a component called more than once is calibrated on every call
            feeds[component_of(key)].append(io)
        outputs.append(model_out)
    return CalibrationData(cal.source, got, batches, feeds, outputs)
