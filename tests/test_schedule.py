"""The learnt poll schedule: plans meet their lag target with fewer polls than fixed intervals."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from veobatch.schedule import (
    DRIFT_CHECK,
    REFIT_AFTER,
    DurationModel,
    Fitted,
    LogNormal,
    cold_delay_s,
    cost,
    first_poll_saturated,
    fixed_schedule_cost,
    plan_for,
    schedule_cost,
)
from veobatch.settings import PollSettings

S = PollSettings()


def lognormal_sample(mean: float, cv: float, n: int, seed: int = 1) -> list[float]:
    sigma2 = math.log1p(cv * cv)
    rng = random.Random(seed)
    return [rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)) for _ in range(n)]


@pytest.mark.parametrize(("mean", "cv"), [(3.0, 0.3), (90.0, 0.4), (150.0, 0.2)])
def test_plans_meet_the_lag_target_with_fewer_polls_than_fixed(mean: float, cv: float) -> None:
    durations = lognormal_sample(mean, cv, 4000)
    polls, lag = schedule_cost(durations, 0.05, S)
    assert lag <= 0.055 * mean
    fixed_polls, fixed_lag = fixed_schedule_cost(durations, 2 * lag)  # same mean lag, roughly
    assert fixed_lag == pytest.approx(lag, rel=0.1)
    assert polls < 0.7 * fixed_polls


def test_plan_is_increasing_and_within_bounds() -> None:
    dist = LogNormal(math.log(3.0), 0.3)
    plan = plan_for(dist, 0.05 * dist.mean, S)
    assert list(plan) == sorted(plan) and len(set(plan)) == len(plan)
    assert plan[0] > dist.quantile(0.0001)  # no poll before anything could be done
    gaps = [b - a for a, b in itertools.pairwise(plan)]
    assert min(gaps) >= S.min_interval_s - 1e-9 and max(gaps) <= S.max_interval_s + 1e-9


def test_cost_counts_the_cold_tail_after_the_plan() -> None:
    assert cost((1.0, 2.0), [0.5, 1.5], S) == (1.5, 0.5)
    polls, lag = cost((1.0,), [3.0], S)
    assert polls > 1 and lag >= 0


def test_model_learns_then_plans_and_refits() -> None:
    model = DurationModel(S, min_samples=20)
    assert model.plan("m") is None
    assert model.first_delay_s("m") == S.first_delay_s
    assert model.next_delay_s("m", 4.0) == cold_delay_s(4.0, S)
    for d in lognormal_sample(3.0, 0.3, 19):
        model.observe("m", d)
    assert model.plan("m") is None
    model.observe("m", 3.0)
    plan = model.plan("m")
    assert plan is not None and model.first_delay_s("m") == plan[0]
    assert model.next_delay_s("m", plan[1]) == pytest.approx(plan[2] - plan[1])
    assert model.next_delay_s("m", plan[-1] + 1) == cold_delay_s(plan[-1] + 1, S)
    assert model.plan("other") is None  # per model
    for d in lognormal_sample(3.0, 0.3, 10, seed=2):
        model.observe("m", d)
    assert model.plan("m") is not plan  # refitted after half as many samples again
    dist = model.distribution("m")
    assert dist is not None and 2.5 < dist.mean < 3.5


def test_censored_fit_is_unbiased_where_midpoints_drift() -> None:
    """Completions are seen only between polls; the first poll's finishes have no lower bound."""
    from veobatch.schedule import fit_intervals

    durations = lognormal_sample(3.0, 0.3, 3000, seed=4)
    intervals = []
    for d in durations:
        lo, t = 0.0, 2.8  # a first poll late enough to catch many early finishers
        while t < d:
            lo, t = t, t + 0.3
        intervals.append((lo, t))
    fit = fit_intervals(intervals)
    assert fit.mean == pytest.approx(3.0, rel=0.03)
    assert fit.sigma == pytest.approx(math.sqrt(math.log1p(0.09)), rel=0.1)
    survivors = [(lo + hi) / 2 for lo, hi in intervals if lo > 0]  # what dropping them gives
    assert sum(survivors) / len(survivors) > 3.2


def _lognormal(mean: float, cv: float) -> LogNormal:
    sigma2 = math.log1p(cv * cv)
    return LogNormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))


@pytest.mark.parametrize(
    ("mean", "cv"), [(240, 1.0), (120, 1.5), (600, 0.5), (1200, 0.3), (1200, 1.5)]
)
def test_a_wide_distribution_is_polled_within_the_cap_after_the_first_poll(
    mean: float, cv: float
) -> None:
    # A grid coarser than the cap once left one poll, at the 99.95 % quantile: past any
    # job timeout, so generations of 1-3 minutes timed out unpolled.
    dist = _lognormal(mean, cv)
    plan = plan_for(dist, S.lag_target_share * dist.mean, S)
    gaps = [b - a for a, b in itertools.pairwise(plan)]
    assert len(plan) > 1 and max(gaps) <= S.max_interval_s + 1e-9
    assert plan[0] < dist.mean and plan[-1] <= dist.quantile(0.9995) + 1e-6


def _history_plan(mean: float = 150.0) -> tuple[DurationModel, tuple[float, ...]]:
    model = DurationModel(S, min_samples=20)
    for d in lognormal_sample(mean, 0.3, 200):
        model.observe("m", d, earlier=True)
    plan = model.plan("m")
    assert plan is not None
    return model, plan


def test_a_first_poll_most_generations_beat_is_halved_then_cold() -> None:
    # History says 150 s; tonight every first poll finds the generation done. A fit of "(0,
    # first]" samples would keep the poll there; looking earlier shows where they really finish.
    model, plan = _history_plan()
    version = model.version("m")
    polled = 0
    while not model.first_polled("m", version, done=True):
        polled += 1
        assert polled < 5  # a handful, where the fit expected few done: not chance
    assert polled >= 1  # one alone could be
    assert model.plan("m") == (plan[0] / 2,)
    assert model.first_delay_s("m") == plan[0] / 2
    assert model.next_delay_s("m", plan[0] / 2) == cold_delay_s(plan[0] / 2, S)
    # First polls the old plan set say nothing of the new one.
    assert not any(model.first_polled("m", version, done=True) for _ in range(50))
    # "(0, first]" completions say nothing of where they fall: no refit on them (the fit would
    # expect them all done by any first poll before them, and plan there again) ...
    for _ in range(100):
        model.observe("m", 0.0, plan[0])
    assert model.plan("m") == (plan[0] / 2,)
    # ... until enough were seen running; then the fit is of tonight, not of the history.
    for d in lognormal_sample(20.0, 0.3, 20, seed=2):
        model.observe("m", 0.9 * d, d)
    refitted = model.plan("m")
    assert refitted is not None and len(refitted) > 1 and refitted[0] < 20


def test_a_completion_found_at_the_first_poll_is_no_verdict_on_it() -> None:
    # The first completions of a wave are the early ones, done by any first poll: judging the
    # plan by them halved a plan that was right, on the night's first completion.
    model, plan = _history_plan()
    model.observe("m", 0.0, plan[0])
    assert model.plan("m") is plan
    version = model.version("m")
    for done in [True] * 3 + [False] * 30:  # what the first polls found: most running
        assert not model.first_polled("m", version, done)
    assert model.plan("m") is plan


def test_scouts_poll_cold_while_the_plan_rests_on_earlier_runs() -> None:
    model, plan = _history_plan()
    scouts = [model.scout("m") for _ in range(40)]
    assert scouts == [True] * 21 + [False] * 9 + [True] + [False] * 9  # min_samples, then 1 in 10
    cold = cold_delay_s(10.0, S)
    assert model.next_delay_s("m", 10.0, scout=True) == cold < model.next_delay_s("m", 10.0)
    # Tonight agrees with the history after min_samples: the plan stands, no more scouts.
    for d in lognormal_sample(150.0, 0.3, 20, seed=2):
        model.observe("m", d)
    assert model.plan("m") is plan
    assert not any(model.scout("m") for _ in range(30))
    assert model.next_delay_s("m", 10.0, scout=True) == model.next_delay_s("m", 10.0)


def test_scouts_faster_than_the_history_replan_from_tonight() -> None:
    model, plan = _history_plan()
    assert plan[0] > 60
    for d in lognormal_sample(20.0, 0.3, 20, seed=2):  # the scouts' completions
        model.observe("m", 0.9 * d, d)
    refitted = model.plan("m")
    assert refitted is not None and refitted[0] < 20


def test_a_plan_fitted_on_tonight_sends_no_scouts() -> None:
    model = DurationModel(S, min_samples=20)
    for d in lognormal_sample(150.0, 0.3, 20):
        model.observe("m", 0.98 * d, d)
    assert model.plan("m") is not None
    assert not any(model.scout("m") for _ in range(30))


def test_tonight_unlike_the_history_is_planned_from_tonight_alone() -> None:
    model = DurationModel(S, min_samples=20)
    for d in lognormal_sample(3.0, 0.3, 5000):
        model.observe("m", d)
    history_plan = model.plan("m")
    assert history_plan is not None and history_plan[0] < 3
    for d in lognormal_sample(150.0, 0.3, DRIFT_CHECK, seed=2):
        model.observe("m", d)
    plan = model.plan("m")  # after DRIFT_CHECK completions, not after 2,500 more
    assert plan is not None and plan[0] > 50  # tonight's plan, not a blend with last week
    for d in lognormal_sample(150.0, 0.3, 30, seed=3):
        model.observe("m", d)
    assert model.plan("m") is plan  # the drift is behind it: the plan stands


def test_a_long_history_still_refits_after_refit_after_new_samples() -> None:
    model = DurationModel(S, min_samples=20)
    for d in lognormal_sample(3.0, 0.3, 5000):
        model.observe("m", d)
    first = model.plan("m")
    for d in lognormal_sample(3.0, 0.3, REFIT_AFTER - 1, seed=2):
        model.observe("m", d)
    assert model.plan("m") is first
    model.observe("m", 3.0)
    assert model.plan("m") is not first  # not only after 2,500 (half as many again)


@pytest.mark.parametrize(
    ("done", "polled", "expected", "saturated"),
    [
        (60, 100, 0.02, True),  # history said slower: far more done than the fit expected
        (20, 100, 0.02, False),
        (80, 100, 0.74, False),  # a narrow distribution: its fit expects most done, and they are
        (96, 100, 0.74, True),  # ... all but done: the cap
        (1, 1, 0.02, False),  # one could be chance
        (3, 3, 0.02, True),  # three all done, where few were expected: not chance
        (100, 100, 0.999, True),  # a fit of "(0, first]" samples alone is not believed
        (6, 10, 0.3, False),  # the margin, but a 1-in-20 chance
    ],
)
def test_saturation_is_judged_against_what_the_fit_expected(
    done: int, polled: int, expected: float, saturated: bool
) -> None:
    assert first_poll_saturated(done, polled, expected) is saturated


def test_a_generation_polled_before_a_new_plans_first_poll_waits_no_more_than_the_cap() -> None:
    model = DurationModel(S, min_samples=1)
    model.observe("m", 100.0)
    model.install("m", Fitted((80.0, 90.0), 0.01), 1)
    assert model.next_delay_s("m", 10.0) == S.max_interval_s  # not 70 s
    assert model.next_delay_s("m", 75.0) == 5.0
    assert model.first_delay_s("m") == 80.0  # a generation not yet polled still waits for it
