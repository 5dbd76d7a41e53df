"""The reconciler: the verdict table, the rate budget, and sweeps over paged usage logs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from veobatch.client import LogEntry, LogPage
from veobatch.errors import (
    AuthError,
    BadRequestError,
    RateLimitedError,
    RedirectedError,
    ServerError,
)
from veobatch.reconcile import (
    Cause,
    Decision,
    Lookup,
    RateBudget,
    Reconciler,
    Verdict,
    decide,
)

OK = LogEntry("c", "gen-1", "succeeded")
FAILED = LogEntry("c", None, "failed")


# Read in full, with a 60 s grace, in logs that show later requests: absence counts.
READ: dict[str, Any] = {"grace_s": 60, "searched_all": True, "later_logged": True}


def lk(cause: Cause = "server_error", since: float = 1000.0) -> Lookup:
    return Lookup("job", "c", "google/veo-3.1-t2v", since, cause)


@pytest.mark.parametrize(
    ("cause", "entry", "now", "searched_all", "verdict"),
    [
        ("server_error", OK, 1001, True, Verdict.ADOPT),
        ("no_answer", OK, 1001, False, Verdict.ADOPT),  # a find needs no full search
        ("crash", FAILED, 1001, True, Verdict.RESUBMIT),
        ("server_error", None, 1030, True, Verdict.WAIT),  # logs may lag: grace is 60 s
        ("server_error", None, 1061, True, Verdict.RESUBMIT),
        ("crash", None, 1061, True, Verdict.RESUBMIT),
        ("no_answer", None, 1061, True, Verdict.UNCERTAIN),
        ("server_error", None, 1061, False, Verdict.WAIT),  # could not read it all: wait
        ("server_error", None, 1000 + 601, False, Verdict.UNCERTAIN),  # ...but not forever
        # The request was made, but the row names no generation: never taken for absence.
        ("server_error", LogEntry("c", None, "succeeded"), 1061, True, Verdict.WAIT),
        ("server_error", LogEntry("c", None, "succeeded"), 1000 + 601, True, Verdict.UNCERTAIN),
        ("crash", LogEntry("c", "gen-1", "pending"), 1061, True, Verdict.WAIT),
    ],
)
def test_verdicts(
    cause: Cause, entry: LogEntry | None, now: float, searched_all: bool, verdict: Verdict
) -> None:
    read = {**READ, "searched_all": searched_all}
    d = decide(lk(cause), entry, waited_s=now - 1000, **read)
    assert d.verdict is verdict
    if verdict is Verdict.ADOPT:
        assert d.generation_id == "gen-1"


@pytest.mark.parametrize("cause", ["server_error", "crash", "no_answer"])
def test_absence_from_another_keys_logs_proves_nothing(cause: Cause) -> None:
    other = Lookup("job", "c", "m", 1000.0, cause, other_key="1a2b3c4d")
    d = decide(other, None, waited_s=61, **READ)
    assert d.verdict is Verdict.UNCERTAIN and "another API key (fingerprint 1a2b3c4d)" in d.reason
    assert decide(other, None, waited_s=1, **READ).verdict is Verdict.WAIT
    assert decide(other, OK, waited_s=61, **READ).verdict is Verdict.ADOPT
    assert decide(other, FAILED, waited_s=61, **READ).verdict is (Verdict.RESUBMIT)


def test_grace_runs_from_the_answer_not_from_the_search_start() -> None:
    # The search reaches back a request timeout (60 s) before the answer at 1060.
    lookup = Lookup("job", "c", "m", 1000.0, "server_error", recorded_wall=1060.0)
    assert decide(lookup, None, waited_s=1, **READ).verdict is (Verdict.WAIT)
    assert decide(lookup, None, waited_s=61, **READ).verdict is (Verdict.RESUBMIT)


def test_rate_budget_keeps_to_the_window() -> None:
    now = [0.0]
    budget = RateBudget(3, 60.0, lambda: now[0])
    for _ in range(3):
        assert budget.wait_s() == 0
        budget.take()
        now[0] += 1
    assert budget.wait_s() == pytest.approx(57.0)
    now[0] = 60.0
    assert budget.wait_s() == 0


# A row stamped long after every look-up of these tests: the logs have caught up past them.
LATER = LogEntry("later", "gen-later", "succeeded", created=10**9)


class PagedLogs:
    """Pages of ``entries``, newest first; the probe for the newest row of any model (limit 1,
    no model) is answered with ``newest`` and counted apart in ``probes``."""

    def __init__(
        self, entries: list[LogEntry], fail: bool = False, newest: LogEntry | None = LATER
    ) -> None:
        self.entries = entries
        self.calls: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.fail = fail
        self.newest = newest

    async def logs(self, **kw: Any) -> LogPage:
        if self.fail:
            self.calls.append(kw)
            raise ServerError("HTTP 503", status=503)
        if kw["limit"] == 1 and kw.get("statuses") == ["succeeded"]:
            self.probes.append(kw)
            return LogPage([self.newest] if self.newest else [], False)
        self.calls.append(kw)
        off, lim = kw["offset"], kw["limit"]
        return LogPage(self.entries[off : off + lim], off + lim < len(self.entries))


def _reconciler(
    api: Any, wall: Callable[[], float], limit: int = 200
) -> tuple[Reconciler, list[tuple[str, Decision]]]:
    """A reconciler with a 60 s grace on ``wall``, and the (job, decision) pairs it settles."""
    got: list[tuple[str, Decision]] = []

    async def sink(lookup: Lookup, decision: Decision) -> None:
        got.append((lookup.job_id, decision))

    budget = RateBudget(limit, 60, lambda: 0)
    rec = Reconciler(
        api, sink, grace_s=60, interval_s=1, budget=budget, wall_clock=wall, clock=wall
    )
    return rec, got


def _one_open(api: Any, cause: Cause) -> tuple[Reconciler, list[tuple[str, Decision]], list[float]]:
    """A reconciler at wall time 1000 with one look-up of a request recorded then; moves
    with ``now[0]``."""
    now = [1000.0]
    rec, got = _reconciler(api, lambda: now[0])
    rec.add(Lookup("job", "c", "m", 1000.0, cause, recorded_wall=1000.0))
    return rec, got, now


async def _sweep(api: Any, lookups: list[Lookup], now: float) -> list[tuple[str, Decision]]:
    rec, got = _reconciler(api, lambda: now)
    for lookup in lookups:
        rec.add(lookup)
    await rec.sweep()
    return got


async def test_one_sweep_pages_until_every_lookup_is_found() -> None:
    noise = [LogEntry(f"other-{i}", f"g{i}", "succeeded") for i in range(250)]
    entries = [
        *noise[:120],
        LogEntry("a", "gen-a", "succeeded"),
        *noise[120:],
        LogEntry("b", None, "failed"),
        *noise,
    ]
    api = PagedLogs(entries)
    lookups = [Lookup("ja", "a", "m1", 900, "no_answer"), Lookup("jb", "b", "m2", 900, "crash")]
    got = await _sweep(api, lookups, now=1000)
    assert [(j, d.verdict) for j, d in got] == [("ja", Verdict.ADOPT), ("jb", Verdict.RESUBMIT)]
    assert len(api.calls) == 3  # stopped as soon as both were found
    assert api.calls[0]["models"] == ["m1", "m2"] and api.calls[1]["offset"] == 100


async def test_unreadable_logs_decide_nothing_yet() -> None:
    got = await _sweep(PagedLogs([], fail=True), [lk("server_error", since=900)], now=1000)
    assert got == []


async def test_a_retry_after_from_the_logs_holds_back_every_later_page() -> None:
    # A 429 with Retry-After: 60 was followed by a page every lookup interval (5 s).
    class Limited(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            self.calls.append(kw)
            raise RateLimitedError("HTTP 429", retry_after_s=60.0)

    now = [1000.0]
    rec, got = _reconciler(Limited([]), lambda: now[0])
    rec.add(lk("server_error", since=900))
    assert rec.pause_s() == 0
    await rec.sweep()
    assert got == [] and rec.pause_s() == pytest.approx(60.0)
    now[0] += 45
    assert rec.pause_s() == pytest.approx(15.0)
    now[0] += 15
    assert rec.pause_s() == 0


async def test_a_pass_begins_when_it_reads_not_when_a_retry_after_stopped_it() -> None:
    # The pass cut off by a 429 kept its start: read in full after the wait, it still counted
    # as begun before the logs' grace, and the job was left uncertain.
    class LimitedOnce(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            if not self.calls:
                self.calls.append(kw)
                raise RateLimitedError("HTTP 429", retry_after_s=70.0)
            return await super().logs(**kw)

    now = [1000.0]
    rec, got = _reconciler(LimitedOnce([]), lambda: now[0])
    rec.add(Lookup("job", "c", "m", 1000.0, "server_error"))
    await rec.sweep()
    now[0] = 1100.0
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]


async def test_a_refused_key_or_redirect_from_the_logs_stops_the_sweep() -> None:
    # Waiting ten graces for logs that will never answer would only hide a wrong base URL.
    class Redirecting(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            raise RedirectedError("HTTP 308: the API base URL redirects", status=308)

    with pytest.raises(RedirectedError):
        await _sweep(Redirecting([]), [lk("server_error", since=900)], now=1000)


async def test_a_refusal_from_the_logs_says_it_was_the_look_up() -> None:
    # The run stops on it; a user must see the look-up, not a create, was refused.
    class NoCredits(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            raise AuthError("HTTP 403: Forbidden resource", status=403)

    with pytest.raises(AuthError) as err:
        await _sweep(NoCredits([]), [lk("server_error", since=900)], now=1000)
    assert err.value.message == (
        "HTTP 403: Forbidden resource (to the usage-logs look-up, GET /v2/logs)"
    )


async def test_search_window_covers_the_intent_with_margin() -> None:
    api = PagedLogs([])
    got = await _sweep(api, [lk("crash", since=10_000)], now=10_100)
    assert got[0][1].verdict is Verdict.RESUBMIT
    window = api.calls[0]
    assert window["start"].timestamp() <= 10_000 - 60
    assert window["end"].timestamp() >= 10_100


async def test_the_window_ends_at_the_latest_record_not_now() -> None:
    # Rows of requests made after the lookup's was recorded cannot be it: leave them out.
    api = PagedLogs([])
    late = Lookup("job", "c", "m", 10_000, "no_answer", recorded_wall=10_060)
    await _sweep(api, [late], now=50_000)
    assert api.calls[0]["end"].timestamp() == 10_060 + 300


async def test_a_sweep_cut_short_by_the_page_cap_goes_on_where_it_stopped() -> None:
    # 6,000 newer rows of other requests before the one looked for: more than one sweep reads.
    noise = [LogEntry(f"other-{i}", f"g{i}", "succeeded") for i in range(6000)]
    api = PagedLogs([*noise, LogEntry("a", "gen-a", "succeeded")])
    rec, got = _reconciler(api, lambda: 1000.0, limit=10**6)
    rec.add(Lookup("ja", "a", "m", 900, "server_error"))
    await rec.sweep()
    assert got == [] and len(api.calls) == 50  # the page cap: wait, do not give up
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("ja", Verdict.ADOPT)]
    assert api.calls[50]["offset"] == 5000 and len(api.calls) == 61


async def test_a_row_logged_late_behind_the_cursor_is_not_taken_for_absence() -> None:
    # The pass that stopped at the page cap began before the row was logged: the row lands
    # among rows it has read. Finishing that pass proves nothing; a pass begun after the
    # grace finds it. (Resubmitting here would pay twice.)
    older = [LogEntry(f"old-{i}", f"g{i}", "succeeded") for i in range(300)]
    newer = [LogEntry(f"new-{i}", f"h{i}", "succeeded") for i in range(5800)]
    api = PagedLogs([*older, *newer])
    wall = [1001.0]
    rec, got = _reconciler(api, lambda: wall[0], limit=10**6)
    rec.add(Lookup("jx", "x", "m", 940.0, "server_error", recorded_wall=1000.0))
    await rec.sweep()
    assert got == [] and api.calls[-1]["offset"] == 4900
    api.entries.insert(300, LogEntry("x", "gen-x", "succeeded"))  # logged 30 s late
    wall[0] = 1070.0
    await rec.sweep()  # goes on from the cursor, past the row: no verdict yet
    assert got == [] and api.calls[50]["offset"] == 5000
    await rec.sweep()  # a new pass, begun after the grace
    assert [(d.verdict, d.generation_id) for _, d in got] == [(Verdict.ADOPT, "gen-x")]


async def test_a_lookup_added_meanwhile_starts_a_new_pass() -> None:
    noise = [LogEntry(f"o-{i}", f"g{i}", "succeeded") for i in range(6000)]
    api = PagedLogs([LogEntry("y", "gen-y", "succeeded"), *noise])
    rec, _ = _reconciler(api, lambda: 5000.0, limit=10**6)
    rec.add(Lookup("jx", "x", "m", 900, "server_error", recorded_wall=1000.0))
    rec.add(Lookup("jz", "z", "m", 900, "server_error", recorded_wall=1000.0))
    await rec.sweep()
    rec.add(Lookup("jy", "y", "m", 900, "server_error", recorded_wall=1000.0))  # same window
    await rec.sweep()
    assert api.calls[50]["offset"] == 0  # y's row may be among those already read


async def test_look_ups_months_apart_are_searched_in_windows_the_logs_accept() -> None:
    # The logs refuse a window over 92 days: an old look-up must not sink a fresh one.
    class Strict(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            if (kw["end"] - kw["start"]).total_seconds() > 92 * 86_400:
                self.calls.append(kw)
                raise BadRequestError("HTTP 400: window must not exceed 92 days", status=400)
            return await super().logs(**kw)

    day = 86_400.0
    now = 200 * day
    api = Strict([LogEntry("new", "gen-new", "succeeded")])
    old = Lookup("j-old", "old", "m", now - 93 * day, "no_answer", recorded_wall=now - 93 * day)
    new = Lookup("j-new", "new", "m", now - 120, "no_answer", recorded_wall=now - 60)
    got = await _sweep(api, [old, new], now=now)
    verdicts = {job: d.verdict for job, d in got}
    assert verdicts["j-new"] is Verdict.ADOPT
    assert verdicts["j-old"] is Verdict.UNCERTAIN  # searched alone: not in the logs
    assert all((c["end"] - c["start"]).total_seconds() <= 92 * day for c in api.calls)


def test_unreadable_logs_get_a_minute_even_with_no_grace() -> None:
    # --logs-grace 0: absence counts at once, but logs that refused (a 429 after a restart)
    # said nothing; 71 look-ups turned uncertain on one refusal.
    unread = {"grace_s": 0, "searched_all": False, "later_logged": True}
    assert decide(lk(since=1000), None, waited_s=30, **unread).verdict is Verdict.WAIT
    assert decide(lk(since=1000), None, waited_s=61, **unread).verdict is Verdict.UNCERTAIN
    assert (
        decide(lk(since=1000), None, waited_s=1, **{**READ, "grace_s": 0}).verdict
        is Verdict.RESUBMIT
    )


async def test_a_wall_clock_step_forward_does_not_count_as_waiting() -> None:
    # An NTP step of +120 s one second after a 5xx: the logs have had 1 s, not 121, to show
    # the request. Taken for absent, the job would be created again and paid twice.
    wall, steady = [10_000.0], [5.0]
    rec, got = _reconciler(PagedLogs([]), lambda: wall[0])
    rec._clock = lambda: steady[0]
    rec.add(Lookup("job", "c", "m", 10_000.0, "server_error"))
    wall[0], steady[0] = 10_121.0, 6.0
    await rec.sweep()
    assert got == []  # still waiting
    steady[0] = 66.0  # the grace, truly passed
    await rec.sweep()
    assert [d.verdict for _, d in got] == [Verdict.RESUBMIT]


async def test_a_wall_clock_step_back_still_searches_up_to_the_request() -> None:
    # Stepped back 600 s: a window ending "now" would end before the request was logged.
    api = PagedLogs([LogEntry("c", "gen-1", "succeeded")])
    got = await _sweep(api, [Lookup("job", "c", "m", 10_000.0, "server_error")], now=9_400.0)
    assert api.calls[0]["end"].timestamp() >= 10_000
    assert [d.verdict for _, d in got] == [Verdict.ADOPT]


@pytest.mark.parametrize("cause", ["server_error", "crash"])
def test_absence_counts_only_once_the_logs_show_a_later_request(cause: Cause) -> None:
    # Logs lagging past the grace showed nothing yet: resubmitted at 60 s, 131 of 2,000 jobs
    # were paid twice. Absence proves nothing until a later request is logged.
    def at(waited: float, later: bool) -> Decision:
        return decide(
            lk(cause), None, waited_s=waited, grace_s=60, searched_all=True, later_logged=later
        )

    assert at(61, later=True).verdict is Verdict.RESUBMIT
    assert at(61, later=False).verdict is Verdict.WAIT
    assert at(599, later=False).verdict is Verdict.WAIT
    d = at(601, later=False)  # ten graces: left for a later run, its cause kept
    assert d.verdict is Verdict.UNCERTAIN and "may lag behind" in d.reason and not d.seen
    d = at(3600, later=False)  # an earlier night's: no usage log lags an hour
    assert d.verdict is Verdict.RESUBMIT and "1.0 h after it was made" in d.reason
    assert decide(
        lk("no_answer"), None, waited_s=61, grace_s=60, searched_all=True, later_logged=True
    ).verdict is (Verdict.UNCERTAIN)


def test_with_no_grace_absence_counts_at_once() -> None:
    # --logs-grace 0: the user says the logs show every request at once.
    no_grace = {**READ, "grace_s": 0, "later_logged": False}
    assert decide(lk(), None, waited_s=0, **no_grace).verdict is Verdict.RESUBMIT


async def test_logs_that_show_nothing_later_leave_the_job_for_a_later_run() -> None:
    api = PagedLogs([], newest=None)  # nothing logged at all: the logs lag behind everything
    now = [1000.0]
    rec, got = _reconciler(api, lambda: now[0])
    rec.add(Lookup("job", "c", "m", 1000.0, "server_error"))
    for t in (1061.0, 1300.0, 1599.0):
        now[0] = t
        await rec.sweep()
        assert got == []
    now[0] = 1601.0
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.UNCERTAIN)]
    assert api.probes and all(p["models"] == ["m"] and p["limit"] == 1 for p in api.probes)


async def test_a_row_of_a_create_sent_after_the_look_up_proves_the_logs_caught_up() -> None:
    # Clock-free: this process sent it after the 5xx was answered, and it is logged.
    now = [1000.0]
    api = PagedLogs([], newest=LogEntry("before", "g0", "succeeded", created=1000.0))
    rec, got = _reconciler(api, lambda: now[0])
    rec.note_sent("before")  # sent while no look-up was open
    rec.add(Lookup("job", "c", "m", 1000.0, "server_error", recorded_wall=1000.0))
    now[0] = 1061.0
    await rec.sweep()
    assert got == []  # the newest row is a request older than the look-up's answer
    rec.note_sent("after")
    api.newest = LogEntry("after", "g1", "succeeded", created=1001.0)  # skew: stamped "early"
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]
    assert "though they show later requests" in got[0][1].reason
    assert rec._sent == {}  # nothing open: the order of creates is not kept


@pytest.mark.parametrize(("cause", "apart"), [("crash", 0), ("server_error", 60)])
async def test_a_row_stamped_within_the_clock_margin_proves_nothing(
    cause: Cause, apart: float
) -> None:
    # After a 5xx, within the margin and a grace: see the test below.
    api = PagedLogs([], newest=LogEntry("someone", "g", "succeeded", created=1299 + apart))
    rec, got, now = _one_open(api, cause)
    now[0] = 1061.0
    await rec.sweep()
    assert got == []
    api.newest = LogEntry("someone", "g2", "succeeded", created=1301 + apart)
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]


async def test_a_create_sent_within_a_grace_of_a_5xx_proves_nothing() -> None:
    # A create the API went on with after its gateway answered 502 is logged when it ends,
    # after rows of creates sent just after it: a row only seconds later is no proof that
    # ours would show by now. One sent a grace later is. (After a crash, any create the next
    # run sends will do: the test above of a create sent after the look-up.)
    api = PagedLogs([], newest=None)
    rec, got, now = _one_open(api, "server_error")
    now[0] = 1030.0
    rec.note_sent("soon")
    api.newest = LogEntry("soon", "g1", "succeeded", created=1030.0)
    for t in (1061.0, 1089.0):
        now[0] = t
        await rec.sweep()
    assert got == []  # logged, but sent 30 s after the 502: ours may still be on its way
    rec.note_sent("later")
    api.newest = LogEntry("later", "g2", "succeeded", created=1089.0)
    now[0] = 1095.0
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]


async def test_no_probe_where_absence_decides_nothing() -> None:
    # Unanswered, another key's, or still in its grace: the newest row would not be used.
    api = PagedLogs([])
    rec, _ = _reconciler(api, lambda: 1030.0)
    rec.add(Lookup("a", "ca", "m", 1000.0, "no_answer"))
    rec.add(Lookup("b", "cb", "m", 1000.0, "crash", other_key="1a2b3c4d"))
    rec.add(Lookup("c", "cc", "m", 1000.0, "server_error"))
    await rec.sweep()
    assert api.probes == []


async def test_a_refused_probe_reads_nothing_and_waits_its_retry_after() -> None:
    class LimitedProbe(PagedLogs):
        async def logs(self, **kw: Any) -> LogPage:
            if kw["limit"] == 1:
                self.probes.append(kw)
                raise RateLimitedError("HTTP 429", retry_after_s=30.0)
            return await super().logs(**kw)

    api = LimitedProbe([])
    rec, got = _reconciler(api, lambda: 1061.0)
    rec.add(Lookup("job", "c", "m", 1000.0, "server_error"))
    await rec.sweep()
    assert got == [] and api.calls == [] and rec.pause_s() == pytest.approx(30.0)


async def test_logs_down_for_a_while_are_a_few_lines_not_one_per_sweep(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sweep every 5 s for 500 s of an outage: 100 warnings; now the first, a summary a
    # window, and one line when the logs can be read again.
    now = [1000.0]
    api = PagedLogs([], fail=True)
    rec, _ = _reconciler(api, lambda: now[0])
    rec.add(lk("no_answer", since=990))
    with caplog.at_level(logging.INFO, logger="veobatch.reconcile"):
        for _ in range(100):
            await rec.sweep()
            now[0] += 5
        api.fail = False
        await rec.sweep()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said[0] == "usage logs unavailable: HTTP 503"
    assert said[1] == (
        "usage-logs read failures window=30s failed=6 succeeded=0: HTTP 503 ×6; look-ups wait"
    )
    assert len(said) == 1 + 16 + 1
    assert said[-1] == "usage-logs reads succeed again after=500s failed=100: HTTP 503 ×100"


async def test_an_earlier_runs_look_up_gets_this_runs_patience() -> None:
    # A 5xx of 15 minutes ago (past ten graces, short of an hour): its first sweep tonight
    # made it uncertain at once, before tonight's own creates could be logged to prove it.
    now = [10_000.0]
    api = PagedLogs([], newest=None)
    rec, got = _reconciler(api, lambda: now[0])
    rec.add(Lookup("job", "c", "m", 10_000.0 - 900, "server_error", recorded_wall=9_100.0))
    await rec.sweep()
    assert got == []  # waits: tonight has not had ten graces to show a later request
    rec.note_sent("tonight")
    api.newest = LogEntry("tonight", "g", "succeeded", created=10_001.0)
    now[0] += 61
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]


async def test_logs_unreadable_at_the_start_of_a_run_get_a_minute_for_old_look_ups() -> None:
    now = [10_000.0]
    rec, got = _reconciler(PagedLogs([], fail=True), lambda: now[0])
    rec.add(Lookup("job", "c", "m", 1000.0, "server_error", recorded_wall=1000.0))
    await rec.sweep()
    assert got == []  # a 503 at a restart is not "the logs cannot be read"
    now[0] += 601
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.UNCERTAIN)]


async def test_an_unanswered_create_waits_for_later_rows_before_it_is_left_uncertain() -> None:
    # Its row may be logged late: taken for absent after one grace, it stayed uncertain until
    # the next night although the logs would have shown its generation minutes later.
    api = PagedLogs([], newest=None)
    rec, got, now = _one_open(api, "no_answer")
    for t in (1061.0, 1300.0):
        now[0] = t
        await rec.sweep()
    assert got == [] and api.probes  # nothing later logged yet: absence proves nothing
    api.entries = [LogEntry("c", "gen-late", "succeeded", created=1000.0)]
    now[0] = 1310.0
    await rec.sweep()
    assert [(j, d.verdict, d.generation_id) for j, d in got] == [("job", Verdict.ADOPT, "gen-late")]


async def test_an_unanswered_create_absent_from_logs_that_caught_up_is_uncertain() -> None:
    api = PagedLogs([], newest=None)
    rec, got, now = _one_open(api, "no_answer")
    now[0] = 1061.0
    await rec.sweep()
    assert got == []
    api.newest = LogEntry("someone", "g", "succeeded", created=1000.0 + 361)
    await rec.sweep()
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.UNCERTAIN)]
    assert "unanswered" in got[0][1].reason


class WindowLogs(PagedLogs):
    """Rows filtered by the window asked for, as the real endpoint does by their stamps."""

    async def logs(self, **kw: Any) -> LogPage:
        if kw["limit"] == 1 and kw.get("statuses") == ["succeeded"]:
            return await super().logs(**kw)
        self.calls.append(kw)
        lo, hi = kw["start"].timestamp(), kw["end"].timestamp()
        rows = [e for e in self.entries if e.created is not None and lo <= e.created <= hi]
        off, lim = kw["offset"], kw["limit"]
        return LogPage(rows[off : off + lim], off + lim < len(rows))


@pytest.mark.parametrize("skew", [-330.0, 330.0])
async def test_an_api_clock_off_by_more_than_the_margin_is_measured_and_searched_for(
    skew: float,
) -> None:
    # The API's clock 5.5 min off ours: its row of the 5xx'd create (made, billed) is stamped
    # outside a window of our clock ± 5 min, and a later create of ours proved the logs had
    # caught up: "never created", sent again, paid twice. Our own row measures the skew.
    row = LogEntry("c", "g-made", "succeeded", created=1000.0 + skew)
    api = WindowLogs([row], newest=None)
    rec, got, now = _one_open(api, "server_error")
    now[0] = 1089.0
    rec.note_sent("later")
    api.newest = LogEntry("later", "g1", "succeeded", created=1089.0 + skew)
    now[0] = 1095.0
    await rec.sweep()
    assert rec.skew_s == skew
    assert [(j, d.verdict, d.generation_id) for j, d in got] == [("job", Verdict.ADOPT, "g-made")]


async def test_absence_under_a_large_skew_leaves_the_request_uncertain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = WindowLogs([], newest=None)
    rec, got, now = _one_open(api, "server_error")
    now[0] = 1089.0
    rec.note_sent("later")
    api.newest = LogEntry("later", "g1", "succeeded", created=1089.0 - 330.0)
    now[0] = 1095.0
    with caplog.at_level(logging.WARNING, "veobatch"):
        await rec.sweep()
    ((job, d),) = got
    assert (job, d.verdict) == ("job", Verdict.UNCERTAIN)
    assert "the API's clock is 330s behind this machine's" in d.reason
    assert "--resubmit-uncertain" in d.reason
    assert any(
        "clock skew: the API's usage logs are stamped 330s behind" in m for m in caplog.messages
    )


async def test_a_small_skew_still_lets_absence_count() -> None:
    api = WindowLogs([], newest=None)
    rec, got, now = _one_open(api, "server_error")
    now[0] = 1089.0
    rec.note_sent("later")
    api.newest = LogEntry("later", "g1", "succeeded", created=1089.0 + 20.0)
    now[0] = 1095.0
    await rec.sweep()
    assert rec.skew_s == 20.0
    assert [(j, d.verdict) for j, d in got] == [("job", Verdict.RESUBMIT)]
