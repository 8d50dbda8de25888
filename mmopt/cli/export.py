"""``mmopt export`` and ``mmopt demo``."""
from __future__ import annotations

from pathlib import Path

import typer

from mmopt.cli import options
from rich.markup import escape

from mmopt.cli.tables import parity_table, summary_table

def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(demo)


def export(
    config: Path = typer.Argument(..., help="mmopt.toml describing the model (see docs/config.md)."),
    out: Path = typer.Option(Path("build"), "--out", "-o", help="Bundle folder to write (replaced atomically)."),
    trust_checkpoint: bool = options.trust_checkpoint(),
    engine: bool = typer.Option(False, "--engine",
                                help="Also build TensorRT engines for every graph in the bundle (same as "
                                     "`mmopt build OUT` afterwards). Needs TensorRT and an NVIDIA GPU: checked "
                                     "before anything is exported."),
) -> None:
    """Export every encoder and the fusion head to ONNX, simplified and proven to match the eager model.

    Runs the model at the min / opt / max sizes of every [dims] entry, derives each component's inputs,
    outputs, dynamic axes and wiring, exports each with the dynamo exporter, simplifies with onnxsim,
    and checks each graph and the recomposed pipeline against eager PyTorch on fresh inputs. A failed
    export leaves any earlier bundle in OUT untouched.

    Example:

        mmopt export mmopt.toml -o build/
    """
    from mmopt import api
    from mmopt.cli import console
    from mmopt.progress import RichProgress

    if engine:
        api.preflight()  # fail before a long export, not after it
    result = api.export(config, out, trust_checkpoint, progress=RichProgress(console))
    console.print(summary_table(result.manifest))
    console.print(parity_table(result.manifest.results["parity"]))
    console.print(f"[green]bundle written:[/] {escape(str(result.bundle))}  ({result.seconds['total']:.1f} s)",
                  highlight=False)
    b = escape(str(out))
    first = escape(next(c for c, s in result.manifest.components.items() if s.kind == "encoder"))
    from mmopt.spec import load_spec

    quantize = (f"-p {first}=int8 (TensorRT) or -p {first}=int8-cpu (ONNX Runtime CPU)"
                if load_spec(config).calibration else f"-p {first}=fp16 (int8 needs \\[calibration] in the config)")
    console.print(f"next: mmopt quantize {b} {quantize} · "
                  f"mmopt bench {b} -o {b}-bench/" + ("" if engine else f" · mmopt build {b} on the target GPU"),
                  highlight=False, style="dim")
    if engine:
        from mmopt.cli.tables import engines_table
        from mmopt.trt import BuildOptions, default_timing_cache

        artifacts = api.build(result.bundle, None, BuildOptions(timing_cache=default_timing_cache()),
                              progress=RichProgress(console))
        console.print(engines_table(result.bundle, artifacts))


def demo(
    out: Path = typer.Option(Path("mmopt-demo"), "--out", "-o", help="Where to write the demo bundle."),
) -> None:
    """Run the whole flow on the embedded easy-VQA model (image CNN + text transformer + fusion).

    Needs no input: the model code, its trained checkpoint and mmopt.toml ship inside mmopt. After the
    fp32 export it converts the bundle to fp16, to TensorRT's int8 form and to the CPU int8 policy
    (int8-cpu image encoder, the rest chosen by the policy search), then benches every variant against
    eager PyTorch (reports in OUT-bench/). The steps are mmopt/examples/vqa/demo.py: read it to script
    your own model.
    """
    from mmopt.cli import console, tables
    from mmopt.cli.bench import print_result
    from mmopt.examples.vqa import demo as steps
    from mmopt.progress import RichProgress

    progress = RichProgress(console)
    bench_out = out.with_name(out.name + "-bench")
    console.print(f"mmopt demo: the bundle goes to {escape(str(out))}/, the bench reports to "
                  f"{escape(str(bench_out))}/ (about a minute on 2 cores)", highlight=False)
    exported = steps.export(out, progress)
    console.print(summary_table(exported.manifest))
    console.print(parity_table(exported.manifest.results["parity"]))
    console.print(f"[green]bundle written:[/] {escape(str(exported.bundle))}  ({exported.seconds['total']:.1f} s)",
                  highlight=False)
    steps.quantize(out, list(exported.manifest.components), progress)
    result = steps.bench(out, bench_out, progress)
    console.print(tables.variants_table(result.report))
    print_result(result.report, result.files)
    b = escape(str(out))
    console.print(
        "what you just saw:\n"
        f"  1. one ONNX graph per encoder and one for the fusion, proven equal to eager PyTorch: {b}/\n"
        "  2. fp16, int8 (TensorRT's Q/DQ form) and the CPU int8 policy, each judged against eager\n"
        f"  3. every variant benched (parity, accuracy, latency): {escape(str(result.files.get('markdown', bench_out)))}\n"
        f"  4. `mmopt inspect {b}` shows the wiring; `mmopt build {b}` makes TensorRT engines on a GPU\n"
        "  5. your own model: write an mmopt.toml (docs/config.md), then `mmopt export mmopt.toml -o build/`",
        highlight=False)
    result.raise_for_gates()
