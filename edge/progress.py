"""Progress bars for the CLIs: one rich bar per named step, fed by the library's progress callbacks.

The library reports `(step, done, total)` and never prints; each command wraps its call in
`step_bars()` and passes the callback it yields. On a terminal the bars draw on stderr; piped, they
stay silent so output files and logs hold only results.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

StepProgress = Callable[[str, int, int], None]


@contextmanager
def step_bars(*, transient: bool = False) -> Iterator[StepProgress]:
    """Yield a `(step, done, total)` callback that keeps one bar per step name."""
    console = Console(stderr=True)
    bars = Progress(TextColumn("{task.description:<32}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=transient, disable=not console.is_terminal)
    tasks: dict[str, int] = {}

    def report(step: str, done: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = bars.add_task(step, total=max(total, 1))
        bars.update(tasks[step], completed=done, total=max(total, 1))

    with bars:
        yield report
