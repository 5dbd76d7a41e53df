"""Repeated request failures: the tally's lines for an outage, a stray failure, flaky requests."""

from __future__ import annotations

import logging
import re

import pytest

from veobatch.errors import (
    ApiError,
    DownloadError,
    NoAnswerError,
    NotFoundError,
    NotSentError,
    ProtocolError,
    RateLimitedError,
    ServerError,
)
from veobatch.outage import MAX_CAUSES, MAX_SAID, FailureTally, Note, OutageLog, failure_cause

W, INFO, D = logging.WARNING, logging.INFO, logging.DEBUG


def tally() -> FailureTally:
    return FailureTally("poll", "polls succeed again", "polling continues", window_s=30.0)


def fail(t: FailureTally, cause: str, now: float, level: int = W) -> tuple[bool, list[Note]]:
    return t.failed(cause, now, level)


def outage(t: FailureTally, start: float, end: float, per_s: int, causes: list[str]) -> list[Note]:
    """Failures at ``per_s`` a second from ``start`` to ``end``, the causes in turn; the lines
    said on the way, each failure's own line as a Note of its level."""
    notes: list[Note] = []
    n = int((end - start) * per_s)
    for i in range(n):
        cause = causes[i % len(causes)]
        full, due = fail(t, cause, start + i / per_s)
        notes.extend(due)
        if full:
            notes.append(Note(W, f"<{cause}>"))
    return notes


def test_a_stray_failure_is_its_own_line_and_nothing_more() -> None:
    t = tally()
    assert fail(t, "HTTP 503", 10.0) == (True, [])
    assert t.succeeded(10.5) == []
    assert t.flush(100.0) == [] and t.idle
    # Another one a while later is the first of a new outage: said in full again.
    assert fail(t, "HTTP 503", 50.0) == (True, [])


def test_a_total_outage_is_one_line_a_summary_a_window_and_its_end() -> None:
    t = tally()
    notes = outage(t, 0.0, 45.0, 100, ["HTTP 503", "HTTP 503", "HTTP 503", "no answer"])
    assert notes == [
        Note(W, "<HTTP 503>"),
        Note(W, "<no answer>"),
        Note(
            W,
            "poll failures window=30s failed=3000 succeeded=0: HTTP 503 ×2,250, no answer ×750;"
            " polling continues",
        ),
    ]
    assert t.succeeded(46.0) == [
        Note(W, "polls succeed again after=46s failed=4500: HTTP 503 ×3,375, no answer ×1,125")
    ]
    # Told: nothing more, at the next success or at the end.
    assert t.succeeded(46.1) == [] and t.flush(100.0) == []
    assert t.idle


def test_an_outage_shorter_than_a_window_ends_with_its_totals() -> None:
    t = tally()
    assert outage(t, 0.0, 10.0, 50, ["HTTP 502"]) == [Note(W, "<HTTP 502>")]
    assert t.succeeded(10.0) == [Note(W, "polls succeed again after=10s failed=500: HTTP 502 ×500")]
    assert t.flush(60.0) == []


def test_flaky_requests_get_a_summary_a_window_and_no_end_lines() -> None:
    # One poll in ten fails, for two minutes: one line, then a summary every 30 s.
    t = tally()
    said: list[Note] = []
    for i in range(1200):
        now = i / 10
        if i % 10 == 3:
            full, due = fail(t, "HTTP 500", now)
            said.extend(due)
            said.extend([Note(W, "<HTTP 500>")] if full else [])
        else:
            said.extend(t.succeeded(now))
    assert said[0] == Note(W, "<HTTP 500>")
    summaries = said[1:]
    assert len(summaries) == 3
    for n in summaries:  # 30 or 31 (a window ends at the first request after its 30 s)
        assert re.match(
            r"poll failures window=30s failed=3[01] succeeded=27[01]: HTTP 500 ×3[01];", n.text
        )
        assert n.text.endswith("; polling continues")
    assert not any("succeed again" in n.text for n in said)
    (last,) = t.flush(120.0)
    assert last.text.startswith("poll failures window=") and "continues" not in last.text


def test_the_end_of_the_run_tells_what_no_line_told() -> None:
    t = tally()
    outage(t, 0.0, 5.0, 10, ["HTTP 503"])
    assert t.flush(5.0) == [Note(W, "poll failures window=5s failed=50 succeeded=0: HTTP 503 ×50")]
    assert t.idle and t.succeeded(6.0) == []


def test_failures_said_in_full_need_no_summary() -> None:
    t = tally()
    assert fail(t, "HTTP 500", 0.0)[0] and fail(t, "HTTP 502", 1.0)[0]
    assert fail(t, "HTTP 503", 40.0) == (True, [])  # the window of two lines: nothing to add
    assert t.succeeded(41.0) == []


def test_a_window_left_open_is_summed_up_before_the_next_failure() -> None:
    t = tally()
    outage(t, 0.0, 2.0, 10, ["HTTP 503"])
    full, due = fail(t, "HTTP 503", 100.0)  # a new outage, and the old window told first
    assert full and due == [
        Note(W, "poll failures window=100s failed=20 succeeded=0: HTTP 503 ×20; polling continues")
    ]


def test_many_distinct_causes_are_capped() -> None:
    t = tally()
    fulls = [fail(t, f"cause {i}", i * 0.01)[0] for i in range(50)]
    assert sum(fulls) == MAX_SAID
    (line,) = t.flush(1.0)
    assert line.text.count("×") == MAX_CAUSES + 1 and "other ×" in line.text


def test_the_summary_is_at_the_level_of_the_lines_it_stands_for() -> None:
    t = tally()
    outage(t, 0.0, 1.0, 10, ["HTTP 429"])
    t2 = tally()
    for i in range(10):
        fail(t2, "HTTP 429", i * 0.1, INFO)
    assert [n.level for n in t.flush(2.0)] == [W]
    assert [n.level for n in t2.flush(2.0)] == [INFO]


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (ServerError("HTTP 503: busy, request id 8f2c", status=503), "HTTP 503"),
        (RateLimitedError("HTTP 429: slow down"), "HTTP 429"),
        (NotFoundError("HTTP 404: no such id", status=404), "HTTP 404"),
        (
            NoAnswerError("GET /v2/video/generations: no answer: ServerDisconnectedError: gone"),
            "no answer: ServerDisconnectedError",
        ),
        (
            NotSentError(
                "GET /v2/video/generations: could not connect: ClientConnectorError: Cannot"
                " connect to host 127.0.0.1:8830 ssl:default [Connect call failed]"
            ),
            "could not connect: ClientConnectorError",
        ),
        (NoAnswerError("read timeout"), "no answer"),
        (NoAnswerError("HTTP 408: timeout", status=408), "HTTP 408"),
        (ProtocolError("GET x: answer is not JSON: '<html>'"), "unreadable answer"),
        (ServerError("HTTP 5xx"), "ServerError"),
        (
            DownloadError("download interrupted after 4925 bytes: ClientPayloadError"),
            "download interrupted: ClientPayloadError",
        ),
        (DownloadError("truncated: got 10 of 200 bytes"), "truncated"),
        (DownloadError("video host too slow: 100 bytes in the last 30 s"), "video host too slow"),
        (
            DownloadError("incomplete MP4: the video host sent the 36748 bytes it announced, but"),
            "incomplete MP4",
        ),
        (
            DownloadError("cannot fetch video: ClientConnectorError: Cannot connect to host c:1"),
            "cannot fetch video: ClientConnectorError",
        ),
        (
            DownloadError("video host answered 403: the URL has expired or is refused"),
            "video host answered 403: the URL has expired or is refused",
        ),
        (
            DownloadError(
                "video host answered 400: the URL has expired or is refused (ExpiredToken:"
                " Request 5c2f expired)"
            ),
            "video host answered 400: the URL has expired or is refused",
        ),
        (DownloadError("video host answered 503"), "video host answered 503"),
        (DownloadError("video host answered 503 (busy: request 5c2f)"), "video host answered 503"),
    ],
)
def test_failure_causes_name_the_kind_never_the_instance(
    exc: ApiError | DownloadError, cause: str
) -> None:
    assert failure_cause(exc) == cause


def test_the_shell_logs_the_first_in_full_and_the_rest_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = logging.getLogger("veobatch.test_outage")
    failures = OutageLog(
        log, "poll", "polls succeed again", "polling continues", clock=lambda: now[0]
    )
    with caplog.at_level(logging.DEBUG, logger="veobatch"):
        for i in range(1000):
            now[0] = i * 0.04
            failures.failed(ServerError("HTTP 503", status=503), "poll failed job=%s: %s", i, "x")
        failures.succeeded()
    by_level = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno > D]
    assert by_level == [
        (W, "poll failed job=0: x"),
        (W, "poll failures window=30s failed=750 succeeded=0: HTTP 503 ×750; polling continues"),
        (W, "polls succeed again after=40s failed=1000: HTTP 503 ×1,000"),
    ]
    assert sum(r.levelno == D for r in caplog.records) == 999  # each job's line, with -v
