"""The scheduler: the resume policy as a table, then the submitter against a scripted API."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import random
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from mp4s import mp4
from PIL import Image

from veobatch.client import Created
from veobatch.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NoAnswerError,
    NotSentError,
    RateLimitedError,
    RedirectedError,
    ServerError,
)
from veobatch.jobs import Job, derived_id, request_key
from veobatch.jobview import compact_request
from veobatch.ledger import ErrorInfo, Gone, JobState, Ledger, load_states, parse_journal, replay
from veobatch.manifest import load_manifest, slug
from veobatch.runner import recorded_file
from veobatch.scheduler import (
    GONE_CONFIRM_S,
    KEPT_AS_FOUND,
    Action,
    SubmitOutcome,
    Submitter,
    adopt_recorded_ids,
    backoff_delay_s,
    category,
    client_request_id,
    pays_for_request,
    plan_job,
    plan_run,
    will_remake,
)

JOB = Job("a", {"model": "google/veo-3.1-t2v", "prompt": "p"})


def test_a_video_put_back_is_known_when_its_request_is_written_otherwise_since(
    tmp_path: Path,
) -> None:
    # Delivered for the request with its default written out, then archived, its refetch
    # failed; the manifest since drops the default: the same video. Compared by the raw key
    # alone, the file put back was not the job's, and --retry-failed paid for it again.
    written = Job("a", {**JOB.request, "resolution": "1080p"})
    assert written.key != JOB.key and written.vkey == JOB.vkey
    content = b"\x00\x00\x00\x18ftypmp42"
    done = {"file": "a.mp4", "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    records = [
        {"t": 1, "ev": "intent", "job": "a", "crid": "c", "key": written.key, "vkey": JOB.vkey},
        {"t": 2, "ev": "submitted", "job": "a", "gen": "g"},
        {"t": 3, "ev": "completed", "job": "a", "url": "u"},
        {"t": 4, "ev": "done", "job": "a", **done},
        {"t": 5, "ev": "failed", "job": "a", "kind": "refetch_failed", "message": "missing"},
    ]
    state = replay(records)["a"]
    (tmp_path / "a.mp4").write_bytes(content)  # copied back
    for retry_failed in (False, True):
        plan = plan_job(JOB, state, tmp_path, retry_failed=retry_failed)
        assert (plan.action, plan.restore) == (Action.SKIP, True)
    other = Job("a", {**JOB.request, "resolution": "720p"})  # another video: not this file
    assert plan_job(other, state, tmp_path, retry_failed=True).action is Action.SUBMIT
    # Put back on record, it is done for the request as the manifest now writes it.
    own = state.delivered
    assert own is not None
    restored = replay([*records, {"t": 6, "ev": "restored", "job": "a", **own}])["a"]
    assert (restored.status, restored.key, restored.vkey) == ("done", written.key, JOB.vkey)
    assert plan_job(JOB, restored, tmp_path).action is Action.SKIP


def st(status: str, **kw: Any) -> JobState:
    s = JobState("a", status=status, key=kw.pop("key", JOB.key), **kw)  # type: ignore[arg-type]
    return s


def _done_file(tmp: Path, content: bytes = b"\x00\x00\x00\x18ftypmp42") -> JobState:
    (tmp / "a.mp4").write_bytes(content)
    return st(
        "done",
        generation_id="g",
        file="a.mp4",
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (JobState("a"), Action.SUBMIT),
        (st("submitting"), Action.LOOKUP),
        (st("uncertain"), Action.LOOKUP),
        (st("submitted", generation_id="g"), Action.POLL),
        (st("submitted", generation_id="g", key="old"), Action.POLL),  # never pay twice
        (st("completed", generation_id="g", video_url="https://c/x"), Action.DOWNLOAD),
        (st("failed", generation_id="g", error=ErrorInfo("timeout", "slow")), Action.POLL),
        (st("failed", generation_id="g", error=ErrorInfo("download", "x")), Action.POLL),
        # Finished and paid for; its URL was refused: poll for another, never pay again.
        (st("failed", generation_id="g", error=ErrorInfo("url_rejected", "x")), Action.POLL),
        (
            st("failed", generation_id="g", error=ErrorInfo("generation_error", "x")),
            Action.HOLD_FAILED,
        ),
        (st("failed", error=ErrorInfo("invalid_request", "x")), Action.HOLD_FAILED),
        (st("failed", error=ErrorInfo("invalid_request", "x"), key="old"), Action.SUBMIT),
        (
            st("failed", generation_id="g", error=ErrorInfo("generation_error", "x"), key="old"),
            Action.SUBMIT,
        ),
        (st("done", generation_id="g", file="missing.mp4", bytes=1, sha256="x"), Action.REFETCH),
    ],
)
def test_plan_table(state: JobState, action: Action, tmp_path: Path) -> None:
    assert plan_job(JOB, state, tmp_path).action is action


def test_done_with_intact_file_is_skipped(tmp_path: Path) -> None:
    assert plan_job(JOB, _done_file(tmp_path), tmp_path).action is Action.SKIP


def test_done_with_altered_file_is_fetched_again(tmp_path: Path) -> None:
    state = _done_file(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypXXXX")  # same size, other bytes
    plan = plan_job(JOB, state, tmp_path)
    assert plan.action is Action.REFETCH
    # Said as it is: "missing or altered" left the user to guess, and hid that it is kept.
    assert plan.reason == (
        "file altered since it was fetched: fetching it again (the altered file is then kept"
        " as a@<first 8 hex of its sha256>.mp4)"
    )
    (tmp_path / "a.mp4").unlink()
    assert plan_job(JOB, state, tmp_path).reason == "file missing: fetching it again"


def test_an_altered_video_kept_as_found_is_left_be(tmp_path: Path) -> None:
    # Its generation was gone when it was found altered: fetching it again can only fail,
    # and the file as found, a whole MP4 or not, is the job's video on record.
    state = _done_file(tmp_path, b"an edit, no MP4")
    state.video, state.flags = {"error": "not an MP4"}, ["duration: x", KEPT_AS_FOUND]
    plan = plan_job(JOB, state, tmp_path, verify=True)
    assert (plan.action, plan.reason) == (
        Action.SKIP,
        "done (altered after it was fetched, kept as found)",
    )
    (tmp_path / "a.mp4").write_bytes(b"edited again!!!")  # altered again: tried again
    assert plan_job(JOB, state, tmp_path).action is Action.REFETCH


def test_done_but_recorded_unreadable_is_fetched_again(tmp_path: Path) -> None:
    # A cut video an earlier version renamed into place and recorded done, its probe's error
    # in the record: skipped, it stayed lost. Fetched again, at no charge.
    state = _done_file(tmp_path, mp4(b"\x01" * 100))
    state.video = {"error": "Invalid data found when processing input"}
    plan = plan_job(JOB, state, tmp_path)
    assert plan.action is Action.REFETCH and "unreadable" in plan.reason


def test_verify_fetches_again_a_done_file_whose_boxes_do_not_add_up(tmp_path: Path) -> None:
    whole = mp4(b"\x01" * 100)
    assert plan_job(JOB, _done_file(tmp_path, whole), tmp_path, verify=True).action is Action.SKIP
    cut = _done_file(tmp_path, whole[:-10])  # recorded as it is: its own size and hash
    assert plan_job(JOB, cut, tmp_path).action is Action.SKIP  # size and hash are all it trusts
    plan = plan_job(JOB, cut, tmp_path, verify=True)
    assert plan.action is Action.REFETCH and "boxes do not add up" in plan.reason


def test_done_but_request_changed_is_submitted(tmp_path: Path) -> None:
    state = _done_file(tmp_path)
    state.key = "another"
    assert plan_job(JOB, state, tmp_path).action is Action.SUBMIT


RESPELLED = [
    {"provider": "auto"},  # the API's own default, written out in the manifest's defaults
    {"resolution": "1080p", "duration": 8, "generate_audio": True},
    {"provider": "AUTO"},
]


def _recorded(state: JobState, job: Job, *, old: bool = False) -> JobState:
    """``state`` with ``job``'s request as an intent records it (by an earlier version:
    ``old``, with no video key)."""
    state.key, state.model = job.key, job.model
    state.vkey = None if old else job.vkey
    state.request = compact_request(job.request)
    return state


@pytest.mark.parametrize("old", [False, True], ids=["recorded", "older ledger"])
@pytest.mark.parametrize("written", RESPELLED)
def test_a_done_job_whose_request_is_only_written_otherwise_is_kept(
    tmp_path: Path, written: dict[str, Any], old: bool
) -> None:
    # `defaults: {provider: auto}` added to a manifest made every done job "changed": 20
    # submissions, the whole back catalogue paid for again, each video kept aside.
    state = _recorded(_done_file(tmp_path), JOB, old=old)
    respelled = Job("a", {**JOB.request, **written})
    plan = plan_job(respelled, state, tmp_path)
    assert (plan.action, category(plan)) == (Action.SKIP, "unchanged")
    assert plan.reason == "done (its request is written otherwise, same video)"
    assert not pays_for_request(plan)
    # The other way round too: written out then, left to the default now.
    state = _recorded(_done_file(tmp_path), respelled, old=old)
    assert plan_job(JOB, state, tmp_path).action is Action.SKIP


def test_a_provider_written_in_other_letters_is_the_same_video(tmp_path: Path) -> None:
    google = Job("a", {**JOB.request, "provider": "google"})
    state = _recorded(_done_file(tmp_path), google, old=True)
    assert plan_job(Job("a", {**JOB.request, "provider": "Google"}), state, tmp_path).action is (
        Action.SKIP
    )
    fal = plan_job(Job("a", {**JOB.request, "provider": "fal"}), state, tmp_path)
    assert (fal.action, category(fal)) == (Action.SUBMIT, "changed")


@pytest.mark.parametrize("old", [False, True], ids=["recorded", "older ledger"])
def test_a_default_changed_for_another_value_is_a_change(tmp_path: Path, old: bool) -> None:
    state = _recorded(_done_file(tmp_path), Job("a", {**JOB.request, "duration": 8}), old=old)
    for other in ({"duration": 6}, {"resolution": "720p"}, {"provider": "fal"}):
        assert plan_job(Job("a", {**JOB.request, **other}), state, tmp_path).action is (
            Action.SUBMIT
        )


def test_an_older_record_whose_request_was_summarised_is_told_by_its_key(tmp_path: Path) -> None:
    # An inline image is recorded summarised: the request cannot be made again from the
    # record, so an older ledger's job is compared as before, by its key alone.
    image = "data:image/png;base64," + "QUJD" * 100
    i2v = Job("a", {"model": "google/veo-3.1-i2v", "prompt": "p", "image_url": image})
    state = _recorded(_done_file(tmp_path), i2v, old=True)
    assert "KiB" in str(state.request)
    assert plan_job(i2v, state, tmp_path).action is Action.SKIP
    respelled = Job("a", {**i2v.request, "provider": "auto"})
    assert plan_job(respelled, state, tmp_path).action is Action.SUBMIT
    state.vkey = i2v.vkey  # recorded by this version: told apart by the video it asks for
    assert plan_job(respelled, state, tmp_path).action is Action.SKIP


def test_a_job_in_flight_whose_request_is_only_written_otherwise_is_not_made_again(
    tmp_path: Path,
) -> None:
    respelled = Job("a", {**JOB.request, "provider": "auto"})
    for state in (
        st("submitted", generation_id="g"),
        st("failed", generation_id="g", error=ErrorInfo("timeout", "slow")),
    ):
        plan = plan_job(respelled, _recorded(state, JOB, old=True), tmp_path)
        assert plan.action is Action.POLL and "request changed" not in plan.reason
        assert not will_remake(plan) and not pays_for_request(plan)
    held = st("failed", error=ErrorInfo("invalid_request", "x"))
    assert plan_job(respelled, _recorded(held, JOB), tmp_path).action is Action.HOLD_FAILED


def test_plan_counts_the_edited_request_of_a_job_being_looked_up(tmp_path: Path) -> None:
    # Found, the generation is fetched and the edit made after it; never created, the edit is
    # sent: either way the run pays for the new request, and plan said "would submit nothing".
    looked_up = _recorded(st("uncertain", client_request_id="vb:a:1:x"), JOB)
    edited = plan_job(Job("a", {**JOB.request, "prompt": "edited"}), looked_up, tmp_path)
    assert edited.action is Action.LOOKUP and pays_for_request(edited)
    assert not will_remake(edited)  # the runner remakes it only once the look-up finds it
    respelled = plan_job(Job("a", {**JOB.request, "provider": "auto"}), looked_up, tmp_path)
    assert respelled.action is Action.LOOKUP and not pays_for_request(respelled)
    assert not pays_for_request(plan_job(JOB, looked_up, tmp_path))


def test_a_done_file_that_is_now_a_link_to_its_copy_is_fetched_again(tmp_path: Path) -> None:
    # Followed, a link to the same bytes elsewhere passed for the video (and a refetch would
    # have written through it): the job's own file is the regular file at its name, or none.
    state = _done_file(tmp_path)
    (tmp_path / "a.mp4").rename(tmp_path / "copy.mp4")
    (tmp_path / "a.mp4").symlink_to(tmp_path / "copy.mp4")
    assert plan_job(JOB, state, tmp_path).action is Action.REFETCH
    assert plan_job(JOB, state, tmp_path, verify=True).action is Action.REFETCH
    # Missing, not "altered": a link is never kept aside (nor hashed), and with the API's
    # video gone an "altered" job warned and asked again every night, forever.
    assert plan_job(JOB, state, tmp_path).reason == "file missing: fetching it again"
    assert recorded_file(tmp_path / "a.mp4", state) == "missing"


def _gone(settled: bool) -> Gone:
    return Gone(1000.0, settled, ErrorInfo("lost", "HTTP 404"))


def test_a_missing_video_the_api_said_gone_once_is_asked_again_then_left_as_gone(
    tmp_path: Path,
) -> None:
    # One night's 404s (a blip) failed it for good; after the API's retention every archived
    # video failed every night. Now: asked again, and once the answer is settled, left be.
    from veobatch.summary import rerun_action

    state = _done_file(tmp_path)
    (tmp_path / "a.mp4").unlink()  # archived
    state.gone = _gone(False)
    plan = plan_job(JOB, state, tmp_path)
    assert plan.action is Action.REFETCH and "asking again" in plan.reason
    assert f"at least {GONE_CONFIRM_S / 3600:.0f} h after the first" in plan.reason
    state.gone = _gone(True)
    plan = plan_job(JOB, state, tmp_path)
    assert (plan.action, plan.restore, category(plan)) == (Action.GONE, False, "unchanged")
    assert "file since moved or deleted, and the API no longer has the video" in plan.reason
    assert rerun_action(state, tmp_path)[0] == "gone"
    assert plan_job(JOB, state, tmp_path, retry_failed=True).action is Action.SUBMIT  # asked
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # put back
    plan = plan_job(JOB, state, tmp_path, retry_failed=True)
    assert (plan.action, plan.restore) == (Action.SKIP, True)  # in place: "gone" no more


def _refetch_failed_earlier(
    tmp_path: Path, content: bytes = b"\x00\x00\x00\x18ftypmp42"
) -> JobState:
    """A done job whose refetch an earlier version failed, its facts taken off the record."""
    digest = hashlib.sha256(content).hexdigest()
    done = {"file": "a.mp4", "bytes": len(content), "sha256": digest, "mtime_ns": 5}
    records = [
        {"t": 1, "ev": "intent", "job": "a", "crid": "c", "key": JOB.key},
        {"t": 2, "ev": "submitted", "job": "a", "gen": "g"},
        {"t": 3, "ev": "completed", "job": "a", "url": "u"},
        {"t": 4, "ev": "done", "job": "a", **done},
        {"t": 5, "ev": "failed", "job": "a", "kind": "refetch_failed", "message": "missing"},
    ]
    return replay(records)["a"]


@pytest.mark.parametrize("retry_failed", [False, True])
def test_the_video_of_a_job_whose_refetch_failed_is_known_when_put_back(
    tmp_path: Path, retry_failed: bool
) -> None:
    state = _refetch_failed_earlier(tmp_path)
    assert (state.status, state.file) == ("failed", None)
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # copied back
    plan = plan_job(JOB, state, tmp_path, retry_failed=retry_failed)
    assert (plan.action, plan.restore) == (Action.SKIP, True)
    assert "in place again" in plan.reason
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypXXXX")  # another video there
    plan = plan_job(JOB, state, tmp_path, retry_failed=retry_failed)
    assert plan.action is (Action.SUBMIT if retry_failed else Action.HOLD_FAILED)
    assert not plan.restore
    (tmp_path / "a.mp4").unlink()  # missing: done again, and fetched again (paid only if asked)
    plan = plan_job(JOB, state, tmp_path, retry_failed=retry_failed)
    if retry_failed:
        assert (plan.action, plan.restore) == (Action.SUBMIT, False)
    else:
        assert (plan.action, plan.restore) == (Action.REFETCH, True)


def test_a_put_back_video_of_another_request_is_not_taken_for_the_jobs(tmp_path: Path) -> None:
    state = _refetch_failed_earlier(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    edited = Job("a", {"model": "google/veo-3.1-t2v", "prompt": "another"})
    plan = plan_job(edited, state, tmp_path)
    assert (plan.action, plan.restore) == (Action.SUBMIT, False)


def test_a_put_back_video_recorded_unreadable_is_not_taken_back(tmp_path: Path) -> None:
    state = _refetch_failed_earlier(tmp_path)
    assert state.delivered is not None
    state.delivered["video"] = {"error": "Invalid data"}
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert plan_job(JOB, state, tmp_path).action is Action.HOLD_FAILED


@pytest.mark.parametrize("what", ["directory", "fifo", "link", "dangling link"])
@pytest.mark.parametrize(
    ("state", "standing"),
    [
        (JobState("a"), "new"),
        (st("failed", error=ErrorInfo("invalid_request", "x"), key="old"), "changed"),
        (st("failed", error=ErrorInfo("output_blocked", "x")), "failed"),
    ],
    ids=["new", "changed", "blocked before"],
)
def test_a_job_to_submit_whose_video_name_is_taken_by_what_cannot_be_kept_is_blocked(
    tmp_path: Path, what: str, state: JobState, standing: str
) -> None:
    import os

    from fifos import fifo_at

    from veobatch.summary import rerun_action

    spot = tmp_path / "a.mp4"
    with contextlib.ExitStack() as stack:
        if what == "directory":
            spot.mkdir()
        elif what == "fifo":
            freed = stack.enter_context(fifo_at(spot))
        else:
            (tmp_path / "elsewhere").write_bytes(b"x")
            spot.symlink_to(tmp_path / ("nowhere" if what == "dangling link" else "elsewhere"))
        plan = plan_job(JOB, state, tmp_path)
        assert plan.action is Action.BLOCKED
        assert plan.reason.startswith(f"{spot} is a ") and "nothing is sent" in plan.reason
        assert category(plan) == standing
        if standing != "changed":  # `status` has no manifest to tell a change by
            assert rerun_action(state, tmp_path)[0] == "blocked"  # it says it too
        if what == "fifo":
            assert not freed
        assert os.path.lexists(spot)  # looked at, never moved or followed


def test_a_job_once_blocked_is_submitted_when_the_way_is_clear(tmp_path: Path) -> None:
    state = st("failed", error=ErrorInfo("output_blocked", "a directory was there"))
    plan = plan_job(JOB, state, tmp_path)
    assert plan.action is Action.SUBMIT and "never sent" in plan.reason
    (tmp_path / "a.mp4").write_bytes(b"someone's own video")  # a readable file: kept aside
    assert plan_job(JOB, state, tmp_path).action is Action.SUBMIT


def test_backoff_full_jitter_bounds() -> None:
    import random

    rng = random.Random(3)
    for attempt in range(12):
        d = backoff_delay_s(attempt, 1.0, 30.0, rng)
        assert 0.0 <= d <= min(30.0, 2.0**attempt)


def test_client_request_id_fits_the_api_alphabet() -> None:
    ids = {client_request_id("job-" + "x" * 96, n) for n in range(100)}
    assert len(ids) == 100
    for crid in ids:
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", crid)


API_CRID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A 100-char id with matrix and variant suffixes, as the manifest builds them: 141 chars.
LONG_ID = "-".join(["j" * 100, slug("16:9"), slug("blurry, low quality, washed out"), "100"])


def test_client_request_id_keeps_a_short_valid_job_id_readable() -> None:
    crid = client_request_id("hero-16x9-3", 2)
    assert re.fullmatch(r"vb:hero-16x9-3:2:[0-9a-f]{16}", crid)
    assert client_request_id("x" * 106, 9).split(":")[1] == "x" * 106  # exactly fills 128
    assert len(client_request_id("x" * 106, 9)) == 128


@pytest.mark.parametrize("attempt", [1, 9, 10, 12345])
def test_client_request_id_of_a_long_job_id_stays_valid(attempt: int) -> None:
    assert len(LONG_ID) == 141
    crid = client_request_id(LONG_ID, attempt)
    assert API_CRID.fullmatch(crid), (len(crid), crid)
    vb, job_part, n, rand = crid.split(":")
    assert (vb, n) == ("vb", str(attempt)) and re.fullmatch(r"[0-9a-f]{16}", rand)
    digest = hashlib.sha256(LONG_ID.encode()).hexdigest()[:16]
    assert job_part.endswith("-" + digest) and LONG_ID.startswith(job_part[: -len(digest) - 1])
    assert len(job_part) > 80  # still mostly the readable id


@pytest.mark.parametrize(
    "job_id", ["caf\u00e9 take/1", "a:b", "has space", "", "\u00e9" * 200, "x" * 107]
)
def test_client_request_id_of_any_job_id_stays_valid(job_id: str) -> None:
    crid = client_request_id(job_id, 1)
    assert API_CRID.fullmatch(crid), crid
    assert len(crid.split(":")) == 4  # a ':' in the id never shifts the parts


def test_long_job_ids_sharing_a_prefix_never_collide() -> None:
    ids = [LONG_ID[:-3] + str(n) for n in range(100, 1100)]
    parts = {client_request_id(job_id, 1).split(":")[1] for job_id in ids}
    assert len(parts) == len(ids)
    assert client_request_id("a:b", 1).split(":")[1] != client_request_id("ab", 1).split(":")[1]


class ScriptedCreate:
    def __init__(self, steps: list[str | ApiError]) -> None:
        self.steps = steps
        self.sent: list[str] = []

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        self.sent.append(client_request_id)
        step = self.steps.pop(0)
        if isinstance(step, ApiError):
            raise step
        return Created(step, "queued")

    async def fetch(self, generation_id: str) -> Any:
        raise NotImplementedError


async def _submit(tmp: Path, steps: list[str | ApiError]) -> tuple[Any, Ledger, ScriptedCreate]:
    api = ScriptedCreate(steps)
    ledger = Ledger.open(tmp)
    submitted: list[str] = []

    async def on_submitted(job: Job, created: Created) -> None:
        submitted.append(created.generation_id)

    sub = Submitter(
        api,
        ledger,
        retries=3,
        backoff_base_s=0,
        backoff_max_s=0,
        should_stop=lambda: False,
        on_submitted=on_submitted,
    )
    try:
        outcome = await sub.submit(JOB)
    except AuthError:
        outcome = SubmitOutcome.AUTH
    ledger.close()
    return outcome, Ledger.open(tmp), api


def _events(tmp: Path) -> list[str]:
    return [r["ev"] for r in parse_journal((tmp / "ledger.jsonl").read_bytes()).records]


async def test_intent_is_on_disk_before_the_post(tmp_path: Path) -> None:
    seen_on_disk: list[list[str]] = []

    class Spy(ScriptedCreate):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            seen_on_disk.append(_events(tmp_path))
            return await super().create(body, client_request_id=client_request_id)

    ledger = Ledger.open(tmp_path)

    async def noop(job: Job, created: Created) -> None:
        assert _events(tmp_path)[-1] == "submitted"  # the id is durable before anything else

    sub = Submitter(Spy(["g1"]), ledger, 3, 0, 0, lambda: False, noop)
    assert await sub.submit(JOB) is SubmitOutcome.SUBMITTED
    ledger.close()
    assert seen_on_disk == [["intent"]]


async def test_a_stop_while_the_intent_is_written_sends_nothing(tmp_path: Path) -> None:
    # A 401 to a poll came while this create's intent waited for its group commit: its POST
    # left ~13 ms after the "no new submissions" line.
    ledger = Ledger.open(tmp_path)
    stop = False
    record = ledger.record

    async def record_then_stop(ev: str, job_id: str, **kw: Any) -> JobState:
        nonlocal stop
        state = await record(ev, job_id, **kw)
        stop = stop or ev == "intent"
        return state

    ledger.record = record_then_stop  # type: ignore[method-assign]

    async def never(job: Job, created: Created) -> None:
        raise AssertionError("nothing was sent")

    api = ScriptedCreate(["g1"])
    sub = Submitter(api, ledger, 3, 0, 0, lambda: stop, never)
    assert await sub.submit(JOB) is SubmitOutcome.STOPPED
    ledger.close()
    assert api.sent == [] and _events(tmp_path) == ["intent", "unsent"]
    assert Ledger.open(tmp_path).state(JOB.id).status == "pending"


async def test_a_long_job_id_is_sent_and_recorded_with_the_same_valid_id(
    tmp_path: Path,
) -> None:
    """The look-up after a lost answer matches the recorded id, so it must be the one sent."""
    legacy = f"vb:{LONG_ID}:1:0123456789abcdef"  # what older versions recorded (163 chars)
    job = Job(LONG_ID, {"model": "google/veo-3.1-t2v", "prompt": "p"})
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", job.id, crid=legacy, key=job.key)
    await ledger.record("uncertain", job.id, kind="no_answer", message="timeout")
    ledger.close()
    ledger = Ledger.open(tmp_path)
    assert ledger.state(job.id).client_request_id == legacy  # matched as recorded

    async def noop(job: Job, created: Created) -> None:
        pass

    api = ScriptedCreate([NoAnswerError("timeout")])
    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop)
    assert await sub.submit(job) is SubmitOutcome.UNCERTAIN
    ledger.close()
    (sent,) = api.sent
    assert API_CRID.fullmatch(sent) and sent.startswith("vb:jjjj") and ":2:" in sent
    assert Ledger.open(tmp_path).state(job.id).client_request_id == sent


@pytest.mark.parametrize(
    ("steps", "outcome", "events", "status"),
    [
        (["g1"], SubmitOutcome.SUBMITTED, ["intent", "submitted"], "submitted"),
        (
            [NotSentError("refused"), "g1"],
            SubmitOutcome.SUBMITTED,
            ["intent", "unsent", "intent", "submitted"],
            "submitted",
        ),
        (
            [RateLimitedError("429", retry_after_s=0), "g1"],
            SubmitOutcome.SUBMITTED,
            ["intent", "unsent", "intent", "submitted"],
            "submitted",
        ),
        (  # the API's limits, more often than the tries for requests that never arrived
            [RateLimitedError("429", retry_after_s=0)] * 6 + ["g1"],
            SubmitOutcome.SUBMITTED,
            ["intent", "unsent"] * 6 + ["intent", "submitted"],
            "submitted",
        ),
        (
            [BadRequestError("Body validation error")],
            SubmitOutcome.REJECTED,
            ["intent", "failed"],
            "failed",
        ),
        ([ServerError("502")], SubmitOutcome.UNCERTAIN, ["intent", "uncertain"], "uncertain"),
        ([NoAnswerError("timeout")], SubmitOutcome.UNCERTAIN, ["intent", "uncertain"], "uncertain"),
        (
            [AuthError("no credits", status=403)],
            SubmitOutcome.AUTH,
            ["intent", "unsent"],
            "pending",
        ),
        (  # a wrong base URL: the POST was not taken, and the run stops
            [RedirectedError("HTTP 308: moved", status=308)],
            SubmitOutcome.AUTH,
            ["intent", "unsent"],
            "pending",
        ),
        (  # "see other" may follow a POST that was acted on: look it up before paying again
            [RedirectedError("HTTP 303: see other", status=303)],
            SubmitOutcome.AUTH,
            ["intent", "uncertain"],
            "uncertain",
        ),
    ],
)
async def test_submit_outcomes(
    tmp_path: Path,
    steps: list[str | ApiError],
    outcome: SubmitOutcome,
    events: list[str],
    status: str,
) -> None:
    got, ledger, api = await _submit(tmp_path, steps)
    assert got is outcome
    assert _events(tmp_path) == events
    assert ledger.state("a").status == status
    assert len(set(api.sent)) == len(api.sent)  # a fresh request id per attempt
    ledger.close()


async def test_a_job_refused_by_the_limits_for_its_patience_fails_unpaid(tmp_path: Path) -> None:
    api = ScriptedCreate([RateLimitedError("429", retry_after_s=0)] * 50)
    ledger = Ledger.open(tmp_path)
    now = [0.0]
    yielded: list[str] = []

    async def on_submitted(job: Job, created: Created) -> None:
        raise AssertionError("nothing is created")

    async def yield_slot(job: Job) -> None:
        yielded.append(job.id)
        now[0] += 400.0  # waiting for a slot again, behind the generations in flight

    sub = Submitter(
        api, ledger, 3, 0, 0, lambda: False, on_submitted,
        rate_limit_patience_s=1800.0, yield_slot=yield_slot, clock=lambda: now[0],
    )  # fmt: skip
    assert await sub.submit(JOB) is SubmitOutcome.REJECTED
    st = ledger.state(JOB.id)
    assert st.status == "failed" and st.error is not None and st.error.kind == "submit_failed"
    assert "refused by the API's limits for 33 min" in st.error.message
    assert len(api.sent) == 6 and yielded == ["a"] * 5
    ledger.close()


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1280, 720), colour).save(buf, format="PNG")
    return buf.getvalue()


class CapturingCreate(ScriptedCreate):
    def __init__(self, steps: list[str | ApiError]) -> None:
        super().__init__(steps)
        self.bodies: list[Any] = []

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        self.bodies.append(body)
        return await super().create(body, client_request_id=client_request_id)


async def test_a_local_image_is_read_and_sent_as_it_was_checked(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    m = load_manifest_text(tmp_path, "image_url: a.png")
    job = m.jobs[0]
    api = CapturingCreate(["g1"])
    (tmp_path / "out").mkdir()
    ledger = Ledger.open(tmp_path / "out")

    async def noop(job: Job, created: Created) -> None:
        pass

    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop)
    assert await sub.submit(job) is SubmitOutcome.SUBMITTED
    ledger.close()
    (body,) = api.bodies
    uri = "data:image/png;base64," + base64.b64encode(_png((1, 2, 3))).decode("ascii")
    assert body == {**job.request, "image_url": uri}
    (intent, _) = parse_journal((tmp_path / "out" / "ledger.jsonl").read_bytes()).records
    assert intent["req"]["image_url"] == f"data:image/png;base64,… ({len(uri) // 1024} KiB)"
    assert intent["key"] == job.key


def load_manifest_text(tmp: Path, image: str) -> Any:
    text = f"version: 1\njobs:\n  - {{id: a, model: google/veo-3.1-i2v, prompt: p, {image}}}\n"
    (tmp / "m.yaml").write_text(text)
    return load_manifest(tmp / "m.yaml")


@pytest.mark.parametrize("earlier", [False, True])
async def test_a_job_whose_image_changed_since_it_was_checked_is_not_sent(
    tmp_path: Path, earlier: bool
) -> None:
    """Not sent, nothing paid: failed as submit_failed, which a rerun submits again once the
    manifest is checked again (an invalid_request would be held back until --retry-failed)."""
    image = tmp_path / "a.png"
    image.write_bytes(_png((1, 2, 3)))
    job = load_manifest_text(tmp_path, "image_url: a.png").jobs[0]
    out = tmp_path / "out"
    out.mkdir()
    ledger = Ledger.open(out)
    before: JobState | None = None
    if earlier:  # a resubmission risked after a POST that may have created one
        await ledger.record("intent", job.id, crid="vb:a:1:x", key=job.key, model=job.model)
        await ledger.record("uncertain", job.id, kind="no_answer", message="timeout")
        before = ledger.state(job.id)
    image.write_bytes(_png((9, 9, 9)))  # edited while the run went on
    api = CapturingCreate(["g1"])

    async def noop(job: Job, created: Created) -> None:
        pass

    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop)
    assert await sub.submit(job, earlier=before) is SubmitOutcome.REJECTED
    assert api.bodies == [] and api.sent == []
    state = ledger.state(job.id)
    ledger.close()
    assert state.error is not None
    assert f"the image file {image} changed since the manifest was checked" in state.error.message
    if earlier:  # the earlier POST is put back on record, for a look-up to settle
        assert (state.status, state.client_request_id) == ("uncertain", "vb:a:1:x")
        assert _events(out) == ["intent", "uncertain", "uncertain"]
        return
    assert (state.status, state.error.kind) == ("failed", "submit_failed")
    assert _events(out) == ["failed"]  # no intent: nothing was sent
    state = load_states(out)[job.id]
    for content in (_png((9, 9, 9)), _png((1, 2, 3))):  # left as edited, or put back
        image.write_bytes(content)
        again = load_manifest_text(tmp_path, "image_url: a.png").jobs[0]
        assert plan_job(again, state, out).action is Action.SUBMIT


def test_a_job_never_created_is_submitted_again_by_the_next_run(tmp_path: Path) -> None:
    # submit_failed: the API never took it (unreachable, or its limits all along): unpaid, so
    # the next night tries again without --retry-failed.
    st = JobState(JOB.id, status="failed", key=JOB.key, error=ErrorInfo("submit_failed", "429"))
    assert plan_job(JOB, st, tmp_path).action is Action.SUBMIT


def test_retry_failed_polls_a_refused_url_again_rather_than_paying(tmp_path: Path) -> None:
    state = st("failed", generation_id="g", error=ErrorInfo("url_rejected", "http URL"))
    assert plan_job(JOB, state, tmp_path, retry_failed=True).action is Action.POLL


def test_a_removed_job_with_a_paid_generation_is_fetched_and_the_rest_left_as_recorded(
    tmp_path: Path,
) -> None:
    kept = Job("kept", {"model": "google/veo-3.1-t2v", "prompt": "a"})
    t2v = "google/veo-3.1-t2v"
    states = {
        "kept": JobState("kept"),
        "flying": JobState(
            "flying", "submitted", model=t2v, generation_id="g1", request={"duration": 4}
        ),
        "finished": JobState(
            "finished", "completed", model=t2v, generation_id="g2", video_url="https://c/v.mp4"
        ),
        "done": JobState("done", "done", model=t2v, generation_id="g3", file="done.mp4"),
        "maybe": JobState("maybe", "uncertain", model=t2v),
        "crashed": JobState("crashed", "submitting", model=t2v),
        "never": JobState("never", "pending"),
    }
    plans, (note,) = plan_run([kept], states, tmp_path)
    assert [(p.job.id, p.action, p.removed) for p in plans] == [
        ("kept", Action.SUBMIT, False),
        ("flying", Action.POLL, True),
        ("finished", Action.DOWNLOAD, True),
    ]
    # the request recorded with the intent: the downloaded video is checked against it
    assert plans[1].job.request == {"model": t2v, "duration": 4}
    assert [category(p) for p in plans] == ["new", "removed", "removed"]
    assert note == (
        "4 jobs in the ledger are not in the manifest: 2 with a generation paid for, fetched all"
        " the same (flying, finished); 2 whose submission may have created a generation, left"
        " uncertain (maybe, crashed): put them back in the manifest to settle them"
    )
    states.pop("maybe"), states.pop("crashed"), states.pop("flying"), states.pop("finished")
    assert plan_run([kept], states, tmp_path)[1] == []  # done or never sent: nothing to say


def test_removed_jobs_whose_post_may_have_created_one_are_looked_up(tmp_path: Path) -> None:
    # Their intent recorded the request id and model: the logs can say whether it was paid.
    t2v = "google/veo-3.1-t2v"
    kept = Job("kept", {"model": t2v, "prompt": "x"})
    states = {
        "maybe": JobState("maybe", "uncertain", model=t2v, client_request_id="vb:maybe:1:a"),
        "crashed": JobState("crashed", "submitting", model=t2v, client_request_id="vb:c:1:b"),
    }
    plans, (note,) = plan_run([kept], states, tmp_path)
    assert [(p.job.id, p.action, p.removed) for p in plans] == [
        ("kept", Action.SUBMIT, False),
        ("maybe", Action.LOOKUP, True),
        ("crashed", Action.LOOKUP, True),
    ]
    assert note == (
        "2 jobs in the ledger are not in the manifest: 2 whose submission may have created a"
        " generation, looked up in the usage logs and fetched if it did, never submitted again"
        " (maybe, crashed)"
    )


def test_a_new_job_asking_what_a_removed_one_got_is_said_to_be_paid_again(
    tmp_path: Path,
) -> None:
    renamed = Job("beta-2", {"model": "google/veo-3.1-t2v", "prompt": "b"})
    other = Job("gamma", {"model": "google/veo-3.1-t2v", "prompt": "c"})
    states = {
        "beta": JobState("beta", "done", key=renamed.key, generation_id="g1", file="beta.mp4"),
    }
    plans, warnings = plan_run([renamed, other], states, tmp_path)
    assert [p.action for p in plans] == [Action.SUBMIT, Action.SUBMIT]  # said, not refused
    assert warnings == [
        "job 'beta-2' asks exactly what 'beta' in the ledger got (done, generation g1): renamed?"
        " As it is, it is generated and paid for again; give it back the id 'beta' to keep that"
        " video instead"
    ]
    states["beta-2"] = JobState("beta-2", "done", key=renamed.key)  # both listed: no rename
    assert plan_run([renamed, other, Job("beta", renamed.request)], states, tmp_path)[1] == []


@pytest.mark.parametrize("old", [False, True], ids=["recorded", "older ledger"])
def test_a_new_job_asking_what_a_removed_one_got_in_other_words_is_said_too(
    tmp_path: Path, old: bool
) -> None:
    got = Job("beta", {"model": "google/veo-3.1-t2v", "prompt": "b", "provider": "google"})
    state = _recorded(JobState("beta", "done", generation_id="g1", file="beta.mp4"), got, old=old)
    renamed = Job("beta-2", {**got.request, "provider": "Google", "duration": 8})
    _, warnings = plan_run([renamed], {"beta": state}, tmp_path)
    assert warnings and warnings[-1].startswith("job 'beta-2' asks exactly what 'beta'")
    other = Job("beta-2", {**got.request, "provider": "fal"})
    assert plan_run([other], {"beta": state}, tmp_path)[1] == []


@pytest.mark.parametrize("status", ["uncertain", "submitting"])
def test_a_new_job_asking_what_a_removed_uncertain_one_asked_is_said_too(
    tmp_path: Path, status: str
) -> None:
    # Its POST may have made the video: under the new id it is paid for again regardless.
    renamed = Job("beta-2", {"model": "google/veo-3.1-t2v", "prompt": "b"})
    states = {"beta": JobState("beta", status, key=renamed.key, client_request_id="vb:beta:1:x")}
    _, warnings = plan_run([renamed], states, tmp_path)
    assert warnings[-1] == (
        f"job 'beta-2' asks exactly what 'beta' in the ledger asked ({status}: its POST may have"
        " created a generation): renamed? As it is, it is generated and paid for again; give it"
        " back the id 'beta' to have it looked up instead"
    )


async def test_a_5xx_asking_for_rest_holds_every_submission_until_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "retry later": a new job, or one the logs proved unsent, waits as long as the API asked.
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr("veobatch.scheduler.anyio.sleep", sleep)

    async def noop(job: Job, created: Created) -> None:
        pass

    api = ScriptedCreate([ServerError("503", status=503, retry_after_s=30), "g2"])
    ledger = Ledger.open(tmp_path)
    stop = [False]
    sub = Submitter(api, ledger, 3, 0, 0, lambda: stop[0], noop, clock=lambda: now[0])
    assert await sub.submit(JOB) is SubmitOutcome.UNCERTAIN
    rests = lambda: sum(s for s in slept if s >= 0.5)  # noqa: E731 (the ledger's waits are ms)
    assert rests() == 0 and sub.paused_until == pytest.approx(130.0, abs=0.1)
    other = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "q"})
    assert await sub.submit(other) is SubmitOutcome.SUBMITTED
    assert rests() == pytest.approx(30.0, abs=0.1) and len(api.sent) == 2
    # A stop (a 401 elsewhere, a signal) does not wait a pause out: it is looked at each second.
    sub.paused_until = now[0] + 900

    async def stop_soon(seconds: float) -> None:
        await sleep(seconds)
        stop[0] = True

    monkeypatch.setattr("veobatch.scheduler.anyio.sleep", stop_soon)
    before = now[0]
    assert await sub.submit(other) is SubmitOutcome.STOPPED
    assert now[0] - before <= 1.0 and len(api.sent) == 2
    ledger.close()


async def test_a_pause_every_post_in_flight_stretches_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 500 creates in flight, each answered 503 with Retry-After a moment later than the one
    # before: each moved the pause on a little, and each said so in a warning.
    now = [100.0]

    async def noop(job: Job, created: Created) -> None:
        pass

    api = ScriptedCreate([ServerError("503", status=503, retry_after_s=30)] * 5)
    ledger = Ledger.open(tmp_path)
    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="veobatch"):
        for i in range(5):
            now[0] += 0.1
            await sub._attempt(Job(f"j{i}", {"model": "google/veo-3.1-t2v", "prompt": "p"}))
    ledger.close()
    assert sub.paused_until == pytest.approx(130.5)
    rests = [r.getMessage() for r in caplog.records if "of rest" in r.getMessage()]
    assert rests == ["the API asked for 30s of rest (HTTP 503): no submission before then"]


def test_a_timed_out_generation_is_followed_again_even_when_removed_or_edited(
    tmp_path: Path,
) -> None:
    # Paid for: its record says the next run polls it. An edit or a removal from the manifest
    # dropped it (the edited job was submitted anew, the removed one left alone).
    timeout = ErrorInfo("timeout", "not finished after 1800s")
    t2v = "google/veo-3.1-t2v"
    edited = Job("a", {"model": t2v, "prompt": "edited"})
    states = {
        "a": JobState("a", "failed", key=JOB.key, model=t2v, generation_id="g1", error=timeout),
        "gone": JobState("gone", "failed", model=t2v, generation_id="g2", error=timeout),
        "bad": JobState(
            "bad",
            "failed",
            model=t2v,
            generation_id="g3",
            error=ErrorInfo("generation_error", "policy"),
        ),
    }
    plans, _ = plan_run([edited], states, tmp_path)
    assert [(p.job.id, p.action, p.removed) for p in plans] == [
        ("a", Action.POLL, False),
        ("gone", Action.POLL, True),
    ]
    assert "then making it as it now reads" in plans[0].reason
    assert will_remake(plans[0]) and not will_remake(plans[1])


def test_a_removed_job_whose_generation_the_api_no_longer_knows_is_left_as_recorded(
    tmp_path: Path,
) -> None:
    # Polled again every night, failed 'lost' again, and the run exited 1 for a job the user
    # deleted (never remade: nothing is submitted for a job no longer listed).
    t2v = "google/veo-3.1-t2v"
    lost, refused = ErrorInfo("lost", "HTTP 404"), ErrorInfo("other_key", "HTTP 403")
    states = {
        "gone": JobState("gone", "failed", model=t2v, generation_id="g1", error=lost),
        "theirs": JobState("theirs", "failed", model=t2v, generation_id="g2", error=refused),
    }
    for retry_failed in (False, True):
        plans, _ = plan_run([], states, tmp_path, retry_failed=retry_failed)
        # another key's generation may still be fetched by a run with that key
        assert [(p.job.id, p.action, p.removed) for p in plans] == [("theirs", Action.POLL, True)]


async def test_the_tries_that_use_up_the_retries_are_this_runs_and_never_429s(
    tmp_path: Path,
) -> None:
    # The runner gives up on a 5xx the logs showed absent by these, not the ledger's attempts,
    # which count every POST: each 429 (a POST of its own) and every earlier night's too.
    ledger = Ledger.open(tmp_path)
    for n in range(1, 10):  # an earlier night's
        await ledger.record("intent", JOB.id, crid=f"vb:a:{n}:x", key=JOB.key)
        await ledger.record("unsent", JOB.id)

    async def noop(job: Job, created: Created) -> None:
        pass

    busy = [RateLimitedError("429", retry_after_s=0)] * 5
    api = ScriptedCreate([*busy, NotSentError("refused"), ServerError("502", status=502)])
    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop)
    assert await sub.submit(JOB) is SubmitOutcome.UNCERTAIN
    assert sub.tries == {JOB.id: 2} and ledger.state(JOB.id).attempts == 16
    ledger.close()


async def test_429s_without_end_stop_the_runs_submissions_not_one_job_after_another(
    tmp_path: Path,
) -> None:
    # Each job waiting out its own patience in turn would take jobs x 30 min: days for a
    # night's manifest, and the next night's run then finds the directory locked.
    api = ScriptedCreate([RateLimitedError("429", retry_after_s=0)] * 50)
    ledger = Ledger.open(tmp_path)
    now = [0.0]

    async def on_submitted(job: Job, created: Created) -> None:
        raise AssertionError("nothing is created")

    async def yield_slot(job: Job) -> None:
        now[0] += 400.0

    sub = Submitter(
        api, ledger, 3, 0, 0, lambda: False, on_submitted,
        rate_limit_patience_s=1800.0, yield_slot=yield_slot, clock=lambda: now[0],
    )  # fmt: skip
    first = Job("a", {"model": "google/veo-3.1-t2v", "prompt": "a"})
    assert await sub.submit(first) is SubmitOutcome.REJECTED  # its own patience, as before
    assert sub.gave_up is not None and "refused every create for 33 min" in sub.gave_up
    sent = len(api.sent)
    second = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "b"})
    assert await sub.submit(second) is SubmitOutcome.STOPPED
    assert len(api.sent) == sent and ledger.state("b").status == "pending"
    ledger.close()


async def test_a_create_that_goes_through_ends_the_refusal_streak(tmp_path: Path) -> None:
    api = ScriptedCreate([RateLimitedError("429", retry_after_s=0), "g1"] * 3)
    ledger = Ledger.open(tmp_path)
    now = [0.0]

    async def on_submitted(job: Job, created: Created) -> None:
        pass

    async def yield_slot(job: Job) -> None:
        now[0] += 1000.0  # each job refused once for 1,000 s: 3,000 s of 429s in all

    sub = Submitter(
        api, ledger, 3, 0, 0, lambda: False, on_submitted,
        rate_limit_patience_s=1800.0, yield_slot=yield_slot, clock=lambda: now[0],
    )  # fmt: skip
    for name in "abc":
        job = Job(name, {"model": "google/veo-3.1-t2v", "prompt": name})
        assert await sub.submit(job) is SubmitOutcome.SUBMITTED
    assert sub.gave_up is None
    ledger.close()


async def test_a_streak_of_429s_ends_with_any_other_answer(tmp_path: Path) -> None:
    # A 429, then no answer (the job goes uncertain): the API answered otherwise, so a single
    # 429 much later must not read as "every create refused for 30 min".
    refused = RateLimitedError("429", retry_after_s=0)
    api = ScriptedCreate([refused, NoAnswerError("timeout"), refused, "g2"])
    ledger = Ledger.open(tmp_path)
    now = [0.0]

    async def on_submitted(job: Job, created: Created) -> None:
        pass

    sub = Submitter(
        api, ledger, 3, 0, 0, lambda: False, on_submitted,
        rate_limit_patience_s=1800.0, clock=lambda: now[0],
    )  # fmt: skip
    first = Job("a", {"model": "google/veo-3.1-t2v", "prompt": "a"})
    assert await sub.submit(first) is SubmitOutcome.UNCERTAIN
    now[0] = 4000.0  # slots held by look-ups and long generations meanwhile
    second = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "b"})
    assert await sub.submit(second) is SubmitOutcome.SUBMITTED
    assert sub.gave_up is None
    ledger.close()


class Clocked(ScriptedCreate):
    """Each create takes ``step_s`` of the fake clock ``now``."""

    def __init__(self, steps: list[str | ApiError], now: list[float], step_s: float) -> None:
        super().__init__(steps)
        self.now, self.step_s = now, step_s

    async def create(self, body: Any, *, client_request_id: str) -> Created:
        self.now[0] += self.step_s
        return await super().create(body, client_request_id=client_request_id)


class Longest(random.Random):
    """Backoff at its longest: a wait of a known length."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def _nothing_created(job: Job, created: Created) -> None:
    raise AssertionError("nothing is created")


def _clocked(api: Clocked, ledger: Ledger, on_submitted: Any = None) -> Submitter:
    """A submitter on the API's fake clock, with no backoff and the 30-minute patience."""

    async def noop(job: Job, created: Created) -> None:
        pass

    return Submitter(
        api, ledger, 3, 0, 0, lambda: False, on_submitted or noop,
        rate_limit_patience_s=1800.0, clock=lambda: api.now[0],
    )  # fmt: skip


def _unreachable() -> NotSentError:
    return NotSentError("POST /v2/video/generations: could not connect: ClientConnectorError")


async def test_an_unreachable_api_stops_the_runs_submissions_and_leaves_the_jobs_pending(
    tmp_path: Path,
) -> None:
    # Nothing listens at the API's address: each job used its 9 tries (two minutes) and failed,
    # one after another: 10,000 jobs would have run for days, each night's run locked out.
    now = [0.0]
    api = Clocked([_unreachable()] * 50, now, 100.0)
    ledger = Ledger.open(tmp_path)
    sub = _clocked(api, ledger, _nothing_created)
    # Its tries ran out while no create of the run got through: the run's patience decides.
    assert await sub.submit(JOB) is SubmitOutcome.STOPPED
    assert len(api.sent) == 20 and now[0] == 2000.0  # past 1,800 s of no create sent
    st = ledger.state(JOB.id)
    assert st.status == "pending" and st.error is None  # never sent: the next run submits it
    assert sub.gave_up is not None
    assert sub.gave_up.startswith("the API could not be reached for 32 min: no create could be")
    assert "could not connect: ClientConnectorError" in sub.gave_up
    second = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "b"})
    assert await sub.submit(second) is SubmitOutcome.STOPPED
    assert len(api.sent) == 20 and ledger.state("b").status == "pending"
    ledger.close()


async def test_a_job_not_sent_while_other_creates_get_through_fails_after_its_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the API gone, but this job's tries: they still end in submit_failed (never created).
    other = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "q"})
    outcomes: list[SubmitOutcome] = []

    async def sleep(seconds: float) -> None:
        if seconds == 30.0 and not outcomes:  # while it waits to try again, another gets through
            outcomes.append(await sub.submit(other))

    monkeypatch.setattr("veobatch.scheduler.anyio.sleep", sleep)

    async def noop(job: Job, created: Created) -> None:
        pass

    api = ScriptedCreate([_unreachable(), "g-b"] + [_unreachable()] * 3)  # type: ignore[list-item]
    ledger = Ledger.open(tmp_path)
    sub = Submitter(api, ledger, 3, 30.0, 30.0, lambda: False, noop, rng=Longest())
    assert await sub.submit(JOB) is SubmitOutcome.REJECTED
    assert outcomes == [SubmitOutcome.SUBMITTED] and sub.gave_up is None
    st = ledger.state(JOB.id)
    assert st.status == "failed" and st.error is not None and st.error.kind == "submit_failed"
    assert st.error.message.startswith("gave up after 4 tries: ")
    ledger.close()


async def test_an_api_back_within_the_patience_takes_the_jobs_that_waited(
    tmp_path: Path,
) -> None:
    # An outage shorter than the patience: the job that used its tries in it is sent after all.
    now = [0.0]
    api = Clocked([_unreachable()] * 12 + ["g1"], now, 60.0)  # type: ignore[operator]
    ledger = Ledger.open(tmp_path)
    sub = _clocked(api, ledger)
    assert await sub.submit(JOB) is SubmitOutcome.SUBMITTED
    assert ledger.state(JOB.id).generation_id == "g1" and sub.gave_up is None
    assert sub.refused_since is None
    ledger.close()


async def test_429s_then_an_unreachable_api_are_one_streak(tmp_path: Path) -> None:
    # The API overloaded, then gone: no create got through all along, whatever each met.
    now = [0.0]
    refused = RateLimitedError("HTTP 429", retry_after_s=0)
    api = Clocked([refused] * 10 + [_unreachable()] * 30, now, 100.0)  # type: ignore[operator]
    ledger = Ledger.open(tmp_path)
    sub = _clocked(api, ledger)
    assert await sub.submit(JOB) is SubmitOutcome.STOPPED
    assert sub.gave_up is not None
    assert sub.gave_up.startswith("no create has got through for 32 min: refused with 429, or")
    assert ledger.state(JOB.id).status == "pending"
    ledger.close()


async def test_a_job_waiting_to_try_again_stops_at_once_when_the_run_gives_up(
    tmp_path: Path,
) -> None:
    # Its wait (up to a minute) would hold the run for nothing: none of its jobs will be sent.
    now = [0.0]

    api = ScriptedCreate([_unreachable()] * 2)  # type: ignore[list-item]
    ledger = Ledger.open(tmp_path)
    waiting = anyio.Event()

    class Told(Longest):
        def uniform(self, a: float, b: float) -> float:
            waiting.set()  # its wait is drawn: it sleeps next, with no await in between
            return super().uniform(a, b)

    async def noop(job: Job, created: Created) -> None:
        pass

    sub = Submitter(
        api, ledger, 3, 1000.0, 1000.0, lambda: False, noop, rng=Told(),
        rate_limit_patience_s=1800.0, clock=lambda: now[0],
    )  # fmt: skip
    outcomes: list[SubmitOutcome] = []

    async def first() -> None:
        outcomes.append(await sub.submit(JOB))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await waiting.wait()  # it waits 1,000 s to try again
            now[0] = 2000.0
            second = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "b"})
            assert await sub.submit(second) is SubmitOutcome.STOPPED
    assert outcomes == [SubmitOutcome.STOPPED] and sub.gave_up is not None
    assert ledger.state(JOB.id).status == "pending"
    ledger.close()


async def test_a_429_asking_for_rest_holds_every_submission_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # "Rate or concurrency limit" with Retry-After: the run rests, not only the job refused.
    now = [100.0]
    sent_at: list[float] = []
    other = Job("b", {"model": "google/veo-3.1-t2v", "prompt": "q"})
    refused_while_paused: list[float | None] = []
    outcomes: list[SubmitOutcome] = []

    async def sleep(seconds: float) -> None:
        if seconds >= 30 and not outcomes:  # while the refused job waits, another one comes
            outcomes.append(await sub.submit(other))
        elif seconds >= 0.5:
            refused_while_paused.append(sub.refused_since)
        now[0] += seconds

    monkeypatch.setattr("veobatch.scheduler.anyio.sleep", sleep)

    class Timed(ScriptedCreate):
        async def create(self, body: Any, *, client_request_id: str) -> Created:
            sent_at.append(now[0])
            return await super().create(body, client_request_id=client_request_id)

    async def noop(job: Job, created: Created) -> None:
        pass

    api = Timed([RateLimitedError("HTTP 429", retry_after_s=30), "g1", "g2"])
    ledger = Ledger.open(tmp_path)
    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="veobatch.scheduler"):
        assert await sub.submit(JOB) is SubmitOutcome.SUBMITTED
    assert outcomes == [SubmitOutcome.SUBMITTED]
    assert sent_at[1] - sent_at[0] >= 30.0  # the other job waited for the rest
    # A pause is neither an answer nor a success: the streak of refusals stood through it.
    (since,) = set(refused_while_paused)
    assert since is not None and since - sent_at[0] < 1.0
    assert sub.refused_since is None  # ended by the creates that went through after it
    rests = [r.getMessage() for r in caplog.records if "of rest" in r.getMessage()]
    assert rests == ["the API asked for 30s of rest (HTTP 429): no submission before then"]
    ledger.close()


async def test_a_403_heard_by_every_create_in_flight_is_said_once_then_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Out of credits with 500 creates in flight: each hears the 403. One ERROR line, and one
    # line at the end with the count, not 500 lines in cron's mail.
    jobs = [Job(f"j{n}", {"model": "google/veo-3.1-t2v", "prompt": "p"}) for n in range(5)]
    api = ScriptedCreate([AuthError("HTTP 403: no credits", status=403) for _ in jobs])
    ledger = Ledger.open(tmp_path)

    async def noop(job: Job, created: Created) -> None:
        pass

    sub = Submitter(api, ledger, 3, 0, 0, lambda: False, noop, clock=lambda: 5.0)
    with caplog.at_level(logging.INFO, logger="veobatch"):
        for job in jobs:
            with pytest.raises(AuthError):
                await sub.submit(job)
        sub.failures.flush()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "submission refused job=j0: HTTP 403: no credits",
        "submission failures window=0s failed=5 succeeded=0: HTTP 403 ×5",
    ]
    ledger.close()


async def test_a_request_the_api_refuses_is_logged_as_every_failure_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Alerts filter on the "failed" event (README): a 400 must not be a "job_failed" apart.
    with caplog.at_level(logging.ERROR, logger="veobatch"):
        outcome, ledger, _ = await _submit(tmp_path, [BadRequestError("Body validation error")])
    assert outcome is SubmitOutcome.REJECTED
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "failed job=a kind=invalid_request: Body validation error"
    ledger.close()


def test_a_recorded_derived_id_is_taken_back_once_and_never_by_a_written_id() -> None:
    # The ledger knows a video by the id its request with a default written out gave; the
    # manifest now derives another id for it. The first derived job asking that video takes
    # the recorded id back; a second, and a job whose id is written, keep their own.
    written = {"model": "google/veo-3.1-t2v", "prompt": "p", "resolution": "1080p"}
    old_id = f"t2v-{request_key(written)[:10]}"
    job = Job(derived_id(written), {"model": "google/veo-3.1-t2v", "prompt": "p"}, derived=True)
    assert job.id != old_id and job.vkey == Job("x", written).vkey
    recorded = JobState(
        old_id, "done", key=request_key(written), vkey=job.vkey, model=written["model"]
    )
    twin = Job("t2v-0123456789", job.request, derived=True)
    mine = Job("mine", job.request)
    states = {old_id: recorded}
    assert [j.id for j in adopt_recorded_ids([mine, job, twin], states)] == [
        "mine",
        old_id,
        twin.id,
    ]
    # Not when the manifest lists that id, nor for another model's or a non-derived id.
    assert adopt_recorded_ids([job, Job(old_id, written)], states)[0] is job
    other = JobState(
        "t2v-fast-0123456789", "done", key=recorded.key, vkey=job.vkey, model=written["model"]
    )
    assert adopt_recorded_ids([job], {other.id: other}) == [job]
    named = JobState("hero", "done", key=recorded.key, vkey=job.vkey, model=recorded.model)
    assert adopt_recorded_ids([job], {"hero": named}) == [job]


MATRIX_JOB = """\
version: 1
jobs:
  - id: teaser
    model: google/veo-3.1-t2v-fast
    prompt: {prompt}
    variants: {variants}
    matrix:
      {first}
      {second}
"""


def test_a_matrix_with_its_fields_in_another_order_takes_its_recorded_ids_back(
    tmp_path: Path,
) -> None:
    # A YAML mapping has no order, yet the matrix's fields written in another order renamed
    # every combination (teaser-16x9-4 became teaser-4-16x9) and each was paid for again; its
    # takes' seeds, made from their ids, changed with them.
    ratios, durations = 'aspect_ratio: ["16:9", "9:16"]', "duration: [4, 8]"

    def jobs(first: str, second: str, prompt: str = "p", variants: int = 2) -> list[Job]:
        text = MATRIX_JOB.format(first=first, second=second, prompt=prompt, variants=variants)
        (tmp_path / "m.yaml").write_text(text)
        return list(load_manifest(tmp_path / "m.yaml").jobs)

    before = jobs(ratios, durations)
    states = {
        j.id: JobState(j.id, "done", key=j.key, vkey=j.vkey, model=j.model, request=j.request)
        for j in before
    }
    # Unchanged, every job is known by its own id: nothing is taken.
    assert all(a is b for a, b in zip(adopt_recorded_ids(before, states), before, strict=True))
    after = jobs(durations, ratios)
    assert {j.id for j in after}.isdisjoint(states) and "teaser-4-16x9-2" in {j.id for j in after}
    adopted = adopt_recorded_ids(after, states)
    # Each combination under its recorded id, with the very request (its seed) made then.
    assert {j.id: j.request for j in adopted} == {b.id: b.request for b in before}
    plans, warnings = plan_run(adopted, states, tmp_path)
    # Done (their files missing here: fetched again), none paid for again, no rename warned.
    assert {p.action for p in plans} == {Action.REFETCH} and not warnings
    assert not any(pays_for_request(p) for p in plans)
    # Another video (a prompt edited), a recorded id the manifest lists for another job, or
    # one another combination already took back: the job keeps its own id.
    edited = jobs(durations, ratios, prompt="q")
    assert all(a is b for a, b in zip(adopt_recorded_ids(edited, states), edited, strict=True))
    hero = Job("teaser-16x9-4-1", {"model": "google/veo-3.1-t2v-fast", "prompt": "hero"})
    taken = adopt_recorded_ids([hero, *after], states)[1:]
    assert [j.id for j in taken if j.id in states] == [
        j.id for j in adopted if j.id != "teaser-16x9-4-1"
    ]
    one = jobs(durations, ratios, variants=1)
    one_states = {
        j.id: JobState(j.id, "done", key=j.key, vkey=j.vkey, model=j.model)
        for j in jobs(ratios, durations, variants=1)
    }
    twice = adopt_recorded_ids([one[0], one[0]], one_states)
    assert [j.id for j in twice] == ["teaser-16x9-4", "teaser-4-16x9"]


@pytest.mark.parametrize("order", ["failed first", "done first"])
def test_of_two_recorded_ids_of_one_video_the_exact_and_delivered_one_is_taken_back(
    order: str,
) -> None:
    # An old ledger held the same video under two ids (a default written out two ways); the
    # first in ledger order had failed. Taken back, it held the job failed every night, and
    # --retry-failed paid for a video the folder already had under the other id.
    model = "google/veo-3.1-t2v"
    r1 = {"model": model, "prompt": "p", "resolution": "1080p"}
    r2 = {"model": model, "prompt": "p", "duration": 8}
    id1, id2 = f"t2v-{request_key(r1)[:10]}", f"t2v-{request_key(r2)[:10]}"
    job = Job(derived_id(r2), r2, derived=True)
    failed = JobState(
        id1,
        "failed",
        key=request_key(r1),
        vkey=job.vkey,
        model=model,
        error=ErrorInfo("generation_error", "the API said error"),
    )
    done = JobState(id2, "done", key=request_key(r2), vkey=job.vkey, model=model)
    pair = [failed, done] if order == "failed first" else [done, failed]
    states = {st.id: st for st in pair}
    assert [j.id for j in adopt_recorded_ids([job], states)] == [id2]
    # Asking the same video in a third spelling: the delivered one, not the failed one.
    plain = {"model": model, "prompt": "p"}
    bare = Job(derived_id(plain), plain, derived=True)
    assert [j.id for j in adopt_recorded_ids([bare], states)] == [id2]
