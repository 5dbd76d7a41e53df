"""Progress while a run goes: a live display on a terminal, a periodic plain line otherwise.

Both are observers of :class:`~veobatch.runner.Snapshot`; the runner knows nothing of either.
Pure core: :func:`display_counts`, :class:`Throughput`, :func:`progress_view`, :func:`render`
and :func:`progress_line` (tested without a terminal). Shell: :class:`LiveProgress` (rich
``Live`` on stderr, redrawn in place so it never floods the scrollback) and :class:`LogProgress`
(one greppable line a minute for cron).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .runner import Snapshot

log = logging.getLogger("veobatch")

# What the operator sees: ledger states, with "submitted" split by what the API last said and
# "completed" shown as what happens to it next.
DISPLAY_STATES = (
    "pending",
    "submitted",
    "generating",
    "downloading",
    "done",
    "failed",
    "uncertain",
)
STYLES = dict(
    zip(DISPLAY_STATES, ("white", "cyan", "blue", "magenta", "green", "red", "yellow"), strict=True)
)


def display_counts(s: Snapshot) -> dict[str, int]:
    c = s.counts
    generating = min(s.generating, c.get("submitted", 0))
    shown = {
        "pending": c.get("pending", 0),
        "submitted": c.get("submitting", 0) + c.get("submitted", 0) - generating,
        "generating": generating,
        "downloading": c.get("completed", 0),
        "done": c.get("done", 0),
        "failed": c.get("failed", 0),
        "uncertain": c.get("uncertain", 0),
    }
    return {state: shown[state] for state in DISPLAY_STATES}  # in the order shown


class Throughput:
    """Finished jobs per minute over a sliding window, and the time left that it implies."""

    def __init__(self, window_s: float = 300.0, min_span_s: float = 5.0) -> None:
        self._window_s = window_s
        self._min_span_s = min_span_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, elapsed_s: float, finished: int) -> None:
        self._samples.append((elapsed_s, finished))
        while len(self._samples) > 2 and elapsed_s - self._samples[1][0] >= self._window_s:
            self._samples.popleft()

    def per_min(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, f0), (t1, f1) = self._samples[0], self._samples[-1]
        if t1 - t0 < self._min_span_s:
            return None
        # Never below nothing: a job counted finished may be taken up again (a remade request).
        return max(0.0, 60.0 * (f1 - f0) / (t1 - t0))

    def eta_s(self, remaining: int) -> float | None:
        if remaining <= 0:
            return 0.0
        rate = self.per_min()
        return 60.0 * remaining / rate if rate else None


def fmt_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass(frozen=True)
class ProgressView:
    """Everything either display shows, computed once per snapshot."""

    total: int
    finished: int
    counts: dict[str, int]
    elapsed_s: float
    rate_per_min: float | None
    eta_s: float | None
    polls: int


def progress_view(s: Snapshot, throughput: Throughput) -> ProgressView:
    throughput.add(s.elapsed_s, s.finished)
    return ProgressView(
        total=s.total,
        finished=s.finished,
        counts=display_counts(s),
        elapsed_s=s.elapsed_s,
        rate_per_min=throughput.per_min(),
        eta_s=throughput.eta_s(s.total - s.finished),
        polls=s.polls,
    )


def _rate(v: ProgressView) -> str:
    return "?" if v.rate_per_min is None else f"{v.rate_per_min:.1f}/min"


def progress_line(v: ProgressView) -> str:
    """The cron line: ``key=value`` words, so it can be grepped and parsed."""
    counts = " ".join(f"{k}={n}" for k, n in v.counts.items())
    return (
        f"progress finished={v.finished}/{v.total} {counts} rate={_rate(v)} "
        f"eta={fmt_duration(v.eta_s)} elapsed={fmt_duration(v.elapsed_s)} polls={v.polls}"
    )


def render(v: ProgressView, errors: Sequence[str] = (), error_total: int = 0) -> RenderableType:
    """The live display: bar, counts per state, rate and times, the latest problems."""
    head = Table.grid(expand=True, padding=(0, 1))
    head.add_column(no_wrap=True)
    head.add_column(ratio=1)
    head.add_column(no_wrap=True, justify="right")
    pct = 100.0 * v.finished / v.total if v.total else 100.0
    head.add_row(
        Text("veobatch", style="bold"),
        ProgressBar(total=max(v.total, 1), completed=v.finished),
        Text(f"{v.finished}/{v.total} finished ({pct:.0f}%)"),
    )
    counts = Text("  ").join(
        Text(f"{k} {n}", style=STYLES[k] if n else "dim") for k, n in v.counts.items()
    )
    times = Text(
        f"throughput {_rate(v)}   elapsed {fmt_duration(v.elapsed_s)}   "
        f"ETA {fmt_duration(v.eta_s)}   {v.polls} polls",
        style="dim",
    )
    parts: list[RenderableType] = [head, counts, times]
    if errors:
        parts.append(Text(f"latest problems ({error_total} so far):", style="bold red"))
        parts.extend(Text(e, style="red", overflow="ellipsis", no_wrap=True) for e in errors)
    return Group(*parts)


class RecentProblems(logging.Handler):
    """Keeps the last few warnings and errors for the live display."""

    def __init__(self, keep: int = 5) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        self.lines.append(f"{stamp} {record.levelname.lower()} {record.getMessage()}")
        self.total += 1


class LiveProgress:
    """A live display on stderr, redrawn in place; warnings and errors show inside it.

    ``mute``: a console log handler to silence while the display runs (its lines would scroll
    the display away); what it would have shown appears in the display and the final summary.
    """

    def __init__(
        self, console: Console, *, keep_problems: int = 5, mute: logging.Handler | None = None
    ) -> None:
        self._mute = mute
        self._muted_level = logging.NOTSET
        self._throughput = Throughput()
        self._problems = RecentProblems(keep_problems)
        self._live = Live(
            Text("veobatch: starting"),
            console=console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveProgress:
        log.addHandler(self._problems)
        if self._mute is not None:
            self._muted_level = self._mute.level
            self._mute.setLevel(logging.CRITICAL + 1)
        self._live.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._live.stop()
        log.removeHandler(self._problems)
        if self._mute is not None:
            self._mute.setLevel(self._muted_level)

    def __call__(self, s: Snapshot) -> None:
        view = progress_view(s, self._throughput)
        self._live.update(render(view, list(self._problems.lines), self._problems.total))


class LogProgress:
    """For cron: a summary line at most once per ``interval_s``, plus one at the end.

    "The end" is the run's last snapshot (``Snapshot.final``), not every jobs-finished count:
    failed jobs re-polled and done jobs re-fetched count as finished while work goes on, and
    a line per 0.5 s tick would flood the log.
    """

    def __init__(
        self, interval_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._throughput = Throughput()

    def __call__(self, s: Snapshot) -> None:
        view = progress_view(s, self._throughput)
        now = self._clock()
        if now - self._last >= self._interval_s or s.final:
            self._last = now
            log.info("%s", progress_line(view))
