"""The precision part of ``mmopt demo``: fp16 and int8 variants of the demo bundle, and one table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def run(bundle: Path, rounds: int = 10) -> dict[str, Any]:
    """Convert ``bundle`` to fp16 (every component), to TensorRT's int8 form (the image encoder; what an
    engine is built from) and to the CPU int8 policy (the image encoder int8-cpu, the other components
    "auto": the policy search picks among int8-cpu / int8-dynamic / fp32 on this machine), then print and
    return the side-by-side comparison."""
    from mmopt import api, reference
    from mmopt.bench.precision import compare
    from mmopt.cli import console
    from mmopt.manifest import Manifest
    from mmopt.progress import RichProgress

    manifest = Manifest.read(bundle)
    comps = list(manifest.components)
    fp16 = {c: "fp16" for c in comps}
    first = comps[0]  # the image encoder of the demo model
    int8 = {c: ("int8" if c == first else "fp32") for c in comps}
    cpu = {c: ("int8-cpu" if c == first else "auto") for c in comps}
    progress = RichProgress(console)
    api.quantize(bundle, precision=fp16, progress=progress, sensitivity=False)
    api.quantize(bundle, precision=int8, progress=progress, sensitivity=False)
    chosen = api.quantize(bundle, precision=cpu, progress=progress).policy
    ref = reference.load(bundle, Manifest.read(bundle))  # the model quantize built: built once per process
    report = compare(bundle, ref.spec, ref.model, ref.split, {"eager fp32": None, "onnx fp32": {}, "fp16": fp16,
                                                  "int8 (TensorRT form)": int8, "int8 (CPU form)": chosen},
                     batches=(32,), rounds=rounds)
    console.print(table(report))
    return report


def table(report: dict[str, Any]) -> Table:
    ev = report.get("evaluation") or {}
    t = Table(title=f"precision variants: accuracy on {ev.get('samples', '?')} test samples, CPU latency at "
                    f"batch {report['latency']['batches'][-1]}, {report['latency']['threads']} thread",
              title_justify="left")
    comps = list(next(iter(report["variants"].values()))["precision"])
    t.add_column("variant")
    for c in comps:
        t.add_column(c)
    for col in ("size", "cos min", "max err", "accuracy", "latency", "vs eager"):
        t.add_column(col, justify="right")
    b = str(report["latency"]["batches"][-1])
    for name, row in report["variants"].items():
        par = row.get("parity_vs_eager", {})
        size = f"{row['total_bytes'] / 1024:.0f} KiB" if "total_bytes" in row else "-"
        prec = [row["precision"][c] if "policy" in row else "PyTorch" for c in comps]
        t.add_row(name, *prec, size, f"{par.get('cos_min', 1.0):.5f}", f"{par.get('max_abs', 0.0):.2e}",
                  f"{row['accuracy'] * 100:.2f}%" if "accuracy" in row else "-",
                  f"{row['latency_ms'][b]:.2f} ms", f"{row.get('latency_vs_eager', {}).get(b, 1.0):.2f}x")
    return t
