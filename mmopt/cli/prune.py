"""``mmopt prune``: structural pruning per component, recovered without labels, as a config to export."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmopt.cli import options
from rich.markup import escape
from rich.table import Table

from mmopt.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command()(prune)


def parse_targets(items: list[str]) -> dict[str, float]:
    targets = {}
    for item in items:
        comp, sep, value = item.partition("=")
        try:
            targets[comp.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not comp.strip():
            raise UsageError(f"--prune {item!r}: write COMPONENT=SHARE, the share to keep (of its MACs, or of its "
                             "latency with --target latency), e.g. -p image=0.5.")
    return targets


def prune(
    config: Path = typer.Argument(..., help="mmopt.toml of the model to prune (with a \\[calibration] table)."),
    targets: list[str] = typer.Option([], "--prune", "-p", metavar="COMP=SHARE",
                                      help="A component and the share to keep, in (0, 1), of its MACs (or of its "
                                           "latency, with --target latency); repeatable, e.g. -p image=0.5."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="The pruned config to write, beside CONFIG. Default: "
                                            "<config>.pruned.toml."),
    align: int = typer.Option(8, "--align", help="Keep channel counts at multiples of this (8 for fp16 tensor "
                                                 "cores; 16 for int8)."),
    steps: int = typer.Option(300, "--steps", help="Distillation steps of the recovery (0: none)."),
    target: str = typer.Option("macs", "--target",
                               help="What SHARE keeps: `macs` (counted), or `latency` of the component's exported "
                                    "graph on ONNX Runtime CPU at one thread, measured after every pruning step."),
    sparse_2_4: bool = typer.Option(False, "--sparse-2-4",
                                    help="Also make the pruned components' Conv / Linear weights 2:4 sparse (two "
                                         "largest of every four input weights kept, held through recovery) for "
                                         "TensorRT's sparse kernels: then `mmopt build --sparse` on an Ampere+ GPU."),
    trust_checkpoint: bool = options.trust_checkpoint(),
) -> None:
    r"""Prune whole channels of components to a share of their MACs, then recover them without labels.

    Torch-Pruning's dependency graph removes channels consistently across convolutions, linears, norms,
    residual adds, concats and attention (whole heads are never split); the layers whose outputs the rest
    of the model reads keep their width, so the pruned component fits unchanged. The pruned model is
    distilled from the unpruned one on \[calibration] data (no labels) for --steps steps, scored on
    \[evaluation] data when configured (gated by \[tolerance].max_accuracy_drop), and written beside CONFIG:
    the pruned config, its safetensors weights (with the plan that shapes the factory's fresh model, so no
    pickled module) and a .prune.json report (MACs, parameters, latency, accuracy before and after, lineage).
    Needs the prune extra: pip install -e '.\[prune]'.

    Example, then export and use the pruned model as any other:

        mmopt prune mmopt.toml -p image=0.5 -o mmopt.pruned.toml
        mmopt export mmopt.pruned.toml -o build-pruned/
    """
    from mmopt import api
    from mmopt.cli import console
    from mmopt.progress import RichProgress

    out = out or config.with_name(config.stem + ".pruned.toml")
    result = api.prune(config, parse_targets(targets), out, align, steps, trust_checkpoint, RichProgress(console),
                       target, sparse_2_4)
    rep = result.report
    t = Table(title="pruned", title_justify="left")
    for col in ("component", "MACs", "kept", "params", "kept", "heads", "ONNX latency", "frozen"):
        t.add_column(col, justify="left" if col in ("component", "heads") else "right")
    for comp, c in rep["components"].items():
        heads = sorted({(h["heads_before"], h["heads"]) for h in c["attention_heads"]})
        t.add_row(escape(comp), f"{c['macs_before'] / 1e6:.2f}M -> {c['macs_after'] / 1e6:.2f}M", f"{c['macs_kept']:.0%}",
                  f"{c['params_before']:,} -> {c['params_after']:,}", f"{c['params_kept']:.0%}",
                  ", ".join(f"{a} -> {b}" for a, b in heads) or "-", f"{c['onnx_latency_ratio']:.2f}x",
                  f"{len(c['frozen_layers'])} layer" + ("" if len(c["frozen_layers"]) == 1 else "s"))
    console.print(t)
    console.print("frozen: the layers whose outputs the rest of the model reads keep their width (the report lists "
                  "them); heads: per attention block, whole heads removed, head size kept; ONNX latency: the pruned "
                  "component's exported graph over the original's (ONNX Runtime CPU, 1 thread, opt size, "
                  "interleaved)", style="dim", highlight=False)
    for comp, c in rep["components"].items():
        if "sparse_2_4" in c:
            sp = c["sparse_2_4"]
            console.print(f"{escape(comp)}: 2:4 sparse weights in {sp['layers']} layers, pattern verified in the "
                          f"exported graph ({sp['weights_2_4']} of its {sp['weights']} weights); speed "
                          f"{escape(sp['speed'])}", highlight=False)
    acc = rep["accuracy"]
    if acc:
        console.print(f"{escape(acc['metric'])} on {acc['samples']} samples: original {acc['original'] * 100:.2f}%, "
                      f"pruned {acc['before_recovery'] * 100:.2f}% before recovery, {acc['after_recovery'] * 100:.2f}% "
                      f"after {rep['recovery']['steps']} distillation steps", highlight=False)
    console.print(f"[green]written:[/] {escape(str(result.config))}, {escape(result.checkpoint.name)}, "
                  f"{escape(result.report_path.name)}  ({result.seconds:.1f} s)", highlight=False)
    o = escape(str(out))
    console.print(f"next: mmopt export {o} -o build-pruned/ (then quantize, bench, build as usual)", highlight=False,
                  style="dim")
