"""Generations, their timing and the counters the simulator keeps (pure, no I/O).

A generation's whole life is fixed when it is created: it is ``queued`` for the first
``queued_fraction`` of its drawn duration, then ``generating``, then ``completed``. Its status is
computed from the clock whenever someone asks, so no background task runs per generation and a
test moves a generation along by moving a fake clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from .validation import VideoRequest

Status = Literal["queued", "generating", "completed", "error"]
FINISHED: frozenset[str] = frozenset({"completed", "error"})
# How the odd_statuses fault may show a generation that is still running: the two statuses the
# official examples treat as running, one nobody documents, and "completed" while the video is
# not there yet (no video, or a video without its url).
OddShape = Literal["waiting", "active", "processing", "completed_no_video", "completed_no_url"]
ODD_SHAPES: tuple[OddShape, ...] = (
    "waiting",
    "active",
    "processing",
    "completed_no_video",
    "completed_no_url",
)


def lognormal_params(mean_s: float, spread: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal whose mean is ``mean_s`` and coefficient of variation
    ``spread``."""
    sigma2 = math.log1p(spread * spread)
    return math.log(mean_s) - sigma2 / 2, math.sqrt(sigma2)


def draw_duration_s(rng: random.Random, mean_s: float, spread: float) -> float:
    """One generation time; ``spread`` 0 (or a zero mean) gives exactly the mean."""
    if spread == 0 or mean_s == 0:
        return mean_s
    mu, sigma = lognormal_params(mean_s, spread)
    return rng.lognormvariate(mu, sigma)


@dataclass
class Generation:
    """One accepted video request and everything observed about it since."""

    id: str
    model: str
    body: dict[str, Any]  # the request body as received
    request: VideoRequest
    api_key_sha: str  # a digest of the key that created it; the key itself is never kept
    created_at: float  # clock seconds
    created_wall_s: float  # Unix time of creation
    duration_s: float  # how long the simulated generation takes
    queued_s: float  # the first part of duration_s, spent "queued"
    client_request_id: str | None
    file_token: str  # the secret path segment of its video URL
    file_name: str  # "<uuid>.mp4"
    usd: float
    credits: int
    fails: bool = False  # ends in "error" instead of "completed" (fault injection)
    request_id: str = ""  # the create request's id in the usage logs
    polls: int = 0
    detected_at: float | None = None  # clock time of the first poll that saw it completed
    downloaded_at: float | None = None  # clock time the first whole download was served

    @property
    def completes_at(self) -> float:
        return self.created_at + self.duration_s

    def status_at(self, now: float) -> Status:
        if now >= self.completes_at:
            return "error" if self.fails else "completed"
        if now < self.created_at + self.queued_s:
            return "queued"
        return "generating"

    def charge_at(self, now: float) -> tuple[float, int]:
        """What has been billed by ``now``, as (usd, credits): the price once completed, and
        nothing before that or ever for a generation that ends in error (README: "the charge is
        recorded after the generation completes"; an error is "not billed")."""
        if self.status_at(now) == "completed":
            return self.usd, self.credits
        return 0.0, 0


def odd_fetch_body(gen: Generation, shape: OddShape, video_s: float) -> dict[str, Any]:
    """A fetch answer for a still-running ``gen`` that a careful client must read as running."""
    body: dict[str, Any] = {"id": gen.id, "video": None, "error": None, "meta": None}
    if shape == "completed_no_video":
        return body | {"status": "completed"}
    if shape == "completed_no_url":
        return body | {"status": "completed", "video": {"duration": video_s}}
    return body | {"status": shape}


def fetch_body(gen: Generation, now: float, video_url: str, video_s: float) -> dict[str, Any]:
    """The answer to ``GET /v2/video/generations`` for ``gen`` at time ``now``."""
    status = gen.status_at(now)
    if status == "error":
        error = {"name": "GenerationError", "message": "the simulated generation failed"}
        return {"id": gen.id, "status": status, "video": None, "error": error, "meta": None}
    if status != "completed":
        return {"id": gen.id, "status": status, "video": None, "error": None, "meta": None}
    # fetch-video.json names the usage figure tokens_used, the create schema credits_used.
    usage = {"credits_used": gen.credits, "tokens_used": gen.credits}
    return {
        "id": gen.id,
        "status": status,
        "video": {"url": video_url, "duration": video_s},
        "duration": video_s,
        "error": None,
        "meta": {"usage": usage},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class SimStats:
    """Counters of what clients did; ``summary()`` is what ``GET /_sim/stats`` returns."""

    creates_ok: int = 0
    creates_rejected: int = 0  # 400s
    creates_unauthorized: int = 0
    unauthorized: int = 0  # 401s on any API route
    polls: int = 0
    downloads: int = 0
    cdn_requests: int = 0
    cdn_auth_headers_seen: int = 0
    logs_requests: int = 0
    rate_limited: int = 0  # 429s answered
    out_of_credits: int = 0  # creates answered 403
    odd_statuses: int = 0  # polls answered with an odd status (fault injection)
    expired_urls: int = 0  # CDN requests refused for an expired URL
    truncated_downloads: int = 0
    stalled_polls: int = 0  # polls held back stall_s before their answer (fault injection)
    # the generations a poll saw finished, in the order they were first seen so
    detected: list[Generation] = field(default_factory=list)

    def record_poll(self, gen: Generation, now: float) -> None:
        self.polls += 1
        gen.polls += 1
        if gen.detected_at is None and gen.status_at(now) in FINISHED:
            gen.detected_at = now
            self.detected.append(gen)

    def summary(self) -> dict[str, Any]:
        """Counts and means, JSON-serialisable. Polls per completed generation count every poll
        of the generations some poll saw completed, including polls after that one."""
        lags = [g.detected_at - g.completes_at for g in self.detected if g.detected_at is not None]
        polls_done = [float(g.polls) for g in self.detected]
        return {
            "creates_ok": self.creates_ok,
            "creates_rejected": self.creates_rejected,
            "creates_unauthorized": self.creates_unauthorized,
            "unauthorized": self.unauthorized,
            "polls": self.polls,
            "downloads": self.downloads,
            "cdn_requests": self.cdn_requests,
            "cdn_auth_headers_seen": self.cdn_auth_headers_seen,
            "logs_requests": self.logs_requests,
            "rate_limited": self.rate_limited,
            "out_of_credits": self.out_of_credits,
            "odd_statuses": self.odd_statuses,
            "expired_urls": self.expired_urls,
            "truncated_downloads": self.truncated_downloads,
            "stalled_polls": self.stalled_polls,
            "generations_detected": len(lags),
            "mean_polls_per_completed": _mean(polls_done),
            "mean_detection_lag_s": _mean(lags),
            "max_detection_lag_s": max(lags) if lags else None,
        }
