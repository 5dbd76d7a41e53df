"""A fake-clock model of the submission loop, to see how a concurrency limit behaves at scale.

Jobs are submitted while a slot is free. The API decides on each create half-way through its
``post_s`` (accepted, or a 429: ``refuse`` is a cap on its in-flight count, or refusals at
random), and its answer reaches us after a varying delay, so the answers to creates sent
together come back in any order. A refused job holds its slot for the Retry-After, during
which nothing is submitted (the run rests), then gives the slot back if the limit went below
the slots held, as the runner does. We see a generation finish up to ``poll_s`` after it
does, so our in-flight count runs ahead of the API's, as in a real run.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Limit(Protocol):
    current: int

    def on_rate_limited(self, now: float, in_flight: int) -> int: ...

    def on_success(self, in_flight: int) -> int: ...


# (the API's count of our generations in flight, the time, a random source) -> a 429?
Refuse = Callable[[int, float, random.Random], bool]


def cap_of(cap: int) -> Refuse:
    return lambda in_flight, now, rng: in_flight >= cap


def sporadic(rate: float) -> Refuse:
    return lambda in_flight, now, rng: rng.random() < rate


@dataclass
class Outcome:
    makespan_s: float = 0.0
    accepted: int = 0
    refused: int = 0
    # over the time jobs were waiting to be submitted (the tail has nothing to submit)
    busy_s: float = 0.0
    limit_s: float = 0.0  # the integral of the limit
    band_s: float = 0.0  # time with the limit inside ``band``
    in_flight_s: float = 0.0  # the integral of the API's in-flight count
    band: tuple[float, float] = (0.0, float("inf"))
    lowest: int = 10**9

    @property
    def mean_limit(self) -> float:
        return self.limit_s / self.busy_s

    @property
    def in_band(self) -> float:
        return self.band_s / self.busy_s

    @property
    def mean_in_flight(self) -> float:
        return self.in_flight_s / self.busy_s


@dataclass
class Model:
    limit: Limit
    refuse: Refuse
    jobs: int
    gen_s: float = 60.0  # mean of a lognormal generation time
    gen_cv: float = 0.3  # its coefficient of variation
    post_s: float = 0.2
    poll_s: float = 5.0
    retry_after_s: float = 2.0
    rest: bool = True  # a 429 holds every submission for its Retry-After
    seed: int = 0
    band: tuple[float, float] = (0.0, float("inf"))
    out: Outcome = field(default_factory=Outcome)

    def run(self) -> Outcome:
        self.rng = random.Random(self.seed)
        self.queue = deque(range(self.jobs))
        self.events: list[tuple[float, int, str, int]] = []
        self.seq = self.held = self.ours = self.api = 0
        self.now = self.rest_until = self.waking = 0.0
        self.out.band = self.band
        self._submit()
        while self.events:
            t, _, kind, job = heapq.heappop(self.events)
            self._account(t)
            self.now = t
            getattr(self, "_" + kind)(job)
            self._submit()
        self.out.makespan_s = self.now
        return self.out

    def _at(self, t: float, kind: str, job: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, job))

    def _account(self, t: float) -> None:
        if not self.queue:
            return
        dt, limit = t - self.now, self.limit.current
        self.out.busy_s += dt
        self.out.limit_s += dt * limit
        self.out.in_flight_s += dt * self.api
        self.out.lowest = min(self.out.lowest, limit)
        if self.band[0] <= limit <= self.band[1]:
            self.out.band_s += dt

    def _submit(self) -> None:
        if self.now < self.rest_until:
            if self.waking != self.rest_until:
                self.waking = self.rest_until
                self._at(self.rest_until, "wake_run", -1)
            return
        while self.queue and self.held < self.limit.current:
            self.held += 1
            self._post(self.queue.popleft())

    def _wake_run(self, job: int) -> None:
        pass  # the rest is over: _submit follows every event

    def _post(self, job: int) -> None:
        self._at(self.now + self.post_s / 2, "decide", job)

    def _decide(self, job: int) -> None:
        refused = self.refuse(self.api, self.now, self.rng)
        if not refused:
            self.api += 1
            sigma = math.sqrt(math.log(1 + self.gen_cv**2))
            took = self.gen_s * self.rng.lognormvariate(-(sigma**2) / 2, sigma)
            self._at(self.now + took, "finished", job)
        delay = self.rng.uniform(0.0, self.post_s)
        self._at(self.now + delay, "refused" if refused else "accepted", job)

    def _refused(self, job: int) -> None:
        self.out.refused += 1
        self.limit.on_rate_limited(self.now, self.ours)
        if self.rest:
            self.rest_until = max(self.rest_until, self.now + self.retry_after_s)
        self._at(self.now + self.retry_after_s, "retry", job)

    def _accepted(self, job: int) -> None:
        self.out.accepted += 1
        self.limit.on_success(self.ours)
        self.ours += 1

    def _retry(self, job: int) -> None:
        if self.held > self.limit.current:  # over the lowered limit: wait for a slot again
            self.held -= 1
            self.queue.appendleft(job)
        elif self.now < self.rest_until:
            self._at(self.rest_until, "retry", job)
        else:
            self._post(job)

    def _finished(self, job: int) -> None:
        self.api -= 1
        self._at(self.now + self.rng.uniform(0.0, self.poll_s), "seen", job)

    def _seen(self, job: int) -> None:
        self.ours -= 1
        self.held -= 1
