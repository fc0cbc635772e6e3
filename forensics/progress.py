"""Progress of long steps on stderr (Rich), one bar per stage; silent when disabled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Stages:
    """Bars for the stages of one long step; every method does nothing when disabled."""

    def __init__(self, bar: Any = None):
        self._bar = bar

    def stage(self, label: str, total: int | None = None) -> Callable[..., None]:
        """Start a stage of ``total`` units; returns ``update(detail="", advance=1)``.

        ``update`` shows ``detail`` (what is being worked on) and advances the bar by
        ``advance`` units; ``update(advance=0, detail=...)`` names the unit being started.
        """
        if self._bar is None:
            return lambda detail="", advance=1: None
        bar = self._bar
        task = bar.add_task(label, total=total, detail="")

        def update(detail: str = "", advance: int = 1) -> None:
            bar.update(task, advance=advance, detail=detail)

        return update


@contextmanager
def stages(enabled: bool) -> Iterator[Stages]:
    """A :class:`Stages` whose bars show on stderr while the block runs (if ``enabled``)."""
    if not enabled:
        yield Stages()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                   console=Console(stderr=True), transient=False)
    bar.start()
    try:
        yield Stages(bar)
    finally:
        bar.stop()
