"""Request failures that repeat by the thousand in an outage: said once, then counted.

A 30 s outage with 10,000 generations in flight failed 30,381 polls and wrote a warning for
each: cron's log could not be read. Here the first failure of each cause in an outage is logged
in full; the rest go to DEBUG (``-v``) and are counted by cause. A summary line every window says
how many failed and why, and when requests succeed again one line closes the outage with its
length and totals. An occasional failure still gets its own line and nothing more.

Pure core: :class:`FailureTally` (time passed in), :func:`failure_cause`.
Shell: :class:`OutageLog`, which writes the tally's lines to a logger.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ApiError, DownloadError, NoAnswerError, NotSentError, ProtocolError

WINDOW_S = 30.0
MAX_SAID = 5  # causes said in full in one outage; a flood of new ones is counted, not said
MAX_CAUSES = 8  # causes counted apart; the rest are "other" (a message that varies by request)
OTHER = "other"


@dataclass(frozen=True)
class Note:
    """A line to log."""

    level: int
    text: str


@dataclass
class _Counts:
    """Failures counted since ``start``, by cause."""

    start: float
    by_cause: Counter[str] = field(default_factory=Counter)
    quiet: int = 0  # counted without a line of their own
    level: int = logging.DEBUG  # the highest level of their lines, for the line that sums up

    def add(self, cause: str, level: int, *, quiet: bool) -> None:
        self.by_cause[cause] += 1
        self.quiet += quiet
        self.level = max(self.level, level)

    def take(self, other: _Counts) -> None:
        """Leave out failures another line has told."""
        self.by_cause -= other.by_cause
        self.quiet = max(0, self.quiet - other.quiet)

    @property
    def total(self) -> int:
        return sum(self.by_cause.values())

    def causes(self) -> str:
        return ", ".join(f"{cause} ×{n:,}" for cause, n in self.by_cause.most_common())


class FailureTally:
    """Failures of one kind of request (polls, downloads, creates), counted by cause.

    An outage begins with a failure after a quiet ``window_s``; the first failure of each cause
    in it is said in full. A window opens at the first failure after the last summary, and once
    it has run ``window_s`` its failures are summed up (unless each had its own line). A
    stretch runs from the first failure after a success to the next success, which ends it
    with a line if a line told of it (one of its failures', or a summary of a window it filled)
    and some of its failures were counted in silence: a total outage ends with its totals, while
    flaky requests get their summaries and a stray failure only its own line."""

    def __init__(
        self, noun: str, recovered: str, going_on: str, *, window_s: float = WINDOW_S
    ) -> None:
        self.noun = noun  # "poll": "poll failures window=..."
        self.recovered = recovered  # "polls succeed again"
        self.going_on = going_on  # "polling continues"
        self.window_s = window_s
        self._said: set[str] = set()
        self._known: set[str] = set()
        self._last_failure = -math.inf
        self._window: _Counts | None = None
        self._succeeded = 0  # successes in the window
        self._stretch: _Counts | None = None
        self._told = False  # a line has told of the stretch

    @property
    def idle(self) -> bool:
        """Nothing counted and untold: a success has nothing to do."""
        return self._window is None and self._stretch is None

    def failed(
        self, cause: str, now: float, level: int = logging.WARNING
    ) -> tuple[bool, list[Note]]:
        """Count one failure: whether to log it in full, and the lines due before it."""
        notes = self._due(now)
        if now - self._last_failure >= self.window_s:  # a new outage
            self._said.clear()
            self._known.clear()
        self._last_failure = now
        if cause not in self._known:
            if len(self._known) >= MAX_CAUSES:
                cause = OTHER
            self._known.add(cause)
        full = cause not in self._said and len(self._said) < MAX_SAID
        if full:
            self._said.add(cause)
        if self._window is None:
            self._window, self._succeeded = _Counts(now), 0
        if self._stretch is None:
            self._stretch, self._told = _Counts(now), False
        self._window.add(cause, level, quiet=not full)
        self._stretch.add(cause, level, quiet=not full)
        self._told = self._told or full
        return full, notes

    def succeeded(self, now: float) -> list[Note]:
        """A request went through: the lines due, the end of an outage among them."""
        if self.idle:
            return []
        if self._window is not None:
            self._succeeded += 1
        notes = self._due(now)
        stretch, self._stretch = self._stretch, None
        if stretch is None or not (self._told and stretch.quiet):
            return notes
        window = self._window
        if window is not None:  # what the line below tells, the next summary does not
            if window.start >= stretch.start:
                self._window = None
            else:
                window.take(stretch)
        after = f"after={now - stretch.start:.0f}s failed={stretch.total}"
        notes.append(Note(stretch.level, f"{self.recovered} {after}: {stretch.causes()}"))
        return notes

    def flush(self, now: float) -> list[Note]:
        """At the end of the run: the failures no line has told yet."""
        notes = self._summary(now, "") if self._window is not None else []
        self._stretch = None
        return notes

    def _due(self, now: float) -> list[Note]:
        window = self._window
        if window is None or now - window.start < self.window_s:
            return []
        return self._summary(now, self.going_on)

    def _summary(self, now: float, tail: str) -> list[Note]:
        window, self._window = self._window, None
        assert window is not None
        if not window.quiet:  # each had a line of its own
            return []
        if self._stretch is not None and self._stretch.start <= window.start:
            self._told = True  # the whole window failed: its end is worth a line
        text = (
            f"{self.noun} failures window={now - window.start:.0f}s failed={window.total}"
            f" succeeded={self._succeeded}: {window.causes()}"
        )
        return [Note(window.level, text + (f"; {tail}" if tail else ""))]


# "GET /v2/video/generations: no answer: ServerDisconnectedError: Server disconnected"
_UNDERLYING = re.compile(r": (could not connect|no answer): ([A-Za-z_][\w.]*)")
_API_KINDS: tuple[tuple[type[ApiError], str], ...] = (
    (NotSentError, "could not connect"),
    (NoAnswerError, "no answer"),
    (ProtocolError, "unreadable answer"),
)
# Download messages with a byte count or a host's words in them: the part that names the cause.
_DOWNLOAD_CAUSES = (
    re.compile(r"^(download interrupted) after \d+ bytes(: \w+)?"),
    re.compile(r"^(cannot fetch video: \w+)"),
    re.compile(r"^(truncated):"),
    re.compile(r"^(video host too slow):"),
    re.compile(r"^(incomplete MP4):"),
    # Not the words of the host's error body that follow: a request id would make each a cause.
    re.compile(r"^(video host answered \d+)(: the URL has expired or is refused)?"),
)
MAX_CAUSE_CHARS = 100


def failure_cause(exc: ApiError | DownloadError) -> str:
    """A short name for why a request failed, the same for every request it failed alike:
    ``HTTP 503``, ``no answer: ServerDisconnectedError``; never a byte count, an id or an
    error body's words (a request id in a 503's body would make each failure a cause)."""
    if isinstance(exc, ApiError):
        if exc.status is not None:
            return f"HTTP {exc.status}"
        if m := _UNDERLYING.search(exc.message):
            return f"{m[1]}: {m[2]}"
        return next(
            (name for kind, name in _API_KINDS if isinstance(exc, kind)), type(exc).__name__
        )
    for pattern in _DOWNLOAD_CAUSES:
        if m := pattern.match(exc.message):
            return "".join(g for g in m.groups() if g)
    return exc.message[:MAX_CAUSE_CHARS]


class OutageLog:
    """A :class:`FailureTally` whose lines go to ``logger``: each failure's own line at its
    level when it is the first of its cause, at DEBUG otherwise."""

    def __init__(
        self,
        logger: logging.Logger,
        noun: str,
        recovered: str,
        going_on: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
    ) -> None:
        self._log = logger
        self._clock = clock
        self.tally = FailureTally(noun, recovered, going_on, window_s=window_s)

    def failed(
        self,
        exc: ApiError | DownloadError,
        message: str,
        *args: object,
        level: int = logging.WARNING,
    ) -> None:
        full, notes = self.tally.failed(failure_cause(exc), self._clock(), level)
        self._say(notes)
        self._log.log(level if full else logging.DEBUG, message, *args)

    def succeeded(self) -> None:
        if not self.tally.idle:  # the common case, once per poll: nothing to do
            self._say(self.tally.succeeded(self._clock()))

    def flush(self) -> None:
        self._say(self.tally.flush(self._clock()))

    def _say(self, notes: list[Note]) -> None:
        for note in notes:
            self._log.log(note.level, "%s", note.text)
