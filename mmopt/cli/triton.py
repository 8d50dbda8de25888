"""``mmopt triton``: a package or bundle as an NVIDIA Triton model repository; ``--check`` validates one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmopt.cli import options
from rich.markup import escape


def register(app: typer.Typer) -> None:
    app.command()(triton)


def triton(
    source: Path = typer.Argument(..., help="A bundle (`mmopt export`), a package (`mmopt package`), or with "
                                            "--check a Triton model repository."),
    precision: list[str] = typer.Option([], "--precision", "-p", metavar="COMP=PREC",
                                        help="For a bundle: the precision to serve per component (repeatable; fp32 "
                                             "where not given). A package serves the policy it holds."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The model repository folder to write."),
    backend: str = typer.Option("native", "--backend", "-b",
                                help="native: onnxruntime_onnx members (Triton's ONNX Runtime backend, GPU or "
                                     "CPU). python: each member runs its graph in ONNX Runtime inside Triton's "
                                     "python backend (any Triton, no GPU needed)."),
    name: Optional[str] = typer.Option(None, "--name", help="The ensemble's model name (members are "
                                                            "NAME_COMPONENT). Default: from the model's factory."),
    no_batching: bool = typer.Option(False, "--no-batching",
                                     help="max_batch_size 0: dims are the full shapes and requests run as sent. "
                                          "For models whose tensors do not all carry the batch on axis 0."),
    instances: int = typer.Option(1, "--instances", help="Instances of each member (instance_group count)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Where instances run: gpu or cpu. Default: gpu for "
                                                            "native, cpu for python."),
    queue_delay_us: int = typer.Option(0, "--max-queue-delay-us",
                                       help="How long the dynamic batcher may hold a request to fill a preferred "
                                            "batch, in microseconds (0: merge only what is already queued)."),
    check: bool = typer.Option(False, "--check", help="Only validate SOURCE, a model repository (mmopt's, or "
                                                      "edited by hand), with Triton's schema and meaning."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="For a bundle: mmopt.toml to read the golden samples' data from. "
                                               "Default: the config the bundle was exported from."),
    trust_checkpoint: bool = options.trust_checkpoint("For a bundle: "),
    public_key: Optional[Path] = typer.Option(None, "--public-key",
                                              help="For a signed package: the public key its signature must verify "
                                                   "with (`mmopt package --sign-key`)."),
    tensorrt: Optional[str] = typer.Option(None, "--tensorrt", metavar="VERSION",
                                           help="The Triton server's TensorRT version (e.g. 10.3.0 in Triton 24.08): "
                                                "the package's engines that load in it are served as tensorrt_plan "
                                                "members, one plan per GPU compute capability; other components stay "
                                                "ONNX. Native backend only."),
    platform: str = typer.Option("linux-x86_64", "--platform", metavar="OS-ARCH",
                                 help="With --tensorrt: the Triton server's platform (linux-x86_64, or linux-aarch64 "
                                      "for Triton on a Jetson); only engine sets built there are served."),
) -> None:
    r"""Write a Triton Inference Server model repository: one model per component and an ensemble that wires
    model inputs -> encoders -> fusion -> model outputs as the captured wiring does.

    Names, dtypes and dims come from the package's IO specs (batch axis left out, dynamic axes -1);
    max_batch_size and the dynamic batcher's preferred sizes from the batch dim's opt / max in \[dims]. A bundle
    is packaged first (its graphs verified and self-tested by the device runtime). Every config.pbtxt is
    parsed with Triton's own schema and the ensemble's dataflow is checked before the folder is renamed into
    place. Needs the triton extra: pip install 'mmopt[triton]'.

        mmopt triton build/ -p image=int8 -p text=fp16 -o model_repository/
        mmopt triton vqa-pkg/ --backend python -o model_repository/
        mmopt triton model_repository/ --check

    A package holding TensorRT engine sets (`mmopt package --engines`) serves them as plans with --tensorrt, the
    server's TensorRT version:

        mmopt triton vqa-pkg/ --tensorrt 10.3.0 -o model_repository/
    """
    from mmopt import api
    from mmopt.cli import console, tables
    from mmopt.cli.quantize import parse_policy
    from mmopt.errors import UsageError
    from mmopt.progress import RichProgress

    if check:
        if out is not None or precision:
            raise UsageError("--check validates SOURCE as it is: give no -o or -p with it.")
        report = api.check_triton(source)
        console.print(tables.triton_check_table(report))
        console.print(f"[green]valid:[/] {escape(str(source))} ({len(report.models)} models, "
                      f"{len(report.ensembles)} ensemble{'s' if len(report.ensembles) != 1 else ''}): Triton's "
                      "schema parses every config and every ensemble's dataflow checks out", highlight=False)
        return
    if out is None:
        raise UsageError("give the repository folder to write: -o model_repository/ (or --check to validate "
                         "SOURCE).")
    r = api.triton(source, parse_policy(precision), out, backend=backend, name=name, batching=not no_batching,
                   instances=instances, kind=kind, queue_delay_us=queue_delay_us, config=config,
                   trust_checkpoint=trust_checkpoint, public_key=public_key, progress=RichProgress(console),
                   tensorrt=tensorrt, platform=platform)
    console.print(tables.triton_table(r))
    for m in r.plan.members.values():
        if m.note:
            console.print(f"note: {escape(m.name)}: {escape(m.note)}", highlight=False)
    console.print(f"[green]repository written:[/] {escape(str(r.folder))} ({len(r.report.models)} models, validated "
                  f"with Triton's schema; {r.seconds:.1f} s)", highlight=False)
    folder = escape(str(r.folder))
    if r.plan.backend == "python":
        hint = (f"tritonserver --model-repository {folder} (the server's Python needs numpy<2 and onnxruntime; "
                "docs/triton.md), then send requests to model "
                f"'{escape(r.plan.ensemble)}'")
    else:
        hint = (f"on a GPU server, tritonserver --model-repository {folder} (e.g. in the "
                f"nvcr.io/nvidia/tritonserver container; docs/triton.md), then send requests to model "
                f"'{escape(r.plan.ensemble)}'")
    console.print(f"next: {hint}", highlight=False, style="dim")
