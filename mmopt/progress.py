"""Progress reporting for long steps: a rich progress bar in the CLI, silence in the API."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class Progress:
    """Silent by default; ``RichProgress`` draws bars. ``task`` yields an ``advance(n=1)`` callable."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def log(self, message: str) -> None:
        pass


class RichProgress(Progress):
    def __init__(self, console) -> None:  # rich.console.Console
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        with Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message), highlight=False)  # plain text: paths such as exp[lr=0.1] are no markup
