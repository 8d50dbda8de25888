"""``mmopt bench``: parity, task score, latency and memory of eager PyTorch and every artifact of a bundle
on every backend here, compared with a baseline and gated.

Steps: check the settings and the baseline (before minutes of measurement); read the bundle and refuse
it if stale; rebuild the eager reference (the model the bundle was exported from); open every variant
and judge it (parity at min / opt / max and on the first evaluation batches); score every variant on
the evaluation data; sweep latency; compare with the baseline, gate, and write the reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmopt import reference
from mmopt.bench import gates, report as render
from mmopt.bench.backends import Opened, open_variant, resolve, variants
from mmopt.bench.harness import REPORT_SCHEMA, parity, sweep, task_scores
from mmopt.bench.inputs import SOURCES, InputMaker, batch_sizes
from mmopt.data import batch_dim, read
from mmopt.errors import UsageError
from mmopt.judge import latency
from mmopt.judge.parity import REAL_BATCHES, summarise
from mmopt.manifest import Manifest
from mmopt.progress import Progress
from mmopt.provenance import machine, peak_rss_mb, rss_mb, tool_versions
from mmopt.spec import ModelSpec

__all__ = ["BenchResult", "BenchSettings", "bench"]


@dataclass(frozen=True)
class BenchSettings:
    """How to bench: validated at once, before anything is measured, and written into the report."""

    backends: tuple[str, ...] | None = None  # None: every backend that runs here
    batches: tuple[int, ...] | None = None  # None: sweep the exported batch range
    threads: int | None = 1  # None: PyTorch's default
    repeats: int = 30
    warmup: int = 5
    inputs: str = "random"  # random | calibration | evaluation
    eval_samples: int | None = None  # None: [evaluation].samples
    budget_s: float | None = 30.0  # per latency measurement
    max_latency_regression: float = 0.10
    gate_on: str = "ratio"  # ratio | p50

    def validate(self) -> "BenchSettings":
        problems = []
        if self.repeats < 1 or self.warmup < 0:
            problems.append(f"--repeats must be >= 1 and --warmup >= 0 (got {self.repeats}, {self.warmup})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1 (got {self.threads})")
        if not 0 <= self.max_latency_regression < 100:
            problems.append(f"--max-latency-regression {self.max_latency_regression}: give a fraction such as "
                            "0.1 (10%)")
        if self.inputs not in SOURCES:
            problems.append(f"--inputs {self.inputs}: choose one of {', '.join(SOURCES)}")
        if self.eval_samples is not None and self.eval_samples < 1:
            problems.append(f"evaluation samples must be >= 1 (got {self.eval_samples})")
        if problems:
            raise UsageError("; ".join(problems) + ".")
        gates.check_gate_on(self.gate_on)
        return self


@dataclass
class BenchResult:
    """The bench report (see ``mmopt.bench.report``) and the files written from it."""

    report: dict[str, Any]
    files: dict[str, Path]

    @property
    def passed(self) -> bool:
        return bool(self.report["gates"]["passed"])

    def raise_for_gates(self) -> None:
        """``GateError`` (exit code 1) listing every failed parity, accuracy and latency gate."""
        gates.raise_for_gates(self.report, self)


def bench(bundle: str | Path, out: str | Path | None, settings: BenchSettings, baseline: str | Path | None = None,
          config: str | Path | None = None, progress: Progress | None = None,
          trust_checkpoint: bool = False) -> BenchResult:
    """Measure, compare with ``baseline``, gate, and write report.json / .md / .png into ``out`` (if given).
    The gates are evaluated, not raised: ``BenchResult.raise_for_gates`` does that."""
    progress = progress or Progress()
    settings = settings.validate()
    if out is not None:
        render.check_out(out, bundle)
    base = _baseline(bundle, baseline)  # fail fast, before minutes of measurement
    report = measure(bundle, settings, config, progress, trust_checkpoint)
    report["baseline"] = gates.compare(report, base, baseline, settings.max_latency_regression,
                                       settings.gate_on) if base else None
    report["gates"] = gates.evaluate(report, report["settings"]["max_accuracy_drop"])
    try:
        files = render.write(report, out) if out is not None else {}
    except OSError as e:
        raise UsageError(f"--out {out}: the reports could not be written ({e.strerror}).") from None
    return BenchResult(report, files)


def _baseline(bundle: str | Path, baseline: str | Path | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    base = gates.load_baseline(baseline, REPORT_SCHEMA)
    manifest = Manifest.read(bundle)
    probe = {"bundle": {"fingerprint": manifest.fingerprint(), "path": str(bundle),
                        "factory": manifest.model.get("factory")}}
    gates.check_same_model(probe, base, baseline)
    return base


def measure(bundle: str | Path, settings: BenchSettings, config: str | Path | None = None,
            progress: Progress | None = None, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Everything measured, as the report dict without baseline and gates."""
    progress = progress or Progress()
    bundle = Path(bundle).resolve()
    manifest = Manifest.read_verified(bundle)
    spec = reference.config_of(bundle, manifest, config)
    reference.check_checkpoint(bundle, manifest, spec)  # stale bundles are refused before any model code runs
    chosen, skipped = resolve(list(settings.backends) if settings.backends else None, manifest)
    sizes = batch_sizes(spec, list(settings.batches) if settings.batches else None)
    _check_inputs(spec, settings.inputs)  # usage errors first, before the model is built
    ref = reference.build(bundle, manifest, spec, trust_checkpoint)
    threads = settings.threads or torch.get_num_threads()
    report = _header(bundle, manifest, spec, settings, chosen, skipped, sizes, threads)
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())  # the caller's setting, restored
        torch.set_num_threads(threads)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))  # fp16 CPU emulations
        opened = open_and_judge(report, manifest, chosen, bundle, ref, threads, scratch, stack, progress)
        if spec.evaluation is not None:
            score(report, opened, spec, settings.eval_samples or spec.evaluation.samples, progress)
        maker = InputMaker(ref.model, spec, ref.split, settings.inputs)
        report["latency"] = sweep(opened, maker, sizes, list(ref.split.components), settings.repeats,
                                  settings.warmup, settings.budget_s, progress)
    report["memory"]["rss_peak_mb"] = round(peak_rss_mb(), 1)
    if torch.cuda.is_available():
        report["memory"]["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


def _check_inputs(spec: ModelSpec, inputs: str) -> None:
    if inputs != "random" and getattr(spec, inputs) is None:
        configured = [k for k in SOURCES[1:] if getattr(spec, k) is not None]
        raise UsageError(f"--inputs {inputs}: choose random" + "".join(f", {k}" for k in configured)
                         + f" ({spec.path} configures {', '.join(configured) or 'no data callables'}).")


def _header(bundle: Path, manifest: Manifest, spec: ModelSpec, settings: BenchSettings, chosen: list[str],
            skipped: list[dict[str, str]], sizes: list[int], threads: int) -> dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA, "kind": "mmopt-bench-report",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(bundle), "fingerprint": manifest.fingerprint(), "factory": manifest.model.get("factory"),
                   "config": str(spec.path), "created": manifest.created,
                   "artifacts": {a.id: a.sha256 for a in manifest.artifacts}},
        "machine": machine(), "tools": tool_versions(),
        "settings": {"backends": chosen, "batches": [b for b in sizes if b] or None, "batch_dim": batch_dim(spec),
                     "threads": threads, "repeats": settings.repeats, "warmup": settings.warmup,
                     "inputs": settings.inputs, "max_accuracy_drop": spec.max_accuracy_drop,
                     "parity_inputs": "random at the min / opt / max shapes"
                     + (f" + the first {REAL_BATCHES} evaluation batches" if spec.evaluation else ""),
                     "time_budget_s": settings.budget_s, "gate_on": settings.gate_on,
                     "max_latency_regression": settings.max_latency_regression,
                     "allocator": latency.steady_allocator()},
        "skipped": skipped, "notes": [], "variants": [], "latency": [],
        "memory": {"rss_before_mb": round(rss_mb(), 1)},
    }


def open_and_judge(report: dict[str, Any], manifest: Manifest, chosen: list[str], bundle: Path,
                   ref: reference.Reference, threads: int, scratch: Path, stack: contextlib.ExitStack,
                   progress: Progress) -> list[Opened]:
    """Open every variant (kept open on ``stack``) and record its parity and memory in the report."""
    spec, model, split = ref.spec, ref.model, ref.split
    real = [b for b, _ in itertools.islice(read(spec, "evaluation"), REAL_BATCHES)] if spec.evaluation else []
    vs = variants(manifest, chosen)
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
            # rows of their own: the shapes of real data, beside the random min / opt / max checks
            summary.update({f"{where} on data": row for where, row in summarise(on_data).items()})
            report["variants"].append({**v.to_json(), "memory": mem, "checks": [c.to_json() for c in checks],
                                       "parity": summary, "failed": sum(bool(c.failed) for c in checks)})
            advance(1)
    return opened


def score(report: dict[str, Any], opened: list[Opened], spec: ModelSpec, samples: int | None,
          progress: Progress) -> None:
    """Every variant's task score on the same evaluation batches, into its report entry."""
    judged = sum(o.judged_whole is not None for o in opened)
    with progress.task(f"task score of {judged} variants on evaluation samples", samples) as advance:
        scores = task_scores(opened, spec, samples, advance)
    for entry in report["variants"]:
        if entry["id"] in scores:
            entry["task"] = scores[entry["id"]]


def settings_from(**options: Any) -> BenchSettings:
    """``BenchSettings`` from keyword options (lists become tuples); unknown names are a usage error."""
    names = {f.name for f in dataclasses.fields(BenchSettings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown bench settings: {', '.join(unknown)} (known: {', '.join(sorted(names))}).")
    return BenchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
