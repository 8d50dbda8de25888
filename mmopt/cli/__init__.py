"""The ``mmopt`` command: a thin Typer layer over ``mmopt.api``.

User errors (``MmoptError``) print as one red message without a traceback and exit with the
error's code (1, or 2 for usage errors). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from mmopt.errors import MmoptError


def _console(stderr: bool = False) -> Console:
    # Piped or captured output (CI logs) gets 120 columns rather than rich's 80, which squeezes the
    # tables into unreadable ellipses; COLUMNS still decides when set.
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=120 if wide else None)


console = _console()
err_console = _console(stderr=True)

def _flags_take_no_value() -> None:
    """Typer shows every option's type (``--engine <bool>``), as if a flag took a value: flags show none."""
    import typer.core

    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:  # older typer shows no type column at all: nothing to hide
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich  # type: ignore[union-attr]


_flags_take_no_value()

# Help text is Markdown: paragraphs re-wrap to the terminal (docstrings are hard-wrapped in the source),
# `code` renders as code, and [dims] / [precision] stay literal (rich markup would eat them).
app = typer.Typer(
    name="mmopt",
    rich_markup_mode="markdown",
    help="Take a trained multimodal PyTorch model to fast, verified deployment artifacts.\n\n"
         "Typical flow: `mmopt export mmopt.toml -o build/` (one ONNX graph per encoder + fusion, proven "
         "to match the eager model), `mmopt inspect build/`, `mmopt verify build/`. "
         "`mmopt demo` runs it all on the embedded VQA model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from mmopt.cli import bench, build, bundle, export, package, prune, quantize, triton

    for module in (export, bundle, build, quantize, prune, package, triton, bench):
        module.register(app)


_register()


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (CI cancelling, a container stopping) unwinds like Ctrl-C: open bundle transactions remove
    # their staged folders on the way out and the earlier bundle stays as it was. The flag lets code that
    # wraps a library's errors tell a swallowed interrupt from a real failure.
    from mmopt.errors import note_interrupt

    note_interrupt()
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
    try:
        app()
    except MmoptError as e:
        from rich.text import Text

        # The message is plain text: brackets such as mmopt[tensorrt] must not be read as markup.
        err_console.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside Typer's own handling: the same exit
        _say_interrupted()
        sys.exit(130)
    except SystemExit as e:  # Typer's own handling of Ctrl-C / SIGTERM exits 130
        if e.code == 130:
            _say_interrupted()
        raise


def _say_interrupted() -> None:
    err_console.print("interrupted: what this run had not finished was discarded; earlier output is as it was",
                      style="yellow", highlight=False)
