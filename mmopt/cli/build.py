"""``mmopt build``: TensorRT engines from a bundle, on the device that will run them."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mmopt.trt.options import HARDWARE_COMPAT, default_timing_cache


def build(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `mmopt export` (holds manifest.json)."),
    precision: Optional[str] = typer.Option(
        None, "--precision", "-p",
        help="Which of the bundle's graphs to build: fp32, fp16 or int8. Default: every precision it holds. "
             "The precision is the graph's own (fp16 tensors, Q/DQ nodes): engines are strongly typed."),
    workspace_mib: Optional[int] = typer.Option(
        None, "--workspace-mib", help="Scratch GPU memory TensorRT may use while building and running, in MiB. "
                                      "Default: TensorRT's (all free device memory). Set it on a Jetson."),
    profile: List[str] = typer.Option(
        [], "--profile", help="Extra optimization profile beside the captured min/opt/max one, e.g. batch=1 for "
                              "latency or batch=8:16:32 for throughput. Repeat for more. Sizes must stay inside "
                              "the captured range."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", help="Persistent timing cache shared across builds, so later builds skip "
                                     "kernel timing. Default: mmopt/trt-timing.cache under $XDG_CACHE_HOME "
                                     "(else ~/.cache)."),
    no_timing_cache: bool = typer.Option(False, "--no-timing-cache", help="Build without a persistent timing cache."),
    sparse: bool = typer.Option(False, "--sparse", help="Let TensorRT use 2:4 structured-sparse kernels where "
                                                        "weights already are 2:4 sparse (Ampere and newer)."),
    hardware_compat: str = typer.Option(
        "none", "--hardware-compat", help=f"One of {', '.join(HARDWARE_COMPAT)}. none: tuned for this GPU; "
                                          "same_compute_capability (TensorRT >= 10.9): any GPU of this compute "
                                          "capability; ampere+: any Ampere-or-newer GPU, somewhat slower."),
    version_compatible: bool = typer.Option(
        False, "--version-compatible", help="Engine also loads in later TensorRT versions (same major, and 10 -> 11); "
                                            "embeds the lean runtime, may be slower."),
    opt_level: Optional[int] = typer.Option(
        None, "--opt-level", help="Builder optimization level 0-5 (TensorRT's default 3); higher builds longer."),
) -> None:
    """Build one TensorRT engine per component, on the target GPU.

    Run it on the device that will serve the model, or on one with the identical GPU and software image.

    Engines are tied to the GPU and TensorRT version that build them: there is no cross-building for Jetson.

    Each engine lands in the bundle as COMPONENT.PRECISION.engine with a .engine.json sidecar, checked before loading.

    Example:

        mmopt build out/ --precision fp16 --profile batch=1
    """
    from rich.markup import escape

    from mmopt.cli import console, tables
    from mmopt.progress import RichProgress
    from mmopt import api
    from mmopt.trt import BuildOptions, parse_profile

    options = BuildOptions(workspace_mib=workspace_mib, profiles=tuple(parse_profile(p) for p in profile),
                           timing_cache=None if no_timing_cache else (timing_cache or default_timing_cache()),
                           sparse_weights=sparse, hardware_compatibility=hardware_compat,
                           version_compatible=version_compatible, optimization_level=opt_level)
    artifacts = api.build(bundle, precision, options, progress=RichProgress(console))
    console.print(tables.engines_table(bundle, artifacts))
    for a in artifacts:
        for w in a.extra.get("warnings", []):
            console.print(f"[yellow]warning[/yellow] {escape(a.component)}: {escape(str(w))}")


def register(app: typer.Typer) -> None:
    """Add ``build`` to the main ``mmopt`` app."""
    app.command("build")(build)
