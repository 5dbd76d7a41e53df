"""The shared poller: its schedule and interval rules as tables, then the loop with a fake API."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio
import pytest

from veobatch.client import Generation
from veobatch.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NoAnswerError,
    NotFoundError,
    RateLimitedError,
    ServerError,
)
from veobatch.poller import (
    MAX_NOT_FOUND,
    NOT_FOUND_FEW,
    NOT_FOUND_STREAK_S,
    OTHER_KEY_NOT_FOUND,
    NotFoundWatch,
    Poller,
    PollSchedule,
    Tracked,
    error_delay_s,
)
from veobatch.schedule import Fitted, cold_delay_s
from veobatch.settings import PollSettings

S = PollSettings(first_delay_s=2, min_interval_s=1, max_interval_s=10, growth=0.25)


@pytest.mark.parametrize(
    ("age", "delay"), [(0, 1), (2, 1), (4, 1), (8, 2), (20, 5), (40, 10), (4000, 10)]
)
def test_poll_delay_grows_with_age_within_bounds(age: float, delay: float) -> None:
    assert cold_delay_s(age, S) == delay


def test_error_delay_is_bounded_and_honours_retry_after() -> None:
    rng = random.Random(1)
    for errors in range(1, 30):
        d = error_delay_s(errors, S, None, rng)
        assert S.min_interval_s <= d <= S.error_backoff_max_s
    assert error_delay_s(1, S, 30.0, rng) >= 30.0


def test_schedule_orders_and_reschedules() -> None:
    s = PollSchedule()
    s.schedule("a", 5)
    s.schedule("b", 1)
    s.schedule("c", 3)
    s.schedule("a", 2)  # moved earlier: the old entry must not fire
    assert s.next_due() == 1
    assert s.pop_due(2.5) == ["b", "a"]
    assert len(s) == 1 and "c" in s
    s.schedule("c", 10)
    assert s.pop_due(5) == []
    s.remove("c")
    assert s.next_due() is None and len(s) == 0


def test_schedule_pop_limit() -> None:
    s = PollSchedule()
    for i in range(10):
        s.schedule(str(i), i)
    assert s.pop_due(100, limit=3) == ["0", "1", "2"]
    assert len(s) == 7


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedApi:
    """Answers each generation id from a script of statuses or errors."""

    def __init__(self, scripts: dict[str, list[str | ApiError]]) -> None:
        self.scripts = scripts
        self.calls: list[str] = []

    async def create(self, body: object, *, client_request_id: str) -> object:
        raise NotImplementedError

    async def fetch(self, generation_id: str) -> Generation:
        self.calls.append(generation_id)
        step = self.scripts[generation_id].pop(0)
        if isinstance(step, ApiError):
            raise step
        url = "https://cdn/x.mp4" if step == "completed" else None
        return Generation(generation_id, step, video_url=url)


class Sink:
    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.timed_out: list[str] = []
        self.lost: list[str] = []
        self.done = anyio.Event()
        self.expect = 0

    def _tick(self) -> None:
        if len(self.finished) + len(self.timed_out) + len(self.lost) >= self.expect:
            self.done.set()

    async def generation_finished(self, tracked: Tracked, generation: Generation) -> None:
        self.finished.append((tracked.job_id, generation.status))
        self._tick()

    async def generation_timed_out(self, tracked: Tracked) -> None:
        self.timed_out.append(tracked.job_id)
        self._tick()

    async def generation_lost(self, tracked: Tracked, error: ApiError) -> None:
        self.lost.append(tracked.job_id)
        self._tick()


FAST = PollSettings(
    first_delay_s=0,
    min_interval_s=0.001,
    max_interval_s=0.002,
    growth=0.0,
    error_backoff_max_s=0.002,
)


async def _drive(api: ScriptedApi, sink: Sink, tracks: list[tuple[str, float]]) -> Poller:
    poller = Poller(api, sink, FAST, clock=anyio.current_time, rng=random.Random(0))
    sink.expect = len(tracks)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            for job, remaining in tracks:
                poller.track(job, "g-" + job, model="m", age_s=0, remaining_s=remaining, first=True)
            await sink.done.wait()
            tg.cancel_scope.cancel()
    return poller


async def test_poller_follows_many_generations_to_their_end() -> None:
    api = ScriptedApi(
        {
            "g-a": ["queued", "generating", "completed"],
            "g-b": ["generating", "error"],
            "g-c": [
                ServerError("boom"),
                RateLimitedError("slow down"),
                "unknown-status",
                "completed",
            ],
        }
    )
    sink = Sink()
    poller = await _drive(api, sink, [("a", 60), ("b", 60), ("c", 60)])
    assert sorted(sink.finished) == [("a", "completed"), ("b", "error"), ("c", "completed")]
    assert poller.polls_sent == 9 == len(api.calls)
    assert len(poller) == 0


async def test_a_fresh_id_may_404_for_a_while_and_still_finish() -> None:
    # An API slow to register new ids: ten 404s, then the generation is there after all.
    api = ScriptedApi({"g-a": [NotFoundError("not yet")] * 10 + ["generating", "completed"]})
    sink = Sink()
    await _drive(api, sink, [("a", 60)])
    assert sink.finished == [("a", "completed")] and sink.lost == []


async def test_only_404s_in_a_row_count_towards_lost() -> None:
    # A passing 404 between answers must not add up with earlier ones.
    flaky = [NotFoundError("replica lag")] * (MAX_NOT_FOUND - 1)
    api = ScriptedApi({"g-a": [*flaky, "generating", *flaky, "generating", "completed"]})
    sink = Sink()
    await _drive(api, sink, [("a", 60)])
    assert sink.finished == [("a", "completed")] and sink.lost == []


# -- which 404s make a generation lost: the pure judge, then the poller on a fake clock --


def test_a_404_counts_only_while_another_generation_is_being_answered() -> None:
    w = NotFoundWatch(recent_s=30)
    w.answered(1.0, "b")
    assert w.not_found(2.0, "a")  # b was answered a moment ago: the API is answering
    assert not w.not_found(40.0, "a")  # nobody for 39 s: the API may be down
    w.answered(41.0, "b")
    assert w.not_found(45.0, "a")
    w.answered(46.0, "a")  # its own answer shows nothing of the others'
    w.answered(50.0, "a")
    assert w.not_found(60.0, "a") and not w.not_found(80.0, "a")  # b's, at 41, is too old


def test_404s_to_many_generations_at_once_count_for_none() -> None:
    # Thirty answered fine, then the API answers 404 to each: a fault, not thirty losses.
    w = NotFoundWatch(recent_s=30)
    for i in range(30):
        w.answered(i * 0.1, f"g{i}")
    counted = [w.not_found(10 + i * 0.1, f"g{i}") for i in range(30)]
    assert counted == [True] * 3 + [False] * 27  # "a few": 10 % of those polled


def test_a_few_generations_lost_among_many_answered_count() -> None:
    w = NotFoundWatch(recent_s=30)
    for i in range(100):
        w.answered(i * 0.1, f"g{i}")
    # "A few": up to 10 % of the generations polled in the window, these included.
    assert all(w.not_found(11.0 + i, f"lost{i}") for i in range(11))  # 11 of 111
    assert not w.not_found(22.5, "lost11")  # 12 of 112: too many


def test_the_watch_forgets_404s_older_than_its_window() -> None:
    w = NotFoundWatch(recent_s=30, window_s=60.0)
    for i in range(NOT_FOUND_FEW + 3):
        w.not_found(float(i), f"g{i}")
    w.answered(100.0, "x")
    assert w.not_found(101.0, "y")  # the burst has left the window


class ClockedApi:
    """Answers from a function of (generation id, fake time)."""

    def __init__(self, clock: FakeClock, answer: Callable[[str, float], str | ApiError]) -> None:
        self.clock = clock
        self.answer = answer
        self.calls: list[tuple[str, float]] = []

    async def fetch(self, generation_id: str) -> Generation:
        self.calls.append((generation_id, self.clock.now))
        step = self.answer(generation_id, self.clock.now)
        if isinstance(step, ApiError):
            raise step
        url = "https://cdn/x.mp4" if step == "completed" else None
        return Generation(generation_id, step, video_url=url)


async def _follow(
    answer: Callable[[str, float], str | ApiError],
    n: int,
    until: float,
    *,
    delivered: bool = False,
    other_keys: int = 0,
) -> tuple[Sink, ClockedApi, dict[str, float]]:
    """``n`` generations submitted at 0 with the default settings and a 30-minute job timeout,
    polled as they fall due on a fake clock up to ``until``; returns when each ended.
    ``delivered``: refetches of videos delivered a day ago instead, polled at once.
    ``other_keys``: the first this many were created with another API key."""
    clock = FakeClock()
    api = ClockedApi(clock, answer)
    sink = Sink()
    poller = Poller(api, sink, PollSettings(), clock=clock, rng=random.Random(0))
    age_s = 86400 if delivered else 0
    for i in range(n):
        poller.track(
            f"j{i}",
            f"g{i}",
            model="m",
            age_s=age_s,
            remaining_s=1800,
            first=not delivered,
            delivered=delivered,
            other_key=i < other_keys,
        )
    ended: dict[str, float] = {}
    while (due := poller._schedule.next_due()) is not None and due <= until:
        clock.now = max(clock.now, due)
        for key in poller._schedule.pop_due(clock.now):
            if (t := poller._tracked.get(key)) is not None:
                await poller._poll_one(t)
                if key not in poller._tracked:
                    ended[key] = clock.now
    return sink, api, ended


async def test_seconds_of_404s_to_every_poll_lose_nothing() -> None:
    # Reviewer D1: 16 s of 404s at 65 s turned all 30 generations "lost" within 3 s (their
    # five 404s came on the fast error backoff, and each was over a minute old).
    def answer(gen: str, now: float) -> str | ApiError:
        if 65 <= now < 81:
            return NotFoundError("HTTP 404: Generation not found", status=404)
        return "completed" if now >= 90 else "generating"

    sink, api, _ = await _follow(answer, 30, until=200)
    assert sink.lost == [] and len(sink.finished) == 30
    during = [at for _, at in api.calls if 65 <= at < 81]
    assert len(during) <= 30 * 3  # at the usual poll intervals, not the error backoff


async def test_a_generation_the_api_lost_is_lost_after_minutes_of_404s() -> None:
    # One of ten is gone from t=100 while the API answers the others: lost, but only after
    # 5 minutes of 404s at the usual poll intervals.
    def answer(gen: str, now: float) -> str | ApiError:
        if gen == "g0" and now >= 100:
            return NotFoundError("HTTP 404: Generation not found", status=404)
        return "generating"

    sink, api, ended = await _follow(answer, 10, until=1000)
    assert sink.lost == ["j0"]
    assert 100 + NOT_FOUND_STREAK_S <= ended["j0"] <= 100 + NOT_FOUND_STREAK_S + 20
    polls = [at for gen, at in api.calls if gen == "g0" and at >= 100]
    assert NOT_FOUND_STREAK_S / 15 <= len(polls) <= NOT_FOUND_STREAK_S / 15 + 2


@pytest.mark.parametrize("n", [1, 3])
async def test_404s_while_no_other_generation_is_answered_never_lose_one(n: int) -> None:
    # Alone, or with every one in flight answered 404: nothing tells a lost generation from
    # an API that lost its way, so none is taken for lost; the job timeout ends them.
    def answer(gen: str, now: float) -> str | ApiError:
        return NotFoundError("HTTP 404", status=404) if now >= 100 else "generating"

    sink, _, ended = await _follow(answer, n, until=4000)
    assert sink.lost == [] and len(sink.timed_out) == n
    assert all(at == pytest.approx(1800) for at in ended.values())


async def test_a_refused_fetch_ends_the_job_at_once() -> None:
    # 400 on a fetch: asking again will not change the answer, so the job is not polled to
    # its deadline.
    api = ScriptedApi({"g-a": [BadRequestError("HTTP 400: bad id", status=400)]})
    sink = Sink()
    await _drive(api, sink, [("a", 60)])
    assert sink.lost == ["a"] and api.calls == ["g-a"]


async def test_a_server_error_retry_after_is_honoured() -> None:
    clock = FakeClock()
    api = ScriptedApi({"g-a": [ServerError("HTTP 503", status=503, retry_after_s=7.0)]})
    poller = Poller(api, Sink(), FAST, clock=clock, rng=random.Random(0))
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=60, first=False)
    await poller._poll_one(poller._tracked["a"])
    assert poller._schedule.next_due() == pytest.approx(7.0)


async def test_a_poll_with_no_answer_is_asked_again_at_its_next_poll_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A poll that hung past the poll timeout is no news, not a failure: its generation keeps
    # its schedule (S: 25 % of its age), with no error backoff and no warning.
    clock = FakeClock()
    hung = NoAnswerError("GET /v2/video/generations: no answer: TimeoutError")
    api = ScriptedApi({"g-a": ["generating", hung, hung, "completed"]})
    sink = Sink()
    poller = Poller(api, sink, S, clock=clock, rng=random.Random(0))
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=600, first=True)
    t = poller._tracked["a"]
    for now in (2.0, 20.0, 40.0):
        clock.now = now
        await poller._poll_one(t)
        assert poller._schedule.due("a") == pytest.approx(now + cold_delay_s(now, S))
    assert t.errors == 0 and t.last_running_age == 2.0  # it learnt nothing from the two
    clock.now = 50.0
    await poller._poll_one(t)
    assert sink.finished == [("a", "completed")]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


async def test_a_poll_with_no_answer_at_the_deadline_times_out() -> None:
    clock = FakeClock()
    api = ScriptedApi({"g-a": [NoAnswerError("no answer")]})
    sink = Sink()
    poller = Poller(api, sink, S, clock=clock)
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=10, first=False)
    clock.now = 10.0
    await poller._poll_one(poller._tracked["a"])
    assert sink.timed_out == ["a"] and len(poller) == 0


async def test_auth_error_stops_the_poller() -> None:
    api = ScriptedApi({"g-a": [AuthError("bad key", status=401)]})
    poller = Poller(api, Sink(), FAST, clock=anyio.current_time)
    with pytest.raises(ExceptionGroup) as info, anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            poller.track("a", "g-a", model="m", age_s=0, remaining_s=60, first=True)
    assert info.group_contains(AuthError)


async def test_first_poll_waits_for_first_delay_with_fake_clock() -> None:
    clock = FakeClock()
    api = ScriptedApi({"g-a": ["completed"]})
    poller = Poller(api, Sink(), PollSettings(first_delay_s=2), clock=clock)
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=60, first=True)
    assert poller._schedule.pop_due(1.9) == []
    assert poller._schedule.pop_due(2.0) == ["a"]
    poller.track("b", "g-b", model="m", age_s=5, remaining_s=60, first=False)  # resumed: at once
    assert poller._schedule.pop_due(0.0) == ["b"]


async def test_a_poll_due_at_the_deadline_still_goes() -> None:
    # Done by the deadline is done: the last poll is sent, not replaced by a timeout.
    api = ScriptedApi({"g-a": ["completed"], "g-b": ["generating"], "g-c": [ServerError("x")]})
    sink = Sink()
    await _drive(api, sink, [("a", 0.0), ("b", 0.0), ("c", 0.0)])
    assert sink.finished == [("a", "completed")] and sorted(sink.timed_out) == ["b", "c"]
    assert sorted(api.calls) == ["g-a", "g-b", "g-c"]  # once each: no retry past the deadline


async def test_only_generations_followed_from_submission_teach_the_durations() -> None:
    # One polled first on resuming or on a URL refresh was done long ago: "(0, now]" is no
    # duration, and a few such once made the fit plan one poll past the job timeout.
    clock = FakeClock()
    api = ScriptedApi({"g-a": ["completed"], "g-b": ["completed"], "g-c": ["generating"] * 2})
    poller = Poller(api, Sink(), S, clock=clock)
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=60, first=False)
    poller.track("b", "g-b", model="m", age_s=0, remaining_s=60, first=True)
    poller.track("c", "g-c", model="m", age_s=0, remaining_s=60, first=False)
    clock.now = 5.0
    for job in ("a", "b", "c"):
        await poller._poll_one(poller._tracked[job])
    api.scripts["g-c"] = ["completed"]
    clock.now = 9.0
    await poller._poll_one(poller._tracked["c"])  # seen running at 5 s: (5, 9] is a sample
    assert list(poller.durations._models["m"].intervals) == [(0.0, 5.0), (5.0, 9.0)]


async def test_unpolled_generations_move_up_to_an_earlier_new_plan() -> None:
    clock = FakeClock()
    poller = Poller(ScriptedApi({}), Sink(), S, clock=clock)
    poller.durations.observe("m", 100.0)
    poller.durations.install("m", Fitted((100.0, 105.0), 0.01), 1)
    poller.track("a", "g-a", model="m", age_s=0, remaining_s=600, first=True)
    poller.track("b", "g-b", model="m", age_s=0, remaining_s=600, first=False)  # due at once
    clock.now = 4.0
    poller.durations.install("m", Fitted((10.0, 12.0), 0.01), 2)
    poller._bring_forward("m")
    assert poller._schedule.due("a") == 10.0 and poller._schedule.due("b") == 0.0
    clock.now = 30.0
    poller._bring_forward("m")  # already due: left as it is
    assert poller._schedule.due("a") == 10.0


def _poller_with_history(clock: FakeClock, api: ScriptedApi) -> Poller:
    poller = Poller(api, Sink(), S, clock=clock)
    for _ in range(30):  # earlier runs: about 100 s
        poller.durations.observe("m", 99.0, 101.0, earlier=True)
    poller.durations.install("m", Fitted((95.0, 100.0, 105.0), 0.1), 30)
    return poller


async def test_scouts_go_on_the_cold_schedule_while_the_plan_rests_on_earlier_runs() -> None:
    clock = FakeClock()
    poller = _poller_with_history(clock, ScriptedApi({}))
    for i in range(25):
        poller.track(f"j{i}", f"g-{i}", model="m", age_s=0, remaining_s=600, first=True)
    dues = [poller._schedule.due(f"j{i}") for i in range(25)]
    # The first min_samples, then one in SCOUT_EVERY, poll cold; the rest wait for the plan.
    assert dues == [S.first_delay_s] * 21 + [95.0] * 4  # the 21st: one in ten
    assert poller._tracked["j0"].scout and not poller._tracked["j21"].scout


async def test_first_polls_finding_all_done_halve_and_move_up_the_rest() -> None:
    clock = FakeClock()
    api = ScriptedApi({f"g-{i}": ["completed"] for i in range(40)})
    poller = _poller_with_history(clock, api)
    poller.durations._models["m"].unconfirmed = False  # no scouts here
    for i in range(40):
        poller.track(f"j{i}", f"g-{i}", model="m", age_s=0, remaining_s=600, first=True)
    clock.now = 95.0
    for i in range(3):
        await poller._poll_one(poller._tracked[f"j{i}"])
    # Three first polls, all done where the fit expected 10 %: not chance. The first poll is
    # halved and every generation not yet polled moves up to it (now, as they are 95 s old).
    assert poller.durations.current_plan("m") == (47.5,)
    assert poller._schedule.due("j3") == 95.0
    clock.now = 100.0
    poller.track("late", "g-late", model="m", age_s=0, remaining_s=600, first=True)
    assert poller._schedule.due("late") == 147.5


async def _outage_of_40_s(failure: Exception, caplog: pytest.LogCaptureFixture) -> list[str]:
    """200 generations in flight, polled once a second, every poll meeting ``failure`` for
    40 s, then all completed: the lines logged at INFO and above."""
    clock = FakeClock()
    api = ScriptedApi({f"g-{i}": [*[failure] * 40, "completed"] for i in range(200)})
    sink = Sink()
    poller = Poller(api, sink, FAST, clock=clock, rng=random.Random(0))
    for i in range(200):
        poller.track(str(i), f"g-{i}", model="m", age_s=0, remaining_s=600, first=False)
    with caplog.at_level(logging.INFO, logger="veobatch"):
        for second in range(41):
            clock.now = float(second)
            for i in range(200):
                await poller._poll_one(poller._tracked[str(i)])
    assert len(sink.finished) == 200
    return [r.getMessage() for r in caplog.records]


async def test_a_poll_outage_is_a_few_lines_not_one_per_failed_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 200 generations in flight while the API answers 503 for 40 s (a round of polls a
    # second): 8,000 failed polls were 8,000 warnings. Now the first, a summary, the end.
    said = await _outage_of_40_s(ServerError("HTTP 503: unavailable", status=503), caplog)
    assert len(said) == 3, said
    assert said[0].startswith("poll failed job=0 attempt=1 ") and said[0].endswith(
        "HTTP 503: unavailable"
    )
    assert said[1] == (
        "poll failures window=30s failed=6000 succeeded=0: HTTP 503 ×6,000; polling continues"
    )
    assert said[2] == "polls succeed again after=40s failed=8000: HTTP 503 ×8,000"


async def test_polls_left_unanswered_by_the_thousand_are_a_few_lines_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An API that stops answering (every poll cut off at the poll timeout) is no failure of
    # any job, but a line per unanswered poll would bury the log all the same.
    said = await _outage_of_40_s(NoAnswerError("no answer within the poll timeout"), caplog)
    assert len(said) <= 4, said
    assert said[0].startswith("poll unanswered job=0: ")


@pytest.mark.parametrize("n", [1, 3])
async def test_a_delivered_video_asked_again_alone_is_lost_after_minutes_of_404s(n: int) -> None:
    # An archive-only night: every poll is a refetch of a video delivered earlier and gone
    # from the API. With nothing else answered, each was polled for the whole job timeout,
    # every night, and never settled as gone. Its 404s count on their own: 5 minutes, not 30.
    def answer(gen: str, now: float) -> str | ApiError:
        return NotFoundError("HTTP 404", status=404)

    sink, _, ended = await _follow(answer, n, until=4000, delivered=True)
    assert sorted(sink.lost) == [f"j{i}" for i in range(n)] and sink.timed_out == []
    assert all(NOT_FOUND_STREAK_S <= at <= NOT_FOUND_STREAK_S + 20 for at in ended.values())


async def test_a_delivered_video_is_not_lost_while_a_generation_in_flight_gets_404s_too() -> None:
    # Reviewer r11 D1: an API answering 404 to every poll on two nights 12 h apart settled
    # archived videos as gone though a new job's generation, polled beside them, was answered
    # 404 as well: the API's fault, which the normal rule counts for none.
    def answer(gen: str, now: float) -> str | ApiError:
        return NotFoundError("HTTP 404", status=404)

    clock = FakeClock()
    sink = Sink()
    poller = Poller(ClockedApi(clock, answer), sink, PollSettings(), clock=clock)
    for i in range(2):
        poller.track(
            f"old{i}",
            f"g{i}",
            model="m",
            age_s=86400,
            remaining_s=1800,
            first=False,
            delivered=True,
        )
    poller.track("new", "gn", model="m", age_s=0, remaining_s=1800, first=True)
    while (due := poller._schedule.next_due()) is not None:
        clock.now = max(clock.now, due)
        for key in poller._schedule.pop_due(clock.now):
            if (t := poller._tracked.get(key)) is not None:
                await poller._poll_one(t)
    assert sink.lost == [] and sorted(sink.timed_out) == ["new", "old0", "old1"]


async def test_another_keys_generation_ends_after_a_few_404s_in_a_row() -> None:
    # Reviewer R12b: after a key rotation every poll of the old key's generations is a 404,
    # and with nothing else answered the lost rule never applied: each was polled for the
    # whole job timeout (5,080 polls of 40), then timed out. This key's own, all answered 404
    # beside them, are still never taken for lost.
    def answer(gen: str, now: float) -> str | ApiError:
        return NotFoundError("HTTP 404", status=404)

    sink, api, ended = await _follow(answer, 42, until=4000, other_keys=40)
    assert sorted(sink.lost) == sorted(f"j{i}" for i in range(40))
    assert sorted(sink.timed_out) == ["j40", "j41"]
    assert all(ended[f"j{i}"] <= 60 for i in range(40))
    assert all(sum(g == f"g{i}" for g, _ in api.calls) == OTHER_KEY_NOT_FOUND for i in range(40))
    assert ended["j40"] == ended["j41"] == pytest.approx(1800)


async def test_another_keys_generation_survives_a_stray_404() -> None:
    # Only 404s in a row end it: one this key can see after all is followed to its end.
    def answer(gen: str, now: float) -> str | ApiError:
        if 100 <= now < 100 + 15 * (OTHER_KEY_NOT_FOUND - 1):
            return NotFoundError("HTTP 404", status=404)
        return "completed" if now >= 300 else "generating"

    sink, _, _ = await _follow(answer, 1, until=4000, other_keys=1)
    assert sink.lost == [] and sink.finished == [("j0", "completed")]
