"""``mmopt bench``'s measurements: parity, task score, latency sweep and memory for eager and every
artifact on every backend, assembled into the report dict (``mmopt.bench.report`` renders it).

Order: check the bundle's hashes, rebuild the eager model from the bundle's config, re-capture and
confirm it is the model the bundle was exported from, open every variant's runners, then measure.
Parity and latency use identical inputs for all variants (``mmopt.bench.inputs``). Latency of a
group (CPU: eager + ONNX Runtime; GPU: eager-cuda + ONNX Runtime CUDA + TensorRT) is taken from
interleaved runs in this one process, so ratios against eager stay fair on a noisy machine.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmopt import reference
from mmopt.bench.backends import Opened, open_variant, resolve, variants
from mmopt.bench.inputs import SOURCES, InputMaker, batch_sizes
from mmopt.data import batch_dim, read
from mmopt.judge import latency
from mmopt.judge.accuracy import evaluate
from mmopt.judge.compare import Check
from mmopt.judge.parity import REAL_BATCHES, summarise, verify, verify_real
from mmopt.manifest import Manifest
from mmopt.progress import Progress
from mmopt.provenance import machine, peak_rss_mb, rss_mb, tool_versions
from mmopt.spec import ModelSpec

REPORT_SCHEMA = 1
BENCH_SEED = 3000  # parity inputs: distinct from capture and export verification


def _sig(x: float) -> float:
    """Four significant digits: a GPU artifact's ratio to CPU eager (~4e-4) keeps its resolution."""
    return float(f"{x:.4g}")


def parity(o: Opened, model, spec: ModelSpec, split, real: list[dict[str, np.ndarray]]) -> list[Check]:
    """Every component and the pipeline at the min / opt / max shapes (identical seeds for all variants)
    and on the first evaluation batches, gated by the one rule of export and quantize
    (``judge.parity.tolerance_for``)."""
    precisions = o.variant.precisions
    return verify(model, spec, split, o.judged, precisions, seed=BENCH_SEED) + \
        verify_real(model, spec, split, o.judged, precisions, real, case="data")


def task_scores(opened: list[Opened], spec: ModelSpec, samples: int | None) -> dict[str, dict[str, Any]]:
    """``judge.accuracy`` (the one task-accuracy function, as in quantize) for every variant on the same
    evaluation batches, with each one's agreement with eager on the score output."""
    acc = evaluate(spec, {o.variant.id: o.judged_whole for o in opened if o.judged_whole is not None},
                   samples=samples, parity_to=opened[0].variant.id)
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


def run(bundle: str | Path, backends: list[str] | None = None, batches: list[int] | None = None,
        threads: int | None = None, repeats: int = 30, warmup: int = 5, inputs: str = "random",
        config: str | Path | None = None, eval_samples: int | None = None, budget_s: float | None = 30.0,
        progress: Progress | None = None, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Measure everything and return the report dict (no gates, no baseline: see ``mmopt.bench.gates``)."""
    from mmopt.errors import UsageError

    progress = progress or Progress()
    bundle = Path(bundle).resolve()
    if repeats < 1 or warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and warm-up >= 0 (got {repeats}, {warmup}).")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads}).")
    manifest = Manifest.read_verified(bundle)
    spec = reference.config_of(bundle, manifest, config)
    reference.check_checkpoint(bundle, manifest, spec)  # stale bundles are refused before any model code runs
    chosen, skipped = resolve(backends, manifest)  # usage errors first, before the model is built
    sizes = batch_sizes(spec, batches)
    if inputs not in SOURCES or (inputs != "random" and getattr(spec, inputs) is None):
        raise UsageError(f"--inputs {inputs}: choose random" + "".join(f", {k}" for k in SOURCES[1:]
                                                                      if getattr(spec, k) is not None)
                         + f" ({spec.path} configures {', '.join(k for k in SOURCES[1:] if getattr(spec, k)) or 'no data callables'}).")
    ref = reference.build(bundle, manifest, spec, trust_checkpoint)
    model, split = ref.model, ref.split
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    maker = InputMaker(model, spec, split, inputs)
    vs = variants(manifest, chosen)
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA, "kind": "mmopt-bench-report",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(bundle), "fingerprint": manifest.fingerprint(), "factory": manifest.model.get("factory"),
                   "config": str(spec.path), "created": manifest.created,
                   "artifacts": {a.id: a.sha256 for a in manifest.artifacts}},
        "machine": machine(), "tools": tool_versions(),
        "settings": {"backends": chosen, "batches": [b for b in sizes if b] or None,
                     "batch_dim": batch_dim(spec), "threads": threads, "repeats": repeats, "warmup": warmup,
                     "inputs": inputs, "max_accuracy_drop": spec.max_accuracy_drop, "parity_inputs": "random at the min / opt / max shapes"
                     + (f" + the first {REAL_BATCHES} evaluation batches" if spec.evaluation else ""), "time_budget_s": budget_s},
        "skipped": skipped, "notes": [], "variants": [], "latency": [],  # drift is refused now (reference.py)
        "memory": {"rss_before_mb": round(rss_mb(), 1)},
    }
    samples = eval_samples or (spec.evaluation.samples if spec.evaluation else None)
    real = [b for b, _ in itertools.islice(read(spec, "evaluation"), REAL_BATCHES)] if spec.evaluation else []
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))  # fp16 CPU emulations
        opened: list[Opened] = []
        with progress.task("open runners + parity", len(vs)) as advance:
            for v in vs:
                before = rss_mb()
                gpu_before = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
                o = stack.enter_context(open_variant(v, bundle, model, split, threads, scratch))
                opened.append(o)
                checks = [] if v.id == "eager" else parity(o, model, spec, split, real)
                mem = {"host_rss_delta_mb": round(rss_mb() - before, 1)}
                if gpu_before is not None:
                    mem["gpu_used_delta_mb"] = round((gpu_before - torch.cuda.mem_get_info()[0]) / 2**20, 1)
                summary = summarise([c for c in checks if not c.case.startswith("data")])
                on_data = [c for c in checks if c.case.startswith("data")]
                if on_data:  # its own row: the shapes of real data, beside the random min / opt / max checks
                    summary["pipeline on data"] = summarise(on_data)["pipeline"]
                report["variants"].append({**v.to_json(), "memory": mem, "checks": [c.to_json() for c in checks],
                                           "parity": summary, "failed": sum(bool(c.failed) for c in checks)})
                advance(1)
        if spec.evaluation is not None:
            with progress.task("task score on evaluation data", 1) as advance:
                scores = task_scores(opened, spec, samples)
                advance(1)
            for entry in report["variants"]:
                if entry["id"] in scores:
                    entry["task"] = scores[entry["id"]]
        report["latency"] = sweep(opened, maker, sizes, list(split.components), repeats, warmup, budget_s, progress)
    report["memory"]["rss_peak_mb"] = round(peak_rss_mb(), 1)
    if torch.cuda.is_available():
        report["memory"]["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report
