"""Progress while a run goes: a live bar on a terminal, a periodic plain line otherwise.

Both are observers of :class:`~veobatch.runner.Snapshot`; the runner knows nothing of either.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .runner import Snapshot

log = logging.getLogger("veobatch")

ORDER = ("pending", "submitting", "submitted", "completed", "done", "failed", "uncertain")


def describe(s: Snapshot) -> str:
    """One line of counts, in pipeline order, skipping the zeros."""
    parts = [f"{s.counts[k]} {k}" for k in ORDER if s.counts.get(k)]
    return f"{s.finished}/{s.total} finished: " + ", ".join(parts)


class LiveProgress:
    """A rich progress bar on stderr; log lines scroll above it."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]veobatch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("run", total=None, detail="starting")

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def __call__(self, s: Snapshot) -> None:
        parts = [f"{s.counts[k]} {k}" for k in ORDER if s.counts.get(k) and k != "done"]
        self._progress.update(
            self._task, total=s.total, completed=s.finished, detail=", ".join(parts)
        )


class LogProgress:
    """For cron: a summary line at most once per ``interval_s``, plus one at the end."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._last = time.monotonic()

    def __call__(self, s: Snapshot) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval_s or s.finished == s.total:
            self._last = now
            log.info("progress: %s (%.0fs)", describe(s), s.elapsed_s)
