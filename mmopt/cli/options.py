"""Options several commands share, defined once so their flag and help read the same everywhere."""
from __future__ import annotations

from typing import Any

import typer


def trust_checkpoint(scope: str = "") -> Any:
    """``--trust-checkpoint``: ``scope`` says when it applies (e.g. "For a bundle: ")."""
    return typer.Option(False, "--trust-checkpoint",
                        help=f"{scope}Allow a .pt checkpoint that needs pickled code. Only for files you trust: "
                             "unpickling can run arbitrary code.")
