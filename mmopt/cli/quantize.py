"""``mmopt quantize``: per-component fp16 / int8 on an exported bundle, judged on parity and task score."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mmopt.cli import options
from rich.markup import escape

from mmopt.cli import tables
from mmopt.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command()(quantize)


def parse_policy(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    policy = {}
    for item in items:
        comp, sep, prec = item.partition("=")
        if not sep or not comp or not prec:
            raise UsageError(f"--precision {item!r}: write COMPONENT=PRECISION, e.g. --precision image=int8.")
        policy[comp.strip()] = prec.strip()
    return policy


def quantize(
    bundle: Path = typer.Argument(Path("build"), help="Bundle folder written by `mmopt export`."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="mmopt.toml to read \\[precision], \\[calibration], \\[evaluation] "
                                               "and \\[tolerance] from. Default: the config the bundle was "
                                               "exported from."),
    precision: list[str] = typer.Option([], "--precision", "-p", metavar="COMP=PREC",
                                        help="Override \\[precision] for this run (repeatable): fp32, fp16, int8, "
                                             "int8-cpu, int8-dynamic, auto."),
    trust_checkpoint: bool = options.trust_checkpoint(),
    no_sensitivity: bool = typer.Option(False, "--no-sensitivity",
                                        help="Skip the report of each int8 node's contribution to the output "
                                             "error (it costs one pipeline run per quantized node)."),
) -> None:
    r"""Convert components to fp16 / int8 beside their fp32 graphs, and judge the recomposed pipeline.

    Per \[precision] in mmopt.toml (or --precision): fp16 keeps fp32 islands where calibration data shows
    overflow or fragile numerics; int8 is static Q/DQ (TensorRT's form) calibrated on \[calibration] data
    with the configured method; int8-cpu is the same calibration in the form ONNX Runtime's CPU kernels run
    fast (uint8 activations, 7-bit weights, fp32 RGB stem); int8-dynamic quantizes weights only (a CPU
    option); auto picks the fastest of int8-cpu / int8-dynamic / fp32 on this machine. The pipeline is
    checked against eager PyTorch, scored on \[evaluation] data when configured (failing beyond
    \[tolerance].max_accuracy_drop), and int8 nodes are ranked by the error they cause. Any failure leaves
    the bundle as it was.

    The eager reference is rebuilt from the config the bundle was exported from (or --config): this imports
    and runs the model code that config names, as `mmopt export` did. A bundle whose config or checkpoint
    changed since export is refused as stale before any of that code runs. One writer at a time: a second
    run on the same bundle waits for the first, then converts on top of its result.

    Examples, for TensorRT engines and for ONNX Runtime on CPU:

        mmopt quantize build/ -p image=int8 -p text=fp16
        mmopt quantize build/ -p image=int8-cpu -p text=auto
    """
    from mmopt import api
    from mmopt.cli import console
    from mmopt.progress import RichProgress

    result = api.quantize(bundle, config, RichProgress(console), parse_policy(precision), trust_checkpoint,
                          not no_sensitivity)
    show(result)


def show(result: Any) -> None:
    """Print what a ``QuantizeResult`` holds: artifacts, parity, fp32 islands, accuracy, sensitivity."""
    from mmopt.cli import console
    from mmopt.precision.convert import parity_key

    m = result.manifest
    console.print(tables.converted_table(result))
    for comp, why in result.kept_fp32.items():
        console.print(f"[yellow]kept fp32:[/] {escape(why)}", highlight=False)
    searched = result.search  # this run's search only (the manifest keeps an earlier run's)
    if searched:
        console.print(tables.search_table(searched))
        for row in searched.get("skipped", []):
            console.print(f"[yellow]auto skipped[/] {escape(row['component'])}={row['precision']}: "
                          f"{escape(row['reason'])}", highlight=False)
        if searched.get("why"):
            console.print(f"auto chose {escape(searched['chosen'])}: {escape(searched['why'])}", highlight=False)
    console.print(tables.parity_table({parity_key(result.policy): m.results["parity"][parity_key(result.policy)]}))
    for comp, islands in result.islands.items():
        console.print(tables.islands_table(comp, islands))
    if result.accuracy:
        console.print(tables.accuracy_table(result.accuracy))
    if result.sensitivity:
        console.print(tables.sensitivity_table(result.sensitivity))
    if result.sensitivity_error:
        console.print(f"[yellow]no sensitivity report:[/] {escape(result.sensitivity_error)} (the conversion "
                      "stands; it was judged before the report)", highlight=False)
    console.print(f"[green]bundle updated:[/] {escape(str(result.bundle))}  ({result.seconds:.1f} s)", highlight=False)
    b = escape(str(result.bundle))
    engines = any(p in ("fp16", "int8") for p in result.policy.values())  # what TensorRT builds
    console.print(f"next: mmopt bench {b} -o {b}-bench/ (latency and parity of every variant)"
                  + (f" · mmopt build {b} on the target GPU (every precision the bundle holds)" if engines else ""),
                  highlight=False, style="dim")
