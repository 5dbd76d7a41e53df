"""The run summary cron mails, its JSON twin, and what `status` says a rerun would do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from veobatch.jobs import Job
from veobatch.ledger import ErrorInfo, JobState
from veobatch.outcome import RunExtras, run_extras
from veobatch.runner import RunReport
from veobatch.summary import (
    WEBHOOK_LIST_LIMIT,
    abort_doc,
    recovered_line,
    rerun_action,
    rerun_summary,
    run_summary,
    status_rows,
    summary_doc,
)

OUT = Path("out/nightly")


def report() -> RunReport:
    return RunReport(
        out_dir=OUT,
        counts={"done": 3, "failed": 1, "uncertain": 1},
        failed=[("b", ErrorInfo("generation_error", "policy: blocked"))],
        uncertain=["c"],
        pending=[],
        submitted=4,
        polls=20,
        elapsed_s=61.0,
        estimated_usd=3.6,
        estimated_jobs=4,
        reported_usd=3.2,
        reported_jobs=3,
    )


EXTRAS = RunExtras(4, [("a", ["duration: 4.0 s, requested 8 s"])], OUT / "report.html")


def test_summary_lines_carry_what_needs_attention() -> None:
    lines = run_summary(report(), 5, EXTRAS)
    assert lines[0].startswith("veobatch: 5 jobs: 3 done, 1 failed, 1 uncertain")
    assert "  b: generation_error: policy: blocked" in lines
    assert "  c: sent, and the run stopped before the usage logs settled it" in lines
    assert "videos that differ from their request: 1" in lines
    assert "  a: duration: 4.0 s, requested 8 s" in lines
    assert (
        "spend: about $3.60 estimated for 4 creates this run that may be billed; "
        "the API reported $3.20 for 3 of them"
    ) in lines
    assert lines[-2:] == [
        "output: out/nightly (results.json, ledger.jsonl)",
        "report: out/nightly/report.html",
    ]
    # An uncertain job says why: "not in the usage logs" only when the logs said so.
    unread = JobState(
        "c", "uncertain", error=ErrorInfo("no_answer", "the usage logs could not be read")
    )
    looked = replace(report(), states={"c": unread})
    assert "  c: the usage logs could not be read" in run_summary(looked, 5, EXTRAS)
    nothing = replace(report(), estimated_jobs=0, reported_jobs=0)
    assert not any("spend" in line for line in run_summary(nothing, 5))  # nothing submitted


def test_the_first_line_counts_held_back_jobs_when_there_are_any() -> None:
    assert "held back" not in run_summary(report(), 5)[0]
    held = replace(report(), over_budget=["d", "e"], cost_limit_usd=4.0)
    assert run_summary(held, 7)[0].startswith(
        "veobatch: 7 jobs: 3 done, 1 failed, 1 uncertain, 0 not finished, 2 held back (4 "
    )


def test_abort_doc_says_why_and_nothing_else() -> None:
    line = "veobatch: another veobatch run is working on x"
    doc = abort_doc("nightly.yaml", OUT, 75, line, interrupted=False)
    assert doc["text"] == (
        "veobatch: nightly.yaml: run aborted (exit 75): another veobatch run is working on x"
    )
    assert doc["event"] == "veobatch.run.aborted" and doc["exit_code"] == 75
    assert doc["interrupted"] is False and doc["error"].startswith("another veobatch run")
    assert abort_doc("n.yaml", OUT, 75, "veobatch: interrupted by SIGTERM", interrupted=True)[
        "interrupted"
    ]


@pytest.mark.parametrize(
    ("adopted", "unrecorded", "why"),
    [
        (2, 0, "answers lost in transit"),
        (
            4,
            4,
            "their ids not on record: the run that sent them stopped before recording the"
            " answers, in a crash or on a failed ledger write",
        ),
        (
            3,
            2,
            "1 answer lost in transit; 2 ids not on record: the run that sent them stopped"
            " before recording the answers, in a crash or on a failed ledger write",
        ),
    ],
)
def test_recovered_generations_say_why_they_were_not_on_record(
    adopted: int, unrecorded: int, why: str
) -> None:
    # A run stopped by a full disk after its POSTs were answered lost no answer in transit.
    line = f"recovered {adopted} generations from the usage logs ({why})"
    assert recovered_line(adopted, unrecorded) == line
    done = replace(report(), adopted=adopted, adopted_unrecorded=unrecorded)
    assert line in run_summary(done, 5)
    assert summary_doc(done, 5)["adopted_unrecorded"] == unrecorded


def test_summary_doc_is_the_same_facts_as_json() -> None:
    doc = summary_doc(report(), 5, EXTRAS)
    assert doc["exit_code"] == 1 and doc["total"] == 5 and doc["counts"]["done"] == 3
    assert doc["failed"] == [{"id": "b", "kind": "generation_error", "message": "policy: blocked"}]
    assert doc["uncertain"] == ["c"] and doc["report"] == "out/nightly/report.html"
    assert doc["flagged"] == [{"id": "a", "flags": ["duration: 4.0 s, requested 8 s"]}]
    assert doc["spend_usd_estimate"] == 3.6 and doc["generations_created"] == 4
    assert doc["spend_usd_reported"] == 3.2 and doc["spend_reported_jobs"] == 3


def test_videos_gone_and_not_fetched_again_are_said_and_fail_nothing() -> None:
    # An archive emptied every night: the ids settled gone earlier are counted, not listed
    # again each night; those found so tonight are listed with why.
    gone = [f"j{i}" for i in range(500)]
    r = replace(
        report(),
        failed=[],
        uncertain=[],
        gone=gone,
        gone_now=[("j0", "the API no longer has it")],
        not_refetched=[("k", "k.mp4 is missing and fetching it again failed")],
    )
    assert r.exit_code == 0
    lines = run_summary(r, 600)
    assert lines[0].startswith("veobatch: 600 jobs: 3 done (500 of them gone), 1 failed")
    i = lines.index(
        "videos delivered earlier whose file is missing, not fetched again (no failure; the next"
        " run tries again, at no charge): 1"
    )
    assert lines[i + 1] == "  k: k.mp4 is missing and fetching it again failed"
    assert lines[i + 2].startswith("videos gone: delivered earlier") and lines[i + 2].endswith(
        ": 1"
    )
    assert lines[i + 3] == "  j0: the API no longer has it"
    assert lines[i + 4].startswith("499 more videos gone since earlier runs")
    doc = summary_doc(r, 600)
    assert doc["gone_count"] == 500 and len(doc["gone"]) == WEBHOOK_LIST_LIMIT
    assert doc["not_refetched"] == [
        {"id": "k", "message": "k.mp4 is missing and fetching it again failed"}
    ]


def test_summary_doc_lists_at_most_a_hundred_of_each_with_whole_counts() -> None:
    held = [f"j{i}" for i in range(20_000)]
    big = replace(report(), over_budget=held, pending=held[:150], gave_up="429 for 30 min")
    doc = summary_doc(big, 20_005, EXTRAS)
    assert doc["over_budget"] == held[:WEBHOOK_LIST_LIMIT] and doc["over_budget_count"] == 20_000
    assert len(doc["not_finished"]) == 100 and doc["not_finished_count"] == 150
    assert doc["failed_count"] == 1 and doc["uncertain_count"] == 1 and doc["flagged_count"] == 1
    assert doc["gave_up"] == "429 for 30 min"
    assert len(json.dumps(doc)) < 10_000


def test_run_extras_counts_only_this_runs_generations() -> None:
    jobs = [
        Job("a", {"model": "google/veo-3.1-t2v-fast", "prompt": "x", "duration": 4}),
        Job("b", {"model": "google/veo-3.1-t2v", "prompt": "y"}),
        Job("c", {"model": "google/veo-3.1-t2v", "prompt": "z"}),
    ]
    states = {
        "a": JobState("a", "done", generation_id="g", submitted_at=1000.0, flags=["audio: x"]),
        "b": JobState("b", "failed", generation_id="h", submitted_at=1000.5),
        "c": JobState("c", "done", generation_id="i", submitted_at=10.0),  # an earlier run's
    }
    extras = run_extras(states, jobs, started_wall=1000.2)
    assert extras.generations == 2
    assert extras.flagged == [("a", ["audio: x"])]


def failed(kind: str, gen: str | None = "g") -> JobState:
    return JobState("j", "failed", generation_id=gen, error=ErrorInfo(kind, "m"))


@pytest.mark.parametrize(
    ("state", "flags", "action", "why"),
    [
        (JobState("j"), {}, "submit", "new"),
        (JobState("j", "submitted", generation_id="g"), {}, "poll", "in flight"),
        (
            JobState("j", "completed", generation_id="g", video_url="https://v"),
            {},
            "download",
            "completed",
        ),
        (JobState("j", "done", file="gone.mp4", bytes=1), {}, "refetch", "missing"),
        (failed("generation_error"), {}, "hold", "failed"),
        (failed("generation_error"), {"retry_failed": True}, "submit", "--retry-failed"),
        (failed("timeout"), {}, "poll", "polling its generation again"),
        (JobState("j", "submitting"), {}, "lookup", "usage logs"),
        (JobState("j", "uncertain"), {}, "lookup", "left uncertain"),
        (JobState("j", "uncertain"), {"resubmit_uncertain": True}, "lookup", "may pay twice"),
    ],
)
def test_what_a_rerun_would_do(
    tmp_path: Path, state: JobState, flags: dict[str, bool], action: str, why: str
) -> None:
    got = rerun_action(state, tmp_path, **flags)
    assert got[0] == action and why in got[1], got


def test_a_done_job_with_its_file_is_skipped_even_with_a_recorded_key(tmp_path: Path) -> None:
    (tmp_path / "j.mp4").write_bytes(b"x" * 10)
    mtime = (tmp_path / "j.mp4").stat().st_mtime_ns
    st = JobState("j", "done", key="k", file="j.mp4", bytes=10, sha256="s", mtime_ns=mtime)
    assert rerun_action(st, tmp_path) == ("skip", "done")
    assert (
        rerun_summary([("skip", ""), ("poll", ""), ("skip", "")]) == "a rerun would: 2 skip, 1 poll"
    )


def _dawn_then_dusk() -> tuple[Job, Job]:
    """A job as it was sent, and as its manifest reads after an edit."""
    old = Job("a", {"model": "google/veo-3.1-t2v", "prompt": "dawn", "duration": 8})
    return old, Job("a", {**old.request, "prompt": "dusk"})


def test_plan_counts_the_new_request_an_edited_in_flight_job_will_be_remade_with() -> None:
    # "would submit nothing: no cost" while the run then paid for the edited request.
    from veobatch.scheduler import Action, JobPlan
    from veobatch.summary import plan_summary

    old, edited = _dawn_then_dusk()
    flying = JobState("a", "submitted", key=old.key, generation_id="g1")
    plans = [JobPlan(edited, Action.POLL, "in flight", flying)]
    assert plan_summary(plans)[2] == "would submit 1 generation, about $3.20 (estimated; see below)"
    held = plan_summary(plans, {}, 1.0)[-1]
    assert held.startswith("cost limit $1.00: 1 job (about $3.20) held back: a")


def test_plan_counts_the_new_request_of_an_edited_job_whose_post_is_looked_up() -> None:
    # Found by the look-up, the generation is fetched and the edit made after it; never
    # created, the edit is sent: plan said "would submit nothing" and the run paid for it.
    from veobatch.scheduler import Action, JobPlan
    from veobatch.summary import plan_summary

    old, edited = _dawn_then_dusk()
    unknown = JobState("a", "uncertain", key=old.key, client_request_id="vb:a:1:x")
    plans = [JobPlan(edited, Action.LOOKUP, "submission outcome unknown", unknown)]
    assert plan_summary(plans)[2] == "would submit 1 generation, about $3.20 (estimated; see below)"
    plans = [JobPlan(old, Action.LOOKUP, "submission outcome unknown", unknown)]
    assert plan_summary(plans)[2] == "would submit nothing: no cost"


def test_the_summary_cron_mails_keeps_an_api_message_on_its_own_line() -> None:
    # A failure's message, a 403's body: none may forge a line ("veobatch: 7 jobs: 7 done"),
    # colour a terminal, or turn its text around (U+202E).
    forged = "blocked\nveobatch: 5 jobs: 5 done\x1b[31m\u202e"
    failed = [("b", ErrorInfo("generation_error", forged))]
    lines = run_summary(replace(report(), failed=failed, auth_error="HTTP 403: no\rcredits"), 5)
    assert "  b: generation_error: blocked\\nveobatch: 5 jobs: 5 done\\x1b[31m\\u202e" in lines
    assert "stopped submitting: HTTP 403: no\\rcredits" in lines
    assert not any(line.startswith("veobatch: 5 jobs: 5 done") for line in lines)


def test_status_rows_stay_one_line_whatever_the_api_said() -> None:
    # `veobatch status | grep | cut` reads one job per line: a generation id or an error
    # message holding a line break must not make two.
    results = {
        "jobs": [
            {
                "id": "a",
                "status": "failed",
                "model": "google/veo-3.1-t2v",
                "generation_id": "gen\nb\tdone",
                "error": {"kind": "generation_error", "message": "blocked\r\n\x1b[31mred"},
            }
        ]
    }
    (row,) = status_rows(results)
    assert row[3] == "gen\\nb\\tdone"
    assert "\n" not in "\t".join(row) and "\x1b" not in row[4]


def test_status_says_an_uncertain_crash_absent_from_the_logs_is_submitted_again() -> None:
    crash = JobState("j", "uncertain", error=ErrorInfo("crash", "the usage logs could not be read"))
    assert (
        "once they show a later request (or an hour after it was made): submitted again"
        in (rerun_action(crash, OUT)[1])
    )
    unanswered = replace(crash, error=ErrorInfo("no_answer", "sent, unanswered"))
    assert "left uncertain" in rerun_action(unanswered, OUT)[1]
