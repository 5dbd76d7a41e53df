"""The shared poller: one loop and one heap of due times for every generation in flight.

One task polls everything, so the cost is one heap operation per poll rather than a sleeping
coroutine per job. Pure core: :func:`error_delay_s`, :class:`PollSchedule`, and the learnt
schedule in :mod:`veobatch.schedule`.
Shell: :class:`Poller`, which hands due generations to a fixed pool of poll workers (the pool
size is the in-flight limit) and every final answer to the runner through a :class:`PollSink`.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from .client import ApiClient, Generation
from .errors import ApiError, AuthError, BadRequestError, NoAnswerError, NotFoundError
from .outage import OutageLog
from .schedule import PLAN_SLACK_S, DurationModel, fit
from .settings import PollSettings

log = logging.getLogger(__name__)

# A 404 is final only after a streak of them this long, at least this many, each of which came
# while the API answered other generations' polls: an API slow to register ids, or answering 404
# for a while by mistake, must not lose paid work. (A generation's age says nothing: real ones
# take minutes, so nearly every one polled is old.)
MAX_NOT_FOUND = 5
NOT_FOUND_STREAK_S = 300.0
# A generation whose intent another API key sent: the API shows a generation only to the key
# that created it, so 404s are its expected answer, explained by the key change. This many in
# a row (not one: a stray 404 must not end one this key can see after all) end it at once, at
# the usual poll intervals (well under a minute), without the lost rule above, which a night of
# nothing but such 404s never meets. Ending it costs nothing: it fails `other_key`, is polled
# again by later runs, and is never remade.
OTHER_KEY_NOT_FOUND = 3
# 404s to many generations at once are the API's fault, not theirs: judged over this window,
# "many" being more than a few generations and more than a share of those polled in it.
NOT_FOUND_WINDOW_S = 60.0
NOT_FOUND_FEW = 2
NOT_FOUND_SHARE = 0.1
POLL_BURST = 50  # polls that may go at once before pacing applies
REFIT_CHECK_S = 0.25  # how often the poller looks for models due a new plan
# Polls due this soon go with the current batch: one loop turn serves several, and the loop
# never wakes a hair early and finds nothing due (event loops round timers to milliseconds).
POLL_EARLY_S = PLAN_SLACK_S - 0.001  # below it, or a planned time would be polled twice


def error_delay_s(
    errors: int,
    s: PollSettings,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Capped exponential backoff with full jitter, never shorter than the server asked."""
    cap = min(s.error_backoff_max_s, s.min_interval_s * (2 ** min(errors, 16)))
    jittered = (rng or random).uniform(s.min_interval_s, max(s.min_interval_s, cap))
    return max(jittered, retry_after_s or 0.0)


class NotFoundWatch:
    """The run's poll answers over the last minute, across generations: tells a generation the
    API has lost (404s to it while others are answered) from an API answering 404 to many at
    once, or to all (a fault: counted for none of them), as submit_failed counts only while
    other creates get through."""

    def __init__(self, recent_s: float, window_s: float = NOT_FOUND_WINDOW_S) -> None:
        self._recent_s = recent_s
        self._window_s = window_s
        # (when, job, a 404, to a generation not delivered before: not a refetch)
        self._seen: deque[tuple[float, str, bool, bool]] = deque()
        self._polled: Counter[str] = Counter()  # answers per generation within the window
        self._missing: Counter[str] = Counter()  # of those, 404s
        self._missing_new: Counter[str] = Counter()  # of those, to generations not delivered
        # The last status any generation's poll got, and the last one another generation's
        # got: (when, job).
        self._last: tuple[float, str] = (-math.inf, "")
        self._other: tuple[float, str] = (-math.inf, "")

    def answered(self, now: float, job_id: str) -> None:
        self._note(now, job_id, False)
        if job_id != self._last[1]:
            self._other = self._last
        self._last = (now, job_id)

    def not_found(self, now: float, job_id: str, *, delivered: bool = False) -> bool:
        """Note a 404 to ``job_id``; True when it counts towards taking the generation for lost:
        another generation's poll got a status within ``recent_s`` (the API is answering), and
        404s are not hitting many generations at once. For a ``delivered`` one (a video asked
        for again) also when no generation that is not such a refetch got a 404 within the
        window: a night of refetches alone has nothing else to compare with, while a 404 to a
        generation in flight beside it is the sign of an API answering 404 to all."""
        self._note(now, job_id, True, delivered)
        if delivered and not self._missing_new:
            return True
        answered = self._last if self._last[1] != job_id else self._other
        if now - answered[0] > self._recent_s:
            return False
        return len(self._missing) <= max(NOT_FOUND_FEW, NOT_FOUND_SHARE * len(self._polled))

    def _note(self, now: float, job_id: str, missing: bool, delivered: bool = False) -> None:
        seen = self._seen
        while seen and seen[0][0] < now - self._window_s:
            _, old, was_missing, was_new = seen.popleft()
            _drop(self._polled, old)
            if was_missing:
                _drop(self._missing, old)
                if was_new:
                    _drop(self._missing_new, old)
        seen.append((now, job_id, missing, not delivered))
        self._polled[job_id] += 1
        if missing:
            self._missing[job_id] += 1
            if not delivered:
                self._missing_new[job_id] += 1


def _drop(counts: Counter[str], key: str) -> None:
    """One less of ``key``; gone at none, so ``len`` is the generations within the window."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class PollSchedule:
    """Due times keyed by job id; rescheduling leaves stale heap entries that are skipped later."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: str) -> bool:
        return key in self._due

    def schedule(self, key: str, due: float) -> None:
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))

    def remove(self, key: str) -> None:
        self._due.pop(key, None)

    def due(self, key: str) -> float | None:
        return self._due.get(key)

    def next_due(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[str]:
        """Keys whose time has come, earliest first; they leave the schedule until rescheduled."""
        out: list[str] = []
        while self._heap and (limit is None or len(out) < limit):
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            out.append(key)
        return out

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)


@dataclass(slots=True)
class Tracked:
    job_id: str
    generation_id: str
    model: str
    started: float  # monotonic time the generation was submitted
    deadline: float  # monotonic time after which the job is given up on
    # Age at the last poll that found it still running; None while unknown (polled first on
    # resuming or refreshing: a finish then says nothing of how long it took).
    last_running_age: float | None = 0.0
    errors: int = 0
    not_found: int = 0  # 404s in a row
    # Of those, the ones that count towards "lost" (NotFoundWatch), and when the first came.
    missing: int = 0
    missing_since: float | None = None
    polls: int = 0
    plan: int = 0  # the version of the plan that set its first poll (0: none, or not counted)
    scout: bool = False  # polled on the cold schedule while the plan rests on earlier runs
    # Its video was delivered and its file has since gone (a refetch): a 404 streak to it
    # counts on its own while no generation in flight beside it gets 404s (NotFoundWatch).
    delivered: bool = False
    # Its intent was sent with another API key than this run's (OTHER_KEY_NOT_FOUND).
    other_key: bool = False
    api_status: str = "queued"  # as the last poll saw it, for progress displays
    # What the last poll met when it got no status (an error, no answer); None after a status.
    # A job timeout that comes after failed polls says so, not merely "not finished".
    last_error: ApiError | None = None


class PollSink(Protocol):
    """Where the poller reports what it learnt; the runner implements it."""

    async def generation_finished(self, tracked: Tracked, generation: Generation) -> None: ...

    async def generation_timed_out(self, tracked: Tracked) -> None: ...

    async def generation_lost(self, tracked: Tracked, error: ApiError) -> None: ...


class Poller:
    def __init__(
        self,
        api: ApiClient,
        sink: PollSink,
        settings: PollSettings,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._sink = sink
        self._s = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._schedule = PollSchedule()
        self._tracked: dict[str, Tracked] = {}
        self._nap = anyio.CancelScope()  # the loop's sleep; cancelled to wake it early
        self._ready: deque[Tracked] = deque()  # due, waiting for a poll worker
        self._idle: list[anyio.Event] = []  # one per poll worker waiting for work
        self._sleeping_until = -math.inf  # -inf while awake: nothing to interrupt
        self._next_slot = -math.inf  # pacing: when the next poll may go
        self.durations = DurationModel(settings)
        # Every generation is polled at least once per max_interval_s: another one answered
        # within two of them shows the API is answering.
        self.not_found_watch = NotFoundWatch(recent_s=2 * settings.max_interval_s)
        self.polls_sent = 0
        # In an outage every generation in flight fails its polls: one line per poll would
        # bury the log (30,381 warnings in a 30 s outage with 10,000 in flight).
        self.failures = OutageLog(
            log, "poll", "polls succeed again", "polling continues", clock=clock
        )

    def __len__(self) -> int:
        return len(self._tracked)

    def generating(self) -> int:
        """Generations the API last reported as generating (not queued)."""
        return sum(1 for t in self._tracked.values() if t.api_status == "generating")

    def track(
        self,
        job_id: str,
        generation_id: str,
        *,
        model: str,
        age_s: float,
        remaining_s: float,
        first: bool,
        after_s: float = 0.0,
        delivered: bool = False,
        other_key: bool = False,
    ) -> None:
        """Start following a generation. ``first`` waits for the first poll time; a resumed
        or refreshed one is polled after ``after_s`` (at once by default). ``delivered``: its
        video was delivered once, and is asked for again (a refetch). ``other_key``: another
        API key created it (:data:`OTHER_KEY_NOT_FOUND`)."""
        now = self._clock()
        t = Tracked(
            job_id,
            generation_id,
            model,
            started=now - age_s,
            deadline=now + remaining_s,
            delivered=delivered,
            other_key=other_key,
        )
        if not first:
            t.last_running_age = None
        elif self.durations.scout(model):
            t.scout = True
        else:
            t.plan = self.durations.version(model)
        self._tracked[job_id] = t
        first_s = self._s.first_delay_s if t.scout else self.durations.first_delay_s(model)
        delay = max(0.0, first_s - age_s) if first else after_s
        self._add(job_id, min(now + delay, t.deadline))

    async def run(self) -> None:
        """Poll forever; the owner cancels this when the run is over."""
        # The pool size bounds the polls in flight, without a task or a semaphore per poll.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refit_loop)
            for _ in range(self._s.max_concurrent):
                tg.start_soon(self._poll_worker)
            while True:
                now = self._clock()
                for job_id in self._schedule.pop_due(now + POLL_EARLY_S):
                    t = self._tracked.get(job_id)
                    if t is None:
                        continue
                    # A poll due at the deadline still goes: a generation done by then is done.
                    await self._pace()
                    self._ready.append(t)
                    if self._idle:
                        self._idle.pop().set()
                await self._sleep_until_due()

    async def _poll_worker(self) -> None:
        """Poll what is ready; a busy pool passes work on with no wake-up at all."""
        while True:
            while self._ready:
                await self._poll_one(self._ready.popleft())
            wake = anyio.Event()
            self._idle.append(wake)
            await wake.wait()

    async def _refit_loop(self) -> None:
        """Fit poll plans in a worker thread: a fit takes tens of milliseconds, which the poll
        loop must not wait for."""
        while True:
            for model, intervals, samples in self.durations.stale():
                fitted = await anyio.to_thread.run_sync(fit, intervals, self._s)
                self.durations.install(model, fitted, samples)
                self._bring_forward(model)
            await anyio.sleep(REFIT_CHECK_S)

    def _bring_forward(self, model: str) -> None:
        """Generations not yet polled move to the new plan's first poll when it is earlier: a
        plan that learnt tonight is faster must not leave hundreds waiting on the old one."""
        first = self.durations.first_delay_s(model)
        version = self.durations.version(model)
        now = self._clock()
        for t in self._tracked.values():
            if t.model != model or t.polls or t.last_running_age is None or t.scout:
                continue
            planned = t.started + first
            due, wanted = self._schedule.due(t.job_id), max(now, planned)
            if due is not None and wanted < due:
                t.plan = version if planned >= now else 0  # polled late: says nothing of it
                self._add(t.job_id, wanted)

    async def _pace(self) -> None:
        """Keep to ``max_polls_per_s`` overall, allowing a short burst."""
        rate = self._s.max_polls_per_s
        now = self._clock()
        self._next_slot = max(self._next_slot, now - POLL_BURST / rate) + 1 / rate
        if self._next_slot > now:
            await anyio.sleep(self._next_slot - now)

    async def _sleep_until_due(self) -> None:
        """Sleep until the earliest due time, or until something due earlier is scheduled."""
        nxt = self._schedule.next_due()
        self._sleeping_until = math.inf if nxt is None else nxt
        # A plain sleep in a scope that _add cancels: a deadline on the scope instead would
        # re-arm its timer until the loop's millisecond clock catches up, spinning meanwhile.
        with anyio.CancelScope() as self._nap:
            if nxt is None:
                await anyio.sleep_forever()
            else:
                await anyio.sleep(max(0.0, nxt - self._clock()))
        self._sleeping_until = -math.inf

    async def _poll_one(self, t: Tracked) -> None:
        t.polls += 1
        self.polls_sent += 1
        try:
            gen = await self._api.fetch(t.generation_id)
        except AuthError:
            raise  # the key no longer works: nothing else will, the run must stop
        except NoAnswerError as exc:
            await self._unanswered(t, exc)
            return
        except ApiError as exc:
            await self._on_error(t, exc)
            return
        self.not_found_watch.answered(self._clock(), t.job_id)
        self.failures.succeeded()
        t.errors = t.not_found = t.missing = 0  # only 404s in a row count towards "lost"
        t.missing_since = None
        t.last_error = None
        if t.polls == 1 and t.plan and not gen.failed:
            # Was the plan's first poll too late for tonight? Then polls waiting for it move up.
            if self.durations.first_polled(t.model, t.plan, gen.completed):
                self._bring_forward(t.model)
        if gen.completed or gen.failed:
            self._tracked.pop(t.job_id, None)
            if gen.completed and (sample := self.sample_of(t)) is not None:
                # It finished since the last poll that saw it running (or since submission).
                self.durations.observe(t.model, *sample)
            await self._sink.generation_finished(t, gen)
            return
        now = self._clock()
        t.api_status = gen.status
        if now >= t.deadline:
            await self._time_out(t)
            return
        t.last_running_age = age = now - t.started
        self._reschedule(t, now + self.durations.next_delay_s(t.model, age, scout=t.scout))

    def sample_of(self, t: Tracked) -> tuple[float, float] | None:
        """When a generation just found finished did finish (after, by), in seconds from
        submission; None when it was first polled on a resume or refresh (unknown)."""
        if t.last_running_age is None:
            return None
        return (t.last_running_age, self._clock() - t.started)

    async def _time_out(self, t: Tracked) -> None:
        if self._tracked.pop(t.job_id, None) is not None:
            await self._sink.generation_timed_out(t)

    async def _unanswered(self, t: Tracked, exc: NoAnswerError) -> None:
        """A poll with no answer (it hung past the poll timeout, its connection dropped) is no
        news, and a GET is safe to send again: the generation is polled at its next poll time,
        as if this one had not been sent, with no backoff and no error counted."""
        t.last_error = exc
        now = self._clock()
        if now >= t.deadline:
            await self._time_out(t)
            return
        delay = self.durations.next_delay_s(t.model, now - t.started, scout=t.scout)
        # Counted with the failures: an API gone quiet must not write a line per poll either.
        what = "poll unanswered job=%s: polled again in %.1fs: %s"
        self.failures.failed(exc, what, t.job_id, delay, exc, level=logging.INFO)
        self._reschedule(t, now + delay)

    async def _on_error(self, t: Tracked, exc: ApiError) -> None:
        t.last_error = exc
        now = self._clock()
        if isinstance(exc, NotFoundError):
            lost = self._not_found(t, now)
        else:
            # 400 and its kin: the API refuses this id, and asking again will not change that.
            lost = isinstance(exc, BadRequestError)
        if lost:
            self._tracked.pop(t.job_id, None)
            await self._sink.generation_lost(t, exc)
            return
        if now >= t.deadline:
            await self._time_out(t)
            return
        t.errors += 1
        if isinstance(exc, NotFoundError):
            # No overload to back off from: asked again at its usual poll time, so the streak
            # that makes it lost is one of minutes, never a few seconds of fast retries.
            usual = self.durations.next_delay_s(t.model, now - t.started, scout=t.scout)
            delay = max(usual, exc.retry_after_s or 0.0)
        else:
            delay = error_delay_s(t.errors, self._s, exc.retry_after_s, self._rng)
        self.failures.failed(
            exc, "poll failed job=%s attempt=%d retry_in=%.1fs: %s", t.job_id, t.errors, delay, exc
        )
        self._reschedule(t, now + delay)

    def _not_found(self, t: Tracked, now: float) -> bool:
        """Count a 404; True once the generation is taken for lost: this 404 and
        :data:`MAX_NOT_FOUND` or more before it counted (NotFoundWatch), over
        :data:`NOT_FOUND_STREAK_S` at least, with no status in between.

        A delivered one's 404s count even with no other generation answered, unless one in
        flight beside it is answered 404 too: a night that only asks again for archived videos
        has nothing to compare with, and would poll each for a whole job timeout, every night,
        never settling it as gone. Taking one for lost costs no charge there: it stays done,
        and only two runs 12 h apart settle it.

        One another key created ends after :data:`OTHER_KEY_NOT_FOUND` in a row, its 404s left
        out of the watch: the key change explains them, so they say nothing of the API."""
        t.not_found += 1
        if t.other_key:
            return t.not_found >= OTHER_KEY_NOT_FOUND
        if not self.not_found_watch.not_found(now, t.job_id, delivered=t.delivered):
            return False
        t.missing += 1
        if t.missing_since is None:
            t.missing_since = now
        return t.missing >= MAX_NOT_FOUND and now - t.missing_since >= NOT_FOUND_STREAK_S

    def _reschedule(self, t: Tracked, due: float) -> None:
        if t.job_id in self._tracked:
            self._add(t.job_id, min(due, t.deadline))

    def _add(self, job_id: str, due: float) -> None:
        self._schedule.schedule(job_id, due)
        if due < self._sleeping_until:  # the loop would oversleep this one
            self._nap.cancel()
