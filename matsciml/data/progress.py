"""One progress-bar style for every long data job (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``1,234 records/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


def progress_bar(console: Console | None = None, unit: str | None = None, disable: bool = False) -> Progress:
    """A rich progress bar: description, bar, n/total, percent, elapsed and remaining time.

    Args:
        console: where to draw (default: stdout).
        unit: name of the counted items; adds a rate column (``records/s``).
        disable: draw nothing.
    """
    rate = (RateColumn(unit),) if unit else ()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
