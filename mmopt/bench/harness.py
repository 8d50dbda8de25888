"""``mmopt bench``'s measurements of opened variants: parity, task score and the latency sweep (the job
that composes them into a report is ``mmopt.jobs.bench``).

Parity and latency use identical inputs for all variants (``mmopt.bench.inputs``). Latency of a group
(CPU: eager + ONNX Runtime; GPU: eager-cuda + ONNX Runtime CUDA + TensorRT) is taken from interleaved
runs in this one process, so ratios against eager stay fair on a noisy machine.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from mmopt.bench.backends import Opened
from mmopt.bench.inputs import InputMaker
from mmopt.judge import latency
from mmopt.judge.accuracy import evaluate
from mmopt.judge.compare import Check
from mmopt.judge.parity import verify, verify_real
from mmopt.progress import Progress
from mmopt.spec import ModelSpec

REPORT_SCHEMA = 1


def _sig(x: float) -> float:
    """Four significant digits: a GPU artifact's ratio to CPU eager (~4e-4) keeps its resolution."""
    return float(f"{x:.4g}")


def parity(o: Opened, model, spec: ModelSpec, split, real: list[dict[str, np.ndarray]]) -> list[Check]:
    """Every component and the pipeline at the min / opt / max shapes and on the first evaluation batches:
    the inputs, the eager reference and the gate (``judge.parity.tolerance_for``) of export and quantize,
    so bench cannot reject what quantize accepted."""
    precisions = o.variant.precisions
    return verify(model, spec, split, o.judged, precisions) + \
        verify_real(model, spec, split, o.judged, precisions, real, case="data")


def task_scores(opened: list[Opened], spec: ModelSpec, samples: int | None,
                on_batch: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """``judge.accuracy`` (the one task-accuracy function, as in quantize) for every variant on the same
    evaluation batches, with each one's agreement with eager on the score output."""
    acc = evaluate(spec, {o.variant.id: o.judged_whole for o in opened if o.judged_whole is not None},
                   samples=samples, parity_to=opened[0].variant.id, on_batch=on_batch)
    ref = opened[0].variant.id
    return {vid: {"metric": "accuracy", "output": acc["output"], "samples": acc["samples"], "score": score,
                  **({} if vid == ref else {"vs_eager": acc["parity"][vid]})}
            for vid, score in acc["scores"].items()}


def _sync(device: str):
    # Runners that hand back numpy arrays have already waited for the device; the explicit sync guards
    # the clock against queued work where torch can see the GPU (a CPU-only torch cannot, and need not).
    return torch.cuda.synchronize if device == "cuda" and torch.cuda.is_available() else None


def _eager_device_ms(o: Opened, feeds: dict[str, np.ndarray], maker: InputMaker, repeats: int) -> float:
    """GPU time of eager's forward alone (CUDA events, inputs already on the device): the pipeline figure
    minus copies and host overhead."""
    from mmopt.runners.eager import to_torch

    runner = o.whole_runner
    tensors = to_torch(feeds, {t.name: t for t in maker.split.model_inputs}, "cuda")

    def forward() -> None:
        with torch.inference_mode():
            runner.forward(tensors)  # type: ignore[union-attr]
    return float(np.median(latency.cuda_event_ms(forward, repeats)))


def sweep(opened: list[Opened], maker: InputMaker, batches: list[int], comps: list[str], repeats: int,
          warmup: int, budget_s: float | None, progress: Progress) -> list[dict[str, Any]]:
    """Latency rows: every batch size x (each component, pipeline) x variant, interleaved per device group."""
    rows: list[dict[str, Any]] = []
    # Each device group is timed interleaved against its own eager reference; without eager-cuda the GPU
    # variants join the CPU group, so their ratio is against eager on the CPU (named in each row).
    if any(o.variant.id == "eager-cuda" for o in opened):
        groups = [[o for o in opened if o.variant.device == dev] for dev in ("cpu", "cuda")]
    else:
        groups = [list(opened)]
    with progress.task("latency sweep", len(batches) * (len(comps) + 1) * len(groups)) as advance:
        for b in batches:
            feeds = maker.feeds(b)
            n = b or len(next(iter(feeds.model.values())))
            for graph in [*comps, "pipeline"]:
                for group in groups:
                    timed = {}
                    for o in group:
                        if graph == "pipeline":
                            timed[o.variant.id] = latency.Timed(lambda o=o: o.whole(feeds.model), n,
                                                                _sync(o.variant.device))
                        else:
                            r, f = o.components[graph], feeds.components[graph]
                            timed[o.variant.id] = latency.Timed(lambda r=r, f=f: r.infer(f, check=False), n,
                                                                _sync(o.variant.device))
                    if any(o.variant.device == "cuda" for o in group) and graph == "pipeline" \
                            and torch.cuda.is_available():
                        from mmopt.runners.eager import to_torch

                        specs = {t.name: t for t in maker.split.model_inputs}
                        timed["h2d"] = latency.Timed(lambda: to_torch(feeds.model, specs, "cuda"), n, torch.cuda.synchronize)
                    samples = latency.interleaved(timed, repeats, warmup, budget_s)
                    ref = group[0].variant.id
                    for o in group:
                        vid = o.variant.id
                        lo, hi = latency.paired_ratio_interval(samples[vid], samples[ref])
                        row = {"variant": vid, "graph": graph, "batch": n, "device": o.variant.device,
                               **latency.stats(samples[vid], n).to_json(),
                               "ratio_vs_eager": _sig(latency.paired_ratio(samples[vid], samples[ref])),
                               "ratio_ci95": [_sig(lo), _sig(hi)], "ratio_reference": ref}
                        if "h2d" in samples and o.variant.device == "cuda":
                            row["h2d_ms"] = round(latency.stats(samples["h2d"], n).p50, 6)
                        if graph == "pipeline" and vid == "eager-cuda":
                            row["device_p50_ms"] = round(_eager_device_ms(o, feeds.model, maker, repeats), 6)
                        rows.append(row)
                    advance(1)
    return rows
