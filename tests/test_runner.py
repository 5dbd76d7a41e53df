"""The runner with an in-memory API and a local video host: limits, resume, stops, exit codes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from fifos import fifo_at
from local_server import serve
from mp4s import FTYP, box, mp4
from run_helpers import dead_host

import veobatch.poller as poller_module
from veobatch.client import Created, Generation, LogEntry, LogPage
from veobatch.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    LedgerError,
    LockedError,
    NoAnswerError,
    NotFoundError,
    NotSentError,
    ProtocolError,
    RateLimitedError,
    ServerError,
)
from veobatch.fsutil import DirLock, ensure_dir
from veobatch.jobs import Job, Manifest, request_key, variant_seed
from veobatch.jobview import compact_request
from veobatch.ledger import (
    ErrorInfo,
    JobState,
    Ledger,
    ResultsWriter,
    load_states,
    parse_journal,
    restore_fields,
)
from veobatch.manifest import parse_manifest
from veobatch.poller import OTHER_KEY_NOT_FOUND, Tracked
from veobatch.runner import (
    MAX_URL_REFRESHES,
    RunReport,
    generation_owners,
    resume_terms,
    timed_out_reason,
)
from veobatch.scheduler import KEPT_AS_FOUND
from veobatch.session import run
from veobatch.settings import PollSettings, RunSettings, Secret
from veobatch.summary import run_summary

MP4 = mp4(b"\x01" * 5000)


@pytest.fixture
async def cdn() -> AsyncIterator[str]:
    async def video(request: web.Request) -> web.Response:
        assert "Authorization" not in request.headers
        return web.Response(body=MP4, content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    async with serve(app) as base:
        yield base


class FakeApi:
    """Generations finish after a fixed number of polls; tracks how many are in flight."""

    def __init__(self, cdn: str, polls_to_finish: int = 2, fail: set[str] | None = None) -> None:
        self.cdn = cdn
        self.polls_to_finish = polls_to_finish
        self.fail = fail or set()
        self.created: list[str] = []
        self.polls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.create_error: Exception | None = None
        self.error_after_create = False
        self.errors_left = 10**9  # how many creates fail before they work
        self.log: list[LogEntry] = []
        self.hide_from_logs = False
        self.sent_at: list[float] = []  # time.monotonic() of each create
        self.cap = 0  # a create while this many are in flight is refused with a 429 (0: none)
        self.cap_retry_after_s: float | None = None
        self.refused = 0  # creates refused by the cap

    def _maybe_clear(self) -> None:
        self.errors_left -= 1
        if self.errors_left <= 0:
            self.create_error = None

    async def logs(self, **kw: Any) -> LogPage:
        rows = [] if self.hide_from_logs else list(reversed(self.log))
        offset, limit = kw["offset"], kw["limit"]
        return LogPage(rows[offset : offset + limit], offset + limit < len(rows))

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        self.sent_at.append(time.monotonic())
        if self.cap and self.in_flight >= self.cap:
            self.refused += 1
            self.log.append(LogEntry(client_request_id, None, "failed"))
            raise RateLimitedError(
                "HTTP 429: Concurrency limit reached", retry_after_s=self.cap_retry_after_s
            )
        error = self.create_error
        if error is not None and not self.error_after_create:
            self.log.append(LogEntry(client_request_id, None, "failed"))
            self._maybe_clear()
            raise error
        gen = f"g{len(self.created)}-{body['prompt']}"
        self.created.append(gen)
        self.log.append(LogEntry(client_request_id, gen, "succeeded"))
        self.polls[gen] = 0
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if error is not None:  # created, but the answer is lost
            self._maybe_clear()
            raise error
        return Created(gen, "queued")

    async def fetch(self, generation_id: str) -> Generation:
        self.polls[generation_id] += 1
        if self.polls[generation_id] < self.polls_to_finish:
            return Generation(generation_id, "generating")
        if self.polls[generation_id] == self.polls_to_finish:
            self.in_flight -= 1
        if any(generation_id.endswith("-" + p) for p in self.fail):
            return Generation(generation_id, "error", error_name="Safety", error_message="no")
        return Generation(generation_id, "completed", video_url=f"{self.cdn}/v/{generation_id}.mp4")


async def seed_intents(
    tmp: Path, intents: list[tuple[Job, str]], *, key: Secret | None = None, gen: str | None = None
) -> None:
    """The ledger a crash right after these intents (job, client request id) leaves behind;
    sent with ``key`` (its fingerprint recorded), and answered with ``gen`` if given."""
    ledger = Ledger.open(ensure_dir(tmp / "out"))
    acct = {"acct": key.fingerprint()} if key is not None else {}
    for job, crid in intents:
        await ledger.record("intent", job.id, crid=crid, key=job.key, model=job.model, **acct)
        if gen is not None:
            await ledger.record("submitted", job.id, gen=gen)
    ledger.close()


def seed_uncertain(
    tmp: Path,
    job: Job,
    kind: str,
    message: str,
    *,
    now: float,
    posted_s_ago: float = 3600.0,
    uncertain_s_ago: float = 3599.0,
) -> str:
    """A ledger an earlier run left with ``job`` uncertain (by default a second after its
    POST, an hour ago); returns the request id its intent recorded."""
    crid = f"vb:{job.id}:1:abc"
    lines = [
        {
            "t": now - posted_s_ago,
            "ev": "intent",
            "job": job.id,
            "crid": crid,
            "key": job.key,
            "model": job.model,
        },
        {
            "t": now - uncertain_s_ago,
            "ev": "uncertain",
            "job": job.id,
            "kind": kind,
            "message": message,
        },
    ]
    ensure_dir(tmp / "out")
    (tmp / "out" / "ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return crid


def manifest(n: int, tmp: Path) -> Manifest:
    jobs = tuple(
        Job(f"job{i}", {"model": "google/veo-3.1-t2v", "prompt": f"p{i}"}, i) for i in range(n)
    )
    return Manifest(tmp / "m.yaml", jobs)


def settings(tmp: Path, **kw: Any) -> RunSettings:
    fast = PollSettings(
        first_delay_s=0,
        min_interval_s=0.001,
        max_interval_s=0.005,
        growth=0,
        error_backoff_max_s=0.01,
    )
    # A plain-http loopback API base is what lets the loopback video host through.
    base = RunSettings(
        out_dir=tmp / "out",
        base_url="http://127.0.0.1:1",
        concurrency=3,
        poll=fast,
        backoff_base_s=0,
        logs_grace_s=0,
        lookup_interval_s=0.01,
        backoff_max_s=0,
    )
    return replace(base, **kw)


async def test_runs_every_job_under_the_concurrency_limit(cdn: str, tmp_path: Path) -> None:
    api = FakeApi(cdn, polls_to_finish=3)
    report = await run(manifest(20, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 20}
    assert len(api.created) == 20
    assert api.max_in_flight == 3  # saturated, never exceeded
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"job{i}.mp4" for i in range(20))
    assert not list(out.glob("*.part"))
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"]["done"] == 20 and doc["summary"]["total"] == 20
    row = doc["jobs"][0]
    assert row["status"] == "done" and row["file"] == "job0.mp4" and row["bytes"] == len(MP4)
    assert row["generation_id"].startswith("g") and row["error"] is None


async def test_rerun_sends_nothing(cdn: str, tmp_path: Path) -> None:
    m = manifest(5, tmp_path)
    await run(m, settings(tmp_path), api=FakeApi(cdn))
    api = FakeApi(cdn)
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and api.created == [] and api.polls == {}


async def stopped_mid_flight(m: Manifest, tmp: Path, cdn: str) -> tuple[list[str], FakeApi]:
    """Run ``m`` until interrupted with generations in flight; return them, and an API that
    knows them and finishes each at its next poll (the API a rerun meets)."""
    api = FakeApi(cdn, polls_to_finish=10_000)  # nothing finishes: interrupt mid-flight
    with anyio.move_on_after(0.3):
        await run(m, settings(tmp), api=api)
    first = list(api.created)
    again = FakeApi(cdn, polls_to_finish=1)
    again.polls = dict.fromkeys(first, 0)
    again.created = list(first)
    return first, again


async def test_resume_polls_recorded_generations_instead_of_paying(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(4, tmp_path)
    first, api2 = await stopped_mid_flight(m, tmp_path, cdn)
    assert len(first) == 3  # the limit held
    report = await run(m, settings(tmp_path), api=api2)
    assert report.exit_code == 0
    assert len(api2.created) == 4  # only the never-submitted job was paid for
    assert set(api2.created[:3]) == set(first)


async def test_a_job_removed_from_the_manifest_mid_flight_is_still_fetched_never_resubmitted(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = manifest(4, tmp_path)
    first, api2 = await stopped_mid_flight(m, tmp_path, cdn)
    assert len(first) == 3
    gone = next(j for j in m.jobs if first[0].endswith("-" + j.request["prompt"]))
    shorter = replace(m, jobs=tuple(j for j in m.jobs if j.id != gone.id))
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(shorter, settings(tmp_path), api=api2)
    assert report.exit_code == 0 and report.counts == {"done": 4} and report.total == 4
    assert len(api2.created) == 4  # only the never-submitted job was paid for
    assert api2.polls[first[0]] == 1  # the removed job's paid generation was followed
    assert (tmp_path / "out" / f"{gone.id}.mp4").read_bytes() == MP4
    assert "1 job in the ledger is not in the manifest: 1 with a generation paid for" in caplog.text
    api3 = FakeApi(cdn)
    report = await run(shorter, settings(tmp_path), api=api3)  # done: nothing more for it
    assert report.exit_code == 0 and api3.created == [] and api3.polls == {}
    assert report.counts == {"done": 3}


async def test_a_job_edited_mid_flight_is_finished_then_made_as_it_now_reads(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(2, tmp_path)
    first, api2 = await stopped_mid_flight(m, tmp_path, cdn)
    assert len(first) == 2
    edited = Job("job0", {"model": "google/veo-3.1-t2v", "prompt": "p0 at dusk"}, 0)
    report = await run(replace(m, jobs=(edited, m.jobs[1])), settings(tmp_path), api=api2)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    assert api2.created[2:] == ["g2-p0 at dusk"]  # the current request, made in the same run
    assert all(api2.polls[g] == 1 for g in first)  # the paid ones were followed, not dropped
    out = tmp_path / "out"
    ledger = Ledger.open(out)
    st = ledger.state("job0")
    ledger.close()
    assert st.key == edited.key and st.generation_id == "g2-p0 at dusk"
    kept = [p.name for p in out.glob("job0@*.mp4")]
    assert len(kept) == 1 and (out / "job0.mp4").exists()  # the first video kept beside it
    api3 = FakeApi(cdn)
    again = await run(replace(m, jobs=(edited, m.jobs[1])), settings(tmp_path), api=api3)
    assert again.exit_code == 0 and api3.created == []


async def test_a_job_in_flight_whose_request_is_only_written_otherwise_is_made_once(
    cdn: str, tmp_path: Path
) -> None:
    # Its provider default written out while it was in flight: the same video, so it is
    # finished and kept as it is, never made a second time nor its video put aside.
    m = manifest(2, tmp_path)
    first, api2 = await stopped_mid_flight(m, tmp_path, cdn)
    assert len(first) == 2
    respelled = Job("job0", {**m.jobs[0].request, "provider": "AUTO", "duration": 8}, 0)
    report = await run(replace(m, jobs=(respelled, m.jobs[1])), settings(tmp_path), api=api2)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    assert api2.created == first and not list((tmp_path / "out").glob("job0@*"))


async def test_a_video_made_before_its_job_was_edited_is_checked_against_what_it_was_made_for(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The host's video is 1920x1080, 8 s: what the job asked when it was sent. The job now asks
    # 720p; its old video is still what was paid for, not one that "differs from its request".
    old = manifest(1, tmp_path).jobs[0]
    edited = Job("job0", {**old.request, "resolution": "720p"}, 0)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    req = compact_request(old.request)
    await ledger.record("intent", "job0", crid="c0", key=old.key, model=old.model, req=req)
    await ledger.record("submitted", "job0", gen="g0-p0")
    ledger.close()
    api = FakeApi(cdn, polls_to_finish=1)
    api.created, api.polls = ["g0-p0"], {"g0-p0": 0}
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(Manifest(tmp_path / "m.yaml", (edited,)), settings(tmp_path), api=api)
    assert report.exit_code == 0 and api.created == ["g0-p0", "g1-p0"]  # then made anew
    journal = (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()
    first, remade = [r for r in map(json.loads, journal) if r["ev"] == "done"]
    assert first["video"]["height"] == 1080 and not first.get("flags")
    # The remake is checked against the request it was made for: the host's video is not it.
    assert remade["flags"] == ["resolution: 1920×1080, requested 1280×720"]
    differs = [r.getMessage() for r in caplog.records if "video differs" in r.getMessage()]
    assert differs == ["video differs job=job0: resolution: 1920×1080, requested 1280×720"]


class OldGenerationFails(FakeApi):
    """The generation ``g-old`` never delivers, as ``how`` says; any other finishes."""

    def __init__(self, cdn: str, how: str, after_s: float = 0.0) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.how = how
        self.after_s = after_s  # each poll of it answered that late

    async def fetch(self, generation_id: str) -> Generation:
        if generation_id != "g-old":
            return await super().fetch(generation_id)
        self.polls[generation_id] = self.polls.get(generation_id, 0) + 1
        await anyio.sleep(self.after_s)
        if self.how == "lost":
            raise BadRequestError("HTTP 400: no such generation", status=400)
        if self.how == "url_rejected":  # a video URL veobatch refuses to fetch
            return Generation(generation_id, "completed", video_url="ftp://cdn.example/old.mp4")
        return Generation(generation_id, "queued")  # lost in the API's queue: never finishes


async def seed_old_generation(tmp: Path, old: Job, failed: str | None) -> None:
    """An earlier run's ledger: ``old`` submitted as ``g-old``, and failed as ``failed``."""
    await seed_intents(tmp, [(old, "vb:job0:1:old")], gen="g-old")
    if failed is not None:
        ledger = Ledger.open(tmp / "out")
        await ledger.record("failed", old.id, kind=failed, message="an earlier night's")
        ledger.close()


@pytest.mark.parametrize(
    ("earlier", "how"),
    [(None, "timeout"), ("timeout", "url_rejected"), ("url_rejected", "lost"), ("lost", "timeout")],
)
async def test_an_edited_job_whose_earlier_generation_fails_is_made_as_it_now_reads(
    cdn: str, tmp_path: Path, earlier: str | None, how: str
) -> None:
    # Re-polled for the old request and failed again: the edit was never made, in that run or
    # any later one (each night polled the old generation, failed it, and exited 1).
    old = manifest(1, tmp_path).jobs[0]
    edited = Job("job0", {"model": "google/veo-3.1-t2v", "prompt": "p0 at dusk"}, 0)
    await seed_old_generation(tmp_path, old, earlier)
    m = Manifest(tmp_path / "m.yaml", (edited,))
    api = OldGenerationFails(cdn, how)
    report = await run(m, settings(tmp_path, job_timeout_s=0.2), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert api.polls["g-old"] >= 1 and api.created == ["g0-p0 at dusk"]
    st = report.states["job0"]
    assert st.key == edited.key and st.generation_id == "g0-p0 at dusk"
    recs = parse_journal((tmp_path / "out" / "ledger.jsonl").read_bytes()).records
    # The old one's failure is on disk before the new intent: a crash between the two polls
    # the old one again, then makes the new one; after the intent, the new one is followed.
    fail_at = max(i for i, r in enumerate(recs) if r["ev"] == "failed")
    assert recs[fail_at]["kind"] == how and recs[fail_at + 1]["ev"] == "intent"
    assert recs[fail_at + 1]["key"] == edited.key
    again = await run(m, settings(tmp_path), api=api)
    assert again.exit_code == 0 and api.created == ["g0-p0 at dusk"]


@pytest.mark.parametrize("held", ["cost limit", "401"])
async def test_an_edited_job_whose_remake_is_held_back_pays_nothing(
    cdn: str, tmp_path: Path, held: str
) -> None:
    old, other = manifest(2, tmp_path).jobs
    edited = Job("job0", {"model": "google/veo-3.1-t2v", "prompt": "p0 at dusk"}, 0)
    await seed_old_generation(tmp_path, old, "timeout")
    m = Manifest(tmp_path / "m.yaml", (edited, other))
    api = OldGenerationFails(cdn, "url_rejected", after_s=0.2)
    s = settings(tmp_path)
    if held == "401":  # the other job's create meets it first: no more submissions
        api.create_error, api.errors_left = AuthError("HTTP 401: bad key", status=401), 1
    else:
        s = replace(s, max_cost_usd=0.0)
    report = await run(m, s, api=api)
    assert api.created == [] and api.polls["g-old"] == 1
    if held == "401":
        assert report.exit_code == 3 and report.failed[0][0] == "job0"
    else:
        assert report.over_budget == ["job0", "job1"] and report.exit_code == 1
    st = report.states["job0"]  # the old one is still on record, for a later run to poll
    assert st.error is not None and (st.status, st.error.kind) == ("failed", "url_rejected")
    assert st.generation_id == "g-old" and st.key == old.key


class Stuck(FakeApi):
    """Generations ``stuck`` never finish (or answer 404, ``gone``); any other finishes."""

    def __init__(self, cdn: str, stuck: set[str], gone: bool = False) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.stuck = stuck
        self.gone = gone

    async def fetch(self, generation_id: str) -> Generation:
        self.polls[generation_id] = self.polls.get(generation_id, 0) + 1
        if generation_id not in self.stuck:
            self.polls[generation_id] -= 1
            return await super().fetch(generation_id)
        if self.gone:
            raise NotFoundError("HTTP 404: Generation not found", status=404)
        return Generation(generation_id, "generating")


async def seed_stuck(
    tmp: Path, jobs: tuple[Job, ...], s_ago: float, kind: str | None, key: Secret | None = None
) -> None:
    """An earlier night's ledger: each job submitted ``s_ago`` seconds ago as ``g-<id>``, then
    failed as ``kind`` (None: still submitted, a crash); sent with ``key``, if given."""
    then = time.time() - s_ago
    ledger = Ledger.open(ensure_dir(tmp / "out"), clock=lambda: then)
    acct = {"acct": key.fingerprint()} if key is not None else {}
    for job in jobs:
        crid = f"vb:{job.id}:1:x"
        await ledger.record("intent", job.id, crid=crid, key=job.key, model=job.model, **acct)
        await ledger.record("submitted", job.id, gen=f"g-{job.id}")
        if kind is not None:
            await ledger.record("failed", job.id, kind=kind, message="an earlier night's")
    ledger.close()


@pytest.mark.parametrize("kind", ["timeout", "lost", None])
async def test_generations_stuck_since_an_earlier_night_hold_no_slot(
    cdn: str, tmp_path: Path, kind: str | None
) -> None:
    # Reviewer D3a: generations that never finish were re-polled each night with a whole new
    # job timeout, holding every slot: the new jobs waited that long before the first create.
    m = manifest(6, tmp_path)
    old = m.jobs[:3]  # as many as the concurrency
    await seed_stuck(tmp_path, old, s_ago=3600, kind=kind)
    api = Stuck(cdn, stuck={f"g-{j.id}" for j in old})
    report = await run(m, settings(tmp_path, job_timeout_s=1.0), api=api)
    assert report.counts == {"done": 3, "failed": 3} and len(api.created) == 3
    assert all(api.polls[f"g-{j.id}"] >= 1 for j in old)  # polled again all the same
    recs = parse_journal((tmp_path / "out" / "ledger.jsonl").read_bytes()).records
    tonight = [r for r in recs if r["t"] > time.time() - 600]
    first_intent = next(i for i, r in enumerate(tonight) if r["ev"] == "intent")
    first_failed = next(i for i, r in enumerate(tonight) if r["ev"] == "failed")
    assert first_intent < first_failed  # the new jobs did not wait for them


@pytest.mark.parametrize(
    ("status", "kind", "age_s", "terms"),
    [
        ("submitted", None, 100, (True, 1700)),  # a crash tonight: in flight, the rest of its time
        ("submitted", None, 1750, (True, 180)),  # nearly out of time: a few polls all the same
        ("submitted", None, 7200, (False, 180)),  # a crash long ago
        ("failed", "timeout", 600, (True, 1200)),
        ("failed", "timeout", 26 * 3600, (False, 180)),  # an earlier night's: no slot, briefly
        ("failed", "lost", 26 * 3600, (False, 180)),
        ("failed", "other_key", 26 * 3600, (False, 180)),
        ("failed", "download", 26 * 3600, (False, 1800)),  # finished: polled for a fresh URL
        ("done", None, 26 * 3600, (False, 1800)),  # a refetch, as before
    ],
)
def test_how_long_a_generation_followed_again_is_polled_and_whether_it_holds_a_slot(
    status: str, kind: str | None, age_s: float, terms: tuple[bool, float]
) -> None:
    st = JobState("j", status=status, generation_id="g")
    if kind is not None:
        st.error = ErrorInfo(kind, "earlier")
    assert resume_terms(st, age_s, RunSettings(out_dir=Path("out"))) == terms


async def test_a_generation_stuck_past_the_limit_is_abandoned_and_remade_only_on_request(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Stuck for two days: polled once more (one that finished meanwhile is collected), then no
    # more; it fails as needing a person, and --retry-failed makes it anew.
    m = manifest(2, tmp_path)
    await seed_stuck(tmp_path, m.jobs, s_ago=49 * 3600, kind="timeout")
    api = Stuck(cdn, stuck={"g-job0"})
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(m, settings(tmp_path, job_timeout_s=0.2), api=api)
    assert report.states["job1"].status == "done" and api.created == []
    ((jid, error),) = report.failed
    assert (jid, error.kind) == ("job0", "abandoned") and report.exit_code == 1
    assert error.message.startswith("generation g-job0 not finished 49 h after submission")
    assert "no longer polled: --retry-failed submits the job again (a new charge)" in error.message
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert said == [f"failed job=job0 kind=abandoned: {error.message}"]
    assert "job0: abandoned: generation g-job0" in "\n".join(run_summary(report, 2))
    polls = api.polls["g-job0"]
    again = await run(m, settings(tmp_path), api=api)
    assert again.exit_code == 1 and api.polls["g-job0"] == polls and api.created == []
    retried = await run(m, settings(tmp_path, retry_failed=True), api=api)
    assert retried.exit_code == 0 and api.created == ["g0-p0"]


KEY_A, KEY_B = Secret("key-AAAA-1111-old"), Secret("key-BBBB-2222-new")


@pytest.mark.parametrize("kind", [None, "timeout"])
async def test_a_generation_another_key_created_fails_other_key_after_a_few_404s(
    cdn: str, tmp_path: Path, kind: str | None
) -> None:
    # Reviewer R12b: the key rotated while generations were in flight. Every poll of them is a
    # 404, which never meets the lost rule: polled to the job timeout, failed `timeout` with
    # no word of the key, then abandoned, and --retry-failed paid for them again.
    m = manifest(1, tmp_path)
    await seed_stuck(tmp_path, m.jobs, s_ago=49 * 3600, kind=kind, key=KEY_A)
    api = Stuck(cdn, stuck={"g-job0"}, gone=True)
    s = settings(tmp_path, api_key=KEY_B, job_timeout_s=2.0)
    report = await run(m, s, api=api)
    ((_, error),) = report.failed
    assert error.kind == "other_key" and api.polls["g-job0"] == OTHER_KEY_NOT_FOUND
    assert error.message.startswith(
        "the API key changed: generation g-job0 was created with another API key"
        f" (fingerprint {KEY_A.fingerprint()}; this run's is {KEY_B.fingerprint()}), and the"
        " API answers 404 (unknown generation) to this key: 3 polls in a row: HTTP 404"
    )
    again = await run(m, replace(s, retry_failed=True), api=api)
    assert api.created == [] and again.failed[0][1].kind == "other_key"
    assert api.polls["g-job0"] == 2 * OTHER_KEY_NOT_FOUND  # polled again, never remade


async def test_a_generation_another_key_created_is_never_abandoned(
    cdn: str, tmp_path: Path
) -> None:
    # Recorded in flight, never failed `other_key` (its key's polls went unanswered, say):
    # stuck past abandon_after_s, it was abandoned, and --retry-failed would pay again.
    m = manifest(2, tmp_path)
    await seed_stuck(tmp_path, m.jobs[:1], s_ago=49 * 3600, kind="timeout", key=KEY_A)
    await seed_stuck(tmp_path, m.jobs[1:], s_ago=49 * 3600, kind="timeout", key=KEY_B)
    api = Stuck(cdn, stuck={"g-job0", "g-job1"})
    report = await run(m, settings(tmp_path, api_key=KEY_B, job_timeout_s=0.2), api=api)
    assert sorted((j, e.kind) for j, e in report.failed) == [
        ("job0", "timeout"),
        ("job1", "abandoned"),  # this key's own: as before
    ]


async def test_a_generation_still_unknown_when_polled_again_stays_lost(
    cdn: str, tmp_path: Path
) -> None:
    # Too few 404s tonight to judge it lost again: still lost, not a timeout, so
    # --retry-failed still makes it anew.
    m = manifest(1, tmp_path)
    await seed_stuck(tmp_path, m.jobs, s_ago=3600, kind="lost")
    api = Stuck(cdn, stuck={"g-job0"}, gone=True)
    report = await run(m, settings(tmp_path, job_timeout_s=0.2), api=api)
    ((_, error),) = report.failed
    assert error.kind == "lost" and error.message.startswith("the API still does not know it")


async def test_generation_error_fails_the_job_and_exit_1(cdn: str, tmp_path: Path) -> None:
    report = await run(manifest(3, tmp_path), settings(tmp_path), api=FakeApi(cdn, fail={"p1"}))
    assert report.exit_code == 1
    assert [(j, e.kind) for j, e in report.failed] == [("job1", "generation_error")]
    assert "Safety: no" in report.failed[0][1].message
    assert report.counts == {"done": 2, "failed": 1}


async def test_a_create_answered_with_an_error_fails_the_job_with_the_apis_words(
    cdn: str, tmp_path: Path
) -> None:
    class RefusedAtOnce(FakeApi):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            made = await super().create(body, client_request_id=client_request_id)
            if body["prompt"] != "p1":
                return made
            return Created(made.generation_id, "error", None, "ContentPolicy", "blocked at once")

    api = RefusedAtOnce(cdn)
    report = await run(manifest(3, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 2, "failed": 1}
    ((jid, error),) = report.failed
    assert jid == "job1" and error.kind == "generation_error"
    assert error.message == "ContentPolicy: blocked at once"
    assert api.polls[next(g for g in api.created if g.endswith("-p1"))] == 0  # nothing to poll
    assert report.estimated_jobs == 2  # an error is not billed: its estimate is given back


async def test_auth_error_stops_submitting_and_exits_3(cdn: str, tmp_path: Path) -> None:
    api = FakeApi(cdn)
    api.create_error = AuthError("HTTP 403: no credits", status=403)
    report = await run(manifest(10, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 3 and "no credits" in (report.auth_error or "")
    assert report.counts == {"pending": 10}
    assert api.created == []


async def test_the_stop_on_a_refusal_is_said_once_in_its_own_words(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every job in flight hears the 403: it was logged once per job, each time calling an
    # account out of credits "the API refused the key".
    api = FakeApi(cdn)
    api.create_error = AuthError("HTTP 403: no credits", status=403)
    with caplog.at_level(logging.ERROR, logger="veobatch"):
        report = await run(manifest(10, tmp_path), settings(tmp_path, concurrency=5), api=api)
    stops = [r.getMessage() for r in caplog.records if "no new submissions" in r.getMessage()]
    assert stops == ["the API refused the request: HTTP 403: no credits; no new submissions"]
    assert report.auth_error == "the API refused the request: HTTP 403: no credits"


class CreditsRunOut(FakeApi):
    """Out of credits: the jobs named in ``answers`` get those answers, every other create a 403
    (logged as failed) once they all have; the usage logs are read only after that 403, so
    their look-ups settle jobs after the run stopped submitting."""

    def __init__(self, cdn: str, answers: dict[str, Exception | None]) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.answers = answers  # by prompt: how that job's first POST is answered
        self.refused = anyio.Event()
        self.answered = anyio.Event()  # every job in ``answers`` has had its answer
        if not answers:
            self.answered.set()

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        if body["prompt"] not in self.answers:
            await self.answered.wait()  # the 403 comes after every answer above
            self.log.append(LogEntry(client_request_id, None, "failed"))
            self.refused.set()
            raise AuthError("HTTP 403: Insufficient credits", status=403)
        error = self.answers.pop(body["prompt"])
        if not self.answers:
            self.answered.set()
        if isinstance(error, ServerError):  # refused before creating anything: logged failed
            self.log.append(LogEntry(client_request_id, None, "failed"))
            raise error
        created = await super().create(body, client_request_id=client_request_id)
        if error is not None:  # created, and the answer lost
            raise error
        return created

    async def logs(self, **kw: Any) -> LogPage:
        await self.refused.wait()
        await anyio.sleep(0.2)  # time for the run to hear the 403 (it gets there either way)
        return await super().logs(**kw)


async def test_jobs_the_usage_logs_settled_after_a_403_are_reported_as_what_they_are(
    cdn: str, tmp_path: Path
) -> None:
    # job0's POST met a 502 the logs show failed, job1's a lost answer the logs show created;
    # job2 is refused 403 (out of credits). The look-ups settle both after the stop: job0 was
    # never created (pending, not billed), job1 is fetched. Neither "may have been billed".
    answers: dict[str, Exception | None] = {
        "p0": ServerError("HTTP 502: bad gateway", status=502),
        "p1": NoAnswerError("read timeout"),
    }
    api = CreditsRunOut(cdn, answers)
    # A resubmission's backoff of up to 1000 s: a run that no longer submits must not wait it.
    slow = {"backoff_base_s": 1000.0, "backoff_max_s": 1000.0}
    s = settings(tmp_path, concurrency=3, max_cost_usd=100.0, **slow, **PRICED)
    with anyio.fail_after(60):
        report = await run(manifest(3, tmp_path), s, api=api)
    assert report.exit_code == 3 and "credits" in (report.auth_error or "")
    assert report.uncertain == [] and report.adopted == 1
    assert report.counts == {"pending": 2, "done": 1}
    assert report.pending == ["job0", "job2"] and len(api.created) == 1
    assert report.estimated_jobs == 1  # only job1's generation may be billed
    lines = run_summary(report, report.total)
    assert not any(line.startswith("uncertain") for line in lines)


async def test_a_crash_the_usage_logs_proved_unsent_is_pending_after_a_403(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(2, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-never-sent")])
    api = CreditsRunOut(cdn, {})
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 3 and report.uncertain == [] and api.created == []
    assert report.counts == {"pending": 2}
    assert load_states(tmp_path / "out")["job0"].status == "pending"


async def test_a_risked_resubmission_a_403_stopped_stays_uncertain(
    cdn: str, tmp_path: Path
) -> None:
    # Unanswered and absent from the logs: with --resubmit-uncertain it would be sent again,
    # but the 403 stops that. Its first POST may still exist: uncertain, never pending.
    api = CreditsRunOut(cdn, {"p0": NoAnswerError("read timeout")})
    api.hide_from_logs = True
    s = settings(tmp_path, concurrency=2, resubmit_uncertain=True)
    report = await run(manifest(2, tmp_path), s, api=api)
    assert report.exit_code == 3 and report.uncertain == ["job0"]
    assert report.counts == {"uncertain": 1, "pending": 1}


async def test_an_api_base_that_redirects_stops_the_run_and_keeps_the_key(
    tmp_path: Path,
) -> None:
    reached: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.headers.get("Authorization"))
        return web.json_response({"id": "g1", "status": "queued"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    async with serve(other) as other_base:

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPPermanentRedirect(other_base + request.path_qs)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", moved)
        async with serve(app) as base:
            s = settings(tmp_path, base_url=base, api_key=Secret("k-secret"))
            report = await run(manifest(3, tmp_path), s)
    assert report.exit_code == 3
    assert "redirects to " + other_base in (report.auth_error or "")
    assert reached == []  # neither followed nor sent on: the key stays with the named host
    assert report.counts == {"pending": 3}


async def test_5xx_before_creation_is_resubmitted_once_logs_show_failure(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error = ServerError("HTTP 502: bad gateway", status=502)
    api.errors_left = 2
    report = await run(manifest(2, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    assert len(api.created) == 2  # each job paid for exactly once
    assert report.adopted == 0


class Scripted(FakeApi):
    """Each create meets the next of ``errors`` (logged as failed), then goes through."""

    def __init__(self, cdn: str, errors: list[Exception]) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.errors = errors

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        if self.errors:
            self.create_error, self.errors_left = self.errors.pop(0), 1
        return await super().create(body, client_request_id=client_request_id)


@pytest.mark.parametrize("before", ["429s", "earlier nights"])
async def test_a_5xx_the_logs_show_failed_is_resubmitted_whatever_tries_came_before(
    cdn: str, tmp_path: Path, before: str
) -> None:
    # Nine POSTs refused with 429 (each an intent of its own), or nine tries of earlier nights,
    # then a 500 the logs showed created nothing: failed submit_failed "10 attempts" at once.
    m = manifest(1, tmp_path)
    errors: list[Exception] = [ServerError("HTTP 500: oops", status=500)]
    if before == "429s":
        errors[:0] = [RateLimitedError("HTTP 429: busy", retry_after_s=None)] * 9
    else:
        ledger = Ledger.open(ensure_dir(tmp_path / "out"))
        for n in range(1, 10):
            await ledger.record("intent", "job0", crid=f"vb:job0:{n}:x", key=m.jobs[0].key)
            await ledger.record("unsent", "job0")
        ledger.close()
    api = Scripted(cdn, errors)
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}, report.failed
    assert len(api.created) == 1 and report.states["job0"].attempts == 11


@pytest.mark.parametrize("error", [ServerError("HTTP 500", status=500), NoAnswerError("reset")])
async def test_lost_answer_after_creation_is_adopted_from_logs(
    cdn: str, tmp_path: Path, error: Exception
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.error_after_create, api.errors_left = error, True, 2
    report = await run(manifest(3, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 3}
    assert len(api.created) == 3 and report.adopted == 2


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (NotSentError("POST /v2/video/generations: could not connect: OSError"), "submit retry"),
        (ServerError("HTTP 503: unavailable", status=503), "submission outcome unknown"),
    ],
)
async def test_a_create_outage_is_a_few_lines_not_one_per_attempt(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, line: str
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = error, 40  # nothing created by these
    s = settings(tmp_path, concurrency=4, submit_retries=100)
    with caplog.at_level(logging.DEBUG, logger="veobatch"):
        report = await run(manifest(8, tmp_path), s, api=api)
    assert report.exit_code == 0 and len(api.created) == 8
    attempts = [r for r in caplog.records if r.getMessage().startswith(line)]
    assert len(attempts) == 40 and sum(r.levelno > logging.DEBUG for r in attempts) == 1
    (end,) = [r.getMessage() for r in caplog.records if "succeed again" in r.getMessage()]
    assert re.match(r"submissions succeed again after=\d+s failed=40: ", end)


async def test_logs_that_lag_get_their_grace_after_the_answer(cdn: str, tmp_path: Path) -> None:
    # The search starts a request timeout before the answer; the grace must not start there
    # too, or it is used up before the first sweep and a created job is paid for twice.
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.error_after_create, api.errors_left = (
        ServerError("HTTP 502", status=502),
        True,
        1,
    )
    api.hide_from_logs = True  # the logs lag behind the request

    async def logs_catch_up() -> None:
        await anyio.sleep(0.3)
        api.hide_from_logs = False

    s = settings(tmp_path, logs_grace_s=2.0, request_timeout_s=60.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(logs_catch_up)
        report = await run(manifest(1, tmp_path), s, api=api)
    assert report.exit_code == 0 and report.adopted == 1
    assert len(api.created) == 1  # found once the logs caught up, never created again


async def test_a_model_edited_after_a_crash_is_looked_up_under_the_model_sent(
    cdn: str, tmp_path: Path
) -> None:
    # The logs were searched under the manifest's new model: the row of the request sent with
    # the old one was never seen, "absent" meant "never created", and the job was paid twice.
    m = manifest(1, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-sent")])
    await api.create(m.jobs[0].request, client_request_id="crid-sent")  # it did get through
    sent_with: dict[str, str] = {"crid-sent": "google/veo-3.1-t2v"}
    logs = api.logs

    async def logs_of_models(**kw: Any) -> LogPage:
        page = await logs(**kw)
        rows = [r for r in page.entries if sent_with.get(r.client_request_id) in kw["models"]]
        return LogPage(rows, page.has_more)

    api.logs = logs_of_models  # type: ignore[method-assign]
    edited = Job("job0", {"model": "google/veo-3.1-t2v-fast", "prompt": "p0"}, 0)
    report = await run(Manifest(tmp_path / "m.yaml", (edited,)), settings(tmp_path), api=api)
    assert report.adopted == 1  # found under the model it was sent with, and finished
    # ...and then, as the manifest now reads, made once with the new model (not twice).
    assert len(api.created) == 2 and report.exit_code == 0
    assert api.polls[api.created[0]] == 1 and api.created[1].endswith("-p0")


class OneGeneration(FakeApi):
    """Answers every create with the same generation id, whatever was asked (an API bug)."""

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        created = await super().create(body, client_request_id=client_request_id)
        self.polls.pop(created.generation_id, None)
        self.created[-1] = "g-same"
        self.log[-1] = replace(self.log[-1], inference_id="g-same")
        self.polls.setdefault("g-same", 0)
        return replace(created, generation_id="g-same")


async def test_one_generation_id_for_two_creates_fails_the_later_job(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both jobs were "done" with the same file, and nothing said so.
    m = manifest(2, tmp_path)
    api = OneGeneration(cdn, polls_to_finish=1)
    report = await run(m, settings(tmp_path, concurrency=1), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 1, "failed": 1}
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job1", "duplicate_generation")
    assert error.message == (
        "the API gave this job generation g-same, the id it had given job job0: one generation"
        " cannot be both videos, so only job0 fetches it; --retry-failed submits this job"
        " again (a new charge)"
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.mp4")) == ["job0.mp4"]
    assert api.polls == {"g-same": 1}  # followed for job0 only
    [warned] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith("duplicate generation job=job1 gen=g-same: the API gave job job0")
    # Never sent again on a guess: the next run leaves it failed, --retry-failed sends it.
    again = await run(m, settings(tmp_path), api=FakeApi(cdn, polls_to_finish=1))
    assert again.exit_code == 1 and again.submitted == 0
    retried_api = FakeApi(cdn, polls_to_finish=1)
    retried = await run(m, settings(tmp_path, retry_failed=True), api=retried_api)
    assert retried.exit_code == 0 and retried_api.created == ["g0-p1"]
    assert (out / "job1.mp4").exists()


async def test_a_generation_id_of_an_earlier_run_given_again_is_a_duplicate(
    cdn: str, tmp_path: Path
) -> None:
    # The index of generation ids is rebuilt from the ledger: job0 got g-same last night.
    m = manifest(2, tmp_path)
    api = OneGeneration(cdn, polls_to_finish=1)
    first = await run(Manifest(m.path, m.jobs[:1]), settings(tmp_path), api=api)
    assert first.exit_code == 0
    report = await run(m, settings(tmp_path), api=api)
    assert [(j, e.kind) for j, e in report.failed] == [("job1", "duplicate_generation")]
    assert report.counts == {"done": 1, "failed": 1} and api.polls == {"g-same": 1}


async def test_a_duplicate_recorded_before_a_crash_is_failed_on_resume(
    cdn: str, tmp_path: Path
) -> None:
    # A crash right after job1's "submitted" record: the rerun finds two jobs with one id.
    m = manifest(2, tmp_path)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    for job in m.jobs:
        await ledger.record("intent", job.id, crid=f"c-{job.id}", key=job.key, model=job.model)
    for job in m.jobs:
        await ledger.record("submitted", job.id, gen="g-same")
    ledger.close()
    api = FakeApi(cdn, polls_to_finish=1)
    api.polls = {"g-same": 0}
    report = await run(m, settings(tmp_path), api=api)
    assert [(j, e.kind) for j, e in report.failed] == [("job1", "duplicate_generation")]
    assert report.counts == {"done": 1, "failed": 1}
    assert api.polls == {"g-same": 1} and api.created == []


async def test_a_generation_adopted_from_the_logs_that_is_another_jobs_is_a_duplicate(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(2, tmp_path)
    api = OneGeneration(cdn, polls_to_finish=1)
    first = await run(Manifest(m.path, m.jobs[:1]), settings(tmp_path), api=api)
    assert first.exit_code == 0
    await seed_intents(tmp_path, [(m.jobs[1], "crid-job1")])
    await api.create(m.jobs[1].request, client_request_id="crid-job1")  # logged as g-same
    report = await run(m, settings(tmp_path), api=api)
    assert report.adopted == 1
    assert [(j, e.kind) for j, e in report.failed] == [("job1", "duplicate_generation")]
    assert api.polls == {"g-same": 1}


def test_generation_owners_are_the_first_given_each_id() -> None:
    def st(job_id: str, gen: str | None, at: float | None, kind: str | None = None) -> JobState:
        error = ErrorInfo(kind, "x") if kind else None
        return JobState(job_id, "submitted", generation_id=gen, submitted_at=at, error=error)

    states = [
        st("late", "g1", 20.0),
        st("early", "g1", 10.0),
        st("undated", "g2", None),
        st("dated", "g2", 5.0),
        st("failed-dup", "g3", 1.0, "duplicate_generation"),
        st("owner", "g3", 2.0),
        st("none", None, 1.0),
    ]
    assert generation_owners(states) == {"g1": "early", "g2": "dated", "g3": "owner"}


async def test_unanswered_and_not_logged_stays_uncertain(cdn: str, tmp_path: Path) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = NoAnswerError("read timeout"), 1
    api.hide_from_logs = True  # the request left, nothing shows it arrived
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 1 and report.uncertain == ["job0"] and api.created == []
    again = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert again.uncertain == ["job0"] and api.created == []  # never resubmitted blindly
    forced = await run(manifest(1, tmp_path), settings(tmp_path, resubmit_uncertain=True), api=api)
    assert forced.exit_code == 0 and forced.risked_duplicates == 1 and len(api.created) == 1


async def test_an_uncertain_job_says_the_latest_look_ups_verdict(cdn: str, tmp_path: Path) -> None:
    # Left uncertain by a redirect; the next run's look-up finds nothing: the summary and
    # results.json must say that, not the first run's redirect.
    m = manifest(1, tmp_path)
    redirected = "HTTP 303: the API base URL redirects"
    seed_uncertain(tmp_path, m.jobs[0], "no_answer", redirected, now=time.time())
    api = FakeApi(cdn, polls_to_finish=1)
    api.hide_from_logs = True
    report = await run(m, settings(tmp_path), api=api)
    assert report.uncertain == ["job0"] and api.created == []
    error = report.states["job0"].error
    assert error is not None and "usage logs" in error.message and "303" not in error.message


async def test_a_later_verdict_keeps_what_the_post_met(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 5xx answered the POST; one night the logs cannot be read. Its words may change, but
    # not its kind: the night the logs are read and it is absent, it is submitted again.
    monkeypatch.setattr("veobatch.reconcile.UNREADABLE_PATIENCE_S", 0.2)  # a minute, at least
    m = manifest(1, tmp_path)
    seed_uncertain(tmp_path, m.jobs[0], "server_error", "HTTP 502", now=time.time())

    class Unreadable(FakeApi):
        async def logs(self, **kw: Any) -> LogPage:
            raise ServerError("HTTP 503")

    down = Unreadable(cdn, polls_to_finish=1)
    report = await run(m, settings(tmp_path, logs_grace_s=0.01), api=down)
    error = report.states["job0"].error
    assert report.uncertain == ["job0"] and error is not None
    assert error.kind == "server_error" and "could not be read" in error.message
    api = FakeApi(cdn, polls_to_finish=1)
    again = await run(m, settings(tmp_path), api=api)
    assert again.exit_code == 0 and len(api.created) == 1


async def test_crash_between_intent_and_answer_is_settled_by_the_logs(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-sent"), (m.jobs[1], "crid-never-sent")])
    await api.create(m.jobs[0].request, client_request_id="crid-sent")  # it did get through
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.adopted == 1
    assert len(api.created) == 2  # job0 adopted, job1 submitted for the first time


async def test_a_request_sent_with_another_key_is_never_taken_for_never_created(
    cdn: str, tmp_path: Path
) -> None:
    # Its intent was recorded, the run was killed mid-POST, and the rerun has a rotated key:
    # that key's usage logs do not show the old key's requests, and "absent" paid twice.
    m = manifest(2, tmp_path)
    old_key, new_key = Secret("key-AAAA-1111-old"), Secret("key-BBBB-2222-new")
    await seed_intents(tmp_path, [(m.jobs[0], "crid-job0")], key=old_key)
    await seed_intents(tmp_path, [(m.jobs[1], "crid-job1")], key=new_key)
    api = FakeApi(cdn, polls_to_finish=1)
    s = settings(tmp_path, api_key=new_key, logs_grace_s=0)
    report = await run(m, s, api=api)
    assert report.uncertain == ["job0"] and len(api.created) == 1  # job1: this key's, absent
    error = report.states["job0"].error
    assert error is not None and f"another API key (fingerprint {old_key.fingerprint()})" in (
        error.message
    )
    # Back on the key it was sent with, absence from the logs is proof again.
    back = await run(m, settings(tmp_path, api_key=old_key, logs_grace_s=0), api=api)
    assert back.exit_code == 0 and len(api.created) == 2, (api.created, back.states["job0"])


async def test_the_intent_records_the_keys_fingerprint_never_the_key(
    cdn: str, tmp_path: Path
) -> None:
    key = Secret("sk-live-0123456789abcdef")
    api = FakeApi(cdn, polls_to_finish=1)
    await run(manifest(1, tmp_path), settings(tmp_path, api_key=key), api=api)
    raw = (tmp_path / "out" / "ledger.jsonl").read_bytes()
    intent = parse_journal(raw).records[0]
    assert intent["ev"] == "intent" and intent["acct"] == key.fingerprint()
    assert len(key.fingerprint()) == 8 and b"0123456789abcdef" not in raw


async def test_rate_limits_lower_the_concurrency(cdn: str, tmp_path: Path) -> None:
    api = FakeApi(cdn, polls_to_finish=3)
    api.create_error = RateLimitedError("HTTP 429", retry_after_s=0)
    api.errors_left = 6
    s = settings(tmp_path, concurrency=8)
    report = await run(manifest(30, tmp_path), s, api=api)
    assert report.exit_code == 0 and len(api.created) == 30


async def test_a_429_asking_for_rest_holds_the_runs_other_submissions(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error = RateLimitedError("HTTP 429", retry_after_s=0.3)
    api.errors_left = 1
    s = settings(tmp_path, concurrency=4)
    with caplog.at_level(logging.WARNING):
        report = await run(manifest(12, tmp_path), s, api=api)
    assert report.exit_code == 0 and len(api.created) == 12
    # The first four were on their way when the 429 came; every later one waited the rest
    # out, even those whose slot a finished generation freed in the meantime.
    refused, later = api.sent_at[0], api.sent_at[4:]
    assert later and all(t - refused >= 0.3 for t in later)
    rests = [r for r in caplog.records if "of rest" in r.getMessage()]
    assert len(rests) == 1


async def test_a_concurrency_cap_is_found_and_kept(cdn: str, tmp_path: Path) -> None:
    # The API refuses a create while 3 of ours are in flight; asked for 12 at once.
    api = FakeApi(cdn, polls_to_finish=3)
    api.cap, api.cap_retry_after_s = 3, 0.01
    report = await run(manifest(40, tmp_path), settings(tmp_path, concurrency=12), api=api)
    assert report.exit_code == 0 and len(api.created) == 40
    # 9 in the first wave, then about one per round of the slow probe above the cap (85 when
    # each 429 took a quarter off and every slot back was asked for again).
    assert api.refused <= 40, api.refused


async def test_429s_without_end_stop_the_submissions_and_leave_the_rest_pending(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error = RateLimitedError("HTTP 429", retry_after_s=0.05)
    api.errors_left = 10**9
    s = settings(tmp_path, concurrency=2, job_timeout_s=0.3)
    started = time.monotonic()
    report = await run(manifest(20, tmp_path), s, api=api)
    assert time.monotonic() - started < 5  # not 20 jobs x their own patience, one by one
    assert api.created == [] and report.exit_code == 1
    assert report.gave_up is not None and "refused every create" in report.gave_up
    assert len(report.pending) + len(report.failed) == 20 and len(report.pending) >= 17
    assert all(e.kind == "submit_failed" for _, e in report.failed)


async def test_a_create_that_keeps_failing_as_the_logs_show_fails_with_the_apis_words(
    cdn: str, tmp_path: Path
) -> None:
    # A 200 with {"error": ...} and no id, its row "failed" in the logs: sent again, then
    # submit_failed saying only "the usage logs show it failed", the API's message dropped.
    api = FakeApi(cdn, polls_to_finish=1)
    said = """create: answer has no generation id: '{"error": {"message": "could not queue"}}'"""
    api.create_error = ProtocolError(said)
    report = await run(manifest(1, tmp_path), settings(tmp_path, submit_retries=2), api=api)
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job0", "submit_failed")
    assert error.message.startswith("gave up after 3 tries: the usage logs show it failed")
    assert error.message.endswith(f"; the API's last answer: {said}")


class GoesDown(FakeApi):
    """Takes ``up_for`` creates, then nothing can reach it: creates, polls, usage logs."""

    def __init__(self, cdn: str, up_for: int) -> None:
        super().__init__(cdn, polls_to_finish=10**9)
        self.up_for = up_for

    def _reach(self) -> None:
        if len(self.created) >= self.up_for:
            raise NotSentError("could not connect: ClientConnectorError: Connection refused")

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        self._reach()
        return await super().create(body, client_request_id=client_request_id)

    async def fetch(self, generation_id: str) -> Generation:
        self._reach()
        return await super().fetch(generation_id)

    async def logs(self, **kw: Any) -> LogPage:
        self._reach()
        return await super().logs(**kw)


async def test_an_api_gone_stops_the_submissions_and_leaves_the_jobs_pending(
    cdn: str, tmp_path: Path
) -> None:
    # The API could not be reached: each job used its tries and failed submit_failed, one
    # after another, the run going on for days at scale. The generations in flight are
    # followed until the job timeout, as far as polls that fail can.
    api = GoesDown(cdn, up_for=2)
    s = settings(tmp_path, concurrency=2, job_timeout_s=0.5, submit_retries=2)
    started = time.monotonic()
    report = await run(manifest(10, tmp_path), s, api=api)
    assert time.monotonic() - started < 5
    assert report.exit_code == 1 and report.submitted == 2
    assert report.gave_up is not None
    assert report.gave_up.startswith("the API could not be reached for 1 s: no create could")
    assert sorted(report.pending) == [f"job{i}" for i in range(2, 10)]
    assert [(j, e.kind) for j, e in report.failed] == [("job0", "timeout"), ("job1", "timeout")]
    for _, error in report.failed:  # kept, and said what its polls met
        assert "its last poll failed: could not connect" in error.message
    lines = run_summary(report, report.total)
    assert any(
        line.startswith("stopped submitting: the API could not be reached") for line in lines
    )
    # Back the next night: the two in flight are polled (not paid again), the rest submitted.
    back = FakeApi(cdn, polls_to_finish=1)
    back.polls = dict.fromkeys(api.created, 0)
    again = await run(manifest(10, tmp_path), settings(tmp_path), api=back)
    assert again.exit_code == 0 and len(back.created) == 8


async def test_a_generation_the_api_answers_404_for_until_the_timeout_says_so(
    cdn: str, tmp_path: Path
) -> None:
    # Too soon for the 404 rule (five, a minute after submission): it timed out, and said
    # only "not finished after 0s", as if the API had reported it running.
    class Unknown(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            raise NotFoundError("HTTP 404: Generation not found", status=404)

    api = Unknown(cdn)
    report = await run(manifest(1, tmp_path), settings(tmp_path, job_timeout_s=0.2), api=api)
    ((_, error),) = report.failed
    assert error.kind == "timeout"  # polled again by the next run: the API may know it then
    assert re.match(
        r"the API answered 404 \(unknown generation\) to \d+ polls until the job", error.message
    )
    assert "HTTP 404: Generation not found; generation g0-p0 is kept" in error.message


def test_a_timeout_says_what_the_last_polls_met() -> None:
    t = Tracked("a", "g1", "m", started=0.0, deadline=20.0)
    assert timed_out_reason(t, 20.0) == (
        "not finished after 20s; generation g1 is kept and will be polled again on the next run"
    )
    t.not_found, t.last_error = 8, NotFoundError("HTTP 404: not found", status=404)
    assert timed_out_reason(t, 20.0).startswith(
        "the API answered 404 (unknown generation) to 8 polls until the job timeout (20s), too"
        " few or too soon to take it for lost (that takes 5 min of them, 5 at least, while the"
        " API answers other generations' polls): HTTP 404: not found; generation g1 is kept"
    )
    t.last_error = ServerError("HTTP 503: busy", status=503)  # the 404s were not the last word
    assert timed_out_reason(t, 20.0).startswith(
        "not finished after 20s; its last poll failed: HTTP 503: busy; generation g1 is kept"
    )


@pytest.mark.parametrize(
    ("status", "said"),
    [
        ("generating", ""),
        ("waiting", ""),  # the API's own examples treat it as running
        ("completed", "; the API last reported 'completed' with no usable video URL"),
        ("processing", "; its last status was 'processing' (not one the API documents)"),
        (
            "a\nb" + "x" * 50,
            "; its last status was 'a\\nb" + "x" * 34 + "...' (not one the API documents)",
        ),
    ],
)
def test_a_timeout_names_a_last_status_that_is_no_plain_running(status: str, said: str) -> None:
    t = Tracked("a", "g1", "m", started=0.0, deadline=20.0, api_status=status)
    assert timed_out_reason(t, 20.0).startswith(f"not finished after 20s{said}")
    assert timed_out_reason(t, 20.0).endswith(
        "; generation g1 is kept and will be polled again on the next run"
    )
    t.last_error = ServerError("HTTP 503: busy", status=503)
    assert timed_out_reason(t, 20.0).startswith(f"not finished after 20s{said}; its last poll")


async def test_a_generation_completed_with_no_video_times_out_saying_so(
    cdn: str, tmp_path: Path
) -> None:
    class NoVideo(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            return Generation(generation_id, "completed", video_url=None)

    api = NoVideo(cdn)
    report = await run(manifest(1, tmp_path), settings(tmp_path, job_timeout_s=0.2), api=api)
    ((_, error),) = report.failed
    assert error.kind == "timeout"  # taken for running, as the contract asks: polled again
    assert error.message == (
        "not finished after 0s; the API last reported 'completed' with no usable video URL;"
        " generation g0-p0 is kept and will be polled again on the next run"
    )


async def test_jobs_taken_up_again_are_not_finished_until_this_run_ends_them(
    cdn: str, tmp_path: Path
) -> None:
    # An earlier run's submit_failed jobs were counted finished, then dropped out as they were
    # submitted: "finished=16/20 ... rate=-4.0/min eta=-60s".
    m = manifest(4, tmp_path)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    for job in m.jobs:
        await ledger.record("intent", job.id, crid=f"vb:{job.id}:1:x", key=job.key, model=job.model)
        await ledger.record("failed", job.id, kind="submit_failed", message="could not connect")
    ledger.close()
    seen: list[int] = []
    api = FakeApi(cdn, polls_to_finish=5)
    s = settings(tmp_path, observe_interval_s=0.001)
    report = await run(m, s, api=api, observer=lambda snap: seen.append(snap.finished))
    assert report.exit_code == 0 and len(api.created) == 4
    assert seen[0] == 0 and seen[-1] == 4 and seen == sorted(seen)


async def test_job_timeout_keeps_generation_id(cdn: str, tmp_path: Path) -> None:
    api = FakeApi(cdn, polls_to_finish=10**9)
    report = await run(manifest(1, tmp_path), settings(tmp_path, job_timeout_s=0.05), api=api)
    assert report.failed[0][1].kind == "timeout"
    recs = parse_journal((tmp_path / "out" / "ledger.jsonl").read_bytes()).records
    assert recs[-1]["ev"] == "failed" and recs[1]["ev"] == "submitted"
    api2 = FakeApi(cdn, polls_to_finish=1)
    api2.polls = dict.fromkeys(api.created, 0)
    report2 = await run(manifest(1, tmp_path), settings(tmp_path), api=api2)
    assert report2.exit_code == 0 and api2.created == []


async def test_a_timed_out_job_removed_from_the_manifest_is_still_polled_and_fetched(
    cdn: str, tmp_path: Path
) -> None:
    # Its record says the next run polls it; taken out of the manifest, it was left alone.
    api = FakeApi(cdn, polls_to_finish=10**9)
    await run(manifest(2, tmp_path), settings(tmp_path, job_timeout_s=0.05), api=api)
    api2 = FakeApi(cdn, polls_to_finish=1)
    api2.polls = dict.fromkeys(api.created, 0)
    api2.created = list(api.created)
    kept = replace(manifest(2, tmp_path), jobs=manifest(2, tmp_path).jobs[1:])
    report = await run(kept, settings(tmp_path), api=api2)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    assert len(api2.created) == 2 and all(n == 1 for n in api2.polls.values())
    assert (tmp_path / "out" / "job0.mp4").read_bytes() == MP4


async def test_a_removed_job_whose_generation_fails_again_is_warned_of_not_failing_the_run(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Taken out of the manifest, its old generation timed out again, then was lost: each
    # night exited 1, and a lost one was polled (and failed) again every night after.
    m = manifest(2, tmp_path)
    await seed_old_generation(tmp_path, m.jobs[0], "timeout")
    kept = Manifest(m.path, m.jobs[1:])
    for how in ("timeout", "lost"):
        api = OldGenerationFails(cdn, how)
        with caplog.at_level(logging.WARNING, logger="veobatch"):
            report = await run(kept, settings(tmp_path, job_timeout_s=0.2), api=api)
        assert report.exit_code == 0 and report.failed == [], report.failed
        assert report.counts == {"done": 1} and api.polls["g-old"] >= 1
        error = load_states(tmp_path / "out")["job0"].error
        assert error is not None and error.kind == how  # on record, for `status`
        warned = [r for r in caplog.records if r.getMessage().startswith("failed job=job0")]
        assert warned and all(r.levelno == logging.WARNING for r in warned)
        assert "not in the manifest: left as recorded" in warned[-1].getMessage()
    api = OldGenerationFails(cdn, "lost")
    report = await run(kept, settings(tmp_path), api=api)  # the API said it is gone
    assert report.exit_code == 0 and "g-old" not in api.polls and api.created == []


async def test_missing_file_is_fetched_again_without_paying(cdn: str, tmp_path: Path) -> None:
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    (tmp_path / "out" / "job0.mp4").unlink()
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and len(api.created) == 2
    assert (tmp_path / "out" / "job0.mp4").read_bytes() == MP4


class Forgetful(FakeApi):
    """Forgets generations made before ``forget()``: polls for them answer 400 (lost)."""

    forgotten: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.asked: list[str] = []  # every poll, answered or not

    def forget(self) -> None:
        self.forgotten = frozenset(self.created)

    async def fetch(self, generation_id: str) -> Generation:
        self.asked.append(generation_id)
        if generation_id in self.forgotten:
            raise BadRequestError("no such generation", status=400)
        return await super().fetch(generation_id)


async def test_a_lost_file_whose_refetch_times_out_stays_done_and_is_polled_again(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An API outage while a deleted video is fetched again must not turn into a new charge,
    # nor a failure that wipes the record of the video (it exited 1, its file facts gone).
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    recorded = load_states(out)["job0"]
    (out / "job0.mp4").unlink()
    api.polls_to_finish = 10**9
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(m, settings(tmp_path, job_timeout_s=0.05), api=api)
    assert report.exit_code == 0 and report.failed == [] and report.counts == {"done": 2}
    st = report.states["job0"]
    assert (st.status, st.file, st.sha256) == ("done", "job0.mp4", recorded.sha256)
    assert [j for j, _ in report.not_refetched] == ["job0"]
    assert "the next run tries again" in report.not_refetched[0][1]
    assert any(r.getMessage().startswith("refetch failed job=job0:") for r in caplog.records)
    lines = run_summary(report, 2)
    assert any(line.startswith("videos delivered earlier whose file is missing") for line in lines)
    api.polls_to_finish = 1
    again = await run(m, settings(tmp_path), api=api)
    assert again.exit_code == 0 and len(api.created) == 2  # polled, not generated anew
    assert (out / "job0.mp4").read_bytes() == MP4


def _age_gone_records(out: Path, by_s: float) -> None:
    """Move the ledger's "gone" records ``by_s`` into the past: a later night, without waiting."""
    lines = []
    for line in (out / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["ev"] == "gone":
            rec["t"] -= by_s
        lines.append(json.dumps(rec))
    (out / "ledger.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how", ["lost", "generation_error"])
async def test_an_archived_video_whose_generation_is_gone_stays_done_and_is_settled_later(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    # Reviewer D2: the operator archives the night's videos; polls answer 404 (a blip, or the
    # API's retention is over). The job failed refetch_failed for good, its record wiped: every
    # night exited 1, and --retry-failed paid again.
    m = manifest(2, tmp_path)
    api = Forgetful(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    recorded = load_states(out)["job0"]
    (out / "job0.mp4").unlink()
    if how == "lost":
        api.forget()
    else:
        api.fail = {"p0"}
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        first = await run(m, settings(tmp_path), api=api)
    assert first.exit_code == 0 and first.failed == [] and len(api.created) == 2
    assert first.counts == {"done": 2} and first.gone == []  # one night's answer: asked again
    st = first.states["job0"]
    assert (st.status, st.file, st.bytes, st.sha256) == (
        "done",
        "job0.mp4",
        recorded.bytes,
        recorded.sha256,
    )
    assert st.gone is not None and not st.gone.settled and st.gone.error.kind == how
    assert "the next run asks again" in first.not_refetched[0][1]
    row = json.loads((out / "results.json").read_text())["jobs"][0]
    assert (row["status"], row["file"], row["sha256"]) == ("done", "job0.mp4", recorded.sha256)
    asked = len(api.asked)
    soon = await run(m, settings(tmp_path), api=api)  # the same night: asked, not settled
    assert soon.exit_code == 0 and soon.gone == [] and len(api.asked) > asked
    _age_gone_records(out, 13 * 3600)  # the next night
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        settled = await run(m, settings(tmp_path), api=api)
    assert settled.exit_code == 0 and settled.failed == [] and settled.gone == ["job0"]
    assert [j for j, _ in settled.gone_now] == ["job0"]
    assert any(r.getMessage().startswith("video gone job=job0:") for r in caplog.records)
    lines = run_summary(settled, 2)
    assert lines[0].startswith("veobatch: 2 jobs: 2 done (1 of them gone), 0 failed")
    assert any(line.startswith("videos gone: delivered earlier") for line in lines)
    asked = len(api.asked)
    later = await run(m, settings(tmp_path), api=api)  # never polled again, never paid
    assert later.exit_code == 0 and later.gone == ["job0"] and later.gone_now == []
    assert len(api.asked) == asked and len(api.created) == 2
    assert any(line.startswith("1 more video gone since") for line in run_summary(later, 2))
    (out / "job0.mp4").write_bytes(MP4)  # put back from the archive: done, in place
    back = await run(m, settings(tmp_path), api=api)
    assert back.exit_code == 0 and back.gone == [] and len(api.asked) == asked
    assert back.states["job0"].gone is None and back.states["job0"].sha256 == recorded.sha256
    (out / "job0.mp4").unlink()  # archived again: asked again, as for the first time
    api.fail, api.forgotten = set(), frozenset()
    api.polls_to_finish = 1
    fetched = await run(m, settings(tmp_path), api=api)
    assert fetched.exit_code == 0 and len(api.created) == 2
    assert (out / "job0.mp4").read_bytes() == MP4


class Unknowing(FakeApi):
    """Answers 404 to polls of generations made before ``forget()``, as the API does for one
    it no longer has (past its retention)."""

    forgotten: frozenset[str] = frozenset()

    def forget(self) -> None:
        self.forgotten = frozenset(self.created)

    async def fetch(self, generation_id: str) -> Generation:
        if generation_id in self.forgotten:
            raise NotFoundError("HTTP 404: Generation not found", status=404)
        return await super().fetch(generation_id)


async def test_an_archive_only_night_settles_gone_videos_without_polling_for_the_timeout(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every video moved to an archive, the API past its retention (404s), nothing else in the
    # run: with no other generation answered, no 404 counted, so each was polled for the whole
    # job timeout, every night, and never settled as gone. A delivered one's 404s count alone.
    monkeypatch.setattr(poller_module, "NOT_FOUND_STREAK_S", 0.05)
    m = manifest(2, tmp_path)
    api = Unknowing(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    for f in out.glob("*.mp4"):
        f.unlink()
    api.forget()
    first = await run(m, settings(tmp_path, job_timeout_s=2.0), api=api)
    assert first.exit_code == 0 and first.failed == [] and len(api.created) == 2
    for jid in ("job0", "job1"):
        st = first.states[jid]
        assert st.status == "done" and st.gone is not None and st.gone.error.kind == "lost"
        assert "while it answered other" not in st.gone.error.message
    _age_gone_records(out, 13 * 3600)
    settled = await run(m, settings(tmp_path, job_timeout_s=2.0), api=api)
    assert settled.exit_code == 0 and sorted(settled.gone) == ["job0", "job1"]
    assert len(api.created) == 2


async def test_a_gone_video_is_made_anew_only_with_retry_failed(cdn: str, tmp_path: Path) -> None:
    m = manifest(2, tmp_path)
    api = Forgetful(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    (out / "job0.mp4").unlink()
    api.forget()
    await run(m, settings(tmp_path), api=api)
    _age_gone_records(out, 13 * 3600)
    assert (await run(m, settings(tmp_path), api=api)).gone == ["job0"]
    retried = await run(m, settings(tmp_path, retry_failed=True), api=api)
    assert retried.exit_code == 0 and retried.gone == [] and len(api.created) == 3
    assert (out / "job0.mp4").read_bytes() == MP4 and not list(out.glob("job0@*"))
    st = retried.states["job0"]
    assert (st.status, st.generation_id, st.gone) == ("done", api.created[2], None)


async def _earlier_version_failed_refetch(cdn: str, tmp_path: Path) -> tuple[Manifest, Forgetful]:
    """A ledger as versions before the "gone" record left it: done, then a failed refetch of
    the missing file recorded as refetch_failed, its file facts wiped."""
    m = manifest(2, tmp_path)
    api = Forgetful(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    old = {
        "t": round(time.time(), 3),
        "ev": "failed",
        "job": "job0",
        "kind": "refetch_failed",
        "message": f"the video file is missing and generation {api.created[0]} cannot be"
        " fetched again (lost: HTTP 404); --retry-failed generates it anew (a new charge)",
    }
    with (out / "ledger.jsonl").open("a") as f:
        f.write(json.dumps(old) + "\n")
    assert load_states(out)["job0"].status == "failed"
    return m, api


@pytest.mark.parametrize("retry_failed", [False, True])
async def test_a_video_restored_after_an_earlier_versions_refetch_failed_is_done_again(
    cdn: str, tmp_path: Path, retry_failed: bool
) -> None:
    # Reviewer D2: files copied back byte for byte, the API healthy: every night reported
    # "10 failed", exit 1; --retry-failed paid for all again and kept the restored files aside
    # as "video not made by this ledger".
    m, api = await _earlier_version_failed_refetch(cdn, tmp_path)
    out = tmp_path / "out"
    os.utime(out / "job0.mp4", ns=(1, 1))  # copied back without its mtime: checked by its hash
    asked = len(api.asked)
    report = await run(m, settings(tmp_path, retry_failed=retry_failed), api=api)
    assert report.exit_code == 0 and report.failed == [] and report.counts == {"done": 2}
    assert len(api.created) == 2 and len(api.asked) == asked  # neither paid nor polled
    assert not list(out.glob("job0@*")) and (out / "job0.mp4").read_bytes() == MP4
    st = report.states["job0"]
    assert (st.status, st.file, st.generation_id) == ("done", "job0.mp4", api.created[0])
    assert st.mtime_ns == 1  # its mtime now on record: not hashed again every night
    recs = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert recs[-1]["ev"] == "restored" and recs[-1]["sha256"] == st.sha256


async def test_a_missing_video_an_earlier_version_failed_is_fetched_again(
    cdn: str, tmp_path: Path
) -> None:
    m, api = await _earlier_version_failed_refetch(cdn, tmp_path)
    out = tmp_path / "out"
    (out / "job0.mp4").unlink()
    report = await run(m, settings(tmp_path), api=api)  # the API has it again: fetched
    assert report.exit_code == 0 and report.failed == [] and len(api.created) == 2
    assert (out / "job0.mp4").read_bytes() == MP4
    (out / "job0.mp4").unlink()
    api.forget()  # now gone: no failure, asked again the next night
    gone = await run(m, settings(tmp_path), api=api)
    assert gone.exit_code == 0 and gone.failed == [] and gone.counts == {"done": 2}
    st = gone.states["job0"]
    assert st.gone is not None and not st.gone.settled and st.sha256 is not None


async def test_a_video_put_back_before_its_resubmission_is_taken_not_kept_aside(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The keep-aside check before a submission moved the job's own video (its sha256 the one
    # the ledger recorded done for the same request) aside as "not made by this ledger".
    m, api = await _earlier_version_failed_refetch(cdn, tmp_path)
    out = tmp_path / "out"
    (out / "job0.mp4").unlink()
    import veobatch.session as session_module

    planned = session_module.plan_run

    def plan_then_restore(*args: Any, **kw: Any) -> Any:
        plans = planned(*args, **kw)
        (out / "job0.mp4").write_bytes(MP4)  # copied back while the run starts
        return plans

    monkeypatch.setattr(session_module, "plan_run", plan_then_restore)
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(m, settings(tmp_path, retry_failed=True), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2} and len(api.created) == 2
    assert not list(out.glob("job0@*")) and (out / "job0.mp4").read_bytes() == MP4
    assert report.estimated_usd == 0 and report.states["job0"].status == "done"
    assert any(r.getMessage().startswith("not submitted job=job0:") for r in caplog.records)


async def test_a_video_altered_in_place_is_kept_aside_when_the_original_is_fetched_again(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator's edit (a tag appended, a trim) was replaced by the original with no copy.
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    edited = MP4 + b"operator edit"
    (out / "job0.mp4").write_bytes(edited)
    tag = hashlib.sha256(edited).hexdigest()[:8]
    (out / f"job0@{tag}.mp4").write_bytes(b"kept by an earlier night")  # the name is taken
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2} and len(api.created) == 2
    assert (out / "job0.mp4").read_bytes() == MP4  # the original, fetched again at no charge
    assert (out / f"job0@{tag}-2.mp4").read_bytes() == edited  # the edit, never overwritten
    assert (out / f"job0@{tag}.mp4").read_bytes() == b"kept by an earlier night"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"video kept job=job0: job0.mp4 was not the video on record (altered or copied in):"
        f" kept as job0@{tag}-2.mp4; the video fetched takes its place"
    ]


@pytest.mark.parametrize(
    ("how", "edited"), [("lost", MP4 + b"tag"), ("generation_error", MP4 + b"other tag")]
)
async def test_a_video_altered_in_place_whose_generation_is_gone_stays_done_as_found(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, edited: bytes
) -> None:
    # It failed "refetch_failed: the video file is gone", its file facts wiped, though the
    # edited file was on disk; every later night exited 1, and --retry-failed paid again.
    m = manifest(2, tmp_path)
    api = Forgetful(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    (out / "job0.mp4").write_bytes(edited)
    if how == "lost":
        api.forget()
    else:
        api.fail = {"p0"}
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2} and report.failed == []
    assert (out / "job0.mp4").read_bytes() == edited and not list(out.glob("job0@*"))
    st = report.states["job0"]
    assert (st.status, st.file, st.bytes) == ("done", "job0.mp4", len(edited))
    assert st.sha256 == hashlib.sha256(edited).hexdigest() and st.generation_id == api.created[0]
    assert st.flags and st.flags[-1] == KEPT_AS_FOUND
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        f"altered video kept job=job0: generation {api.created[0]} can no longer be fetched"
    )
    assert warned[0].endswith("job0.mp4 stays as it is, on record as the job's video from now on")
    row = json.loads((out / "results.json").read_text())["jobs"][0]
    assert (row["status"], row["file"], row["bytes"]) == ("done", "job0.mp4", len(edited))
    polls = dict(api.polls)
    for later in (settings(tmp_path), settings(tmp_path, retry_failed=True)):
        again = await run(m, later, api=api, verify=True)  # even when it is no whole MP4
        assert again.exit_code == 0 and again.counts == {"done": 2}
        assert api.polls == polls and len(api.created) == 2  # left be: not polled, not paid
    assert (out / "job0.mp4").read_bytes() == edited


async def test_a_done_file_turned_into_no_video_with_its_generation_gone_is_damaged(
    cdn: str, tmp_path: Path
) -> None:
    # Kept "as found", bytes no reader could open were recorded done (flagged unreadable):
    # exit 0 every night, and --retry-failed could never make it again.
    m = manifest(2, tmp_path)
    api = Forgetful(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    (out / "job0.mp4").write_bytes(b"not a video at all")
    api.forget()
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 1 and [(j, e.kind) for j, e in report.failed] == [
        ("job0", "refetch_failed")
    ]
    assert "damaged" in report.failed[0][1].message
    assert (out / "job0.mp4").read_bytes() == b"not a video at all"  # never deleted
    again = await run(m, settings(tmp_path, retry_failed=True), api=api)
    assert again.exit_code == 0 and len(api.created) == 3  # made again, on request only


async def test_a_video_altered_in_place_whose_refetch_times_out_stays_and_is_retried(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    recorded = load_states(out)["job0"]
    edited = MP4 + b"operator edit"
    (out / "job0.mp4").write_bytes(edited)
    api.polls_to_finish = 10**9
    report = await run(m, settings(tmp_path, job_timeout_s=0.05), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2} and report.failed == []
    assert (out / "job0.mp4").read_bytes() == edited
    st = report.states["job0"]  # still the original's facts: the next run tries again
    assert (st.status, st.sha256, st.bytes) == ("done", recorded.sha256, recorded.bytes)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith("refetch failed job=job0 kind=timeout:")
        and w.endswith(
            "job0.mp4, altered since it was fetched, stays as it is, and the next run"
            " fetches the original again"
        )
        for w in warned
    ), warned
    api.polls_to_finish = 1
    again = await run(m, settings(tmp_path), api=api)
    assert again.exit_code == 0 and len(api.created) == 2
    assert (out / "job0.mp4").read_bytes() == MP4
    tag = hashlib.sha256(edited).hexdigest()[:8]
    assert (out / f"job0@{tag}.mp4").read_bytes() == edited


async def test_second_run_on_same_directory_is_locked(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with DirLock(tmp_path / "out"), pytest.raises(LockedError):
        await run(manifest(1, tmp_path), settings(tmp_path), api=FakeApi("http://x"))


async def test_no_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AIMLAPI_KEY"):
        await run(manifest(1, tmp_path), settings(tmp_path))


async def test_changed_request_keeps_the_previous_video(cdn: str, tmp_path: Path) -> None:
    m = manifest(1, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    old_key = m.jobs[0].key
    changed = Manifest(m.path, (Job("job0", {**m.jobs[0].request, "seed": 5}, 0),))
    report = await run(changed, settings(tmp_path), api=api)
    assert report.exit_code == 0 and len(api.created) == 2
    out = tmp_path / "out"
    assert (out / f"job0@{old_key[:8]}.mp4").read_bytes() == MP4
    assert (out / "job0.mp4").read_bytes() == MP4


async def test_stale_part_of_an_earlier_generation_is_not_resumed(cdn: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "job0.mp4.part").write_bytes(b"bytes of some other generation")
    (out / "job0.mp4.part.meta").write_bytes(b'{"validator": "\\"old\\"", "total": 30}')
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=FakeApi(cdn))
    assert report.exit_code == 0 and (out / "job0.mp4").read_bytes() == MP4
    assert not (out / "job0.mp4.part.meta").exists()  # dropped with its .part


async def test_retry_failed_resubmits_failed_jobs(cdn: str, tmp_path: Path) -> None:
    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1, fail={"p1"})
    first = await run(m, settings(tmp_path), api=api)
    assert first.exit_code == 1 and len(api.created) == 2
    api.fail = set()
    held = await run(m, settings(tmp_path), api=api)
    assert held.exit_code == 1 and len(api.created) == 2  # failed jobs are left alone
    retried = await run(m, settings(tmp_path, retry_failed=True), api=api)
    assert retried.exit_code == 0 and len(api.created) == 3


class ExpiringOnce(FakeApi):
    """Hands out a stale video URL (``?v=stale``) first, a fresh one on later polls."""

    async def fetch(self, generation_id: str) -> Generation:
        g = await super().fetch(generation_id)
        fresh = "fresh" if self.polls[generation_id] > 1 else "stale"
        return replace(g, video_url=f"{g.video_url}?v={fresh}") if g.video_url else g


def refusing_stale_urls(served: list[str]) -> web.Application:
    """A video host that answers a stale URL 410 and a fresh one with the video."""

    async def video(request: web.Request) -> web.Response:
        served.append(request.query.get("v", ""))
        if request.query.get("v") == "stale":
            return web.Response(status=410)
        return web.Response(body=MP4)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    return app


async def test_expired_video_url_is_refreshed_by_polling_again(tmp_path: Path) -> None:
    served: list[str] = []
    async with serve(refusing_stale_urls(served)) as base:
        report = await run(manifest(1, tmp_path), settings(tmp_path), api=ExpiringOnce(base, 1))
    assert report.exit_code == 0 and served == ["stale", "fresh"]


async def test_video_urls_expiring_by_the_thousand_are_not_a_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every URL handed out has expired by the time its download starts (downloads queue
    # behind a slow host): one warning a job was thousands. The first is said, the rest counted.
    async with serve(refusing_stale_urls([])) as base:
        with caplog.at_level(logging.DEBUG, logger="veobatch"):
            s = settings(tmp_path, concurrency=20)
            report = await run(manifest(20, tmp_path), s, api=ExpiringOnce(base, 1))
    assert report.exit_code == 0 and report.counts == {"done": 20}
    refused = [r for r in caplog.records if "fresh URL" in r.getMessage()]
    assert len(refused) == 20 and [r.levelno for r in refused].count(logging.WARNING) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warned = [w for w in warned if not w.startswith("video differs")]  # the fake's bytes
    assert len(warned) <= 3, warned
    told = " ".join(warned)  # what the lines after the first add up to: all 20
    counts = [int(n) for n in re.findall(r"failed=(\d+)", told)]
    assert sum(counts) == 20
    assert "video host answered 410: the URL has expired or is refused ×" in told


ERROR_PAGE = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
# A whole MP4 whose moov has no video track: its boxes add up, nothing can read it.
UNREADABLE = FTYP + box(b"mdat", b"\x01" * 5000) + box(b"moov", box(b"mvhd", bytes(100)))


def serving_stale_urls_as(stale: Callable[[], web.Response], served: list[str]) -> web.Application:
    """A video host that answers a stale URL with ``stale()`` and a fresh one with the video."""

    async def video(request: web.Request) -> web.Response:
        served.append(request.query.get("v", ""))
        return stale() if request.query.get("v") == "stale" else web.Response(body=MP4)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    return app


@pytest.mark.parametrize(
    ("stale", "tries"),
    [
        # An error page sent with a 200, as a CDN may for a signature it no longer takes: the
        # same URL brings it again, so a fresh one is asked for at once.
        (lambda: web.Response(body=ERROR_PAGE, content_type="application/xml"), 1),
        # Half the file, its Content-Length that half's (a cached or half-uploaded object):
        # the host's whole copy, so the same: a fresh URL at once (a 1 GB video is not
        # fetched cut six times over). It was renamed into place and recorded done.
        (lambda: web.Response(body=MP4[: len(MP4) // 2], content_type="video/mp4"), 1),
        # A whole MP4 no reader can open: the same.
        (lambda: web.Response(body=UNREADABLE, content_type="video/mp4"), 1),
    ],
    ids=["error-page", "cut-short", "unreadable"],
)
async def test_a_url_that_brings_no_whole_video_is_asked_for_again(
    tmp_path: Path, stale: Callable[[], web.Response], tries: int
) -> None:
    served: list[str] = []
    api = ExpiringOnce("", 1)
    async with serve(serving_stale_urls_as(stale, served)) as api.cdn:
        report = await run(manifest(1, tmp_path), settings(tmp_path, download_retries=2), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert served == ["stale"] * tries + ["fresh"]
    assert api.created == ["g0-p0"] and api.polls == {"g0-p0": 2}  # polled again, not paid
    out = tmp_path / "out"
    assert (out / "job0.mp4").read_bytes() == MP4 and not list(out.glob("*.part*"))


# Google Cloud Storage's answer to a signed URL past its time (Azure says 401 likewise).
EXPIRED_TOKEN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
    b"<Message>The provided token has expired.</Message></Error>"
)


def expired_with(status: int) -> Callable[[], web.Response]:
    return lambda: web.Response(status=status, body=EXPIRED_TOKEN, content_type="application/xml")


@pytest.mark.parametrize("status", [400, 401, 403], ids=["gcs-400", "azure-401", "s3-403"])
async def test_an_expired_url_refused_with_any_4xx_is_asked_for_again(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    served: list[str] = []
    api = ExpiringOnce("", 1)
    async with serve(serving_stale_urls_as(expired_with(status), served)) as api.cdn:
        report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert served == ["stale", "fresh"] and api.created == ["g0-p0"]
    [told] = [r.getMessage() for r in caplog.records if "fresh URL" in r.getMessage()]
    assert told.endswith(
        f"video host answered {status}: the URL has expired or is refused"
        " (ExpiredToken: The provided token has expired.)"
    )


async def test_a_url_of_a_stopped_run_refused_with_400_on_resume_gets_a_fresh_one(
    tmp_path: Path,
) -> None:
    # A run stopped mid-download (SIGTERM): the rerun resumes from the stored URL, which GCS
    # now refuses with 400. It used to fail the job, the video left for the next night.
    m = manifest(1, tmp_path)
    job = m.jobs[0]
    served: list[str] = []
    api = StaleWhileSet("", polls_to_finish=1)
    api.stale = False
    api.created, api.polls = ["g0-p0"], {"g0-p0": 1}
    async with serve(serving_stale_urls_as(expired_with(400), served)) as api.cdn:
        ledger = Ledger.open(ensure_dir(tmp_path / "out"))
        await ledger.record("intent", job.id, crid="c", key=job.key, model=job.model)
        await ledger.record("submitted", job.id, gen="g0-p0")
        await ledger.record("completed", job.id, url=f"{api.cdn}/v/g0-p0.mp4?v=stale")
        ledger.close()
        report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert served == ["stale", "fresh"] and api.created == ["g0-p0"]


async def test_a_url_refused_every_time_fails_with_what_the_host_said(tmp_path: Path) -> None:
    served: list[str] = []
    api = StaleWhileSet("", polls_to_finish=1)
    async with serve(serving_stale_urls_as(expired_with(400), served)) as api.cdn:
        report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job0", "download")
    assert error.message == (
        "video host answered 400: the URL has expired or is refused (ExpiredToken: The"
        f" provided token has expired.) (after {MAX_URL_REFRESHES} fresh URLs)"
    )
    assert served == ["stale"] * (1 + MAX_URL_REFRESHES) and api.created == ["g0-p0"]


class StaleWhileSet(FakeApi):
    """Hands out ``?v=stale`` video URLs while ``stale`` is set, ``?v=fresh`` ones after."""

    stale = True

    async def fetch(self, generation_id: str) -> Generation:
        g = await super().fetch(generation_id)
        v = "stale" if self.stale else "fresh"
        return replace(g, video_url=f"{g.video_url}?v={v}") if g.video_url else g


@pytest.mark.parametrize("body", [MP4[: len(MP4) // 2], UNREADABLE], ids=["cut", "unreadable"])
async def test_a_video_every_url_brings_damaged_fails_the_download_and_is_polled_next_run(
    tmp_path: Path, body: bytes
) -> None:
    served: list[str] = []
    m, s = manifest(1, tmp_path), settings(tmp_path, download_retries=1)
    api = StaleWhileSet("", polls_to_finish=1)
    async with serve(serving_stale_urls_as(lambda: web.Response(body=body), served)) as api.cdn:
        report = await run(m, s, api=api)
        assert report.exit_code == 1 and report.counts == {"failed": 1}
        [(job_id, error)] = report.failed
        assert (job_id, error.kind) == ("job0", "download")
        assert error.message.endswith(f" (after {MAX_URL_REFRESHES} fresh URLs)")
        assert served == ["stale"] * (1 + MAX_URL_REFRESHES)  # each URL once: a whole answer
        out = tmp_path / "out"
        assert not (out / "job0.mp4").exists() and not list(out.glob("*.part*"))
        # Never done: the next run polls the generation again, at no charge.
        api.stale = False
        again = await run(m, s, api=api)
    assert again.exit_code == 0 and api.created == ["g0-p0"]
    assert (out / "job0.mp4").read_bytes() == MP4


async def test_a_done_video_an_earlier_version_recorded_unreadable_is_fetched_again(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(1, tmp_path)
    out = ensure_dir(tmp_path / "out")
    cut = MP4[: len(MP4) // 2]
    (out / "job0.mp4").write_bytes(cut)
    ledger = Ledger.open(out)
    job = m.jobs[0]
    await ledger.record("intent", job.id, crid="c", key=job.key, model=job.model)
    await ledger.record("submitted", job.id, gen="g0-p0")
    await ledger.record("completed", job.id, url=f"{cdn}/v/g0-p0.mp4")
    digest = hashlib.sha256(cut).hexdigest()
    mtime = (out / "job0.mp4").stat().st_mtime_ns
    await ledger.record(
        "done",
        job.id,
        file="job0.mp4",
        bytes=len(cut),
        sha256=digest,
        mtime_ns=mtime,
        video={"error": "Invalid data found when processing input"},
        flags=["unreadable: Invalid data found when processing input"],
    )
    ledger.close()
    api = FakeApi(cdn, polls_to_finish=1)
    api.created, api.polls = ["g0-p0"], {"g0-p0": 0}
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert api.polls == {"g0-p0": 1} and api.created == ["g0-p0"]  # fetched again, not paid
    assert (out / "job0.mp4").read_bytes() == MP4


class MovedHost(FakeApi):
    """Hands out URLs on a host that has gone until ``moved_after`` polls of a generation,
    then URLs on the live host: a CDN that moved, as a restarted simulator's does."""

    def __init__(self, cdn: str, polls_to_finish: int, moved_after: int) -> None:
        super().__init__(cdn, polls_to_finish)
        self.gone = dead_host()
        self.moved_after = moved_after

    async def fetch(self, generation_id: str) -> Generation:
        g = await super().fetch(generation_id)
        if g.video_url and self.polls[generation_id] <= self.moved_after:
            return replace(g, video_url=g.video_url.replace(self.cdn, self.gone))
        return g


async def test_an_unreachable_video_host_gets_a_fresh_url_once_retries_run_out(
    cdn: str, tmp_path: Path
) -> None:
    api = MovedHost(cdn, polls_to_finish=1, moved_after=1)
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert api.polls == {"g0-p0": 2} and api.created == ["g0-p0"]  # polled again, not paid
    assert (tmp_path / "out" / "job0.mp4").read_bytes() == MP4


async def test_a_completed_job_whose_url_names_a_host_gone_since_resumes(
    cdn: str, tmp_path: Path
) -> None:
    # The ledger of a run killed between "completed" and "done": its URL names a video host
    # that has gone since (a restarted simulator's CDN port, a CDN host retired overnight).
    m = manifest(1, tmp_path)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    job = m.jobs[0]
    await ledger.record("intent", job.id, crid="c", key=job.key, model=job.model)
    await ledger.record("submitted", job.id, gen="g0-p0")
    await ledger.record("completed", job.id, url=f"{dead_host()}/v/g0-p0.mp4")
    ledger.close()
    api = FakeApi(cdn, polls_to_finish=1)
    api.created, api.polls = ["g0-p0"], {"g0-p0": 0}
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1}
    assert api.polls == {"g0-p0": 1} and api.created == ["g0-p0"]
    assert (tmp_path / "out" / "job0.mp4").read_bytes() == MP4


async def test_a_video_host_that_stays_unreachable_fails_after_the_fresh_urls(
    cdn: str, tmp_path: Path
) -> None:
    api = MovedHost(cdn, polls_to_finish=1, moved_after=10**9)
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 1
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job0", "download")
    port = api.gone.rsplit(":", 1)[1]
    assert error.message.startswith(
        f"cannot fetch video: ClientConnectorError: Cannot connect to host 127.0.0.1:{port}"
    )
    assert error.message.endswith(f" (after {MAX_URL_REFRESHES} fresh URLs)")
    assert api.polls == {"g0-p0": 1 + MAX_URL_REFRESHES} and api.created == ["g0-p0"]


class MalformedUrl(FakeApi):
    """Hands out ``url`` for job1's generation (prompt p1) while ``bad`` is set."""

    def __init__(self, cdn: str, url: str) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.url = url
        self.bad = True

    async def fetch(self, generation_id: str) -> Generation:
        g = await super().fetch(generation_id)
        if g.video_url and self.bad and generation_id.endswith("-p1"):
            return replace(g, video_url=self.url)
        return g


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:99999/v.mp4", "its port is not a number from 1 to 65535"),
        ("http://cdn:abc/v.mp4", "its port is not a number from 1 to 65535"),
        ("http://[::1/v.mp4", "its host cannot be read"),
        ("http://a..example/v.mp4", "it cannot be sent as written (encoding with 'idna'"),
    ],
)
async def test_a_malformed_video_url_fails_its_job_not_the_run(
    cdn: str, tmp_path: Path, url: str, reason: str
) -> None:
    # A ValueError from the URL checks stopped the run (exit 3) with the job left completed,
    # so every rerun stopped too, before the other paid videos were fetched.
    m, api = manifest(3, tmp_path), MalformedUrl(cdn, url)
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 2, "failed": 1}
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job1", "url_rejected") and reason in error.message
    again = await run(m, settings(tmp_path), api=api)  # polled again for another URL: the same
    assert again.exit_code == 1 and again.counts == {"done": 2, "failed": 1}
    assert api.polls["g1-p1"] == 2 and len(api.created) == 3
    api.bad = False  # the API mends its URL: fetched, never paid for again
    mended = await run(m, settings(tmp_path), api=api)
    assert mended.exit_code == 0 and mended.counts == {"done": 3} and len(api.created) == 3


async def test_a_completed_job_whose_url_is_malformed_resumes_without_stopping_the_run(
    cdn: str, tmp_path: Path
) -> None:
    # The ledger the bug left: the job completed with a URL no request can be made of.
    m = manifest(2, tmp_path)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    for job in m.jobs:
        await ledger.record("intent", job.id, crid=f"c{job.id}", key=job.key, model=job.model)
    await ledger.record("submitted", "job0", gen="g0-p0")
    await ledger.record("completed", "job0", url="http://127.0.0.1:99999/v/g0-p0.mp4")
    await ledger.record("submitted", "job1", gen="g1-p1")
    ledger.close()
    api = FakeApi(cdn, polls_to_finish=1)
    api.created, api.polls = ["g0-p0", "g1-p1"], {"g0-p0": 0, "g1-p1": 0}
    report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 1, "failed": 1}
    assert [(j, e.kind) for j, e in report.failed] == [("job0", "url_rejected")]
    again = await run(m, settings(tmp_path), api=api)  # a poll brings a URL that works
    assert again.exit_code == 0 and again.counts == {"done": 2}
    assert api.polls == {"g0-p0": 1, "g1-p1": 1} and len(api.created) == 2


async def test_an_unexpected_error_in_one_download_fails_that_job_not_the_run(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import veobatch.runner as runner_module

    real = runner_module.download

    async def buggy(session: Any, url: str, out: Path, job_id: str, **kw: Any) -> Any:
        if job_id == "job1":
            raise RuntimeError("boom")
        return await real(session, url, out, job_id, **kw)

    m, api = manifest(3, tmp_path), FakeApi(cdn, polls_to_finish=1)
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="veobatch"):
        patch.setattr(runner_module, "download", buggy)
        report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 2, "failed": 1}
    [(job_id, error)] = report.failed
    assert (job_id, error.kind) == ("job1", "download")
    assert error.message == "unexpected error fetching the video: RuntimeError: boom"
    [crash] = [r for r in caplog.records if r.getMessage().startswith("download crashed job=job1")]
    assert crash.levelname == "ERROR" and crash.exc_info and crash.exc_info[0] is RuntimeError
    again = await run(m, settings(tmp_path), api=api)  # polled again, at no charge
    assert again.exit_code == 0 and again.counts == {"done": 3} and len(api.created) == 3


async def test_a_ledger_error_met_in_a_download_still_stops_the_run(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import veobatch.runner as runner_module

    async def broken(*a: Any, **kw: Any) -> Any:
        raise LedgerError("cannot write ledger.jsonl: No space left on device")

    monkeypatch.setattr(runner_module, "download", broken)
    with pytest.raises(LedgerError, match="No space left on device"):
        await run(manifest(2, tmp_path), settings(tmp_path), api=FakeApi(cdn, polls_to_finish=1))


async def test_fresh_urls_after_the_first_come_after_a_growing_pause(
    cdn: str, tmp_path: Path
) -> None:
    # Three refreshes went within 0.1 s: a host refusing a fresh URL for a few seconds (a copy
    # still spreading) failed the job for the night.
    polled: list[float] = []

    class Timed(MovedHost):
        async def fetch(self, generation_id: str) -> Generation:
            polled.append(time.monotonic())
            return await super().fetch(generation_id)

    api = Timed(cdn, polls_to_finish=1, moved_after=10**9)
    s = settings(tmp_path, backoff_base_s=0.02, backoff_max_s=1.0, download_retries=0)
    report = await run(manifest(1, tmp_path), s, api=api)
    assert report.exit_code == 1 and len(polled) == 1 + MAX_URL_REFRESHES
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    assert gaps[1] >= 0.1 and gaps[2] >= 0.4  # 5 and 20 times the base (5 s, 20 s by default)


class HandsOut(FakeApi):
    """Sets ``all_out`` once every job's first video URL has been handed out; with
    ``refuse_first``, the first URL handed out is marked ``?v=stale``, its next ``?v=fresh``."""

    def __init__(self, cdn: str, jobs: int, *, refuse_first: bool = False) -> None:
        super().__init__(cdn, polls_to_finish=1)
        self.jobs = jobs
        self.refuse_first = refuse_first
        self.stale: str | None = None
        self.all_out = anyio.Event()

    async def fetch(self, generation_id: str) -> Generation:
        g = await super().fetch(generation_id)
        if self.refuse_first and self.stale is None and g.video_url:
            self.stale = generation_id
        if g.video_url and generation_id == self.stale:
            tag = "stale" if self.polls[generation_id] == 1 else "fresh"
            g = replace(g, video_url=f"{g.video_url}?v={tag}")
        if sum(1 for n in self.polls.values() if n) == self.jobs:
            self.all_out.set()
        return g


async def test_a_fresh_url_is_fetched_before_the_videos_queued_before_it(tmp_path: Path) -> None:
    # A refreshed URL queued behind every pending download expired again before its turn
    # (32 of 2,000 jobs failed in a soak with URLs valid for 15 s and a slow video host).
    served: list[str] = []
    api: HandsOut

    async def video(request: web.Request) -> web.Response:
        await api.all_out.wait()  # the whole backlog is queued before the refusal
        await anyio.sleep(0.05)  # and recorded by the runner, after the last poll's answer
        name = request.match_info["gen"] + ":" + request.query.get("v", "")
        served.append(name)
        return web.Response(status=410) if name.endswith(":stale") else web.Response(body=MP4)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    async with serve(app) as base:
        api = HandsOut(base, jobs=6, refuse_first=True)
        s = settings(tmp_path, concurrency=6, download_concurrency=1)
        report = await run(manifest(6, tmp_path), s, api=api)
    assert report.exit_code == 0 and report.counts == {"done": 6}
    assert len(served) == 7 and served[0] == f"{api.stale}:stale"
    # Only the video the worker took up while the fresh URL was asked for goes before it,
    # not the four others queued before it.
    assert served.index(f"{api.stale}:fresh") <= 2


async def test_a_retry_wait_does_not_hold_a_download_worker(tmp_path: Path) -> None:
    # The only download worker slept through a video's backoff while finished videos waited.
    served: list[tuple[str, float]] = []
    api: HandsOut

    async def video(request: web.Request) -> web.Response:
        await api.all_out.wait()
        await anyio.sleep(0.05)
        served.append((request.match_info["gen"], time.monotonic()))
        if len(served) == 1:  # the first video asked for: come back in two seconds
            return web.Response(status=503, headers={"Retry-After": "2"})
        return web.Response(body=MP4)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    async with serve(app) as base:
        api = HandsOut(base, jobs=3)
        s = settings(tmp_path, concurrency=3, download_concurrency=1)
        report = await run(manifest(3, tmp_path), s, api=api)
    assert report.exit_code == 0 and report.counts == {"done": 3}
    gens = [gen for gen, _ in served]
    # The two other videos went while the first waited out its two seconds, then the first.
    assert len(gens) == 4 and len(set(gens[:3])) == 3 and gens[3] == gens[0]
    assert served[3][1] - served[0][1] >= 2 - 0.01  # and not before the host asked


async def test_a_full_disk_fails_the_download_not_the_run(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import veobatch.downloader as dl

    def full(self: object, data: bytes, sync: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    m = manifest(2, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    with monkeypatch.context() as patch:
        patch.setattr(dl._PartWriter, "_write_all", full)
        report = await run(m, settings(tmp_path), api=api)
    assert report.exit_code == 1
    assert sorted((j, e.kind, e.message) for j, e in report.failed) == [
        (f"job{i}", "download", f"cannot write job{i}.mp4: No space left on device")
        for i in range(2)
    ]
    again = await run(m, settings(tmp_path), api=api)  # room again: fetched, not paid for again
    assert again.exit_code == 0 and again.counts == {"done": 2} and len(api.created) == 2


async def test_a_video_host_429_is_waited_out_as_long_as_it_asks(tmp_path: Path) -> None:
    asked: list[float] = []

    async def video(request: web.Request) -> web.Response:
        asked.append(time.monotonic())
        if len(asked) == 1:
            return web.Response(status=429, headers={"Retry-After": "0.3"})
        return web.Response(body=MP4)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    async with serve(app) as base:  # the settings' backoff is zero: only Retry-After waits
        report = await run(manifest(1, tmp_path), settings(tmp_path), api=FakeApi(base, 1))
    assert report.exit_code == 0 and len(asked) == 2
    assert asked[1] - asked[0] >= 0.3


def full_disk_for(name: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make writes to files called ``name`` fail with ENOSPC; returns the paths refused."""
    refused: list[str] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            refused.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return refused


async def test_a_full_disk_for_results_json_warns_once_and_the_run_goes_on(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import veobatch.ledger as ledger_module

    def full(path: Path, data: bytes) -> None:
        assert path.name == "results.json"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger_module, "atomic_write_bytes", full)
    s = settings(tmp_path, ledger_flush_interval_s=0.005)
    report = await run(manifest(6, tmp_path), s, api=FakeApi(cdn, polls_to_finish=20), verify=False)
    assert report.exit_code == 0 and report.counts == {"done": 6}
    problems = [r for r in caplog.records if "results.json" in r.getMessage()]
    assert [r.levelname for r in problems] == ["WARNING", "ERROR"]  # once a run, then the end
    assert "No space left on device" in problems[-1].getMessage()
    assert not (tmp_path / "out" / "results.json").exists()


async def test_a_ledger_that_cannot_be_written_stops_the_run_before_any_post(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    refused = full_disk_for("ledger.jsonl", monkeypatch)
    with pytest.raises(LedgerError, match="No space left on device"):  # ours, not a group
        await run(manifest(3, tmp_path), settings(tmp_path), api=api)
    monkeypatch.undo()
    assert refused and api.created == []  # no intent on disk: no POST sent
    assert not (tmp_path / "out" / "results.json").exists()  # it would claim more than the ledger
    again = await run(manifest(3, tmp_path), settings(tmp_path), api=api)  # room again
    assert again.exit_code == 0 and len(api.created) == 3


async def test_generation_ids_a_full_ledger_could_not_record_are_logged_and_recovered(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The disk filled after the intents: the ids the API answered were in no file and no log
    # line, and the next night called them "answers lost in transit".
    api = FakeApi(cdn, polls_to_finish=1)
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if b'"ev":"submitted"' in bytes(data) and os.readlink(f"/proc/self/fd/{fd}").endswith(
            "ledger.jsonl"
        ):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(LedgerError, match="No space left on device"):
        await run(manifest(3, tmp_path), settings(tmp_path), api=api)
    monkeypatch.undo()
    assert api.created  # made and billed
    unrecorded = [r for r in caplog.records if r.getMessage().startswith("unrecorded job=")]
    assert {r.levelname for r in unrecorded} == {"ERROR"}
    said = {r.getMessage().split(" ")[2].removeprefix("gen=").rstrip(":") for r in unrecorded}
    assert said == set(api.created)
    again = await run(manifest(3, tmp_path), settings(tmp_path), api=api)  # room again
    assert again.exit_code == 0 and again.counts == {"done": 3}
    n = len(api.created) - (3 - again.adopted)  # the rest were never sent: submitted now
    assert again.adopted == again.adopted_unrecorded == n > 0
    lines = run_summary(again, 3)
    assert f"recovered {n} generations from the usage logs (their ids not on record:" in "\n".join(
        lines
    )
    assert not any("lost in transit" in line for line in lines)


@pytest.mark.parametrize("how", ["emptied", "deleted", "results_only"])
async def test_a_lost_ledger_beside_finished_work_refuses_to_pay_again(
    cdn: str, tmp_path: Path, how: str
) -> None:
    m = manifest(4, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    if how == "deleted":
        (out / "ledger.jsonl").unlink()
    else:
        (out / "ledger.jsonl").write_bytes(b"")
    if how == "results_only":
        for video in out.glob("*.mp4"):
            video.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    with pytest.raises(LedgerError, match="empty or missing") as refused:
        await run(m, settings(tmp_path), api=api)
    assert len(api.created) == 4  # nothing sent
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before
    message = str(refused.value)
    assert "Restore the ledger" in message and "--out" in message
    assert "results.json records 4 submitted jobs" in message
    if how != "results_only":
        assert "4 videos (job0.mp4, job1.mp4, job2.mp4, ...)" in message


@pytest.mark.parametrize("left", [".thumbs", "ledger.jsonl.torn-1700000000"])
async def test_a_tidied_folder_still_known_as_ours_refuses_to_pay_again(
    cdn: str, tmp_path: Path, left: str
) -> None:
    # An operator deletes the ledger, results.json and report.html but keeps the videos: the
    # report's thumbnail cache, or a torn ledger tail kept aside, still shows a run wrote here.
    m = manifest(3, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    out = tmp_path / "out"
    for name in ("ledger.jsonl", "results.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    if left == ".thumbs":
        (out / left).mkdir(exist_ok=True)
    else:
        (out / left).write_bytes(b'{"ev":')
    with pytest.raises(LedgerError, match="empty or missing") as refused:
        await run(m, settings(tmp_path), api=api)
    assert len(api.created) == 3  # nothing sent
    assert "3 videos (job0.mp4, job1.mp4, job2.mp4)" in str(refused.value)


async def test_a_hand_edited_results_row_whose_id_is_no_string_names_no_job(
    cdn: str, tmp_path: Path
) -> None:
    # Beside an empty ledger, rows are read to tell whether this directory held these jobs: a
    # row whose id is a list (unhashable) or a number is no job of the manifest's.
    out = ensure_dir(tmp_path / "out")
    rows = [{"id": ["job0"], "generation_id": "g"}, {"id": 7, "generation_id": "g"}, "job0"]
    (out / "results.json").write_text(json.dumps({"jobs": rows}))
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and len(api.created) == 1
    # One row that does name a job still counts.
    (out / "ledger.jsonl").write_bytes(b"")
    rows.append({"id": "job0", "generation_id": "g"})
    (out / "results.json").write_text(json.dumps({"jobs": rows}))
    with pytest.raises(LedgerError, match=r"results\.json records 1 submitted job and"):
        await run(manifest(1, tmp_path), settings(tmp_path), api=api)


async def test_a_fresh_out_holding_a_same_named_file_runs_and_keeps_it(
    cdn: str, tmp_path: Path
) -> None:
    # Not a veobatch output directory (no results.json): the user's file is no sign of a lost
    # ledger, so the run goes ahead, and the file is kept aside rather than replaced.
    out = tmp_path / "out"
    out.mkdir()
    (out / "job0.mp4").write_bytes(b"notes, not a video")
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and len(api.created) == 1
    assert (out / "job0.mp4").read_bytes() == MP4
    assert [p.read_bytes() for p in out.glob("job0@*.mp4")] == [b"notes, not a video"]


async def test_a_video_the_ledger_does_not_know_is_kept_not_overwritten(
    cdn: str, tmp_path: Path
) -> None:
    import hashlib

    out = tmp_path / "out"
    m = manifest(1, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)  # the ledger has records from now on
    two = manifest(2, tmp_path)
    foreign = b"\x00\x00\x00\x18ftypmp42 someone else's video"
    (out / "job1.mp4").write_bytes(foreign)
    tag = hashlib.sha256(foreign).hexdigest()[:8]
    (out / f"job1@{tag}.mp4").write_bytes(b"kept earlier")  # never overwritten either
    report = await run(two, settings(tmp_path), api=api)
    assert report.exit_code == 0 and len(api.created) == 2
    assert (out / "job1.mp4").read_bytes() == MP4
    assert (out / f"job1@{tag}-2.mp4").read_bytes() == foreign
    assert (out / f"job1@{tag}.mp4").read_bytes() == b"kept earlier"


async def test_a_foreign_video_is_hashed_off_the_event_loop(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copied-in video may be gigabytes: hashing it on the loop would stall every poll.
    import threading

    import veobatch.runner as runner_mod

    threads: list[threading.Thread] = []
    real = runner_mod.sha256_file

    def spy(path: Path) -> str:
        threads.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(runner_mod, "sha256_file", spy)
    out = tmp_path / "out"
    api = FakeApi(cdn, polls_to_finish=1)
    await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    (out / "job1.mp4").write_bytes(b"someone else's video")
    report = await run(manifest(2, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert [p.read_bytes() for p in out.glob("job1@*.mp4")] == [b"someone else's video"]


# -- what cannot be kept aside, and links in a shared output folder -----------------------


@contextlib.contextmanager
def _obstructed(spot: Path, what: str, elsewhere: Path) -> Iterator[list[bool]]:
    """Put at ``spot`` what no new video may replace or be kept aside from; yields what
    fifos.fifo_at does (a FIFO read would be freed after a while, and noted)."""
    if what == "fifo":
        with fifo_at(spot) as freed:
            yield freed
        return
    if what == "directory":
        spot.mkdir()
    elif what in ("link", "dangling link"):
        if what == "link":
            elsewhere.write_bytes(b"precious data")
        spot.symlink_to(elsewhere)
    else:  # unreadable: a file of another user, mode 0600
        spot.write_bytes(b"someone's video")
        spot.chmod(0)
    yield []


def _reads_anything(tmp: Path) -> bool:
    """Root (with its capabilities) reads a file whatever its mode."""
    probe = tmp / "mode-000"
    probe.write_bytes(b"")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return False
    finally:
        probe.unlink()
    return True


@pytest.mark.parametrize("what", ["directory", "fifo", "link", "dangling link", "unreadable"])
async def test_what_cannot_be_kept_aside_at_a_new_jobs_name_fails_that_job_alone_unsent(
    cdn: str, tmp_path: Path, what: str
) -> None:
    # A directory there ended every run with exit 3 ("Is a directory") after other jobs'
    # creates were paid for, night after night; a FIFO hung the run past SIGTERM; a link was
    # followed. Now: named, failed unsent, and the other jobs go on.
    if what == "unreadable" and _reads_anything(tmp_path):
        pytest.skip("this user reads a file of mode 000 (root): the case needs a non-root user")
    out = tmp_path / "out"
    out.mkdir()
    spot, elsewhere = out / "job0.mp4", tmp_path / "elsewhere.mp4"
    m = manifest(3, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    with _obstructed(spot, what, elsewhere) as freed:
        report = await run(m, settings(tmp_path), api=api)
        again = await run(m, settings(tmp_path), api=api)  # still there: still named
    assert not freed  # the FIFO was never opened
    assert report.exit_code == 1 and report.counts == {"done": 2, "failed": 1}
    assert sorted(api.created) == ["g0-p1", "g1-p2"]  # nothing sent for job0
    ((job_id, error),) = report.failed
    assert job_id == "job0" and error.kind == "output_blocked"
    assert error.message.startswith(f"{spot} is a") and "nothing is sent" in error.message
    assert f"job0: output_blocked: {spot} is a" in "\n".join(run_summary(report, report.total))
    assert (spot.is_symlink() or spot.exists()) and not list(out.glob("job0@*"))  # not moved
    if what == "link":
        assert elsewhere.read_bytes() == b"precious data"
    assert again.exit_code == 1 and again.failed == report.failed and len(api.created) == 2
    if what == "directory":
        spot.rmdir()
    else:
        spot.unlink()
    cleared = await run(m, settings(tmp_path), api=api)
    assert cleared.exit_code == 0 and api.created[2:] == ["g2-p0"]
    assert (out / "job0.mp4").read_bytes() == MP4


async def test_what_appears_at_a_jobs_name_after_planning_fails_that_job_alone_unsent(
    cdn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    class Obstructing(FakeApi):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            (out / "job1.mp4").mkdir(exist_ok=True)  # made while job1 waits for its slot
            return await super().create(body, client_request_id=client_request_id)

    api = Obstructing(cdn, polls_to_finish=1)
    report = await run(manifest(3, tmp_path), settings(tmp_path, concurrency=1), api=api)
    assert report.exit_code == 1 and report.counts == {"done": 2, "failed": 1}
    assert api.created == ["g0-p0", "g1-p2"]
    ((job_id, error),) = report.failed
    assert job_id == "job1" and error.kind == "output_blocked"
    assert f"{out / 'job1.mp4'} is a directory" in error.message
    assert report.estimated_jobs == 2  # its reservation given back: it was never sent


@pytest.mark.parametrize("cause", ["no_answer", "crash"])
async def test_a_resubmission_blocked_by_what_is_at_its_name_keeps_what_may_exist(
    cdn: str, tmp_path: Path, cause: str
) -> None:
    # no_answer: resent only with --resubmit-uncertain, its first POST may exist: it stays
    # uncertain, that POST on record. crash: the usage logs prove nothing was made: failed.
    m = manifest(1, tmp_path)
    crid = seed_uncertain(tmp_path, m.jobs[0], cause, "timed out", now=time.time())
    (tmp_path / "out" / "job0.mp4").mkdir()
    api = FakeApi(cdn, polls_to_finish=1)
    api.hide_from_logs = True
    report = await run(m, settings(tmp_path, resubmit_uncertain=True), api=api)
    assert api.created == [] and report.exit_code == 1
    st = load_states(tmp_path / "out")["job0"]
    assert st.error is not None and "job0.mp4 is a directory" in st.error.message
    if cause == "no_answer":
        assert report.uncertain == ["job0"] and st.status == "uncertain"
        assert st.client_request_id == crid  # the POST that may exist, still looked up
    else:
        assert st.status == "failed" and st.error.kind == "output_blocked"


async def test_links_in_a_shared_output_folder_are_never_written_through(
    cdn: str, tmp_path: Path
) -> None:
    # A planted <id>.mp4.part link got the video written over its target, and the link became
    # the job's "done" video; a lock link truncated its target to the pid.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious data")
    real = tmp_path / "data" / "videos"
    real.mkdir(parents=True)
    out = tmp_path / "out"
    out.symlink_to(real)  # the folder itself reached through a link: that is fine
    (real / "job0.mp4.part").symlink_to(victim)
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(manifest(2, tmp_path), settings(tmp_path), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    assert victim.read_bytes() == b"precious data"
    video = real / "job0.mp4"
    assert not video.is_symlink() and video.read_bytes() == MP4
    old = time.time() - 3600
    (tmp_path / "tmpabcd1234.tmp").write_bytes(b"not veobatch's")
    os.utime(tmp_path / "tmpabcd1234.tmp", (old, old))
    (real / ".thumbs").symlink_to(tmp_path, target_is_directory=True)
    await run(manifest(2, tmp_path), settings(tmp_path), api=api)
    assert (tmp_path / "tmpabcd1234.tmp").exists()  # not cleaned up as a stale thumbnail's
    (real / ".veobatch.lock").unlink()
    (real / ".veobatch.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"is a symbolic link .*not veobatch's lock file"):
        await run(manifest(3, tmp_path), settings(tmp_path), api=api)
    assert victim.read_bytes() == b"precious data" and len(api.created) == 2


# -- the cost limit ------------------------------------------------------------------------

PRICED = {"prices": {"google/veo-3.1-t2v": 0.1}}  # the fake's 8 s jobs: $0.80 each


async def test_each_risked_resubmission_reserves_again_under_the_limit(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.error_after_create = NoAnswerError("reset"), True  # created, unanswered
    api.hide_from_logs = True  # and never found: every look-up is uncertain
    s = settings(tmp_path, resubmit_uncertain=True, max_cost_usd=1.7, **PRICED)
    report = await run(manifest(1, tmp_path), s, api=api)
    assert len(api.created) == 2  # $0.80 twice fits $1.70; a third would not
    assert report.estimated_usd == pytest.approx(1.6) and report.estimated_jobs == 2
    assert report.risked_duplicates == 1
    # Both may exist and be billed: uncertain, not held back as if nothing were sent.
    assert report.uncertain == ["job0"] and report.over_budget == []
    assert report.counts == {"uncertain": 1} and report.exit_code == 1


async def test_a_resubmission_after_a_proven_failure_needs_no_second_reservation(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = ServerError("HTTP 502", status=502), 2  # logged: failed
    s = settings(tmp_path, max_cost_usd=0.8, **PRICED)
    report = await run(manifest(1, tmp_path), s, api=api)
    assert report.exit_code == 0 and report.counts == {"done": 1} and len(api.created) == 1
    assert report.over_budget == [] and report.estimated_usd == pytest.approx(0.8)


async def test_risked_resubmissions_that_run_out_leave_the_job_uncertain(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.error_after_create = NoAnswerError("reset"), True
    api.hide_from_logs = True
    s = settings(tmp_path, resubmit_uncertain=True, submit_retries=2)
    report = await run(manifest(1, tmp_path), s, api=api)
    assert len(api.created) == 3
    # Not failed: --retry-failed would pay for it yet again.
    assert report.failed == [] and report.uncertain == ["job0"]


async def test_a_done_job_whose_changed_request_is_held_back_exits_1(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(1, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(m, settings(tmp_path), api=api)
    changed = Manifest(m.path, (Job("job0", {**m.jobs[0].request, "seed": 5}, 0),))
    report = await run(changed, settings(tmp_path, max_cost_usd=0.0), api=api)
    assert len(api.created) == 1 and report.over_budget == ["job0"] and report.exit_code == 1


async def test_a_failed_job_retried_but_held_back_exits_1(cdn: str, tmp_path: Path) -> None:
    m = manifest(1, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1, fail={"p0"})
    await run(m, settings(tmp_path), api=api)
    s = settings(tmp_path, retry_failed=True, max_cost_usd=0.0)
    report = await run(m, s, api=api)
    assert len(api.created) == 1 and report.over_budget == ["job0"] and report.failed == []
    assert report.exit_code == 1


async def test_a_crash_proven_unsent_then_held_back_is_pending_not_uncertain(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(1, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-never-sent")])
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(m, settings(tmp_path, max_cost_usd=0.0), api=api)
    assert api.created == [] and report.uncertain == []
    assert report.over_budget == ["job0"] and report.counts == {"pending": 1}
    assert report.exit_code == 1


async def test_a_5xx_proven_unsent_then_held_back_is_pending_not_uncertain(
    cdn: str, tmp_path: Path
) -> None:
    # An earlier run's 5xx, absent from the usage logs: never created. Held back by the limit,
    # it is pending on record too (it stayed "uncertain" in the ledger, and in `status`).
    m = manifest(1, tmp_path)
    seed_uncertain(tmp_path, m.jobs[0], "server_error", "HTTP 502", now=time.time())
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(m, settings(tmp_path, max_cost_usd=0.0), api=api)
    assert api.created == [] and report.uncertain == [] and report.over_budget == ["job0"]
    assert report.counts == {"pending": 1}
    assert load_states(tmp_path / "out")["job0"].status == "pending"


async def test_a_job_waiting_for_a_slot_when_a_poll_meets_401_is_not_counted_as_sent(
    cdn: str, tmp_path: Path
) -> None:
    class KeyRevoked(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            raise AuthError("HTTP 401: invalid key", status=401)

    api = KeyRevoked(cdn)
    s = settings(tmp_path, concurrency=1, max_cost_usd=100.0, **PRICED)
    report = await run(manifest(2, tmp_path), s, api=api)
    assert report.exit_code == 3 and len(api.created) == 1  # job1 waited for job0's slot
    assert report.estimated_usd == pytest.approx(0.8) and report.estimated_jobs == 1


async def test_a_403_to_a_poll_lets_the_videos_already_found_download(tmp_path: Path) -> None:
    # One 403 to a poll stopped the whole run, the download of a finished, paid video with it.
    started, refused = anyio.Event(), anyio.Event()

    async def video(request: web.Request) -> web.Response:
        started.set()
        await refused.wait()  # still downloading when the poll is refused
        return web.Response(body=MP4)

    class RefusesJob1(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            if generation_id.endswith("-p1"):
                await started.wait()
                refused.set()
                raise AuthError("HTTP 403: Forbidden resource", status=403)
            return await super().fetch(generation_id)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    async with serve(app) as base:
        api = RefusesJob1(base, polls_to_finish=1)
        report = await run(manifest(3, tmp_path), settings(tmp_path, concurrency=2), api=api)
    assert report.exit_code == 3 and report.auth_error is not None
    assert report.auth_error.startswith("the API refused the request: HTTP 403")
    assert report.counts == {"done": 1, "submitted": 1, "pending": 1}
    assert (tmp_path / "out" / "job0.mp4").read_bytes() == MP4
    assert len(api.created) == 2  # job2 never sent


class _Said(logging.Handler):
    """Sets ``event`` once a log line holding ``words`` is written."""

    def __init__(self, words: str, event: anyio.Event) -> None:
        super().__init__()
        self.words, self.event = words, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


async def test_a_url_refused_after_a_poll_401_is_left_for_the_next_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No poll can ask for a fresh URL once the key is refused: the job stays completed, for
    # the next run to download (or poll for a fresh URL), and the run ends.
    started, stopped = anyio.Event(), anyio.Event()

    async def video(request: web.Request) -> web.Response:
        started.set()
        await stopped.wait()
        return web.Response(status=400, body=EXPIRED_TOKEN)

    class RefusesJob1(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            if generation_id.endswith("-p1"):
                await started.wait()
                raise AuthError("HTTP 401: invalid key", status=401)
            return await super().fetch(generation_id)

    app = web.Application()
    app.router.add_get("/v/{gen}.mp4", video)
    said = _Said("no new submissions", stopped)
    logging.getLogger("veobatch.runner").addHandler(said)
    try:
        async with serve(app) as base:
            api = RefusesJob1(base, polls_to_finish=1)
            s = settings(tmp_path, concurrency=2)
            report = await run(manifest(2, tmp_path), s, api=api)
    finally:
        logging.getLogger("veobatch.runner").removeHandler(said)
    assert report.exit_code == 3 and report.counts == {"completed": 1, "submitted": 1}
    assert api.polls == {"g0-p0": 1, "g1-p1": 0}  # no poll for a fresh URL
    assert any("no fresh URL this run" in r.getMessage() for r in caplog.records)


async def test_a_stop_gives_back_the_reservation_of_a_job_never_sent(
    cdn: str, tmp_path: Path
) -> None:
    api = FakeApi(cdn)
    api.create_error = AuthError("HTTP 403: no credits", status=403)
    s = settings(tmp_path, concurrency=1, max_cost_usd=100.0, **PRICED)
    report = await run(manifest(3, tmp_path), s, api=api)
    assert report.exit_code == 3 and api.created == []
    assert report.estimated_usd == pytest.approx(0.0) and report.estimated_jobs == 0


class Filling(FakeApi):
    """Says when the third generation (the default concurrency) has been created."""

    def __init__(self, cdn: str, polls_to_finish: int) -> None:
        super().__init__(cdn, polls_to_finish)
        self.full = anyio.Event()

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        created = await super().create(body, client_request_id=client_request_id)
        if len(self.created) == 3:
            self.full.set()
        return created


async def test_a_stop_signal_while_the_run_plans_ends_it_without_waiting_for_the_plan(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With --verify the plan hashes every finished video: minutes for a night's worth, and a
    # service manager's stop would end in a kill, not exit 75.
    import veobatch.session as runner_module

    real = runner_module.plan_run

    def slow_plan(*args: Any, **kw: Any) -> Any:
        time.sleep(3)
        return real(*args, **kw)

    monkeypatch.setattr(runner_module, "plan_run", slow_plan)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    api = FakeApi(cdn)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def stop_soon() -> None:
                    await anyio.sleep(0.3)
                    os.kill(os.getpid(), signal.SIGTERM)

                tg.start_soon(stop_soon)
                started = time.monotonic()
                report = await run(
                    manifest(2, tmp_path), settings(tmp_path), api=api, handle_signals=True
                )
                took = time.monotonic() - started
    finally:
        signal.signal(signal.SIGTERM, before)
    assert report.exit_code == 75 and api.created == []
    assert took < 2.5  # not the plan's 3 s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_hangup_stops_the_run_like_sigterm(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, sig: signal.Signals
) -> None:
    # Ignored until the run takes it: a signal the run leaves alone fails the test, not pytest.
    before = signal.signal(sig, signal.SIG_IGN)
    api = Filling(cdn, polls_to_finish=10**9)
    reports: list[RunReport] = []

    async def go() -> None:
        reports.append(
            await run(manifest(4, tmp_path), settings(tmp_path), api=api, handle_signals=True)
        )

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(go)
                await api.full.wait()  # every slot taken, one job waiting
                os.kill(os.getpid(), sig)
        after = signal.getsignal(sig)
    finally:
        signal.signal(sig, before)
    assert after == signal.SIG_IGN  # the run gave back what it found
    [report] = reports
    assert report.exit_code == 75 and report.interrupted
    assert report.counts == {"submitted": 3, "pending": 1} and len(api.created) == 3
    assert f"{sig.name}: stopping; run again to resume" in caplog.text


def test_history_samples_leave_out_completions_seen_only_much_later() -> None:
    from veobatch.ledger import JobState
    from veobatch.runner import history_samples

    old = [  # ledgers written before completions said whether they were followed
        JobState("a", model="m", submitted_at=1000.0, completed_at=1120.0),
        JobState("b", model="m", submitted_at=1000.0, completed_at=1000.0 + 86_400),  # next night
        JobState("c", model="m", submitted_at=1000.0),  # never completed
        JobState("d", model="n", submitted_at=1000.0, completed_at=1000.0 + 1800),
    ]
    assert list(history_samples(old, 1800.0)) == [
        ("m", pytest.approx(117.6), 120.0),
        ("n", pytest.approx(1764.0), 1800.0),
    ]
    new = [
        JobState("e", model="m", submitted_at=1000.0, completed_at=1125.0, took=(110.0, 121.5)),
        # resumed after a crash, finished meanwhile: 5 minutes from submission says nothing
        JobState("f", model="m", submitted_at=1000.0, completed_at=1300.0, took=None),
    ]
    assert list(history_samples(new, 1800.0)) == [("m", 110.0, 121.5)]


async def test_a_completion_records_when_it_finished_as_the_polls_saw_it(
    cdn: str, tmp_path: Path
) -> None:
    from veobatch.ledger import Ledger

    api = FakeApi(cdn, polls_to_finish=2)
    await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    ledger = Ledger.open(tmp_path / "out")
    took = ledger.state("job0").took
    ledger.close()
    assert isinstance(took, tuple) and 0 <= took[0] <= took[1] < 5  # seen running, then done


@pytest.mark.parametrize(("ignored", "expected"), [(False, "[1, 2, 15]"), (True, "[2, 15]")])
def test_a_hangup_ignored_at_start_stays_ignored(ignored: bool, expected: str) -> None:
    # `nohup veobatch run ...` ignores SIGHUP so the run outlives the session: keep it so.
    import subprocess
    import sys

    code = (
        "import signal\n"
        f"if {ignored}: signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from veobatch.session import STOP_SIGNALS\n"
        "print(sorted(int(s) for s in STOP_SIGNALS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


async def test_a_404_to_the_create_request_stops_the_run_with_nothing_uncertain(
    cdn: str, tmp_path: Path
) -> None:
    # "Unknown resource" for the endpoint itself (a wrong base path): nothing was created.
    api = FakeApi(cdn)
    api.create_error = NotFoundError("HTTP 404: Cannot POST /api/v2/video/generations", status=404)
    s = settings(tmp_path, concurrency=1, max_cost_usd=100.0, **PRICED)
    report = await run(manifest(2, tmp_path), s, api=api)
    assert report.exit_code == 3 and report.uncertain == [] and report.counts == {"pending": 2}
    assert report.auth_error is not None and "AIMLAPI_BASE_URL" in report.auth_error
    assert report.estimated_usd == pytest.approx(0.0)


async def test_an_uncertain_job_of_an_earlier_run_is_looked_up_around_its_intent(
    cdn: str, tmp_path: Path
) -> None:
    # Made uncertain 10 minutes after its POST (the logs were down); the next night's look-up
    # must search where the POST was logged, not around the later "uncertain" record.
    m = manifest(1, tmp_path)
    now = time.time()
    unread = "the usage logs could not be read"
    crid = seed_uncertain(tmp_path, m.jobs[0], "no_answer", unread, now=now, uncertain_s_ago=3000)
    logged_at = now - 3599  # when the API logged the request

    class Logs(FakeApi):
        async def logs(self, **kw: Any) -> LogPage:
            inside = kw["start"].timestamp() <= logged_at <= kw["end"].timestamp()
            rows = [LogEntry(crid, "gen-x", "succeeded")] if inside else []
            return LogPage(rows, False)

    api = Logs(cdn, polls_to_finish=1)
    api.polls["gen-x"] = 0
    report = await run(m, settings(tmp_path), api=api)
    assert api.created == [] and report.adopted == 1
    assert report.exit_code == 0 and report.counts == {"done": 1}


async def test_jobs_held_back_by_the_cost_limit_do_not_bury_the_log(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = FakeApi(cdn, polls_to_finish=1)
    with caplog.at_level(logging.INFO, logger="veobatch"):
        report = await run(
            manifest(50, tmp_path), settings(tmp_path, max_cost_usd=0.0, **PRICED), api=api
        )
    assert len(report.over_budget) == 50 and api.created == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(m.startswith("not submitted job=") for m in warned) == 20
    assert "not submitted: 30 more jobs over the cost limit (listed in the summary)" in warned


async def test_a_run_removes_what_an_interrupted_write_left_long_ago(
    cdn: str, tmp_path: Path
) -> None:
    out = ensure_dir(tmp_path / "out")
    stale = [out / ".results.json.ab12cd_9.tmp", ensure_dir(out / ".thumbs") / "tmpab12cd_9.tmp"]
    for path in stale:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=FakeApi(cdn))
    assert report.exit_code == 0 and not any(p.exists() for p in stale)


async def test_a_removed_job_whose_post_may_have_created_one_is_looked_up_never_resubmitted(
    cdn: str, tmp_path: Path
) -> None:
    # Killed mid-POST, then taken out of the manifest: the rerun did nothing and exited 0,
    # and a generation paid for was never fetched.
    m = manifest(3, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[1], "crid-paid"), (m.jobs[2], "crid-unsent")])
    api = FakeApi(cdn, polls_to_finish=1)
    await api.create(m.jobs[1].request, client_request_id="crid-paid")  # it did get through
    kept = Manifest(m.path, m.jobs[:1])
    s = settings(tmp_path, logs_grace_s=0.01, resubmit_uncertain=True)
    report = await run(kept, s, api=api)
    assert report.exit_code == 0 and report.adopted == 1, report
    assert len(api.created) == 2  # job0, and job1's one from before: job2 never again
    assert report.states["job1"].status == "done" and (tmp_path / "out" / "job1.mp4").exists()
    assert report.states["job2"].status == "pending" and report.total == 2  # job2: not ours


async def test_a_generation_another_key_created_is_never_remade_by_retry_failed(
    cdn: str, tmp_path: Path
) -> None:
    # Refused to a rotated key, it failed as 'lost', and --retry-failed paid for it again.
    m = manifest(1, tmp_path)
    key_a, key_b = Secret("key-AAAA-1111-old"), Secret("key-BBBB-2222-new")
    job = m.jobs[0]
    await seed_intents(tmp_path, [(job, "c")], key=key_a, gen="gA")

    class Refusing(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            raise BadRequestError("HTTP 400: not yours")

    refusing = Refusing(cdn, polls_to_finish=1)
    report = await run(m, settings(tmp_path, api_key=key_b), api=refusing)
    (error,) = [e for _, e in report.failed]
    assert error.kind == "other_key" and key_a.fingerprint() in error.message
    again = await run(m, settings(tmp_path, api_key=key_b, retry_failed=True), api=refusing)
    assert refusing.created == [] and again.failed[0][1].kind == "other_key"
    api = FakeApi(cdn, polls_to_finish=1)
    api.polls["gA"] = 0
    back = await run(m, settings(tmp_path, api_key=key_a), api=api)
    assert back.exit_code == 0 and api.created == [] and back.states[job.id].status == "done"


async def test_a_request_the_logs_showed_made_is_never_taken_for_absent_later(
    cdn: str, tmp_path: Path
) -> None:
    # A crash's look-up found its row without a generation id: uncertain. A later night the
    # row had aged out of the logs, and the crash's kind read that as "never created".
    m = manifest(1, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-made")])
    api = FakeApi(cdn, polls_to_finish=1)
    api.log.append(LogEntry("crid-made", None, "pending"))
    s = settings(tmp_path, logs_grace_s=0.01, lookup_interval_s=0.01)
    first = await run(m, s, api=api)
    error = first.states["job0"].error
    assert first.uncertain == ["job0"] and error is not None and error.kind == "no_answer"
    api.log.clear()
    again = await run(m, s, api=api)
    assert again.uncertain == ["job0"] and api.created == []


async def test_a_removed_job_still_uncertain_is_warned_of_not_failing_every_night(
    cdn: str, tmp_path: Path
) -> None:
    m = manifest(2, tmp_path)
    seed_uncertain(tmp_path, m.jobs[1], "no_answer", "read timeout", now=time.time())
    api = FakeApi(cdn, polls_to_finish=1)
    api.hide_from_logs = True
    s = settings(tmp_path, logs_grace_s=0.01, resubmit_uncertain=True)
    report = await run(Manifest(m.path, m.jobs[:1]), s, api=api)
    assert report.exit_code == 0 and report.uncertain == [] and len(api.created) == 1
    assert report.states["job1"].status == "uncertain"  # on record, never resubmitted


async def test_a_429_is_measured_against_generations_running_not_videos_fetched_again(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Done jobs whose files are gone are polled for a fresh URL: tracked by the poller, but
    # not in flight at the API and holding no slot. Counted, they set the floor of the limit
    # after a 429 (a 429 at 3 running then read as 18 raised the limit to 18).
    m = manifest(4, tmp_path)
    api = FakeApi(cdn, polls_to_finish=1)
    await run(Manifest(m.path, m.jobs[:3]), settings(tmp_path), api=api)
    for f in (tmp_path / "out").glob("job*.mp4"):
        f.unlink()

    class SlowRefetch(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            if generation_id in api.created:  # the three done earlier: still being polled
                await anyio.sleep(0.5)
            return await super().fetch(generation_id)

    again = SlowRefetch(cdn, polls_to_finish=1)
    again.polls.update(api.polls)
    again.create_error, again.errors_left = RateLimitedError("HTTP 429", retry_after_s=0), 1
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(m, settings(tmp_path, concurrency=8), api=again)
    assert report.exit_code == 0 and report.counts == {"done": 4}
    lowered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("429 from")]
    assert lowered and all("in_flight=0" in line for line in lowered), lowered


async def test_a_504_not_in_the_logs_is_uncertain_not_resubmitted(cdn: str, tmp_path: Path) -> None:
    # "Generation timeout": a gateway gave up waiting, and the API may yet create it and log
    # its row after later requests'. Its absence proves nothing, as for no answer at all.
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = ServerError("HTTP 504: Generation timeout", status=504), 1
    api.hide_from_logs = True
    report = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert report.uncertain == ["job0"] and api.created == []
    error = report.states["job0"].error
    assert error is not None and error.kind == "no_answer"


async def test_a_5xx_the_logs_never_caught_up_past_is_left_for_a_later_run(
    cdn: str, tmp_path: Path
) -> None:
    # The last create of a run met a 5xx and nothing later is ever logged: absence after ten
    # graces proved nothing (logs ten graces late paid it twice). Left uncertain, its cause
    # kept, so a later run's look-up (with its own creates logged) can still resubmit it.
    api = FakeApi(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = ServerError("HTTP 502", status=502), 1
    api.hide_from_logs = True
    s = settings(tmp_path, logs_grace_s=0.05, lookup_interval_s=0.01)
    report = await run(manifest(1, tmp_path), s, api=api)
    assert report.uncertain == ["job0"] and api.created == []
    error = report.states["job0"].error
    assert error is not None and error.kind == "server_error" and "may lag" in error.message


async def test_after_a_403_open_look_ups_are_left_for_a_later_run_at_once(
    cdn: str, tmp_path: Path
) -> None:
    # A 5xx's look-up waiting for the logs when a 403 stops submissions: it waited out ten
    # graces (10 min by default) only to end in a resubmission never sent, its request id
    # thrown away. One more read of the logs, then it is left as recorded for the next run.
    class FiveHundredThen403(FakeApi):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            if body["prompt"] == "p0":
                raise ServerError("HTTP 500", status=500)
            raise AuthError("HTTP 403: Insufficient credits", status=403)

    api = FiveHundredThen403(cdn)
    api.hide_from_logs = True  # the logs lag: p0's row is not there yet
    s = settings(tmp_path, concurrency=2, logs_grace_s=30.0, lookup_interval_s=0.05)
    with anyio.fail_after(10):
        report = await run(manifest(2, tmp_path), s, api=api)
    assert report.exit_code == 3 and report.uncertain == ["job0"]
    st = report.states["job0"]
    assert st.error is not None and st.error.kind == "server_error" and st.client_request_id


@pytest.mark.parametrize(
    "then",
    [
        AuthError("HTTP 403: Insufficient credits", status=403),
        RateLimitedError("HTTP 429"),
        BadRequestError("HTTP 400: Body validation error", status=400),
    ],
)
async def test_a_risked_resubmission_refused_keeps_the_earlier_post_on_record(
    cdn: str, tmp_path: Path, then: Exception
) -> None:
    # --resubmit-uncertain sent a job again whose first POST was made (its answer lost, the
    # logs behind), and the API refused the new one. It became never sent (or submit_failed):
    # the next run paid again and the first video was never fetched.
    class FirstLostThenRefused(FakeApi):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            if not self.created:
                await super().create(body, client_request_id=client_request_id)
                raise NoAnswerError("read timeout")  # made, and billed
            raise then

    api = FirstLostThenRefused(cdn, polls_to_finish=1)
    api.hide_from_logs = True
    s = settings(tmp_path, resubmit_uncertain=True, job_timeout_s=0.3)
    report = await run(manifest(1, tmp_path), s, api=api)
    st = report.states["job0"]
    assert report.uncertain == ["job0"] and report.risked_duplicates == 0
    assert report.estimated_jobs == 1  # the refused resend's estimate given back
    assert st.client_request_id == api.log[0].client_request_id  # the POST that was made
    raw = (tmp_path / "out" / "ledger.jsonl").read_bytes()
    intents = [r for r in parse_journal(raw).records if r["ev"] == "intent"]
    # Each resend's intent names the earlier POST, should the run die before its answer.
    assert all(r["prev"]["crid"] == st.client_request_id for r in intents[1:]) and intents[1:]
    assert st.error is not None and "earlier POST" in st.error.message
    # Next night the logs show it: adopted and fetched, nothing paid again.
    api.hide_from_logs = False
    again = await run(manifest(1, tmp_path), settings(tmp_path), api=api)
    assert again.exit_code == 0 and again.adopted == 1 and len(api.created) == 1


async def test_a_generation_polled_again_after_a_timeout_counts_as_running(
    cdn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Timed out last night, still made by the API tonight: it holds a slot on resume, and a
    # 429 must be measured against it too (in_flight=0 set the limit's floor too low).
    m = manifest(2, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-0")], gen="g-late")
    ledger = Ledger.open(tmp_path / "out")
    await ledger.record("failed", "job0", kind="timeout", message="still generating")
    ledger.close()

    class SlowLate(FakeApi):
        async def fetch(self, generation_id: str) -> Generation:
            if generation_id == "g-late":
                await anyio.sleep(0.5)
                return Generation(generation_id, "completed", video_url=f"{self.cdn}/v/g0-p0.mp4")
            return await super().fetch(generation_id)

    api = SlowLate(cdn, polls_to_finish=1)
    api.create_error, api.errors_left = RateLimitedError("HTTP 429", retry_after_s=0), 1
    with caplog.at_level(logging.WARNING, logger="veobatch"):
        report = await run(m, settings(tmp_path, concurrency=8), api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2}
    lowered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("429 from")]
    assert lowered and all("in_flight=1" in line for line in lowered), lowered


async def test_a_crash_during_a_risked_resend_keeps_the_earlier_post(
    cdn: str, tmp_path: Path
) -> None:
    # --resubmit-uncertain sent a job again (its first POST unanswered), and the run died
    # before the resend's answer. The rerun looked up only the resend, found it absent, paid
    # a third time, and never fetched the video the first POST made.
    m = manifest(1, tmp_path)
    job = m.jobs[0]
    api = FakeApi(cdn, polls_to_finish=1)
    ledger = Ledger.open(ensure_dir(tmp_path / "out"))
    await ledger.record("intent", job.id, crid="crid-first", key=job.key, model=job.model)
    await ledger.record("uncertain", job.id, kind="no_answer", message="read timeout")
    prev = restore_fields(replace(ledger.state(job.id)))
    await ledger.record(
        "intent", job.id, crid="crid-resend", key=job.key, model=job.model, prev=prev
    )
    ledger.close()  # killed mid-POST: the resend never arrived
    await api.create(job.request, client_request_id="crid-first")  # the first one was made
    report = await run(m, settings(tmp_path), api=api)
    assert len(api.created) == 1 and report.adopted == 1, api.created
    assert report.exit_code == 0 and report.counts == {"done": 1}


async def test_look_ups_holding_every_slot_do_not_keep_out_the_create_that_settles_them(
    cdn: str, tmp_path: Path
) -> None:
    # Killed between an intent and its POST, with concurrency 1: the rerun's look-up held the
    # only slot while it waited for a later create to show the logs caught up, and no create
    # could be sent for the slot it held. It waited ten graces, then stayed uncertain.
    m = manifest(2, tmp_path)
    await seed_intents(tmp_path, [(m.jobs[0], "crid-never-sent")])
    api = FakeApi(cdn, polls_to_finish=1)
    s = settings(tmp_path, concurrency=1, logs_grace_s=0.05, lookup_interval_s=0.01)
    with anyio.fail_after(10):
        report = await run(m, s, api=api)
    assert report.exit_code == 0 and report.counts == {"done": 2}, report.states
    assert len(api.created) == 2  # job1, then job0 once job1's row proved it never sent


# --- derived ids: a default written out is the same video, under the same id ---------------

_DERIVED_JOBS = """version: 1
{defaults}jobs:
  - {{model: google/veo-3.1-t2v-fast, prompt: a cat, duration: 4}}
  - {{model: google/veo-3.1-t2v-fast, prompt: a dog, duration: 4, variants: 3}}
  - model: google/veo-3.1-t2v-fast
    prompt: a bird
    duration: 4
    matrix: {{aspect_ratio: ["16:9", "9:16"]}}
"""


def _derived_manifest(tmp: Path, defaults: str = "", prompt: str = "a cat") -> Manifest:
    text = _DERIVED_JOBS.format(defaults=defaults).replace("a cat", prompt)
    return parse_manifest(text, path=tmp / "m.yaml")


def _as_named_before(m: Manifest) -> Manifest:
    """``m`` as versions before named its id-less jobs: by their request as written (and each
    take seeded by that id), a default written out giving other ids and seeds."""
    jobs = []
    for job in m.jobs:
        if not job.seeded_take:
            jobs.append(replace(job, id=f"t2v-fast-{request_key(job.request)[:10]}"))
            continue
        unseeded = {k: v for k, v in job.request.items() if k != "seed"}
        base = f"t2v-fast-{request_key(unseeded)[:10]}"
        seed = variant_seed(base, job.seeded_take)
        jobs.append(
            replace(job, id=f"{base}-{job.seeded_take}", request={**job.request, "seed": seed})
        )
    return replace(m, jobs=tuple(jobs))


async def test_a_default_written_out_on_id_less_jobs_pays_for_nothing_again(
    cdn: str, tmp_path: Path
) -> None:
    # Derived ids were made from the request as written: adding `resolution: 1080p` (the
    # model's default) gave every id-less job, take and combination a new id, and paid again.
    plain = _derived_manifest(tmp_path)
    assert len(plain.jobs) == 6 and all(j.derived for j in plain.jobs)
    first = FakeApi(cdn, polls_to_finish=1)
    assert (await run(plain, settings(tmp_path), api=first)).counts == {"done": 6}
    assert len(first.created) == 6
    for defaults in ("defaults: {resolution: 1080p}\n", "defaults: {provider: AUTO}\n", ""):
        m = _derived_manifest(tmp_path, defaults)
        assert [j.id for j in m.jobs] == [j.id for j in plain.jobs], defaults
        api = FakeApi(cdn, polls_to_finish=1)
        report = await run(m, settings(tmp_path), api=api)
        assert report.counts == {"done": 6} and api.created == [], defaults
    # A real change is a new video, under a new id.
    api = FakeApi(cdn, polls_to_finish=1)
    report = await run(_derived_manifest(tmp_path, prompt="a lion"), settings(tmp_path), api=api)
    assert len(api.created) == 1 and report.counts == {"done": 6}


async def test_a_ledger_that_named_id_less_jobs_by_a_default_written_out_pays_for_nothing(
    cdn: str, tmp_path: Path
) -> None:
    # A ledger from before knows these jobs by ids made from the request with its default
    # written out: after the upgrade the same manifest, or one without the default, takes
    # those ids back (and each take its seed), never paying again.
    with_default = _derived_manifest(tmp_path, "defaults: {resolution: 1080p}\n")
    before = _as_named_before(with_default)
    assert not {j.id for j in before.jobs} & {j.id for j in with_default.jobs}
    first = FakeApi(cdn, polls_to_finish=1)
    assert (await run(before, settings(tmp_path), api=first)).counts == {"done": 6}
    for m in (with_default, _derived_manifest(tmp_path), with_default):
        api = FakeApi(cdn, polls_to_finish=1)
        report = await run(m, settings(tmp_path), api=api)
        assert api.created == [] and report.counts == {"done": 6}
        assert sorted(report.states) == sorted(j.id for j in before.jobs)
        rows = json.loads((tmp_path / "out" / "results.json").read_text())["jobs"]
        assert [r["id"] for r in rows] == [j.id for j in before.jobs]
    api = FakeApi(cdn, polls_to_finish=1)
    changed = _derived_manifest(tmp_path, "defaults: {resolution: 1080p}\n", prompt="a lion")
    await run(changed, settings(tmp_path), api=api)
    assert api.created == ["g0-a lion"]


async def test_the_rows_kept_for_results_json_are_let_go_before_the_last_write(
    cdn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every job's encoded row, a folder's earlier nights' among them: the traceback of the
    # periodic writer's cancellation kept its frame, and them, past the run's last write.
    import veobatch.runner as runner_module
    import veobatch.session as session_module

    writers: list[weakref.ref[ResultsWriter]] = []

    class Counted(ResultsWriter):
        def __init__(self, ledger: Ledger, jobs: Iterable[Job]) -> None:
            super().__init__(ledger, jobs)
            writers.append(weakref.ref(self))

    alive_at_the_end: list[ResultsWriter] = []
    last_write = session_module._final_results

    def final(ledger: Ledger, manifest: Manifest) -> None:
        alive_at_the_end.extend(w for ref in writers if (w := ref()) is not None)
        last_write(ledger, manifest)

    monkeypatch.setattr(runner_module, "ResultsWriter", Counted)
    monkeypatch.setattr(session_module, "_final_results", final)
    s = settings(tmp_path, ledger_flush_interval_s=0.005)
    report = await run(manifest(6, tmp_path), s, api=FakeApi(cdn, polls_to_finish=20), verify=False)
    assert report.exit_code == 0 and len(writers) == 1
    assert alive_at_the_end == []
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["done"] == 6
