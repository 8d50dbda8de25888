"""Parity metrics between a reference output and a candidate, and the gate that judges them.

Pure functions over arrays. Every output is measured and every failure collected; callers raise
once with the whole table (``ParityError``), never at the first bad output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

import numpy as np

from mmopt.errors import ParityError
from mmopt_runtime.compare import Metrics, failures, measure  # the metrics' one home (torch-free, for devices)

__all__ = ["Check", "Metrics", "check_all", "failures", "measure", "merge", "raise_on_failures"]


@dataclass
class Check:
    """One measured output of one ``component`` (or "pipeline") in one ``case`` (a size such as "opt", a
    real batch such as "real0", "data"). Read the fields; ``where`` is only for display."""

    component: str
    case: str
    metrics: Metrics
    failed: list[str]

    @property
    def where(self) -> str:
        return f"{self.component}@{self.case}"

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "component": self.component, "case": self.case, **self.metrics.to_json(),
                "failed": self.failed}


def check_all(component: str, case: str, refs: dict[str, np.ndarray], outs: dict[str, np.ndarray],
              tol: dict[str, float], scores: Collection[str] = ()) -> list[Check]:
    """Every output of ``refs`` measured and gated; argmax agreement only on the outputs in ``scores``."""
    checks = []
    for name, ref in refs.items():
        if name not in outs:
            checks.append(Check(component, case, measure(name, ref, np.full_like(ref, np.nan), name in scores),
                                ["output missing"]))
            continue
        m = measure(name, ref, outs[name], name in scores)
        why = failures(m, tol)
        if m.shape != tuple(np.shape(ref)):
            why = [f"shape {m.shape} != reference {tuple(np.shape(ref))}"]
        checks.append(Check(component, case, m, why))
    return checks


def raise_on_failures(checks: list[Check], what: str, hint: str) -> None:
    bad = [c for c in checks if c.failed]
    if not bad:
        return
    rows = [f"  {c.where:<28} {c.metrics.name:<28} cos {c.metrics.cos_min:>9.6f}  max_abs {c.metrics.max_abs:>9.3g}  "
            f"-> {'; '.join(c.failed)}" for c in bad]
    raise ParityError(f"{what}: {len(bad)} of {len(checks)} checked outputs fail parity:\n" + "\n".join(rows)
                      + f"\n{hint}")


def merge(ms: list[Metrics]) -> Metrics:
    """One output's metrics over several batches (e.g. an evaluation set): worst errors and cosine,
    sample-weighted mean cosine and argmax agreement, summed NaN / Inf counts."""
    if not ms:
        raise ValueError("nothing to merge")
    rows = [max(m.shape[0], 1) if m.shape else 1 for m in ms]
    total = sum(rows)
    arg = None if any(m.argmax is None for m in ms) else sum(m.argmax * r for m, r in zip(ms, rows)) / total
    return Metrics(ms[0].name, (total, *ms[0].shape[1:]), max(m.max_abs for m in ms), max(m.max_rel for m in ms),
                   min(m.cos_min for m in ms), sum(m.cos_mean * r for m, r in zip(ms, rows)) / total, arg,
                   sum(m.nan for m in ms), sum(m.inf for m in ms), max(m.norm_change for m in ms))
