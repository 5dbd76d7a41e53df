"""The shared poller beyond the benchmark's timings, on a virtual clock.

    python benchmarks/poll_scenarios.py                    # every scenario, about 20 s
    python benchmarks/poll_scenarios.py --quick            # smaller counts (the test uses these)
    python benchmarks/poll_scenarios.py --only cold-uniform deadline --json out.json

Why: `benchmarks/bench.py` runs 3 s generations through the simulator in real time. The real
API's generations take 1-3 minutes (longer when it queues), a night need not look like the
ledger's history, and 10,000 generations in flight for an hour cannot be watched in real time
on every change. Here the REAL `Poller` (and its `DurationModel`) runs unchanged against a fake
API on an asyncio event loop whose clock jumps to the next timer whenever nothing is ready, so
hours of polling take seconds. It is a model of the API's timing (instant answers, durations
drawn as each scenario says), not a measurement of the API.

What is kept as a run has it:
- plan fits run inline: `anyio.to_thread.run_sync` is replaced while a scenario runs, and only
  then (in a thread, the idle loop would move the clock on while the fit computes);
- the fake API answers queued / generating / completed / error by virtual time;
- ledger history goes through `runner.learn_history`, as in a run, and the first submission
  goes once the poller has started (the runner starts it before any create request has come
  back), so a plan from the history is in place for the first generation;
- each generation is tracked with the job timeout (`remaining_s`), and the poller's own
  deadline handling declares timeouts;
- a URL refresh re-tracks the generation with `age_s=0, first=False`, as `Runner._refresh_url`.

Per scenario: polls per generation (mean, max), detection lag (the poll that saw a completion
minus the completion) mean / p95 / max in seconds and its mean as a share of the mean duration
(submission to completion), timeouts and how many of those were never polled, how many
generations took longer than the job timeout (those time out under any poller), and the most
polls sent in any 1 s window (the cap is 1,000 a second plus a burst of 50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import selectors
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from veobatch.client import Generation  # noqa: E402
from veobatch.errors import ApiError  # noqa: E402
from veobatch.ledger import JobState  # noqa: E402
from veobatch.poller import Poller, Tracked  # noqa: E402
from veobatch.runner import learn_history  # noqa: E402
from veobatch.settings import PollSettings  # noqa: E402

# (rng, job index) -> (seconds queued, seconds from submission to the end), the first within
# the second: the API says "queued", then "generating", then "completed" (or "error").
Draw = Callable[[random.Random, int], tuple[float, float]]

CAP_S = PollSettings().max_interval_s  # the poll interval cap: longer lags are counted apart
# Virtual seconds before the first submission: the poller starts and fits any history first,
# as in a run, where a fit takes milliseconds and a create request longer.
STARTUP_S = 0.01


# -- durations ---------------------------------------------------------------------------------


def lognormal(mean: float, cv: float) -> Draw:
    sigma = math.sqrt(math.log(1 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2
    return lambda rng, i: (0.0, rng.lognormvariate(mu, sigma))


def uniform(lo: float, hi: float) -> Draw:
    return lambda rng, i: (0.0, rng.uniform(lo, hi))


def queued_then(queue_mean: float, then: Draw) -> Draw:
    """An exponential wait in the API's queue, then the generation itself."""

    def draw(rng: random.Random, i: int) -> tuple[float, float]:
        queue = rng.expovariate(1 / queue_mean)
        _, generating = then(rng, i)
        return queue, queue + generating

    return draw


def alternate(draws: dict[str, Draw]) -> tuple[Draw, Callable[[int], str]]:
    """Jobs take turns among models: the draw and the model of job i."""
    names = sorted(draws)

    def model(i: int) -> str:
        return names[i % len(names)]

    return (lambda rng, i: draws[model(i)](rng, i)), model


def one_model(i: int) -> str:
    return "m"


@dataclass(frozen=True)
class History:
    """Earlier runs' completions in the ledger of the output directory."""

    model: str
    draw: Draw
    samples: int


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    jobs: int
    concurrency: int
    draw: Draw
    model: Callable[[int], str] = one_model
    history: tuple[History, ...] = ()
    job_timeout_s: float = 1800.0
    refresh_share: float = 0.0  # of completions whose URL the video host refuses
    fail_share: float = 0.0  # of generations that end in "error"


def scenarios(quick: bool = False) -> list[Scenario]:
    """The scenarios, with job counts that keep the whole run to about 20 s of CPU (--quick: a
    few seconds). Jobs are 2-20 times the concurrency, so later generations are polled by what
    the earlier ones taught the plan."""

    def n(full: int, small: int) -> int:
        return small if quick else full

    two, two_model = alternate({"fast": lognormal(20, 0.3), "slow": lognormal(150, 0.3)})
    return [
        Scenario(
            "bench-like",
            "lognormal mean 3 s, CV 0.3 (the simulator's, as in bench.py)",
            n(10_000, 1_000),
            n(500, 100),
            lognormal(3, 0.3),
        ),
        Scenario(
            "cold-uniform",
            "no history, uniform 60-180 s (the API's documented 1-3 minutes)",
            n(5_000, 600),
            n(500, 100),
            uniform(60, 180),
        ),
        Scenario(
            "cold-ln120",
            "no history, lognormal mean 120 s, CV 0.3",
            n(5_000, 600),
            n(500, 100),
            lognormal(120, 0.3),
        ),
        Scenario(
            "cold-heavy",
            "no history, lognormal mean 300 s, CV 1.0 (heavy tail)",
            n(3_000, 600),
            n(500, 100),
            lognormal(300, 1.0),
        ),
        Scenario(
            "queueing",
            "exponential queue wait, mean 300 s, then uniform 60-180 s",
            n(5_000, 600),
            n(500, 100),
            queued_then(300, uniform(60, 180)),
        ),
        Scenario(
            "two-models",
            "two models taking turns: lognormal 20 s and 150 s, CV 0.3",
            n(5_000, 600),
            n(500, 100),
            two,
            model=two_model,
        ),
        Scenario(
            "hist-3s-now-150s",
            "ledger: 5,000 completions of ~3 s; tonight ~150 s (lognormal CV 0.3)",
            n(5_000, 600),
            n(500, 100),
            lognormal(150, 0.3),
            history=(History("m", lognormal(3, 0.3), 5_000),),
        ),
        Scenario(
            "hist-150s-now-20s",
            "ledger: 5,000 completions of ~150 s; tonight ~20 s (lognormal CV 0.3)",
            n(5_000, 600),
            n(500, 100),
            lognormal(20, 0.3),
            history=(History("m", lognormal(150, 0.3), 5_000),),
        ),
        Scenario(
            "hist-150s-now-20s-c4",
            "as above, at the default concurrency of 4",
            n(400, 100),
            4,
            lognormal(20, 0.3),
            history=(History("m", lognormal(150, 0.3), 5_000),),
        ),
        Scenario(
            "url-refresh",
            "uniform 60-180 s; 2 % of completions polled again for a fresh URL",
            n(5_000, 600),
            n(500, 100),
            uniform(60, 180),
            refresh_share=0.02,
        ),
        Scenario(
            "10k-in-flight",
            "uniform 60-180 s, thousands in flight: the 1,000 polls/s cap and its burst",
            n(20_000, 2_000),
            n(10_000, 1_000),
            uniform(60, 180),
        ),
        Scenario(
            "deadline",
            "uniform 100-104.5 s, job timeout 105 s: every one must complete",
            n(1_000, 200),
            n(250, 50),
            uniform(100, 104.5),
            job_timeout_s=105.0,
        ),
    ]


# -- the virtual clock -------------------------------------------------------------------------


class _VirtualSelector(selectors.BaseSelector):
    """The loop's real selector for readiness (its self-pipe), but it never waits: a wait for
    the next timer moves the virtual clock to that timer instead."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            raise RuntimeError("virtual clock: nothing is scheduled, the run would wait forever")
        self.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time: idle waits cost nothing, callbacks run as usual."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self._clock_resolution = 1e-9  # timers fire at their time, not a clock tick early

    def time(self) -> float:
        return self._virtual.now


@contextlib.contextmanager
def inline_fits() -> Iterator[None]:
    """Plan fits run in the calling task while the block lasts, then the real
    ``anyio.to_thread.run_sync`` is back: a fit in a thread would leave the loop idle, and an
    idle virtual loop moves its clock on while the fit computes."""
    original = anyio.to_thread.run_sync

    async def run_inline(func: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return func(*args)

    anyio.to_thread.run_sync = run_inline  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = original


# -- the fake API and the run ------------------------------------------------------------------


@dataclass(slots=True)
class _Gen:
    submitted: float
    generating_at: float
    ends: float
    fails: bool


class FakeApi:
    """GET /v2/video/generations by virtual time; answers at once. Records every poll's time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.gens: dict[str, _Gen] = {}
        self.poll_times: list[float] = []

    async def fetch(self, generation_id: str) -> Generation:
        g, now = self.gens[generation_id], self._clock()
        self.poll_times.append(now)
        if now >= g.ends:
            if g.fails:
                return Generation(generation_id, "error", error_name="x", error_message="failed")
            return Generation(generation_id, "completed", video_url=f"https://cdn/{generation_id}")
        return Generation(generation_id, "queued" if now < g.generating_at else "generating")


@dataclass
class _Tally:
    polls: list[int] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    per_model: dict[str, tuple[list[int], list[float], list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: ([], [], []))
    )
    failed: int = 0
    lost: int = 0
    timeouts: int = 0
    timeouts_unpolled: int = 0
    over_timeout: int = 0
    over_cap: int = 0  # lags longer than the interval cap
    over_cap_first: int = 0  # of those, seen at the generation's first poll
    refresh_waits: list[float] = field(default_factory=list)
    refresh_timeouts: int = 0


class _Run:
    """One scenario: keeps ``concurrency`` generations open, and is the poller's sink."""

    def __init__(self, sc: Scenario, seed: int, clock: Callable[[], float]) -> None:
        self.sc = sc
        self.clock = clock
        self.rng = random.Random(seed)
        self.refresh_rng = random.Random(seed + 1)
        self.api = FakeApi(clock)
        self.poller = Poller(
            self.api,  # type: ignore[arg-type]
            self,
            PollSettings(),
            clock=clock,
            rng=random.Random(seed + 2),
        )
        self.tally = _Tally()
        self.next = 0
        self.open = 0
        self.refreshing: dict[str, float] = {}  # job id -> when its fresh URL was asked for
        self.history_fed = 0
        self.done = anyio.Event()

    def learn_history(self, seed: int) -> None:
        """Ledger records of earlier runs (submitted and completed times, detected at once),
        fed as the runner feeds them (``runner.learn_history``)."""
        rng, states, t0 = random.Random(seed), [], 1.7e9  # wall-clock times, as the ledger's
        for h in self.sc.history:
            for k in range(h.samples):
                took = h.draw(rng, k)[1]
                states.append(
                    JobState(
                        f"{h.model}-earlier-{k}",
                        status="done",
                        model=h.model,
                        submitted_at=t0,
                        completed_at=t0 + took,
                    )
                )
        self.history_fed += learn_history(self.poller.durations, states, self.sc.job_timeout_s)

    def submit(self) -> None:
        i, sc = self.next, self.sc
        self.next += 1
        self.open += 1
        queued, total = sc.draw(self.rng, i)
        now, gid = self.clock(), f"gen-{i}"
        fails = sc.fail_share > 0 and self.rng.random() < sc.fail_share
        self.api.gens[gid] = _Gen(now, now + queued, now + total, fails)
        self.tally.over_timeout += total > sc.job_timeout_s
        self.poller.track(
            f"job-{i}",
            gid,
            model=sc.model(i),
            age_s=0.0,
            remaining_s=sc.job_timeout_s,
            first=True,
        )

    def _release(self) -> None:
        self.open -= 1
        if self.next < self.sc.jobs:
            self.submit()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.open == 0 and not self.refreshing and self.next >= self.sc.jobs:
            self.done.set()

    # -- the poller's sink --

    async def generation_finished(self, tracked: Tracked, generation: Generation) -> None:
        now = self.clock()
        if tracked.job_id in self.refreshing:  # the fresh URL, not another generation
            self.tally.refresh_waits.append(now - self.refreshing.pop(tracked.job_id))
            self._maybe_done()
            return
        if not generation.completed:
            self.tally.failed += 1
            self._release()
            return
        g = self.api.gens[tracked.generation_id]
        t = self.tally
        lag = now - g.ends
        t.polls.append(tracked.polls)
        t.lags.append(lag)
        if lag > CAP_S:
            t.over_cap += 1
            t.over_cap_first += tracked.polls == 1
        t.durations.append(g.ends - g.submitted)
        polls, lags, durations = t.per_model[tracked.model]
        polls.append(tracked.polls)
        lags.append(lag)
        durations.append(g.ends - g.submitted)
        if self.sc.refresh_share and self.refresh_rng.random() < self.sc.refresh_share:
            # The video host refuses the URL: poll for a fresh one, as Runner._refresh_url does.
            self.refreshing[tracked.job_id] = now
            self.poller.track(
                tracked.job_id,
                tracked.generation_id,
                model=tracked.model,
                age_s=0.0,
                remaining_s=self.sc.job_timeout_s,
                first=False,
            )
        self._release()

    async def generation_timed_out(self, tracked: Tracked) -> None:
        if self.refreshing.pop(tracked.job_id, None) is not None:
            self.tally.refresh_timeouts += 1
            self._maybe_done()
            return
        self.tally.timeouts += 1
        self.tally.timeouts_unpolled += tracked.polls == 0
        self._release()

    async def generation_lost(self, tracked: Tracked, error: ApiError) -> None:
        self.tally.lost += 1
        self._release()

    async def main(self, seed: int) -> None:
        self.learn_history(seed + 3)
        sc = self.sc
        # Virtual seconds no run of this scenario can need: a hang fails instead of spinning.
        budget = (math.ceil(sc.jobs / sc.concurrency) + 2) * (sc.job_timeout_s + 120.0)
        with anyio.fail_after(budget):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.poller.run)
                await anyio.sleep(STARTUP_S)
                for _ in range(min(sc.concurrency, sc.jobs)):
                    self.submit()
                await self.done.wait()
                tg.cancel_scope.cancel()


async def _play(sc: Scenario, seed: int, clock: Callable[[], float]) -> _Run:
    run = _Run(sc, seed, clock)  # on the loop: the poller makes its cancel scope at once
    await run.main(seed)
    return run


def peak_in_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most of these (sorted) times in any half-open window of ``window_s``."""
    peak = lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        peak = max(peak, hi - lo + 1)
    return peak


def p95(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.95 * len(s)))]


def _figures(
    polls: Sequence[int], lags: Sequence[float], durations: Sequence[float]
) -> dict[str, Any]:
    if not polls:
        return {"completed": 0}
    lag_mean, duration_mean = statistics.fmean(lags), statistics.fmean(durations)
    return {
        "completed": len(polls),
        "polls_mean": statistics.fmean(polls),
        "polls_max": max(polls),
        "lag_mean_s": lag_mean,
        "lag_p95_s": p95(lags),
        "lag_max_s": max(lags),
        "mean_duration_s": duration_mean,
        "lag_share": lag_mean / duration_mean,  # of the mean duration
    }


def run_scenario(sc: Scenario, seed: int = 1) -> dict[str, Any]:
    """Run one scenario on a fresh virtual loop; its figures as plain data."""
    cpu0 = time.process_time()
    loop = VirtualLoop()
    try:
        with inline_fits():
            run = loop.run_until_complete(_play(sc, seed, loop.time))
        virtual_s = loop.time()
    finally:
        loop.close()
    t = run.tally
    out: dict[str, Any] = {
        "scenario": sc.name,
        "about": sc.about,
        "jobs": sc.jobs,
        "concurrency": sc.concurrency,
        "job_timeout_s": sc.job_timeout_s,
        "history_samples": run.history_fed,
        **_figures(t.polls, t.lags, t.durations),
        "failed": t.failed,
        "lost": t.lost,
        "timeouts": t.timeouts,
        "timeouts_never_polled": t.timeouts_unpolled,
        "longer_than_timeout": t.over_timeout,
        "lags_over_cap": t.over_cap,
        "lags_over_cap_at_first_poll": t.over_cap_first,
        "polls_sent": len(run.api.poll_times),
        "peak_polls_in_1s": peak_in_window(run.api.poll_times),
        "virtual_s": virtual_s,
        "cpu_s": time.process_time() - cpu0,
    }
    if len(t.per_model) > 1:
        out["per_model"] = {m: _figures(*figs) for m, figs in sorted(t.per_model.items())}
    if sc.refresh_share:
        out["refreshes"] = len(t.refresh_waits)
        out["refresh_wait_max_s"] = max(t.refresh_waits, default=0.0)
        out["refresh_timeouts"] = t.refresh_timeouts
    plans = {}
    for model in sorted({sc.model(i) for i in range(min(sc.jobs, 10))}):
        plan = run.poller.durations.current_plan(model)
        plans[model] = {"len": len(plan), "first_s": plan[0], "last_s": plan[-1]} if plan else None
    out["final_plans"] = plans
    return out


# -- the table ---------------------------------------------------------------------------------

HEADER = (
    f"{'scenario':<18} {'jobs':>6} {'in flight':>9} {'polls/gen':>9} {'max':>4} "
    f"{'lag mean':>8} {'p95':>6} {'max':>6} {'share':>6} {'timeouts':>12} {'peak/1s':>7} "
    f"{'virtual':>8} {'cpu':>5}"
)


def _row(name: str, r: dict[str, Any], jobs: str = "", flight: str = "") -> str:
    if not r.get("completed"):
        return f"{name:<18} {jobs:>6} {flight:>9} {'(no completions)':^44}"
    return (
        f"{name:<18} {jobs:>6} {flight:>9} {r['polls_mean']:>9.2f} {r['polls_max']:>4} "
        f"{r['lag_mean_s']:>7.2f}s {r['lag_p95_s']:>5.1f}s {r['lag_max_s']:>5.1f}s "
        f"{r['lag_share']:>6.1%}"
    )


def format_row(r: dict[str, Any]) -> list[str]:
    """The scenario's line, and one indented line per model when there are several."""
    timeouts = f"{r['timeouts']} ({r['timeouts_never_polled']} unp.)"
    line = _row(r["scenario"], r, f"{r['jobs']:,}", f"{r['concurrency']:,}")
    line += (
        f" {timeouts:>12} {r['peak_polls_in_1s']:>7,} {r['virtual_s'] / 60:>6.0f}m "
        f"{r['cpu_s']:>4.1f}s"
    )
    lines = [line]
    for model, f in r.get("per_model", {}).items():
        lines.append(_row(f"  model {model}", f))
    notes = []
    if r["lags_over_cap"]:
        notes.append(
            f"{r['lags_over_cap']:,} lags over the {CAP_S:g} s interval cap, "
            f"{r['lags_over_cap_at_first_poll']:,} of them at the first poll"
        )
    if r["longer_than_timeout"]:
        notes.append(f"{r['longer_than_timeout']} took longer than the job timeout")
    if "refreshes" in r:
        notes.append(
            f"{r['refreshes']} URL refreshes, answered within {r['refresh_wait_max_s']:.2f}s, "
            f"{r['refresh_timeouts']} timed out"
        )
    if r["failed"] or r["lost"]:
        notes.append(f"{r['failed']} failed, {r['lost']} lost")
    lines += [f"  ({n})" for n in notes]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller job counts (a few seconds)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these scenarios only")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--fail-share",
        type=float,
        default=0.0,
        help="share of generations that end in 'error', in every scenario (default 0)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    opts = ap.parse_args()
    chosen = [replace(sc, fail_share=opts.fail_share) for sc in scenarios(opts.quick)]
    if opts.only:
        unknown = set(opts.only) - {sc.name for sc in chosen}
        if unknown:
            ap.error(
                f"no scenario {', '.join(sorted(unknown))}; there are: "
                + ", ".join(sc.name for sc in chosen)
            )
        chosen = [sc for sc in chosen if sc.name in opts.only]
    print("default PollSettings; job timeout 1800 s unless said; 'share' is the mean lag over")
    print("the mean duration; 'unp.' timeouts were never polled; 'virtual' is the virtual time")
    print(HEADER, flush=True)
    results = []
    for sc in chosen:
        r = run_scenario(sc, opts.seed)
        results.append(r)
        print("\n".join(format_row(r)), flush=True)
    print(f"total CPU {sum(r['cpu_s'] for r in results):.1f}s")
    if opts.json:
        opts.json.write_text(json.dumps({"seed": opts.seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
