"""The whole mmopt flow on this example, as a user scripts it with mmopt's API (``mmopt demo`` runs it).

1. export the fp32 bundle (every encoder and the fusion head, proven equal to eager PyTorch);
2. quantize it three ways: fp16 everywhere; TensorRT's int8 form on the image encoder (what an engine is
   built from); the CPU int8 policy (image encoder int8-cpu, the other components "auto": the policy
   search picks among int8-cpu / int8-dynamic / fp32 on this machine);
3. bench every artifact and each judged mixed policy against eager PyTorch: parity, accuracy on the full
   test split, CPU latency at batch 1, 8 and 32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmopt import api
from mmopt.progress import Progress

CONFIG = Path(__file__).resolve().with_name("mmopt.toml")
BATCHES = [1, 8, 32]
REPEATS = 20


def policies(components: list[str]) -> dict[str, dict[str, str]]:
    """The three precision policies of the demo, for its components (image, text, fusion)."""
    return {"fp16": {c: "fp16" for c in components},
            "int8 (TensorRT form)": {"image": "int8"},
            "int8 (CPU form)": {c: ("int8-cpu" if c == "image" else "auto") for c in components}}


def export(out: Path, progress: Progress) -> api.ExportResult:
    return api.export(CONFIG, out, progress=progress)


def quantize(out: Path, components: list[str], progress: Progress) -> dict[str, Any]:
    """Each policy converted and judged in turn; the sensitivity report only for the CPU int8 policy."""
    return {name: api.quantize(out, precision=policy, progress=progress, sensitivity=name == "int8 (CPU form)")
            for name, policy in policies(components).items()}


def bench(out: Path, reports: Path, progress: Progress) -> api.BenchResult:
    """``mmopt bench`` on the bundle: the gates are checked by the caller once it has shown the tables."""
    return api.bench(out, reports, batches=BATCHES, repeats=REPEATS, check=False, progress=progress)
