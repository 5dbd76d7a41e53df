"""Fault injection: what the simulated API gets wrong on purpose, each with a rate.

All draws come from one seeded generator, so a failing run can be replayed exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Faults:
    """Rates are probabilities per request (0 = never). Defaults inject nothing."""

    seed: int = 0
    create_429: float = 0.0  # 429 with Retry-After
    create_429_bare: float = 0.0  # 429 without Retry-After
    max_concurrent: int = 0  # per key; a create over it is answered 429 (0 = no cap)
    credits_for: int = 0  # per key: creates paid for; every further create is a 403 (0 = no end)
    create_5xx_before: float = 0.0  # 500/502/503, nothing created (logged as failed)
    create_5xx_after: float = 0.0  # the generation is created, then a 500 is answered
    create_drop_before: float = 0.0  # connection dropped, nothing created, nothing logged
    create_drop_after: float = 0.0  # the generation is created, then the connection drops
    poll_5xx: float = 0.0
    poll_429: float = 0.0
    poll_stall: float = 0.0  # a poll is answered only after stall_s: a hung request
    stall_s: float = 120.0  # how long a stalled poll is held (or until the simulator stops)
    # a running generation is reported as waiting, active, an unknown status, or completed
    # without a video URL (never once it has really finished)
    odd_statuses: float = 0.0
    generation_error: float = 0.0  # the generation ends with status "error"
    truncate_download: float = 0.0  # the body stops halfway, connection dropped
    url_ttl_s: float = 0.0  # video URLs expire this long after being handed out (0 = never)
    logs_delay_s: float = 0.0  # a request shows up in /v2/logs only after this long
    retry_after_s: float = 1.0  # what 429s say in Retry-After

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"fault {f.name} must not be negative")
            if f.type == "float" and not f.name.endswith("_s") and value > 1:
                raise ValueError(f"fault rate {f.name} must be between 0 and 1")

    @classmethod
    def parse(cls, specs: list[str], seed: int = 0) -> Faults:
        """From ``NAME=VALUE`` strings, as the CLI takes them."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {"seed": seed}
        for spec in specs:
            name, sep, raw = spec.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ValueError(f"unknown fault {spec!r}; known: {', '.join(known)}")
            values[name] = int(raw) if known[name] == "int" else float(raw)
        return cls(**values)  # type: ignore[arg-type]


class Dice:
    """The seeded source of every fault decision."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def choice(self, options: Sequence[T]) -> T:
        return self._rng.choice(options)
