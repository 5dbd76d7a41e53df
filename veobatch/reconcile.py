"""The reconciler: settle submissions whose outcome is unknown by reading the usage logs.

The API has no idempotency key. A POST answered with a 5xx, or not answered at all, or cut
short by a crash, may have created a billed generation. Each attempt carries a unique
``X-Client-Request-Id``; ``GET /v2/logs`` reports it with the ``inference_id`` (the generation
id) of what it created. One sweep pages through the logs for every open lookup at once,
within the endpoint's own rate limit, and decides:

- logged as succeeded → adopt its generation id and poll it (nothing is paid twice);
- logged as failed → nothing was created: submit again;
- not logged after a grace period, in logs that already show a request made after it, or an
  hour after it was made → after a 5xx or a crash, submit again (the API's advice); after a
  request that went unanswered, the job is ``uncertain``. Logs that show nothing later may lag
  behind more than the grace: after ten graces the job is left ``uncertain`` for a later run.

The logs list requests newest first, and a row shows up once the request is logged. A row of a
request made after ours (one this process sent after ours was answered, or one stamped later
than ours by more than any clock skew) shows the logs have caught up past ours: that is the
evidence absence needs. After a 5xx, a grace after ours: the API may have gone on with the
create after its gateway gave up, and log it only when it ends, after requests that came
later (a grace out of order is tolerated, more is not). One ``limit=1`` read per sweep asks
for the newest succeeded row of the look-ups' models.

Pure core: :func:`decide`, :class:`RateBudget`. Shell: :class:`Reconciler`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import anyio

from .client import LOGS_PATH, ApiClient, LogEntry, LogPage
from .errors import ApiError, AuthError
from .outage import OutageLog

log = logging.getLogger(__name__)

Cause = Literal["server_error", "no_answer", "crash"]
CLOCK_MARGIN_S = 300.0  # the API's clock and ours may disagree; search a wider window
# Skew measured past this (the API's clock against ours, from a row of one of our own creates)
# leaves an unfound request uncertain rather than "never created": the windows move by the
# skew, but a clock that far off may be stepped back any time, and absence would then cost a
# second payment.
MAX_SKEW_FOR_ABSENCE_S = CLOCK_MARGIN_S / 2
PAGE_SIZE = 100
MAX_PAGES_PER_SWEEP = 50
# The logs refuse a window over 92 days: look-ups are searched in groups spanning less, with
# room for the clock margin on both sides.
MAX_WINDOW_S = 90 * 86_400.0
MAX_CURSORS = 16


@dataclass(frozen=True)
class Lookup:
    job_id: str
    client_request_id: str
    model: str
    since_wall: float  # the earliest the request can have left: where the search starts
    cause: Cause
    # When the attempt's last record was written (the answer, or the intent after a crash): the
    # logs' grace runs from here, never from the widened search start, which would eat it.
    recorded_wall: float | None = None
    # Sent with another API key than this run's (its fingerprint): the logs show only the
    # asking key's requests, so absence from them proves nothing.
    other_key: str | None = None

    @property
    def settled_wall(self) -> float:
        return self.since_wall if self.recorded_wall is None else self.recorded_wall


class Verdict(enum.Enum):
    ADOPT = "adopt"
    RESUBMIT = "resubmit"
    UNCERTAIN = "uncertain"
    WAIT = "wait"
    LEAVE = "leave"  # not settled, and the run submits nothing more: left as recorded


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    generation_id: str | None = None
    # The logs showed the request was made: absence from a later read (a row aged out) must
    # never count as "never created".
    seen: bool = False


UNREADABLE_PATIENCE_S = 60.0
# Absent from the logs this long after it was made, a request was never made, later requests
# logged or not: no usage log lags an hour.
NO_LAG_THAT_LONG_S = 3600.0


def decide(
    lookup: Lookup,
    entry: LogEntry | None,
    *,
    waited_s: float,
    grace_s: float,
    searched_all: bool,
    later_logged: bool,
    watched_s: float | None = None,
) -> Decision:
    """What the logs say about one attempt, ``waited_s`` after its last record. Absence counts
    only once the logs had time to catch up, the whole window was read, and the logs were seen
    holding a request made after this one (``later_logged``) before that read began.
    ``watched_s``: how long this run has been looking (the patience with logs that cannot be
    read, or show nothing later, runs from there: an earlier run's look-up gets it too)."""
    watched = waited_s if watched_s is None else watched_s
    if entry is not None and entry.status == "succeeded" and entry.inference_id:
        return Decision(Verdict.ADOPT, "found in the usage logs", entry.inference_id)
    if entry is not None and entry.status == "failed":
        return Decision(Verdict.RESUBMIT, "the usage logs show it failed: nothing was created")
    if entry is not None:  # it was made, but the row names no generation (yet): never absent
        shown = f"logged as {entry.status!r} without a generation id"
        if waited_s < 10 * grace_s:
            return Decision(Verdict.WAIT, shown, seen=True)
        return Decision(Verdict.UNCERTAIN, shown, seen=True)
    if waited_s < grace_s:
        return Decision(Verdict.WAIT, "giving the usage logs time to catch up")
    if not searched_all:
        # Logs that refuse a while (a 429 at a restart, a brief outage) get a minute at least,
        # even with no grace for their lag: unread is not absent.
        if watched < max(10 * grace_s, UNREADABLE_PATIENCE_S):
            return Decision(Verdict.WAIT, "the usage logs could not be read in full yet")
        return Decision(Verdict.UNCERTAIN, "the usage logs could not be read")
    if lookup.other_key is not None:
        return Decision(
            Verdict.UNCERTAIN,
            f"sent with another API key (fingerprint {lookup.other_key}), whose requests this "
            "key's usage logs do not show; a run with that key looks it up",
        )
    if lookup.cause == "no_answer":
        # Never resubmitted on absence, but a row logged late is still worth the wait: adopted,
        # its video is fetched tonight instead of after the next night's look-up.
        if later_logged or watched >= 10 * grace_s:
            return Decision(
                Verdict.UNCERTAIN,
                f"sent, unanswered, and not in the usage logs after {waited_s:.0f}s",
            )
        return Decision(Verdict.WAIT, "the usage logs show no request made after it yet")
    if later_logged:
        return Decision(
            Verdict.RESUBMIT,
            f"not in the usage logs after {waited_s:.0f}s, though they show later requests:"
            " it was never created",
        )
    if grace_s == 0:  # --logs-grace 0: the user says the logs show every request at once
        return Decision(Verdict.RESUBMIT, "not in the usage logs: it was never created")
    if waited_s >= NO_LAG_THAT_LONG_S:  # an earlier night's crash or 5xx
        return Decision(
            Verdict.RESUBMIT,
            f"not in the usage logs {waited_s / 3600:.1f} h after it was made: it was never"
            " created",
        )
    # Logs lagging more than the grace made each such 5xx a second payment: with nothing later
    # logged, absence proves nothing tonight. Left uncertain with its cause, a later run (its
    # own creates logged, or an hour gone by) settles it without paying twice.
    if watched < 10 * grace_s:
        return Decision(Verdict.WAIT, "the usage logs show no request made after it yet")
    return Decision(
        Verdict.UNCERTAIN,
        f"not in the usage logs after {waited_s:.0f}s, but they show no request made after it"
        " either, so they may lag behind; a later run looks it up again",
    )


def apart_s(lookup: Lookup, grace_s: float) -> float:
    """How long after the look-up's request a logged one must have been made to show the
    logs caught up past it. A 5xx may have come from a gateway that gave up while the API went
    on: that create is logged when it ends, maybe after the rows of creates sent in the seconds
    after the 5xx; a request left unanswered likewise. A crashed run's POST, if it arrived, ran
    at the API's usual pace."""
    return 0.0 if lookup.cause == "crash" else grace_s


def made_after(entry: LogEntry, lookup: Lookup, grace_s: float, skew_s: float = 0.0) -> bool:
    """The row's request was made ``apart_s`` after the look-up's, whatever the clocks' skew
    (``skew_s``: the API's clock ahead of ours by that much, when measured)."""
    if entry.created is None:
        return False
    made = entry.created - skew_s
    return made > lookup.settled_wall + apart_s(lookup, grace_s) + CLOCK_MARGIN_S


def window_groups(lookups: list[Lookup]) -> list[dict[str, Lookup]]:
    """The open look-ups in groups of neighbouring times, each searchable at once: the logs
    refuse a window over 92 days, and one old look-up must not make every search fail."""
    groups: list[dict[str, Lookup]] = []
    first = 0.0
    for lk in sorted(lookups, key=lambda lk: lk.since_wall):
        if not groups or max(lk.settled_wall, lk.since_wall) - first > MAX_WINDOW_S:
            groups.append({})
            first = lk.since_wall
        groups[-1][lk.client_request_id] = lk
    return groups


class RateBudget:
    """At most ``limit`` calls in any ``window_s``: the logs endpoint allows 200 per 60 s."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._calls: deque[float] = deque()

    def wait_s(self) -> float:
        now = self._clock()
        while self._calls and self._calls[0] <= now - self.window_s:
            self._calls.popleft()
        if len(self._calls) < self.limit:
            return 0.0
        return self._calls[0] + self.window_s - now

    def take(self) -> None:
        self._calls.append(self._clock())


DecisionSink = Callable[[Lookup, Decision], Awaitable[None]]


class Reconciler:
    """Open lookups, settled in sweeps; owned by the run's task group."""

    def __init__(
        self,
        api: ApiClient,
        on_decision: DecisionSink,
        *,
        grace_s: float,
        interval_s: float,
        budget: RateBudget,
        wall_clock: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._on_decision = on_decision
        self._grace_s = grace_s
        self._interval_s = interval_s
        self._budget = budget
        self._wall = wall_clock  # where to search: the logs are stamped in wall time
        self._clock = clock  # how long was waited: a step of the wall clock must not count
        self._open: dict[str, _Open] = {}
        self._wake = anyio.Event()
        # Where passes cut short by the page cap stopped, by window.
        self._cursors: dict[tuple[float, float, tuple[str, ...]], _Cursor] = {}
        self._not_before = -math.inf  # a 429's or 503's Retry-After, on ``clock``
        # When this process's creates left (note_sent: steady clock, wall clock), kept only
        # while a look-up is open: a row of one sent after a look-up's request (``apart_s``
        # after) shows the logs caught up past it, and its stamp measures the skew.
        self._sent: dict[str, tuple[float, float]] = {}
        self._pruned_to = -math.inf
        # The API's clock ahead of ours (seconds; negative: behind), from the newest row of
        # one of our own creates: the usage logs are stamped by the API's clock.
        self.skew_s: float | None = None
        self._closing = False
        # Logs down for an hour would fail a sweep every few seconds: counted, not a line each.
        self.failures = OutageLog(
            log, "usage-logs read", "usage-logs reads succeed again", "look-ups wait", clock=clock
        )

    def close(self) -> None:
        """The run submits nothing more: what one more read of the logs does not settle is left
        as recorded for a later run (waiting out graces now could only end in a resubmission
        that will not be sent, or keep the run alive for nothing)."""
        self._closing = True
        self._wake.set()

    def note_sent(self, client_request_id: str) -> None:
        """A create is about to leave: its row, once logged, vouches for the look-ups whose
        requests were made long enough before it (``apart_s``)."""
        if self._open:
            self._sent[client_request_id] = (self._clock(), self._wall())

    def add(self, lookup: Lookup) -> None:
        now = self._clock()
        age = max(0.0, self._wall() - lookup.settled_wall)
        self._open[lookup.client_request_id] = _Open(lookup, now - age, now)
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._open:
                await self._wake.wait()
            self._wake = anyio.Event()
            await self.sweep()
            if self._open:
                with anyio.move_on_after(self._interval_s):
                    await self._wake.wait()

    async def sweep(self) -> None:
        """Read the logs once for every open lookup and act on what is settled."""
        self._prune()
        for group in window_groups([o.lookup for o in self._open.values()]):
            await self._sweep(group)
        if not self._open:
            self._sent.clear()

    async def _sweep(self, lookups: dict[str, Lookup]) -> None:
        if await self._probe(lookups):
            found, searched_all, started = await self._search(lookups)
        else:  # the logs refused: unread, as if the search had failed
            found, searched_all, started = {}, False, self._clock()
        now = self._clock()
        for crid, lookup in lookups.items():
            o = self._open[crid]
            # Absence counts only in a pass begun once the logs had their grace to catch up:
            # a row logged late lands among rows an older pass has already read.
            caught_up = started - o.settled_at >= self._grace_s
            d = decide(
                lookup,
                found.get(crid),
                waited_s=now - o.settled_at,
                grace_s=self._grace_s,
                searched_all=searched_all and caught_up,
                # Seen before this pass began: a row logged during a pass may land among rows
                # it has already read.
                later_logged=o.later_seen_at <= started,
                watched_s=now - o.opened_at,
            )
            if d.verdict is Verdict.RESUBMIT and crid not in found and self._skewed():
                d = Decision(Verdict.UNCERTAIN, self._skew_reason(d.reason))
            if d.verdict is Verdict.WAIT and self._closing:
                why = "submissions stopped before the usage logs settled it"
                d = Decision(Verdict.LEAVE, why, seen=d.seen)
            if d.verdict is Verdict.WAIT:
                continue
            del self._open[crid]
            log.info("lookup job=%s verdict=%s: %s", lookup.job_id, d.verdict.value, d.reason)
            await self._on_decision(lookup, d)

    @property
    def _shift(self) -> float:
        """Where the API's clock stamps what ours calls now, minus now: the skew, 0 unknown."""
        return self.skew_s or 0.0

    def _skewed(self) -> bool:
        return self.skew_s is not None and abs(self.skew_s) > MAX_SKEW_FOR_ABSENCE_S

    def _skew_words(self) -> str:
        """``330s behind``: the skew as the messages say it."""
        return f"{abs(self._shift):.0f}s {'ahead of' if self._shift > 0 else 'behind'}"

    def _skew_reason(self, reason: str) -> str:
        return (
            f"{reason.split(':')[0]}, but the API's clock is {self._skew_words()} this"
            " machine's, so absence from its usage logs proves nothing (fix the clock, e.g."
            " NTP; --resubmit-uncertain sends it again)"
        )

    def _note_skew(self, entry: LogEntry) -> None:
        """Measure the skew from a row of one of our own creates: it was made just after we
        sent it (within the request's latency, seconds against a margin of minutes)."""
        sent = self._sent.get(entry.client_request_id or "")
        if sent is None or entry.created is None:
            return
        was_skewed = self._skewed()
        self.skew_s = entry.created - sent[1]
        if self._skewed() and not was_skewed:
            log.warning(
                "clock skew: the API's usage logs are stamped %s this machine's clock;"
                " a request not found in them is left uncertain, never sent again",
                self._skew_words(),
            )

    async def _search(self, lookups: dict[str, Lookup]) -> tuple[dict[str, LogEntry], bool, float]:
        """Page through the window that can hold these requests' rows: what was found,
        whether the whole window was read, and when that pass began (at offset 0, on the
        steady clock).

        The window ends where the latest of them was recorded (a request is logged when it is
        made, and it was made before its answer was recorded, or just after its intent): rows
        of later requests, thousands in a large run, are outside it. A sweep cut short by the
        page cap leaves a cursor, and the next sweep of the same window and lookups goes on
        from there, so a window of any size is read in the end. Rows logged meanwhile may land
        among the rows already read: the pass's start says which rows it can vouch for.
        """
        shift = self._shift  # the logs are stamped by the API's clock
        since = min(lk.since_wall for lk in lookups.values()) + shift - CLOCK_MARGIN_S
        # Up to the last record, even if the wall clock now reads earlier (stepped back): a
        # window ending before the request would never find it, and absence would be wrong.
        until = max(lk.settled_wall for lk in lookups.values()) + shift
        models = sorted({lk.model for lk in lookups.values()})
        window = (since, until + CLOCK_MARGIN_S, tuple(models))
        start = datetime.fromtimestamp(window[0], UTC)
        end = datetime.fromtimestamp(window[1], UTC)
        found: dict[str, LogEntry] = {}
        offset, started = 0, None
        cursor = self._cursors.pop(window, None)
        if cursor is not None and cursor.crids >= lookups.keys():
            offset, started = cursor.offset, cursor.started
            found = {c: e for c, e in cursor.found.items() if c in lookups}
        crids = frozenset(lookups)
        for _ in range(MAX_PAGES_PER_SWEEP):
            await anyio.sleep(self.pause_s())
            if started is None:  # a pass begins when it reads, after any Retry-After wait:
                started = self._clock()  # rows logged during the wait are in what it reads
            page = await self._read(
                start=start, end=end, models=models, offset=offset, limit=PAGE_SIZE
            )
            if page is None:
                if offset:  # a pass with nothing read yet begins again, when it reads
                    self._keep(_Cursor(window, crids, offset, found, started))
                return found, False, started
            for entry in page.entries:
                if entry.client_request_id in lookups:
                    found.setdefault(entry.client_request_id, entry)
            if len(found) == len(lookups) or not page.has_more or not page.entries:
                return found, True, started
            offset += len(page.entries)
        assert started is not None  # set by the first page
        self._keep(_Cursor(window, crids, offset, found, started))
        return found, False, started

    async def _probe(self, lookups: dict[str, Lookup]) -> bool:
        """Read the newest row of the logs (a create of these models that went through), and
        note which of these look-ups it shows the logs have caught up past. Only for look-ups
        whose absence would decide something (not another key's), once their grace is over.
        False when the logs refused."""
        now = self._clock()
        waiting = [
            o
            for o in (self._open[crid] for crid in lookups)
            if o.later_seen_at == math.inf
            and o.lookup.other_key is None
            and now - o.settled_at >= self._grace_s
        ]
        if not waiting:
            return True
        wall = self._wall() + self._shift
        earliest = min(o.lookup.since_wall for o in waiting) + self._shift
        start = max(earliest - CLOCK_MARGIN_S, wall - MAX_WINDOW_S)
        await anyio.sleep(self.pause_s())
        probed = self._clock()
        page = await self._read(
            start=datetime.fromtimestamp(start, UTC),
            end=datetime.fromtimestamp(max(wall, start) + CLOCK_MARGIN_S, UTC),
            # Creates like ours that went through: the rows most surely logged the way ours
            # would be (a refusal's row may be written by another path, sooner).
            models=sorted({o.lookup.model for o in waiting}),
            offset=0,
            limit=1,
            statuses=["succeeded"],
        )
        if page is None:
            return False
        if not page.entries:
            return True
        newest = page.entries[0]
        self._note_skew(newest)
        sent_at = self._sent.get(newest.client_request_id or "", (-math.inf,))[0]
        for o in waiting:
            apart = apart_s(o.lookup, self._grace_s)
            if sent_at - o.settled_at >= apart or made_after(
                newest, o.lookup, self._grace_s, self._shift
            ):
                o.later_seen_at = probed
        return True

    async def _read(
        self,
        *,
        start: datetime,
        end: datetime,
        models: Sequence[str],
        offset: int,
        limit: int,
        statuses: Sequence[str] = (),
    ) -> LogPage | None:
        """One page of the logs, within the rate budget; None when they refused (counted, and
        a Retry-After the API asked for holds every later page)."""
        self._budget.take()
        try:
            page = await self._api.logs(
                start=start,
                end=end,
                models=models,
                offset=offset,
                limit=limit,
                statuses=statuses,
            )
        except AuthError as exc:
            # A refused key, no credits or a wrong base URL: the run stops, it does not wait.
            # Said of the look-up, as the run may not have sent anything else yet.
            exc.message = f"{exc.message} (to the usage-logs look-up, GET {LOGS_PATH})"
            raise
        except ApiError as exc:
            self.failures.failed(exc, "usage logs unavailable: %s", exc.message)
            if exc.retry_after_s:
                self._not_before = self._clock() + exc.retry_after_s
            return None
        self.failures.succeeded()
        return page

    def _prune(self) -> None:
        """Forget creates sent too soon after every open look-up: they vouch for none of them."""
        if not self._open:
            return
        floor = min(o.settled_at + apart_s(o.lookup, self._grace_s) for o in self._open.values())
        if floor > self._pruned_to and len(self._sent) > 1024:
            self._sent = {c: t for c, t in self._sent.items() if t[0] >= floor}
            self._pruned_to = floor

    def pause_s(self) -> float:
        """How long the next page must wait: for the rate budget, and for a Retry-After."""
        return max(self._budget.wait_s(), self._not_before - self._clock())

    def _keep(self, cursor: _Cursor) -> None:
        if len(self._cursors) >= MAX_CURSORS:  # windows of look-ups settled since
            self._cursors.pop(next(iter(self._cursors)))
        self._cursors[cursor.window] = cursor


@dataclass
class _Open:
    """An open look-up and what the reconciler knows of it, on its steady clock."""

    lookup: Lookup
    # When its grace began: its record's age on the wall clock when it was opened (an earlier
    # run's: never below zero), then steady time.
    settled_at: float
    opened_at: float  # the patience with unreadable or lagging logs runs from here
    later_seen_at: float = math.inf  # when the logs were first seen holding a later request


@dataclass(frozen=True)
class _Cursor:
    window: tuple[float, float, tuple[str, ...]]
    crids: frozenset[str]  # the lookups the pass looks for: a new one needs a new pass
    offset: int
    found: dict[str, LogEntry]
    started: float  # when the pass read its first page (on the reconciler's steady clock)
