"""Progress reporting for long steps: a rich progress bar in the CLI, silence in the API."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class Progress:
    """Silent by default; ``RichProgress`` draws bars. ``task`` yields an ``advance(n=1, doing=None)``
    callable: ``n`` units done (``total`` counts them; None when unknown), and optionally what the bar does
    now, shown after its description (``advance(0, doing="image=int8")`` before a long unit)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        yield lambda n=1, doing=None: None

    def log(self, message: str) -> None:
        pass


class RichProgress(Progress):
    def __init__(self, console) -> None:  # rich.console.Console
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        with Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), console=self.console, transient=False) as bar:
            tid = bar.add_task(escape(description), total=total)

            def advance(n: int = 1, doing: str | None = None) -> None:
                shown = escape(description if doing is None else f"{description}: {doing}")
                bar.update(tid, advance=n, description=shown)

            yield advance
            # finished: the bar names the whole step, and is full (a data set smaller than asked for, or an
            # unknown total, ends where the data ended)
            bar.update(tid, description=escape(description), total=bar.tasks[0].completed)

    def log(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message), highlight=False)  # plain text: paths such as exp[lr=0.1] are no markup
