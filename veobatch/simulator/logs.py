"""The usage log behind ``GET /v2/logs`` (``logs-v2.json``): rows, query parsing, pages, and
the endpoint's rate limit.

Pure: the caller passes the current time, so the ``period`` filter and the sliding window are
tested without a clock.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

LogStatus = Literal["succeeded", "failed"]
LOG_STATUSES: tuple[LogStatus, ...] = ("succeeded", "failed")
MAX_WINDOW = timedelta(days=92)
MAX_MODELS = 50
_PERIOD = re.compile(r"([1-9][0-9]*)([hd])")
_INTEGER = re.compile(r"-?[0-9]+")


def iso_utc_ms(wall_s: float) -> str:
    """``2026-07-02T03:04:05.000Z``: the logs' own timestamp format."""
    moment = datetime.fromtimestamp(wall_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class LogRow:
    """One ``POST /v2/video/generations`` request, as the usage log reports it."""

    api_key: str
    created_wall_s: float
    status: LogStatus
    model: str
    usd: float
    credits: int
    request_id: str
    inference_id: str
    client_request_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "created": iso_utc_ms(self.created_wall_s),
            "status": self.status,
            "origin": "api",
            "model": self.model,
            "cost": {"usd": self.usd, "credits": self.credits},
            "tokens": {"input": 0, "output": 0, "total": 0},
            "request_id": self.request_id,
            "inference_id": self.inference_id,
            "client_request_id": self.client_request_id,
        }


class QueryInvalid(Exception):
    """The ``/v2/logs`` query string breaks the published rules (answered with 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class LogQuery:
    """A parsed ``/v2/logs`` query: an optional window, filters, and the page asked for."""

    since_s: float | None = None  # inclusive, Unix time
    until_s: float | None = None  # inclusive, Unix time
    models: frozenset[str] | None = None
    statuses: frozenset[str] | None = None
    limit: int = 50
    offset: int = 0


def _last(params: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in params if k == name]
    return values[-1] if values else None


def _parse_int(name: str, raw: str | None, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise QueryInvalid(f"{name} must be an integer, received {raw!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise QueryInvalid(f"{name} must be {bounds}, received {value}")
    return value


def _parse_instant(name: str, raw: str) -> float:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise QueryInvalid(f"{name} must be an ISO-8601 date-time, received {raw!r}") from None
    if moment.tzinfo is None:  # documented: a value without offset is UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_window(
    params: Sequence[tuple[str, str]], now_wall_s: float
) -> tuple[float | None, float | None]:
    period, start, end = (_last(params, n) for n in ("period", "start", "end"))
    if period is not None:
        if start is not None or end is not None:
            raise QueryInvalid("Provide either period or start and end, not both")
        match = _PERIOD.fullmatch(period)
        if match is None:
            raise QueryInvalid(f"period must look like 24h or 7d, received {period!r}")
        unit_s = 3600 if match.group(2) == "h" else 86400
        return now_wall_s - int(match.group(1)) * unit_s, None
    if start is None and end is None:
        return None, None
    if start is None or end is None:
        raise QueryInvalid("start and end must be given together")
    since_s, until_s = _parse_instant("start", start), _parse_instant("end", end)
    if until_s < since_s:
        raise QueryInvalid("end must not be earlier than start")
    if until_s - since_s > MAX_WINDOW.total_seconds():
        raise QueryInvalid("The window must not exceed 92 days")
    return since_s, until_s


def _parse_filters(
    params: Sequence[tuple[str, str]],
) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    models = [v for k, v in params if k == "model"]
    if len(models) > MAX_MODELS:
        raise QueryInvalid(f"At most {MAX_MODELS} model values are accepted")
    statuses = [v for k, v in params if k == "status"]
    for status in statuses:
        if status not in LOG_STATUSES:
            raise QueryInvalid(
                f"Invalid enum value. Expected 'succeeded' | 'failed', received '{status}'"
            )
    return (frozenset(models) or None), (frozenset(statuses) or None)


def parse_log_query(params: Sequence[tuple[str, str]], now_wall_s: float) -> LogQuery:
    """Read the query string pairs of ``GET /v2/logs``; :class:`QueryInvalid` when wrong.

    Without ``period`` or ``start``/``end`` every row is in the window (the documentation
    does not say what the real API does then)."""
    since_s, until_s = _parse_window(params, now_wall_s)
    models, statuses = _parse_filters(params)
    return LogQuery(
        since_s=since_s,
        until_s=until_s,
        models=models,
        statuses=statuses,
        limit=_parse_int("limit", _last(params, "limit"), 50, 1, 100),
        offset=_parse_int("offset", _last(params, "offset"), 0, 0, None),
    )


def _model_matches(model: str, wanted: frozenset[str]) -> bool:
    """``source/alias`` or the bare alias, each matched exactly (``logs-v2.json``)."""
    return model in wanted or model.partition("/")[2] in wanted


def _matches(row: LogRow, query: LogQuery) -> bool:
    return (
        (query.since_s is None or row.created_wall_s >= query.since_s)
        and (query.until_s is None or row.created_wall_s <= query.until_s)
        and (query.models is None or _model_matches(row.model, query.models))
        and (query.statuses is None or row.status in query.statuses)
    )


def log_page(rows: Sequence[LogRow], query: LogQuery) -> dict[str, Any]:
    """The answer body: matching rows newest first (later requests first on ties), one page."""
    newest_first = sorted(reversed(rows), key=lambda r: r.created_wall_s, reverse=True)
    matching = [r for r in newest_first if _matches(r, query)]
    page = matching[query.offset : query.offset + query.limit]
    return {
        "data": [r.to_json() for r in page],
        "pagination": {
            "limit": query.limit,
            "offset": query.offset,
            "total": len(matching),
            "has_more": query.offset + len(page) < len(matching),
        },
    }


class SlidingWindow:
    """At most ``limit`` calls per key in any ``window_s`` ("200 requests per 60 s").

    A refused call is not counted, so a client that waits as long as it is told gets in.
    ``limit`` 0 admits everything."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._calls: dict[str, deque[float]] = {}

    def admit(self, key: str, now: float) -> float | None:
        """None when the call may go ahead (it is then counted); else the seconds to wait."""
        if not self.limit:
            return None
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now - self.window_s:
            calls.popleft()
        if len(calls) >= self.limit:
            return calls[0] + self.window_s - now
        calls.append(now)
        return None
