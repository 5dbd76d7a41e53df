"""The download queue: which video a free download worker fetches next, and from when.

A video URL expires (a signed CDN URL may be valid for minutes, or seconds), so the order
matters. A URL fetched again because the host refused the old one goes first: behind the whole
backlog it would expire too. Among equals the oldest URL goes first, as it expires soonest.
A download that failed waits out its backoff here, not in a worker, so the workers go on with
other videos meanwhile; a waiting one is one entry in a heap, with no task or timer of its own.
Pure core: :class:`Fetch`, :class:`FetchQueue`. Shell: :class:`DownloadQueue`, which the
download workers wait on.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import anyio

# Event loops round timers to milliseconds (uvloop does): a retry may start this much early,
# rather than a worker waking again and again for the last fraction of a millisecond.
EARLY_S = 0.002


@dataclass(frozen=True, slots=True)
class Fetch:
    """One download to make: a job's video URL, and how it has fared so far."""

    job_id: str
    url: str
    url_at: float  # when the API handed the URL out (monotonic): an older one expires sooner
    refreshed: bool = False  # it replaces a URL the video host refused
    attempt: int = 0  # attempts with this URL that failed and may be retried

    @property
    def rank(self) -> tuple[bool, float]:
        """Lower goes first: a refreshed URL, then the one handed out earliest."""
        return (not self.refreshed, self.url_at)


class FetchQueue:
    """Fetches ready to go, best first, and fetches waiting for their retry time: two heaps."""

    def __init__(self) -> None:
        self._ready: list[tuple[tuple[bool, float], int, Fetch]] = []
        self._waiting: list[tuple[float, int, Fetch]] = []
        self._seq = 0  # ties go in the order they came, and fetches are never compared

    def __len__(self) -> int:
        return len(self._ready) + len(self._waiting)

    def put(self, fetch: Fetch, not_before: float | None = None) -> None:
        """Queue ``fetch``, to be handed out no sooner than ``not_before`` when given."""
        self._seq += 1
        if not_before is None:
            heapq.heappush(self._ready, (fetch.rank, self._seq, fetch))
        else:
            heapq.heappush(self._waiting, (not_before, self._seq, fetch))

    def pop(self, now: float) -> Fetch | None:
        """The best fetch whose time has come, or None; a retry whose wait is over takes its
        place by its rank, as if it had never left."""
        while self._waiting and self._waiting[0][0] <= now:
            _, seq, fetch = heapq.heappop(self._waiting)
            heapq.heappush(self._ready, (fetch.rank, seq, fetch))
        return heapq.heappop(self._ready)[2] if self._ready else None

    def next_at(self) -> float | None:
        """When the earliest waiting fetch is due, or None when none waits."""
        return self._waiting[0][0] if self._waiting else None


class DownloadQueue:
    """The shell the download workers share: :meth:`get` waits for the next fetch due."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._queue = FetchQueue()
        self._clock = clock
        self._naps: list[anyio.CancelScope] = []  # one per worker waiting: cancelled to wake it

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, fetch: Fetch, *, delay_s: float = 0.0) -> None:
        """Queue ``fetch``, to start ``delay_s`` from now (a retry's backoff)."""
        self._queue.put(fetch, self._clock() + delay_s if delay_s > 0 else None)
        if self._naps:  # one waiting worker looks again: this one may be due before its wake-up
            self._naps.pop().cancel()

    async def get(self) -> Fetch:
        while (fetch := self._queue.pop(self._clock() + EARLY_S)) is None:
            await self._nap(self._queue.next_at())
        return fetch

    async def _nap(self, until: float | None) -> None:
        """Sleep until ``until`` (or for good), unless :meth:`put` wakes us first. A plain sleep
        in a scope put() cancels: a deadline on the scope would re-arm its timer until the
        loop's millisecond clock caught up, spinning meanwhile."""
        with anyio.CancelScope() as scope:
            self._naps.append(scope)
            try:
                if until is None:
                    await anyio.sleep_forever()
                else:
                    await anyio.sleep(max(0.0, until - self._clock()))
            finally:
                if scope in self._naps:  # woken by its timer: not in put()'s way any more
                    self._naps.remove(scope)
