"""``mmopt package``: one policy of a bundle as a package for the torch-free device runtime (``mmopt-run``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmopt.cli import options
from rich.markup import escape


def register(app: typer.Typer) -> None:
    app.command()(package)


def package(
    bundle: Path = typer.Argument(Path("build"), help="Bundle folder written by `mmopt export` / `mmopt quantize`."),
    precision: list[str] = typer.Option([], "--precision", "-p", metavar="COMP=PREC",
                                        help="The precision to ship per component (repeatable; fp32 where not "
                                             "given). The bundle must hold it."),
    out: Path = typer.Option(..., "--out", "-o", help="Package folder to write (a .tar.gz of it is written beside)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="mmopt.toml to read the golden samples' data from. Default: the "
                                               "config the bundle was exported from."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", metavar="PRIVATE.pem",
                                            help="Sign the package with this PEM elliptic-curve private key "
                                                 "(OpenSSF model-signing; pip install 'mmopt[sign]'). Devices "
                                                 "then check it with `mmopt-run --public-key`."),
    engines: list[Path] = typer.Option([], "--engines", metavar="BUNDLE",
                                       help="A copy of this bundle that `mmopt build` ran in on another device "
                                            "(repeatable): its engines for the packaged graphs join the package as "
                                            "one more engine set. The bundle's own engines are always taken."),
    trust_checkpoint: bool = options.trust_checkpoint(),
) -> None:
    r"""Write one policy of a bundle as a deployment package, self-tested by the device runtime.

    The package holds one ONNX graph per component at the chosen precision, the same graphs merged into one
    (checked against the split pipeline; the runtime prefers it: one session call), golden samples (a few real
    \[evaluation] or \[calibration] samples with the eager model's outputs and the policy's tolerance), and
    package.json: wiring, IO, dynamic axes with min / opt / max, every file's sha256, the verified parity and
    lineage back to the bundle. On the device, the runtime (`pip install ./runtime`: numpy and onnxruntime,
    no torch) checks the hashes and the golden outputs before it serves:

        mmopt package build/ -p image=int8-cpu -o vqa-pkg/
        mmopt-run selftest vqa-pkg/
        mmopt-run infer vqa-pkg/ --inputs sample.npz --out result.npz

    TensorRT engines that `mmopt build` made from these very graphs ship too, one engine set per GPU / TensorRT
    version (the ONNX graphs stay, the fallback); on the device the runtime runs the set that matches it, else a
    version-compatible one, else builds engines there once (full TensorRT), else ONNX Runtime, and says which.
    Engines from two devices (the bundle copied to each and `mmopt build` run there):

        mmopt package build/ -p image=fp16 -p text=fp16 -o vqa-pkg/ --engines orin-build/ --engines l4-build/

    Signed (devices refuse it unless the signature verifies with the public key they hold):

        mmopt package build/ -p image=int8-cpu -o vqa-pkg/ --sign-key key.pem
        mmopt-run selftest vqa-pkg/ --public-key public.pem
    """
    from mmopt import api
    from mmopt.cli import console
    from mmopt.cli.quantize import parse_policy
    from mmopt.progress import RichProgress

    r = api.package(bundle, parse_policy(precision), out, config, trust_checkpoint, RichProgress(console), sign_key,
                    engines)
    g = r.manifest["golden"]
    console.print(f"self-test by the runtime: {g['samples']} golden samples from {escape(g['source'])} pass the "
                  f"policy's gate (min cosine {min(o['cos_min'] for o in r.selftest['outputs'].values()):.6f})",
                  highlight=False)
    if "file" in r.merged:
        console.print(f"merged graph: {escape(r.merged['file'])} runs the whole policy in one ONNX Runtime session "
                      f"(against the split pipeline: max abs difference {r.merged['vs_split']:.3g})", highlight=False)
    else:
        console.print(f"no merged graph ({escape(r.merged['reason'])}): the runtime runs the split graphs",
                      highlight=False)
    for es in r.manifest["engines"]:
        console.print(f"engine set {escape(es['id'])}: {', '.join(sorted(es['components']))} (built on "
                      f"{escape(es['gpu']['name'])}, TensorRT {escape(es['tensorrt']['version'])})", highlight=False)
    if not r.manifest["engines"]:
        console.print("no TensorRT engine set: the device runs the ONNX graphs (or, with full TensorRT there, builds "
                      "engines from them once into its engine cache)", highlight=False)
    for note in r.engine_notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if sign_key is not None:
        console.print(f"signed with {escape(str(sign_key))}: package.sig covers every file (model-signing, key "
                      "mode)", highlight=False)
    console.print(f"[green]package written:[/] {escape(str(r.folder))} and {escape(r.archive.name)} "
                  f"({len(r.manifest['files'])} files, {r.seconds:.1f} s)", highlight=False)
    key = " --public-key public.pem" if sign_key is not None else ""
    console.print(f"next: on the device, pip install ./runtime (numpy + onnxruntime, no torch), then mmopt-run "
                  f"selftest {escape(r.folder.name)}/{key}", highlight=False, style="dim")
