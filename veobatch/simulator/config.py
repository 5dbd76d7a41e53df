"""Settings of the simulator and the few facts about the real API it imitates.

The prices are not published by the API (see the shared README); they live here, beside the
simulator's other defaults, and not in ``veobatch.catalogue``, so a mistake on either side is
caught by the other when the client's cost estimate is compared with what the simulator charges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .faults import Faults

CREDITS_PER_USD = 2_000_000
STANDARD_USD_PER_S = 0.40
FAST_USD_PER_S = 0.15
# Used when a request carries no ``duration``: the schemas' documented default.
DEFAULT_DURATION_S = 8


@dataclass(frozen=True)
class SimConfig:
    """How the simulated API behaves; the defaults make a quick but realistic run."""

    api_keys: frozenset[str] | None = None  # None: any non-empty Bearer token is accepted
    gen_time_mean_s: float = 3.0  # lognormal generation time, mean
    gen_time_spread: float = 0.3  # coefficient of variation of that lognormal
    queued_fraction: float = 0.2  # first part of a generation's time is "queued"
    seed: int = 0  # makes durations reproducible
    video_mode: Literal["faithful", "tiny"] = "faithful"  # tiny: 160x90, 1 s, 8 fps
    video_fps: int = 24
    faults: Faults = field(default_factory=Faults)
    state_dir: Path | None = None  # journal (and video port) kept here for a restarted client
    blob_dir: Path | None = None  # files served as-is at <cdn_url>/blobs/<name> (benchmarks)
    # GET /v2/logs per key, in any sliding window: the documented 200 per 60 s (0 = no limit)
    logs_rate_limit: int = 200
    logs_rate_window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.gen_time_mean_s < 0 or self.gen_time_spread < 0:
            raise ValueError("gen_time_mean_s and gen_time_spread must not be negative")
        if not 0.0 <= self.queued_fraction <= 1.0:
            raise ValueError("queued_fraction must be between 0 and 1")
        if self.video_fps < 1:
            raise ValueError("video_fps must be at least 1")
        if self.logs_rate_limit < 0 or self.logs_rate_window_s <= 0:
            raise ValueError("logs_rate_limit must not be negative, logs_rate_window_s positive")
        if self.video_mode not in ("faithful", "tiny"):
            raise ValueError(f"unknown video_mode {self.video_mode!r}")


def usd_per_second(model: str) -> float:
    """Assumed price of one second of video: the ``-fast`` variants are cheaper."""
    return FAST_USD_PER_S if model.endswith("-fast") else STANDARD_USD_PER_S


def price(model: str, duration_s: int) -> tuple[float, int]:
    """What a generation of ``duration_s`` seconds costs, as (usd, credits)."""
    usd = round(usd_per_second(model) * duration_s, 6)
    return usd, round(usd * CREDITS_PER_USD)
