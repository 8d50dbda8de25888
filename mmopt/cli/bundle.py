"""``mmopt inspect`` and ``mmopt verify``: read a bundle without running anything."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from mmopt.cli.tables import parity_table, summary_table
from mmopt.errors import BundleError


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(verify)


def inspect(bundle: Path = typer.Argument(Path("build"), help="Bundle folder written by `mmopt export`.")) -> None:
    """Show a bundle: components with their inputs, outputs, dynamic axes and wiring, artifacts, parity."""
    from mmopt import api
    from mmopt.cli import console
    from mmopt.cli.tables import components_table, dims_table, weights_table

    manifest = api.inspect_bundle(bundle)
    console.print(components_table(manifest))
    console.print(dims_table(manifest))
    console.print(weights_table(manifest, bundle))
    console.print(summary_table(manifest))
    for precision, summary in manifest.results.get("parity", {}).items():
        console.print(parity_table({precision: summary}))


def verify(bundle: Path = typer.Argument(Path("build"), help="Bundle folder written by `mmopt export`.")) -> None:
    """Recheck every artifact's sha256 against the manifest; exit 1 on a missing or tampered file."""
    from mmopt import api
    from mmopt.cli import console

    manifest, problems = api.verify_bundle(bundle)
    if problems:
        rows = "\n".join(f"  {f}: {p}" for f, p in problems)
        raise BundleError(f"{bundle}: {len(problems)} of {len(manifest.artifacts)} artifacts failed:\n{rows}\n"
                          "Re-run `mmopt export` (or restore the files) before shipping this bundle.")
    console.print(f"[green]ok:[/] {len(manifest.artifacts)} artifacts match their sha256 in "
                  f"{escape(str(bundle / 'manifest.json'))}", highlight=False)
