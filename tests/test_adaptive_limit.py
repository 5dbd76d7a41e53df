"""The adaptive concurrency limit: its rules one by one, then a fake-clock model of long runs
against sporadic 429s and against a hard cap, beside the limit it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from limit_sim import Limit, Model, Outcome, Refuse, cap_of, sporadic

from veobatch.scheduler import AdaptiveLimit, rest_until

CEILING = 500
JOBS = 10_000


@dataclass
class OldLimit:
    """The limit before: a quarter off per 429 (once per cooldown), one slot back per
    ``current`` accepted creates, whatever was in flight."""

    ceiling: int
    cooldown_s: float = 2.0
    current: int = 0
    _last_cut: float = float("-inf")
    _successes: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or self.ceiling

    def on_rate_limited(self, now: float, in_flight: int) -> int:
        if now - self._last_cut >= self.cooldown_s:
            self.current = max(1, min(self.current - 1, self.current * 3 // 4))
            self._last_cut = now
            self._successes = 0
        return self.current

    def on_success(self, in_flight: int) -> int:
        self._successes += 1
        if self._successes >= self.current and self.current < self.ceiling:
            self.current += 1
            self._successes = 0
        return self.current


# -- the rules ---------------------------------------------------------------------------------


def test_a_429_takes_a_quarter_off_but_never_below_what_is_in_flight() -> None:
    assert AdaptiveLimit(100).on_rate_limited(0.0, in_flight=10) == 75
    assert AdaptiveLimit(100).on_rate_limited(0.0, in_flight=90) == 90  # the API holds 90
    assert AdaptiveLimit(100).on_rate_limited(0.0, in_flight=99) == 99
    # More in flight than the limit (taken over from an earlier run): nothing to take off.
    assert AdaptiveLimit(100, current=50).on_rate_limited(0.0, in_flight=120) == 100
    assert AdaptiveLimit(1).on_rate_limited(0.0, in_flight=0) == 1  # never below one


def test_the_level_cut_is_regained_one_slot_per_accepted_create_then_probed_slowly() -> None:
    limit = AdaptiveLimit(ceiling=200, current=100)
    assert limit.on_rate_limited(0.0, in_flight=10) == 75
    for _ in range(25):
        limit.on_success(in_flight=50)
    assert limit.current == 100  # back where it was after 25 accepted creates
    for _ in range(99):
        limit.on_success(in_flight=50)
    assert limit.current == 100
    assert limit.on_success(in_flight=50) == 101  # above it: one slot per `current` creates
    for _ in range(100_000):
        limit.on_success(in_flight=50)
    assert limit.current == 200  # never above the ceiling


def test_a_burst_of_429s_is_one_cut() -> None:
    limit = AdaptiveLimit(100, cooldown_s=2.0)
    assert limit.on_rate_limited(0.0, in_flight=10) == 75
    assert limit.on_success(in_flight=20) == 76  # accepted above that level: regaining
    assert limit.on_rate_limited(1.0, in_flight=21) == 76  # the same burst
    assert limit.on_success(in_flight=30) == 77
    assert limit.on_rate_limited(2.5, in_flight=31) == 57  # a new one: 77 * 3 // 4


def test_429s_again_at_the_same_level_are_taken_for_a_cap() -> None:
    limit = AdaptiveLimit(CEILING)
    assert limit.on_rate_limited(0.0, in_flight=150) == 375 and not limit.capped
    # Refused again about there, nothing accepted above it: down to it, cooldown or not.
    assert limit.on_rate_limited(0.1, in_flight=148) == 150 and limit.capped
    for _ in range(149):
        limit.on_success(in_flight=140)
    assert limit.current == 150  # no fast regain above a cap
    assert limit.on_success(in_flight=140) == 151  # only the slow probe
    assert limit.on_rate_limited(10.0, in_flight=150) == 150  # over it: refused, back to it
    # A cap that drops: a 429 well below the last level is a quarter off, then the new level.
    assert limit.on_rate_limited(20.0, in_flight=50) == 112 and not limit.capped
    assert limit.on_rate_limited(20.5, in_flight=50) == 50 and limit.capped


def test_a_create_accepted_above_the_level_undoes_a_cut_taken_for_a_cap() -> None:
    # The first answers to a burst of creates: two 429s while the acceptances are still on
    # their way, so few generations are known in flight.
    limit = AdaptiveLimit(CEILING)
    assert limit.on_rate_limited(0.0, in_flight=3) == 375
    assert limit.on_rate_limited(0.0, in_flight=3) == 3 and limit.capped
    assert limit.on_rate_limited(0.0, in_flight=5) == 5  # never below what the API holds
    assert limit.on_success(in_flight=6) == 6  # accepted above 5: it was no cap
    for _ in range(CEILING):
        limit.on_success(in_flight=6)
    assert limit.current == CEILING  # regained at one slot per accepted create


@pytest.mark.parametrize(
    ("paused_until", "now", "retry_after_s", "expected"),
    [
        (float("-inf"), 100.0, 30.0, (130.0, True)),  # a new pause: said
        (130.0, 110.0, 30.0, (140.0, False)),  # the refusals of creates already sent: silent
        (130.0, 110.0, 10.0, (130.0, False)),  # shorter than the pause under way
        (130.0, 110.0, 90.0, (200.0, True)),  # lengthened by a minute or more: said again
        (130.0, 130.0, 5.0, (135.0, True)),  # the last one is over: a new one
        (130.0, 110.0, None, (130.0, False)),  # no Retry-After: no pause
        (float("-inf"), 110.0, 0.0, (float("-inf"), False)),  # an HTTP-date already past
    ],
)
def test_a_retry_after_holds_the_run_and_is_said_once_per_pause(
    paused_until: float, now: float, retry_after_s: float | None, expected: tuple[float, bool]
) -> None:
    assert rest_until(paused_until, now, retry_after_s) == expected


# -- long runs, modelled -----------------------------------------------------------------------
# 10,000 jobs at concurrency 500, generations of about a minute, each seen finished up to a
# 5 s poll later; a 429 asks for 2 s of rest. See limit_sim for the model.


def run(limit: Limit, refuse: Refuse, **kw: Any) -> Outcome:
    return Model(limit, refuse, jobs=JOBS, **kw).run()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sporadic_429s_leave_the_limit_near_the_ceiling(seed: int) -> None:
    # The soak's case: 0.3 % of creates refused at random (23 in 10,000), not for concurrency.
    unhindered = run(AdaptiveLimit(CEILING), sporadic(0.0), seed=seed)
    new = run(AdaptiveLimit(CEILING), sporadic(0.003), seed=seed)
    old = run(OldLimit(CEILING), sporadic(0.003), seed=seed)
    assert new.refused > 10
    assert new.mean_limit >= 0.95 * CEILING and new.lowest >= 0.75 * CEILING
    assert new.makespan_s <= 1.1 * unhindered.makespan_s
    # What it replaced: down to 5-10 % of the ceiling, several times as long.
    assert old.mean_limit <= 0.2 * CEILING and old.makespan_s >= 5 * unhindered.makespan_s
    # A busier API, 3 % refused at random: still near the ceiling.
    busy = run(AdaptiveLimit(CEILING), sporadic(0.03), seed=seed)
    assert busy.refused > 200 and busy.mean_limit >= 0.9 * CEILING


@pytest.mark.parametrize("cap", [50, 150, 400])
def test_a_cap_is_found_and_held_without_a_storm_of_429s(cap: int) -> None:
    # The API refuses any create while `cap` generations of ours are in flight. Our count runs
    # a few ahead of the API's (finished, not yet polled), so the limit that fills the cap
    # sits a little above it.
    band = (0.75 * cap, 1.1 * cap)
    new = run(AdaptiveLimit(CEILING), cap_of(cap), band=band)
    old = run(OldLimit(CEILING), cap_of(cap), band=band)
    first_wave = CEILING - cap  # sent together at the start: refused whatever the limit does
    assert new.in_band >= 0.9 and new.mean_in_flight >= 0.85 * cap
    # After the first wave, about one 429 per round of the slow probe above the cap (a round:
    # `cap` accepted creates), never a storm.
    assert new.refused - first_wave <= 3 * new.accepted / cap
    # The old limit took a quarter off at a time, down below the cap, and was refused all the
    # same while regaining: slower, and far more 429s where the cap is well under the ceiling.
    assert new.mean_in_flight >= old.mean_in_flight and new.makespan_s <= old.makespan_s
    assert cap > 0.75 * CEILING or new.refused < 0.7 * old.refused
