"""``mmopt bench``: parity, latency and regressions of eager PyTorch and every artifact in a bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmopt.cli import options
from rich.markup import escape

from mmopt.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command()(bench)


def bench(
    bundle: Path = typer.Argument(Path("build"), help="Bundle folder written by `mmopt export`."),
    baseline: Path = typer.Option(None, "--baseline", help="report.json of an earlier run to compare against."),
    max_latency_regression: str = typer.Option("10%", "--max-latency-regression",
                                               help="Fail when a pipeline is slower than the baseline's by more "
                                                    "than this (\"10%\" or 0.1), see --gate-on."),
    gate_on: str = typer.Option("ratio", "--gate-on",
                                help="ratio: gate each variant's speed relative to eager measured in the same run, "
                                     "failing only beyond the run's own 95% bootstrap spread (robust on shared "
                                     "machines). p50: gate raw medians (a dedicated benchmark runner)."),
    backend: list[str] = typer.Option(["auto"], "--backend", "-b",
                                      help="auto, onnxruntime, onnxruntime-cuda, tensorrt, eager-cuda (repeatable). "
                                           "Eager CPU always runs: it is the reference."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,32 (default: sweep the exported range)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for PyTorch and ONNX Runtime alike."),
    repeats: int = typer.Option(30, "--repeats", help="Timed, interleaved runs per measurement."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs first."),
    inputs: str = typer.Option("random", "--inputs", help="random (from the captured specs), calibration or evaluation."),
    config: Path = typer.Option(None, "--config", help="mmopt.toml to rebuild the eager model from, instead of "
                                                       "the one the bundle was exported from."),
    out: Path = typer.Option(Path("bench-report"), "--out", "-o", help="Folder for report.json, report.md, report.png."),
    trust_checkpoint: bool = options.trust_checkpoint(),
) -> None:
    """Bench eager PyTorch and every artifact of a bundle on every backend here; exit 1 when a gate fails.

    The eager reference is rebuilt from the config the bundle was exported from (or --config): this imports
    and runs the model code that config names, as `mmopt export` did. A bundle whose config or checkpoint
    changed since export is refused as stale before any of that code runs.

    Example:

        mmopt bench build/ --baseline main-report.json --batch 1,8
    """
    run_and_print(bundle, out, baseline=baseline, max_latency_regression=parse_fraction(max_latency_regression),
                  backends=backend, batches=parse_batches(batch), threads=threads, repeats=repeats, warmup=warmup,
                  inputs=inputs, config=config, trust_checkpoint=trust_checkpoint, gate_on=gate_on)


def run_and_print(bundle: Path, out: Path, **settings: Any) -> None:
    """Bench, print the table and where the reports are, then exit 1 if a gate failed (also for `mmopt demo`)."""
    from mmopt import api
    from mmopt.cli import console
    from mmopt.progress import RichProgress

    result = api.bench(bundle, out, check=False, progress=RichProgress(console), **settings)
    print_result(result.report, result.files)
    result.raise_for_gates()


def parse_fraction(text: str) -> float:
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--max-latency-regression {text!r}: give a percentage (\"10%\") or a fraction (0.1).") from None


def parse_batches(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    out = []
    for part in ",".join(values).split(","):
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"--batch {part!r}: batch sizes are positive integers, e.g. --batch 1,8,32.") from None
        out.append(n)
    return out


def print_result(report: dict[str, Any], files: dict[str, Path]) -> None:
    from mmopt.cli import console, tables

    for sk in report.get("skipped", []):
        console.print(f"[yellow]skipped[/] {escape(sk['backend'])}: {escape(sk['reason'])}", highlight=False)
    console.print(tables.bench_table(report))
    base = report.get("baseline")
    if base:
        worst = max(base["rows"], key=lambda r: r["change"] if r["gated"] else -1e9, default=None)
        if worst:
            console.print(f"baseline {escape(base['path'])}: worst pipeline change {worst['change']:+.1%} "
                          f"({escape(worst['variant'])}, batch {worst['batch']})", highlight=False)
    if files:
        console.print(f"reports: {escape(', '.join(str(p) for p in files.values()))}", highlight=False)
    gates = report["gates"]
    console.print("[green]gates passed[/]" if gates["passed"] else f"[red]{len(gates['failures'])} gate(s) failed[/]")
    if files:
        md = files.get("markdown")
        console.print(f"next: open {escape(str(md))} (tables and the latency plot)" if gates["passed"] else
                      f"next: the failures are listed above and in {escape(str(md))}; rerun with --baseline "
                      "to compare against an earlier report", highlight=False, style="dim")
