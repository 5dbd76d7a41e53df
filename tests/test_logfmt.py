"""Log formats: messages split into event, fields and detail; JSON lines for collectors."""

from __future__ import annotations

import json
import logging

import pytest

from veobatch.logfmt import JsonFormatter, Parsed, formatter, parse_message


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        ("submitted job=a gen=g-1", Parsed("submitted", {"job": "a", "gen": "g-1"})),
        (
            "failed job=j1 kind=timeout: not finished after 1800s",
            Parsed("failed", {"job": "j1", "kind": "timeout"}, "not finished after 1800s"),
        ),
        (
            "done job=a file=a.mp4 bytes=123",
            Parsed("done", {"job": "a", "file": "a.mp4", "bytes": 123}),
        ),
        (
            "poll failed job=a attempt=2 retry_in=0.4s: HTTP 500: boom",
            Parsed("poll_failed", {"job": "a", "attempt": 2, "retry_in": "0.4s"}, "HTTP 500: boom"),
        ),
        (
            "poll failures window=30s failed=6000 succeeded=0: HTTP 503 ×6,000; polling continues",
            Parsed(
                "poll_failures",
                {"window": "30s", "failed": 6000, "succeeded": 0},
                "HTTP 503 ×6,000; polling continues",
            ),
        ),
        (
            "polls succeed again after=40s failed=8000: HTTP 503 ×8,000",
            Parsed("polls_succeed_again", {"after": "40s", "failed": 8000}, "HTTP 503 ×8,000"),
        ),
        (
            "429 from the API in_flight=3: concurrency lowered to 3",
            Parsed("429_from_the_api", {"in_flight": 3}, "concurrency lowered to 3"),
        ),
        (
            "adopted job=x gen=y (from the usage logs)",
            Parsed("adopted", {"job": "x", "gen": "y"}, "(from the usage logs)"),
        ),
        (
            "video differs job=a: duration: 1.0 s",
            Parsed("video_differs", {"job": "a"}, "duration: 1.0 s"),
        ),
        (
            "simulator listening on http://h (videos on c)",
            Parsed("simulator_listening", {}, "simulator listening on http://h (videos on c)"),
        ),
        ("", Parsed("log")),
    ],
)
def test_parse_message(message: str, parsed: Parsed) -> None:
    assert parse_message(message) == parsed


def record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("veobatch.runner", level, __file__, 1, msg, args, None)


def test_json_lines() -> None:
    line = JsonFormatter().format(record("failed job=%s kind=%s: %s", "j1", "lost", "gone"))
    doc = json.loads(line)
    assert "\n" not in line
    assert doc["level"] == "error" and doc["event"] == "failed" and doc["job"] == "j1"
    assert doc["fields"] == {"kind": "lost"} and doc["detail"] == "gone"
    assert doc["message"] == "failed job=j1 kind=lost: gone"
    assert doc["ts"].endswith("Z") and doc["ts"][10] == "T"


def test_json_lines_carry_tracebacks() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("veobatch", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    doc = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in doc["exc"] and doc["event"] == "oops"


def test_text_lines_are_timestamped_and_greppable() -> None:
    line = formatter("text").format(record("done job=%s file=%s", "a", "a.mp4", level=logging.INFO))
    stamp, level, rest = line.split(" ", 2)
    assert len(stamp) == 19 and stamp[10] == "T" and level == "INFO"
    assert rest == "done job=a file=a.mp4"


def test_a_value_from_the_api_cannot_forge_a_text_line() -> None:
    # A generation id with a line break wrote a second, forged line ("INFO done job=fake")
    # and an ESC sequence into the log cron users grep.
    forged = "ab\n2026-11-21T00:00:00 INFO done job=fake file=x\x1b[31m"
    line = formatter("text").format(record("submitted job=%s gen=%s", "a", forged))
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith("gen=ab\\n2026-11-21T00:00:00 INFO done job=fake file=x\\x1b[31m")
