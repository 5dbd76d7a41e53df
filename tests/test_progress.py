"""Progress views: the state counts, throughput and ETA, the live display and the cron line."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from rich.console import Console

from veobatch.progress import (
    DISPLAY_STATES,
    LiveProgress,
    LogProgress,
    ProgressView,
    Throughput,
    display_counts,
    fmt_duration,
    progress_line,
    progress_view,
    render,
)
from veobatch.runner import Snapshot

COUNTS = {"pending": 5, "submitting": 1, "submitted": 4, "completed": 2, "done": 7, "failed": 1}


def snap(elapsed_s: float = 30.0, counts: dict[str, int] | None = None, gen: int = 3) -> Snapshot:
    return Snapshot(20, dict(COUNTS if counts is None else counts), elapsed_s, 12, 40, gen)


def test_display_counts_split_submitted_by_what_the_api_said() -> None:
    c = display_counts(snap())
    assert tuple(c) == DISPLAY_STATES
    assert c == {
        "pending": 5,
        "submitted": 2,  # 1 submitting + 4 submitted - 3 generating
        "generating": 3,
        "downloading": 2,
        "done": 7,
        "failed": 1,
        "uncertain": 0,
    }
    assert sum(c.values()) == sum(COUNTS.values())


def test_throughput_over_a_sliding_window_and_eta() -> None:
    t = Throughput(window_s=60.0, min_span_s=5.0)
    t.add(0.0, 0)
    assert t.per_min() is None and t.eta_s(10) is None  # not enough to say
    t.add(30.0, 10)
    assert t.per_min() == pytest.approx(20.0)
    assert t.eta_s(10) == pytest.approx(30.0) and t.eta_s(0) == 0.0
    for second in range(31, 200):
        t.add(float(second), 10)  # nothing finishes for a while: the rate decays to zero
    assert t.per_min() == 0.0 and t.eta_s(10) is None


def test_throughput_and_eta_are_never_negative() -> None:
    # A job counted finished may be taken up again (a done one remade): "rate=-4.0/min eta=-60s"
    t = Throughput(window_s=60.0, min_span_s=5.0)
    t.add(0.0, 16)
    t.add(60.0, 12)
    assert t.per_min() == 0.0 and t.eta_s(8) is None
    line = progress_line(progress_view(snap(60.0), t))
    assert "rate=0.0/min eta=? " in line


def test_jobs_taken_up_again_are_not_counted_finished() -> None:
    # 4 failed in an earlier run, submitted again by this one: not finished yet.
    s = replace(snap(counts={"done": 16, "failed": 4}), reopened=4)
    assert s.finished == 16


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "?"), (4.4, "4s"), (65, "1m05s"), (3725, "1h02m")]
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


def view() -> ProgressView:
    t = Throughput()
    t.add(0.0, 0)
    return progress_view(snap(60.0), t)


def test_progress_line_is_greppable() -> None:
    line = progress_line(view())
    assert line.startswith("progress finished=8/20 pending=5 submitted=2 generating=3 ")
    assert "downloading=2 done=7 failed=1 uncertain=0 rate=8.0/min eta=1m30s" in line
    assert line.endswith("elapsed=1m00s polls=40")


def test_render_shows_states_rates_and_latest_problems() -> None:
    console = Console(record=True, width=110, color_system=None)
    console.print(render(view(), ["01:02:03 error failed job=x kind=timeout"], 4))
    text = console.export_text()
    assert "8/20 finished (40%)" in text
    for word in ("pending 5", "generating 3", "downloading 2", "done 7", "failed 1"):
        assert word in text
    assert "throughput 8.0/min" in text and "ETA 1m30s" in text
    assert "latest problems (4 so far):" in text and "failed job=x" in text


def test_live_display_collects_problems_and_mutes_the_console_log() -> None:
    console = Console(record=True, width=100, force_terminal=True)
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    log = logging.getLogger("veobatch")
    with LiveProgress(console, mute=handler) as live:
        assert handler.level > logging.CRITICAL
        log.warning("download retry job=a in 1.0s: reset")
        live(snap())
    assert handler.level == logging.INFO
    assert "download retry job=a" in console.export_text()


def test_log_progress_writes_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "veobatch")
    lp = LogProgress(interval_s=3600)
    lp(snap(1.0))
    assert not caplog.records  # not yet a minute
    lp(replace(snap(2.0, {"done": 20}), final=True))  # the end is always reported
    assert [r.getMessage().split()[:2] for r in caplog.records] == [["progress", "finished=20/20"]]


def test_log_progress_stays_quiet_while_everything_counts_as_finished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Done jobs being re-fetched and failed ones re-polled count as finished: a run can sit at
    # 20/20 for an hour, observed every 0.5 s. One line a minute, and one at the end.
    caplog.set_level(logging.INFO, "veobatch")
    now = [1000.0]
    lp = LogProgress(interval_s=60.0, clock=lambda: now[0])
    for tick in range(1, 2 * 3600 + 1):  # an hour of 0.5 s ticks
        now[0] = 1000.0 + tick * 0.5
        lp(snap(tick * 0.5, {"done": 18, "failed": 2}))
    lp(replace(snap(3600.5, {"done": 20}), final=True))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 61 and all(line.startswith("progress finished=20/20") for line in lines)
    assert lines[-1].startswith("progress finished=20/20 ") and "done=20" in lines[-1]
