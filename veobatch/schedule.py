"""When to poll a generation: a schedule learnt from how long this model's generations take.

Polling at a fixed interval pays for every poll before a generation could plausibly be done.
Once a model has enough completions, its durations are fitted with a lognormal and a list of
poll offsets (seconds after submission) is planned for it by dynamic programming: the times
that minimise expected lag + λ·expected polls, which puts the first poll just before the
earliest completions and the others dense where completions are likely, sparse in the tails.
λ is chosen so that the expected detection lag meets a target share of the mean duration.
Until a model has enough samples, and after its plan runs out, a growing interval is used.

Everything here is pure: the benchmark replays it over true durations to draw the trade-off.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import NamedTuple

from .settings import PollSettings

QUANTILES = 400  # points that stand for the distribution when costing a plan


def cold_delay_s(age_s: float, s: PollSettings) -> float:
    """Before anything is known: wait longer as a generation ages, within the bounds."""
    return min(s.max_interval_s, max(s.min_interval_s, s.growth * age_s))


@dataclass(frozen=True)
class LogNormal:
    mu: float
    sigma: float

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)

    def cdf(self, t: float) -> float:
        if t <= 0:
            return 0.0
        return NormalDist().cdf((math.log(t) - self.mu) / self.sigma)

    def quantile(self, p: float) -> float:
        return math.exp(self.mu + self.sigma * NormalDist().inv_cdf(p))


GRID_POINTS = 150  # candidate poll times between the 0.05% and 99.95% quantiles, at least
MAX_GRID_POINTS = 1200  # more when needed to space them at most a quarter of the cap apart


def plan_offsets(dist: LogNormal, lam: float, s: PollSettings) -> tuple[float, ...]:
    """The poll times minimising E[lag] + λ·E[polls], by dynamic programming on a grid.

    V(i) is the least cost still to pay when the last poll was at grid[i] and found the
    generation running; the next poll at grid[j] costs λ·S(grid[i]) plus the lag of every
    completion in between.
    """
    lo, hi = dist.quantile(0.0005), dist.quantile(0.9995)
    # A grid coarser than the interval cap leaves the DP no allowed step after the first poll:
    # a wide distribution would get one poll at its 99.95 % quantile, past any job timeout.
    points = min(MAX_GRID_POINTS, max(GRID_POINTS, math.ceil(4 * (hi - lo) / s.max_interval_s) + 1))
    grid = [0.0] + [lo + (hi - lo) * k / (points - 1) for k in range(points)]
    n = len(grid)
    cdf = [dist.cdf(t) for t in grid]
    tmass = [0.0] * n  # cumulative ∫ t f(t) dt, by midpoints
    for k in range(1, n):
        tmass[k] = tmass[k - 1] + (grid[k] + grid[k - 1]) / 2 * (cdf[k] - cdf[k - 1])
    value = [0.0] * n
    nxt = [n - 1] * n
    for i in range(n - 2, -1, -1):
        base = lam * (1.0 - cdf[i])
        best, best_j = math.inf, n - 1
        for j in range(i + 1, n):
            gap = grid[j] - grid[i]
            if gap < s.min_interval_s and j < n - 1:
                continue
            if gap > s.max_interval_s and i > 0 and j > i + 1:
                break  # the next point is always allowed: the finest grid may still be coarse
            c = base + grid[j] * (cdf[j] - cdf[i]) - (tmass[j] - tmass[i]) + value[j]
            if c < best:
                best, best_j = c, j
        value[i], nxt[i] = best, best_j
    plan: list[float] = []
    i = 0
    while i < n - 1:
        i = nxt[i]
        plan.append(grid[i])
    return _within_cap(plan, s.max_interval_s)


def _within_cap(plan: list[float], cap: float) -> tuple[float, ...]:
    """The plan with polls added, evenly, wherever two are more than ``cap`` apart (a
    distribution wider than even the finest grid covers)."""
    out = plan[:1]
    for t in plan[1:]:
        gaps = math.ceil((t - out[-1]) / cap - 1e-9)
        start = out[-1]
        out.extend(start + (t - start) * k / gaps for k in range(1, gaps))
        out.append(t)
    return tuple(out)


def cost(
    offsets: Sequence[float], durations: Sequence[float], s: PollSettings
) -> tuple[float, float]:
    """Mean polls and mean detection lag of a plan over some durations (cold tail after it)."""
    polls = lag = 0.0
    for d in durations:
        i = bisect.bisect_left(offsets, d)
        if i < len(offsets):
            polls += i + 1
            lag += offsets[i] - d
            continue
        t, n = offsets[-1], len(offsets)
        while t < d:
            t += cold_delay_s(t, s)
            n += 1
        polls += n
        lag += t - d
    return polls / len(durations), lag / len(durations)


def _quantile_sample(dist: LogNormal) -> list[float]:
    return [dist.quantile((i + 0.5) / QUANTILES) for i in range(QUANTILES)]


def plan_for(dist: LogNormal, lag_target_s: float, s: PollSettings) -> tuple[float, ...]:
    """The plan with the fewest polls whose expected lag meets the target (bisection on λ)."""
    sample = _quantile_sample(dist)
    lo, hi = 1e-6 * dist.mean, dist.mean  # λ in seconds of lag per poll
    plan = plan_offsets(dist, lo, s)
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        candidate = plan_offsets(dist, mid, s)
        if cost(candidate, sample, s)[1] <= lag_target_s:
            lo, plan = mid, candidate
        else:
            hi = mid
    return plan


_STD = NormalDist()
WINDOW = 2000  # the most recent completions per model: enough to fit, and it follows drift
EM_ROUNDS = 6
# A poll this close before a planned time is that planned poll (the poller sends polls that are
# nearly due with the current batch); without it the same planned time would be polled twice.
PLAN_SLACK_S = 0.005


def fit_intervals(intervals: Sequence[tuple[float, float]]) -> LogNormal:
    """Fit a lognormal to completion times known only as intervals (lo, hi].

    A poll sees a generation finished somewhere since the previous poll (or since submission
    for the first poll). Fitting midpoints, or dropping the first-poll finishes, biases the fit
    and the plan built on it drifts later and later; EM on the censored data does not.
    """
    logs = [(math.log(lo) if lo > 0 else -math.inf, math.log(hi)) for lo, hi in intervals]
    seeds = [(a + b) / 2 if a > -math.inf else b for a, b in logs]
    mu = sum(seeds) / len(seeds)
    sigma = max(math.sqrt(max(sum(x * x for x in seeds) / len(seeds) - mu * mu, 0.0)), 0.02)
    for _ in range(EM_ROUNDS):
        total = total_sq = 0.0
        for a, b in logs:
            m1, m2 = _truncated_moments(mu, sigma, a, b)
            total += m1
            total_sq += m2
        mu = total / len(logs)
        sigma = max(math.sqrt(max(total_sq / len(logs) - mu * mu, 0.0)), 0.02)
    return LogNormal(mu, sigma)


def _truncated_moments(mu: float, sigma: float, a: float, b: float) -> tuple[float, float]:
    """E[X] and E[X²] of N(mu, sigma²) restricted to (a, b]."""
    alpha = (a - mu) / sigma if a > -math.inf else -math.inf
    beta = (b - mu) / sigma
    mass = _STD.cdf(beta) - (_STD.cdf(alpha) if alpha > -math.inf else 0.0)
    if mass < 1e-12:  # the fit puts no weight here: trust the interval itself
        x = (a + b) / 2 if a > -math.inf else b
        return x, x * x
    pa = _STD.pdf(alpha) if alpha > -math.inf else 0.0
    pb = _STD.pdf(beta)
    apa = alpha * pa if alpha > -math.inf else 0.0
    mean_z = (pa - pb) / mass
    var_z = 1.0 + (apa - beta * pb) / mass - mean_z * mean_z
    mean_x = mu + sigma * mean_z
    return mean_x, sigma * sigma * max(var_z, 0.0) + mean_x * mean_x


# A refit is due after half as many samples again, or this many new ones: with a long history
# the first rule alone would wait thousands of completions to notice tonight differs.
REFIT_AFTER = WINDOW // 2
# Every generation's first poll under a plan finds it done or running. When far more are done
# than the plan's fit expected (by this margin, or up to the cap), and too many to be chance,
# that poll is too late to tell how early they finish (all a fit sees is "before it"): the
# first poll is halved at once instead of trusting a fit. A narrow distribution may rightly
# expect most done by its first poll: only the excess counts. First polls are counted, not
# completions: the first completions of a wave are the early ones, done by any first poll.
SATURATION_MARGIN = 0.25
SATURATION_CAP = 0.95
SATURATION_ALPHA = 1e-3  # the chance of so many done first if the fit were right, at most
SATURATION_FLOOR = 0.05  # a fit's expected share is taken as at least this (fits err in tails)
# ... and at most this: a fit of nothing but "(0, first]" samples can expect all done by a first
# poll anywhere before them, and a plan judged against that could never be found too late.
SATURATION_TRUST = 0.75
UNKNOWN_FIRST_SHARE = 0.25  # what a plan not from a fit (a halved poll) is taken to expect
DRIFT_RATIO = 2.0  # recent completions' median this far from the older ones': refit on them
DRIFT_CHECK = 100  # new completions between two looks for drift
# While a plan rests on earlier runs alone, the first min_samples generations, then one in this
# many, are scouts, polled on the cold schedule: if tonight is faster, the scouts' completions
# say so (drift) before the rest reach the plan's first poll. Polling them all from the plan
# would lose a whole wave. (If tonight agrees, a night pays for some twenty scouts' polls.)
SCOUT_EVERY = 10


@dataclass
class _Samples:
    intervals: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    n: int = 0
    plan: tuple[float, ...] | None = None
    planned_at: int = 0
    version: int = 0  # of the plan: first polls count towards the plan that set them
    first_share: float = UNKNOWN_FIRST_SHARE  # done by the plan's first poll, as its fit expects
    firsts: int = 0  # first polls under this plan
    firsts_done: int = 0  # ... that found the generation done
    halved: bool = False  # the plan is a halved first poll: refit once it has min_samples
    seen_running: int = 0  # samples since the halving that were seen running before done
    tonight: int = 0  # samples from this run (not from the ledger's earlier runs)
    unconfirmed: bool = False  # the plan rests on earlier runs: tonight has not yet agreed
    tracked: int = 0  # generations started while it is unconfirmed (every SCOUT_EVERY-th scouts)
    checked_at: int = 0  # samples when drift was last looked for
    regime: int = 0  # the sample the current regime starts at: older ones are not fitted


@dataclass
class DurationModel:
    """Per-model duration estimates and the poll plan they imply."""

    settings: PollSettings
    min_samples: int = 20
    _models: dict[str, _Samples] = field(default_factory=dict)

    def observe(
        self, model: str, low_s: float, high_s: float | None = None, *, earlier: bool = False
    ) -> None:
        """A generation of ``model`` finished after ``low_s`` and by ``high_s`` (seconds from
        submission); with one figure, it took about that long. ``earlier``: in an earlier run."""
        hi = low_s if high_s is None else high_s
        lo = low_s * 0.98 if high_s is None else low_s
        if hi <= 0:
            return
        m = self._models.setdefault(model, _Samples())
        m.intervals.append((max(lo, 0.0), hi))
        m.n += 1
        m.seen_running += lo > 0
        m.tonight += not earlier

    def version(self, model: str) -> int:
        """The plan a generation's first poll is set by now (0: none, the cold schedule)."""
        m = self._models.get(model)
        return m.version if m is not None and m.plan is not None else 0

    def scout(self, model: str) -> bool:
        """Should a generation starting now be a scout (polled on the cold schedule)?"""
        m = self._models.get(model)
        if m is None or not m.unconfirmed or m.halved:
            return False
        m.tracked += 1
        return m.tracked <= self.min_samples or m.tracked % SCOUT_EVERY == 1

    def first_polled(self, model: str, version: int, done: bool) -> bool:
        """A first poll set by plan ``version`` found the generation done or running. True when
        that made the plan's first poll too late and halved it (polls waiting for the old
        one should move up)."""
        m = self._models.get(model)
        if m is None or m.plan is None or version != m.version:
            return False  # set by an older plan, or by none: says nothing of this one
        m.firsts += 1
        m.firsts_done += done
        if not first_poll_saturated(m.firsts_done, m.firsts, m.first_share):
            return False
        first = self.first_delay_s(model)
        # Look earlier: half the first poll, then the cold schedule's narrow intervals, until
        # a refit sees where completions really fall (halving again if need be).
        self._set_plan(m, (max(self.settings.min_interval_s, first / 2),), UNKNOWN_FIRST_SHARE)
        # The samples the late plan was fitted on misled it: fit only those since it began.
        m.regime, m.planned_at, m.halved, m.seen_running = m.planned_at, m.n, True, 0
        return True

    def distribution(self, model: str) -> LogNormal | None:
        m = self._models.get(model)
        if m is None or m.n < self.min_samples:
            return None
        return fit_intervals(list(m.intervals))

    def stale(self) -> list[tuple[str, list[tuple[float, float]], int]]:
        """Models due for a refit, each with a copy of the samples to fit, so the fit can run
        in a worker thread while polls go on: a first plan, half as many samples again,
        REFIT_AFTER new ones, min_samples seen running since a halving (which say where
        completions fall: a "(0, first]" one does not), or new ones (checked every
        DRIFT_CHECK) that tell another story."""
        due = []
        for name, m in self._models.items():
            if m.n < self.min_samples:
                continue
            if m.halved and m.seen_running < self.min_samples:
                continue  # a halved first poll waits for samples that say where they fall
            recent = m.n - m.planned_at
            checking = (
                m.plan is not None
                and m.n < m.planned_at * 1.5
                and recent < REFIT_AFTER
                and not m.halved
            )
            look = m.checked_at + (self.min_samples if m.unconfirmed else DRIFT_CHECK)
            if checking and (m.n < look or recent < self.min_samples):
                continue  # asked four times a second: no copy, no sort until a look is due
            # Only the samples of the current regime: since the last drift, within the window.
            intervals = list(m.intervals)[max(0, m.regime - (m.n - len(m.intervals))) :]
            drifted = drift(intervals, recent, self.min_samples)
            if checking:
                m.checked_at = m.n
                if not drifted:
                    m.unconfirmed = False  # tonight agrees with the earlier runs
                    continue  # the plan stands
            if drifted:  # tonight is not last week: forget the older samples
                m.regime = m.planned_at
                intervals = intervals[-recent:]
            due.append((name, intervals, m.n))
        return due

    def install(self, model: str, fitted: Fitted, samples: int) -> None:
        m = self._models[model]
        if m.halved and m.planned_at >= samples:
            return  # halved since these samples were taken: the next look refits
        self._set_plan(m, *fitted)
        m.planned_at, m.halved = samples, False
        tonight = m.tonight - (m.n - samples)  # of the samples fitted
        m.unconfirmed = tonight < min(samples, self.min_samples)

    @staticmethod
    def _set_plan(m: _Samples, plan: tuple[float, ...], first_share: float) -> None:
        m.plan, m.first_share = plan, first_share
        m.version += 1
        m.firsts = m.firsts_done = 0

    def plan(self, model: str) -> tuple[float, ...] | None:
        """The plan, refitted here and now when it is due: for callers off the event loop."""
        for name, intervals, n in self.stale():
            if name == model:
                self.install(model, fit(intervals, self.settings), n)
        return self.current_plan(model)

    def current_plan(self, model: str) -> tuple[float, ...] | None:
        m = self._models.get(model)
        return m.plan if m else None

    def next_delay_s(self, model: str, age_s: float, *, scout: bool = False) -> float:
        """Seconds from now to the next poll of a generation this old that is still running.
        (Polled already: a new plan's first poll, later than its age, is no licence to wait
        past the interval cap.) A scout keeps to the cold schedule while the plan is unconfirmed."""
        cold = cold_delay_s(age_s, self.settings)
        m = self._models.get(model)
        if m is not None and m.plan:
            i = bisect.bisect_right(m.plan, age_s + PLAN_SLACK_S)
            if i < len(m.plan):
                wait = m.plan[i] - age_s
                wait = min(wait, self.settings.max_interval_s) if i == 0 else wait
                return min(wait, cold) if scout and m.unconfirmed else wait
        return cold

    def first_delay_s(self, model: str) -> float:
        plan = self.current_plan(model)
        return plan[0] if plan else self.settings.first_delay_s


def drift(intervals: Sequence[tuple[float, float]], recent: int, min_samples: int) -> bool:
    """Do the last ``recent`` samples tell another story than the ones before (medians
    DRIFT_RATIO apart)? Tonight is not last week: a fit of both would plan for neither until
    the old ones leave the window, thousands of completions later."""
    if recent < min_samples or recent >= len(intervals):
        return False
    old = sorted(hi for _, hi in intervals[:-recent])
    new = sorted(hi for _, hi in intervals[-recent:])
    a, b = old[len(old) // 2], new[len(new) // 2]
    return max(a, b) > DRIFT_RATIO * min(a, b)


def first_poll_saturated(done: int, polled: int, expected: float) -> bool:
    """Did far more of ``polled`` first polls find the generation done than the plan's fit
    ``expected``, and too many to be chance?

    Such a completion is (0, first poll]: it says only "earlier than that". If far more are,
    the plan's first poll is too late for tonight (history slower than tonight, say), and a
    fit of such samples would keep it there: every generation waits for it, lag unbounded.
    Chance is bounded by Chernoff (P[X ≥ k] ≤ exp(-n·KL(k/n ‖ p))), so a handful of first
    polls all done is enough when the fit expected few.
    """
    if polled < 1 or done < min(SATURATION_CAP, expected + SATURATION_MARGIN) * polled:
        return False
    p, q = min(max(expected, SATURATION_FLOOR), SATURATION_TRUST), done / polled
    if q <= p:
        return False
    kl = q * math.log(q / p) + (0.0 if q >= 1.0 else (1 - q) * math.log((1 - q) / (1 - p)))
    return polled * kl >= -math.log(SATURATION_ALPHA)


class Fitted(NamedTuple):
    plan: tuple[float, ...]
    first_share: float  # of completions done by the first poll, as the fit expects


def fit(intervals: Sequence[tuple[float, float]], s: PollSettings) -> Fitted:
    """Fit the samples and plan for them: the costly step (EM, then DP), pure."""
    dist = fit_intervals(intervals)
    plan = plan_for(dist, s.lag_target_share * dist.mean, s)
    return Fitted(plan, dist.cdf(plan[0]) if plan else 0.0)


def fit_plan(intervals: Sequence[tuple[float, float]], s: PollSettings) -> tuple[float, ...]:
    return fit(intervals, s).plan


def fixed_schedule_cost(durations: Sequence[float], interval_s: float) -> tuple[float, float]:
    """Mean polls and lag when polling every ``interval_s`` from submission."""
    polls = lag = 0.0
    for d in durations:
        n = math.ceil(d / interval_s)
        polls += n
        lag += n * interval_s - d
    return polls / len(durations), lag / len(durations)


def schedule_cost(
    durations: Sequence[float], lag_target_share: float, s: PollSettings
) -> tuple[float, float]:
    """Mean polls and lag of the adaptive plan fitted to these durations, replayed on them.

    The fit sees what a run's model would: the latest WINDOW completions, known to ±2 %."""
    samples = [(0.98 * d, d) for d in durations[-WINDOW:]]
    plan = fit_plan(samples, replace(s, lag_target_share=lag_target_share))
    return cost(plan, durations, s)
