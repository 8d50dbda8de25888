"""``mmopt quantize``: per-component fp16 / int8 on an exported bundle, judged on parity and task score."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mmopt.cli.render import parity_table
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
    precision: list[str] = typer.Option([], "--precision", "-p", metavar="COMPONENT=PRECISION",
                                        help="Override \\[precision] for this run (repeatable): fp32, fp16, int8, "
                                             "int8-cpu, int8-dynamic, auto."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow a .pt checkpoint that needs pickled code (only for files "
                                               "you trust)."),
    sensitivity: bool = typer.Option(True, "--sensitivity/--no-sensitivity",
                                     help="Report each int8 node's contribution to the output error."),
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

    Examples: mmopt quantize build/ -p image=int8 -p text=fp16        # for TensorRT engines
              mmopt quantize build/ -p image=int8-cpu -p text=auto    # for ONNX Runtime on CPU
    """
    from mmopt import api
    from mmopt.cli import console
    from mmopt.progress import RichProgress

    result = api.quantize(bundle, config, RichProgress(console), parse_policy(precision), trust_checkpoint,
                          sensitivity)
    show(result)


def show(result: Any) -> None:
    """Print what a ``QuantizeResult`` holds: artifacts, parity, fp32 islands, accuracy, sensitivity."""
    from mmopt.cli import console
    from mmopt.precision import artifact_file, parity_key

    m = result.manifest
    t = Table(title=f"converted: {escape(result.label)}", title_justify="left")
    for col in ("component", "precision", "file", "size", "fp32 size"):
        t.add_column(col)
    for comp, prec in result.policy.items():
        if prec == "fp32":
            continue
        art, parent = m.artifact(comp, prec), m.artifact(comp, "fp32")
        t.add_row(escape(comp), prec, escape(artifact_file(comp, prec)), f"{art.bytes / 1024:.0f} KiB",
                  f"{parent.bytes / 1024:.0f} KiB")
    console.print(t)
    for comp, why in result.kept_fp32.items():
        console.print(f"[yellow]kept fp32:[/] {escape(why)}", highlight=False)
    for row in (m.results.get("policy_search") or {}).get("skipped", []):
        console.print(f"[yellow]auto skipped[/] {escape(row['component'])}={row['precision']}: "
                      f"{escape(row['reason'])}", highlight=False)
    console.print(parity_table({parity_key(result.policy): m.results["parity"][parity_key(result.policy)]}))
    for comp, islands in result.islands.items():
        t = Table(title=f"{escape(comp)}: nodes kept in fp32", title_justify="left")
        t.add_column("node")
        t.add_column("why")
        for node, why in islands.items():
            t.add_row(escape(node), escape(why))
        console.print(t)
    if result.accuracy:
        console.print(accuracy_table(result.accuracy))
    if result.sensitivity:
        console.print(sensitivity_table(result.sensitivity))
    console.print(f"[green]bundle updated:[/] {escape(str(result.bundle))}  ({result.seconds:.1f} s)", highlight=False)


def accuracy_table(acc: dict[str, Any]) -> Table:
    t = Table(title=escape(f"{acc['metric']} on {acc['samples']} samples from {acc['source']}"), title_justify="left")
    t.add_column("pipeline")
    t.add_column("accuracy", justify="right")
    t.add_column("vs eager fp32", justify="right")
    base = acc["scores"].get("eager fp32")
    for label, score in acc["scores"].items():
        t.add_row(escape(label), f"{score * 100:.2f}%", "" if base is None else f"{(score - base) * 100:+.2f} pts")
    return t


def sensitivity_table(report: dict[str, Any]) -> Table:
    t = Table(title="int8 sensitivity: pipeline error with only this node quantized (worst first)",
              title_justify="left")
    for col in ("component", "node", "op", "max rel", "cos min", "argmax"):
        t.add_column(col, justify="right" if col in ("max rel", "cos min", "argmax") else "left")
    for comp, r in report.items():
        w = r["whole_component"]
        t.add_row(escape(comp), "(all quantized nodes)", str(r["quantized_nodes"]), f"{w['max_rel']:.4f}",
                  f"{w['cos_min']:.5f}", "-" if w["argmax"] is None else f"{w['argmax']:.3f}")
        for row in r["worst_nodes"]:
            t.add_row("", escape(row["node"]), escape(row["op"]), f"{row['max_rel']:.4f}", f"{row['cos_min']:.5f}",
                      "-" if row["argmax"] is None else f"{row['argmax']:.3f}")
        if r.get("suggest_exclude"):
            t.add_row("", f"[yellow]to try: exclude.{escape(comp)} = {escape(str(r['suggest_exclude']))}[/]",
                      "", "", "", "")
    return t
