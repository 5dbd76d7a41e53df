"""The runner against the simulator's contract-level faults, over real loopback HTTP: running out
of credits mid-run, and generations reported with statuses a careful client must read as running."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import anyio
import av
from run_helpers import CANARY, fast_settings, mixed_manifest

from veobatch.ledger import load_states
from veobatch.session import run
from veobatch.simulator import Faults, SimConfig, Simulator


def quick(faults: Faults, state_dir: Path | None = None) -> SimConfig:
    return SimConfig(
        api_keys=frozenset({CANARY}),
        gen_time_mean_s=0.4,
        gen_time_spread=0.3,
        video_mode="tiny",
        faults=faults,
        state_dir=state_dir,
    )


def submissions_per_job(out: Path) -> Counter[str]:
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return Counter(r["job"] for r in map(json.loads, lines) if r["ev"] == "submitted")


async def test_out_of_credits_stops_submitting_and_a_rerun_finishes(tmp_path: Path) -> None:
    m = mixed_manifest(8, tmp_path)
    out, state = tmp_path / "out", tmp_path / "sim-state"
    async with Simulator(quick(Faults(credits_for=3), state)) as sim:
        report = await run(m, fast_settings(out, sim.base_url))
        assert sim.stats.creates_ok == 3 and sim.stats.out_of_credits >= 1
    assert report.exit_code == 3 and report.auth_error and "credits" in report.auth_error
    assert report.counts == {"done": 3, "pending": 5} and not report.failed
    paid = set(submissions_per_job(out))
    assert len(paid) == 3

    # Topped up: the same simulator state, no credit limit any more.
    async with Simulator(quick(Faults(), state)) as sim:
        again = await run(m, fast_settings(out, sim.base_url))
        assert sim.stats.creates_ok == 5
    assert again.exit_code == 0 and again.counts == {"done": 8}
    per_job = submissions_per_job(out)
    assert per_job == {job.id: 1 for job in m.jobs}  # the first 3 were not created again


async def test_odd_statuses_are_read_as_running_and_every_job_finishes(tmp_path: Path) -> None:
    m = mixed_manifest(8, tmp_path)
    out = tmp_path / "out"
    async with Simulator(quick(Faults(seed=5, odd_statuses=0.3))) as sim:
        report = await run(m, fast_settings(out, sim.base_url))
        odd = sim.stats.odd_statuses
        assert sim.stats.creates_ok == 8
    assert odd > 0  # the fault did strike
    assert report.exit_code == 0 and report.counts == {"done": 8}, report
    states = load_states(out)
    for job in m.jobs:
        st = states[job.id]
        assert st.file is not None
        with av.open(str(out / st.file)) as container:
            assert container.streams.video, job.id


async def test_logs_lagging_past_the_grace_never_make_a_5xx_pay_twice(tmp_path: Path) -> None:
    # Usage logs 1.5 s behind, a grace of 0.2 s: absence was taken for "never created" and
    # each create answered 5xx after creating was made again (2,131 creates for 2,000 jobs in
    # a soak with logs 90 s late). Absence now counts only in logs that show later requests.
    m = mixed_manifest(16, tmp_path)
    out = tmp_path / "out"
    faults = Faults(seed=3, create_5xx_after=0.3, logs_delay_s=1.5)
    async with Simulator(quick(faults)) as sim:
        settings = fast_settings(out, sim.base_url, logs_grace_s=0.2, lookup_interval_s=0.1)
        report = await run(m, settings)
        created = sim.stats.creates_ok
    assert created == 16, f"{created} generations created for 16 jobs"
    assert report.adopted >= 3  # the fault did strike, and each was found in the logs
    assert report.exit_code == 0 and report.counts == {"done": 16}
    assert report.risked_duplicates == 0


async def test_jobs_the_usage_logs_proved_unsent_are_not_uncertain_after_running_out(
    tmp_path: Path,
) -> None:
    # Creates refused with a 5xx before anything is made (logged as failed), then out of
    # credits: every look-up settles its job as never created, some while their resubmission
    # waits out its backoff when the 403 comes. None "may have been billed".
    m = mixed_manifest(16, tmp_path)
    out = tmp_path / "out"
    faults = Faults(seed=3, credits_for=6, create_5xx_before=0.4)
    async with Simulator(quick(faults)) as sim:
        s = fast_settings(out, sim.base_url, concurrency=8, backoff_base_s=0.5, backoff_max_s=2.0)
        report = await run(m, s)
        assert sim.stats.creates_ok == 6 and sim.stats.out_of_credits >= 1
    assert report.exit_code == 3 and report.uncertain == [], report.states
    assert report.counts == {"done": 6, "pending": 10}
    assert report.estimated_jobs == 6  # the creates refused are not counted as maybe billed


async def test_hung_polls_are_asked_again_soon_not_after_the_request_timeout(
    tmp_path: Path,
) -> None:
    # 2 % of polls hanging held the 64 poll workers for the 60 s request timeout each: mean
    # detection lag 26.9 s for 3 s generations. A poll has a short timeout of its own, and a
    # hung one is no failure: the job finishes, polled again.
    m = mixed_manifest(8, tmp_path)
    out = tmp_path / "out"
    async with Simulator(quick(Faults(seed=3, poll_stall=0.3, stall_s=3600))) as sim:
        s = fast_settings(out, sim.base_url, poll_timeout_s=0.3)
        assert s.request_timeout_s == 60  # what a hung poll waited for until now
        with anyio.fail_after(30):
            report = await run(m, s)
        stalled, answered = sim.stats.stalled_polls, sim.stats.polls
    assert stalled > 0  # the fault did strike
    assert report.exit_code == 0 and report.counts == {"done": 8}, report
    assert report.polls == answered + stalled  # each hung poll was given up, none answered
