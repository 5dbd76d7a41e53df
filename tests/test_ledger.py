"""The ledger: the state machine, journal parsing and recovery, group-committed appends."""

from __future__ import annotations

import errno
import io
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from veobatch import ledger as ledger_module
from veobatch.errors import LedgerCorruptError, LedgerError
from veobatch.jobs import Job
from veobatch.ledger import (
    LEDGER_NAME,
    RESULTS_NAME,
    JobState,
    Ledger,
    ResultsWriter,
    apply_record,
    build_results,
    current_results,
    encode_results,
    load_states,
    parse_journal,
    replay,
    replay_journal,
    restore_fields,
)


def rec(ev: str, job: str = "a", **kw: Any) -> dict[str, Any]:
    return {"t": 1.0, "ev": ev, "job": job, **kw}


HAPPY = [
    rec("intent", crid="c1", key="k", model="m"),
    rec("submitted", gen="g1"),
    rec("completed", url="https://cdn/x.mp4"),
    rec("done", file="a.mp4", bytes=10, sha256="ab", mtime_ns=5),
]


def test_happy_path_walks_every_state() -> None:
    states: dict[str, JobState] = {}
    seen = [apply_record(states, r).status for r in HAPPY]
    assert seen == ["submitting", "submitted", "completed", "done"]
    s = states["a"]
    assert (s.generation_id, s.video_url, s.file, s.bytes, s.sha256, s.mtime_ns) == (
        "g1",
        "https://cdn/x.mp4",
        "a.mp4",
        10,
        "ab",
        5,
    )
    assert s.attempts == 1 and s.client_request_id == "c1" and s.key == "k"


@pytest.mark.parametrize(
    ("history", "event", "allowed"),
    [
        ([], "submitted", False),  # an id without an intent: never
        ([], "done", False),
        ([], "intent", True),
        ([], "failed", True),  # a local image changed before the job's first POST
        (HAPPY[:1], "submitted", True),
        (HAPPY[:1], "uncertain", True),
        (HAPPY[:1], "unsent", True),
        (HAPPY[:1], "failed", True),
        (HAPPY[:1], "intent", True),  # a retry after a request that was certainly not sent
        (HAPPY[:2], "intent", False),  # has a generation id: must never be submitted again
        (HAPPY[:2], "completed", True),
        (HAPPY[:2], "done", False),  # no download without completion
        (HAPPY[:3], "done", True),
        (HAPPY[:3], "intent", False),
        (HAPPY, "completed", True),  # file lost: fetch a fresh URL
        (HAPPY, "intent", True),  # request changed: a new generation
        (HAPPY, "failed", True),  # file lost and its generation cannot be fetched again
        ([*HAPPY[:2], rec("failed", kind="timeout")], "completed", True),
        ([*HAPPY[:1], rec("uncertain")], "submitted", True),  # adopted from the usage logs
        ([*HAPPY[:1], rec("uncertain")], "intent", True),  # deliberate resubmission
        ([*HAPPY[:1], rec("uncertain")], "uncertain", True),  # a later look-up's verdict
        (HAPPY[:2], "uncertain", False),  # a generation id is certain
    ],
)
def test_transitions(history: list[dict[str, Any]], event: str, allowed: bool) -> None:
    states = replay(history)
    extra = {"gen": "g2", "url": "u", "file": "f", "bytes": 1, "sha256": "s"}
    if allowed:
        apply_record(states, rec(event, **extra))
    else:
        with pytest.raises(LedgerError):
            apply_record(states, rec(event, **extra))


def test_failed_keeps_generation_id() -> None:
    states = replay([*HAPPY[:2], rec("failed", kind="timeout", message="slow")])
    assert states["a"].status == "failed"
    assert states["a"].generation_id == "g1"
    assert states["a"].error is not None and states["a"].error.kind == "timeout"


def test_the_video_key_goes_with_the_key_it_was_recorded_with() -> None:
    # A later intent without one (an older veobatch wrote it) must not keep an earlier
    # request's video key beside its own key: that would tell an edit from a respelling wrongly.
    states = replay([rec("intent", crid="c1", key="k1", vkey="v1", model="m")])
    assert (states["a"].key, states["a"].vkey) == ("k1", "v1")
    assert restore_fields(states["a"])["vkey"] == "v1"  # an earlier POST put back: its own
    apply_record(states, rec("uncertain", kind="no_answer", message="x"))
    apply_record(states, rec("intent", crid="c2", key="k2", model="m"))
    assert (states["a"].key, states["a"].vkey) == ("k2", None)
    apply_record(states, rec("uncertain", message="x", **restore_fields(states["a"])))
    assert (states["a"].key, states["a"].vkey) == ("k2", None)


def _lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_parse_clean_journal() -> None:
    data = _lines(HAPPY)
    j = parse_journal(data)
    assert len(j.records) == 4 and j.good_bytes == len(data) and j.tail == b""


def test_every_cut_of_the_last_record_recovers() -> None:
    good = _lines(HAPPY[:3])
    last = _lines(HAPPY[3:])
    for cut in range(len(last) + 1):
        j = parse_journal(good + last[:cut])
        if cut >= len(last) - 1:  # whole record, with or without its newline
            assert len(j.records) == 4, cut
        else:
            assert len(j.records) == 3, cut
            assert j.good_bytes == len(good)
            assert j.tail == last[:cut]


@pytest.mark.parametrize(
    "tail",
    [
        b"\x00" * 64,
        b"garbage\n",
        b'{"ev": "nope"}\n',
        b"[1,2]\n",
        b'{"t":1,"ev":"done"\x00\x00\n\x00',
    ],
)
def test_garbage_tails_are_cut(tail: bytes) -> None:
    good = _lines(HAPPY)
    j = parse_journal(good + tail)
    assert len(j.records) == 4
    assert j.tail == tail


def test_damage_before_a_valid_record_refuses() -> None:
    data = _lines(HAPPY[:2]) + b"{broken\n" + _lines(HAPPY[2:])
    with pytest.raises(LedgerCorruptError, match="line 3"):
        parse_journal(data)


@pytest.mark.parametrize("how", ["open", "load_states"])
def test_a_damaged_ledger_is_named_by_its_whole_path(tmp_path: Path, how: str) -> None:
    # Several nightly folders in one cron mail: "ledger.jsonl: ... damaged" does not say which.
    out = tmp_path / "nightly"
    out.mkdir()
    (out / "ledger.jsonl").write_bytes(_lines(HAPPY[:2]) + b"{broken\n" + _lines(HAPPY[2:]))
    with pytest.raises(LedgerCorruptError) as caught:
        Ledger.open(out) if how == "open" else load_states(out)
    assert caught.value.message.startswith(f"{out / 'ledger.jsonl'}: record at line 3")


def test_failed_after_done_forgets_the_file_but_keeps_the_generation() -> None:
    states = replay([*HAPPY, rec("failed", kind="refetch_failed", message="gone")])
    s = states["a"]
    assert s.error is not None and s.error.kind == "refetch_failed"
    assert (s.status, s.generation_id) == ("failed", "g1")
    assert (s.file, s.bytes, s.sha256, s.mtime_ns, s.video, s.flags) == (None,) * 6
    assert build_results(states)["jobs"][0]["file"] is None
    # Known still, so the file put back in place is taken for the job's own video.
    assert s.delivered == {
        "file": "a.mp4",
        "bytes": 10,
        "sha256": "ab",
        "mtime_ns": 5,
        "key": "k",
        "gen": "g1",
    }


def test_a_done_video_kept_known_through_a_new_attempt_until_another_is_done() -> None:
    states = replay([*HAPPY, rec("intent", crid="c2", key="k", model="m")])
    assert states["a"].file is None and states["a"].delivered is not None
    assert states["a"].delivered["sha256"] == "ab"
    apply_record(states, rec("unsent"))
    assert states["a"].status == "pending" and states["a"].delivered is not None
    for r in HAPPY:
        apply_record(states, {**r, "sha256": "cd"} if r["ev"] == "done" else r)
    assert states["a"].delivered is None and states["a"].sha256 == "cd"


def test_gone_keeps_the_job_done_with_its_facts_and_its_first_sighting() -> None:
    states = replay([*HAPPY, {**rec("gone", kind="lost", message="404"), "t": 100.0}])
    s = states["a"]
    assert (s.status, s.file, s.sha256, s.bytes) == ("done", "a.mp4", "ab", 10)
    assert s.gone is not None and (s.gone.since, s.gone.settled) == (100.0, False)
    apply_record(states, {**rec("gone", kind="lost", message="404", settled=True), "t": 9e4})
    assert s.gone is not None and (s.gone.since, s.gone.settled) == (100.0, True)
    apply_record(states, rec("restored", file="a.mp4", bytes=10, sha256="ab", mtime_ns=7))
    assert (s.status, s.gone, s.mtime_ns) == ("done", None, 7)
    with pytest.raises(LedgerError, match="'gone' cannot follow 'failed'"):
        replay([*HAPPY, rec("failed", kind="x"), rec("gone")])


def test_restored_puts_the_delivered_video_back_with_its_request_and_generation() -> None:
    states = replay(
        [
            *HAPPY,
            rec("intent", crid="c2", key="k", model="m"),
            rec("submitted", gen="g2"),
            rec("failed", kind="generation_error", message="x"),
        ]
    )
    s = states["a"]
    assert s.delivered is not None
    apply_record(states, rec("restored", **s.delivered))
    assert (s.status, s.file, s.sha256, s.key, s.generation_id, s.error) == (
        "done",
        "a.mp4",
        "ab",
        "k",
        "g1",
        None,
    )


def test_replay_rejects_impossible_history() -> None:
    with pytest.raises(LedgerCorruptError):
        replay([rec("submitted", gen="g")])


async def test_open_recovers_torn_tail_and_keeps_it(tmp_path: Path) -> None:
    good = _lines(HAPPY[:2])
    (tmp_path / LEDGER_NAME).write_bytes(good + b'{"t": 2, "ev": "comp')
    ledger = Ledger.open(tmp_path)
    try:
        assert ledger.states["a"].status == "submitted"
        assert ledger.recovered_tail is not None
        assert ledger.recovered_tail.read_bytes() == b'{"t": 2, "ev": "comp'
        assert (tmp_path / LEDGER_NAME).read_bytes() == good
        await ledger.record("completed", "a", url="u")
    finally:
        ledger.close()
    assert replay(parse_journal((tmp_path / LEDGER_NAME).read_bytes()).records)["a"].status == (
        "completed"
    )


@pytest.mark.parametrize("after", [b"", b'{"t": 3, "ev": "completed", "job": "a", "url": "u"}\n'])
def test_a_whole_record_of_an_unknown_kind_is_refused_not_cut(tmp_path: Path, after: bytes) -> None:
    # A newer veobatch's record: a crash never leaves a whole one, so it is no torn write.
    newer = b'{"t": 2, "ev": "note", "job": "a", "text": "x"}\n'
    ledger = tmp_path / LEDGER_NAME
    ledger.write_bytes(_lines(HAPPY[:2]) + newer + after)
    with pytest.raises(LedgerCorruptError, match=r"line 3 is of a kind .* \('note'\): .*newer"):
        Ledger.open(tmp_path)
    assert ledger.read_bytes().endswith(newer + after)  # nothing cut
    assert not list(tmp_path.glob("*.torn-*"))


async def test_open_terminates_a_last_record_missing_its_newline(tmp_path: Path) -> None:
    (tmp_path / LEDGER_NAME).write_bytes(_lines(HAPPY[:2]).rstrip(b"\n"))
    ledger = Ledger.open(tmp_path)
    await ledger.record("completed", "a", url="u")
    ledger.close()
    states = replay(parse_journal((tmp_path / LEDGER_NAME).read_bytes()).records)
    assert states["a"].status == "completed"


def test_open_refuses_mid_file_corruption(tmp_path: Path) -> None:
    (tmp_path / LEDGER_NAME).write_bytes(_lines(HAPPY[:1]) + b"\x00\x00\n" + _lines(HAPPY[1:2]))
    with pytest.raises(LedgerCorruptError):
        Ledger.open(tmp_path)


async def test_records_are_durable_and_rejected_records_are_not_written(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, clock=lambda: 42.0)
    await ledger.record("intent", "a", crid="c", key="k", model="m")
    with pytest.raises(LedgerError):
        await ledger.record("done", "a", file="f", bytes=1, sha256="s")
    await ledger.record("submitted", "a", gen="g")
    ledger.close()
    lines = (tmp_path / LEDGER_NAME).read_text().splitlines()
    assert [json.loads(x)["ev"] for x in lines] == ["intent", "submitted"]
    assert json.loads(lines[0])["t"] == 42.0


async def test_concurrent_records_share_fsyncs(tmp_path: Path) -> None:
    import anyio

    ledger = Ledger.open(tmp_path)
    writes = 0
    real = ledger._write

    def counting(lines: list[bytes]) -> None:
        nonlocal writes
        writes += 1
        real(lines)

    ledger._write = counting  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(lambda i=i: ledger.record("intent", f"j{i}", crid="c", key="k"))
    ledger.close()
    assert len(Ledger.open(tmp_path).states) == 200
    assert writes < 200  # group commit: many records per write+fsync


async def test_records_through_disk_threads_are_durable_when_awaited(tmp_path: Path) -> None:
    import anyio

    from veobatch.fsutil import DiskThreads

    disk = DiskThreads(linger_s=30.0)  # a lingering hand-over would time the test out
    ledger = Ledger.open(tmp_path, offload=disk)
    try:
        with anyio.fail_after(5):  # the ledger hands its batch over at once: it lingered already
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(lambda i=i: ledger.record("intent", f"j{i}", crid="c", key="k"))
        # Every awaited record is on disk before the ledger is closed.
        assert len(Ledger.open(tmp_path).states) == 50
        assert disk.batches < 50
    finally:
        disk.close()
        ledger.close()


async def test_a_changed_directory_is_synced_before_the_batch_that_names_its_files(
    tmp_path: Path,
) -> None:
    ledger = Ledger.open(tmp_path)
    calls: list[str] = []
    sync_dir, write = ledger._sync_dir, ledger._write
    ledger._sync_dir = lambda: (calls.append("dir"), sync_dir())[1]  # type: ignore[method-assign]
    ledger._write = lambda lines: (calls.append("write"), write(lines))[1]  # type: ignore[method-assign]
    for ev, kw in [("intent", {"crid": "c"}), ("submitted", {"gen": "g"}), ("completed", {})]:
        await ledger.record(ev, "a", **kw)
    ledger.dir_changed()
    await ledger.record("done", "a", durable=False, file="a.mp4", bytes=1, sha256="s")
    assert calls == ["write"] * 3  # not waited for: it rides the next batch
    await ledger.sync()
    ledger.close()
    assert calls == ["write"] * 3 + ["dir", "write"]
    assert Ledger.open(tmp_path).states["a"].status == "done"


class ShortWrites:
    """os.write for the ledger's fd: a few bytes a call, then optionally a full disk."""

    def __init__(self, fd: int, *, chunk: int, fail_after: int | None = None) -> None:
        self.fd, self.chunk, self.fail_after, self.calls = fd, chunk, fail_after, 0
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if fd != self.fd:
            return self.real(fd, data)
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, bytes(data[: self.chunk]))


async def test_a_short_write_is_completed_before_the_record_counts_as_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.open(tmp_path)
    short = ShortWrites(ledger._fd, chunk=7)
    monkeypatch.setattr(os, "write", short)
    await ledger.record("intent", "a", crid="c" * 200, key="k", model="m")
    await ledger.record("submitted", "a", gen="g")
    monkeypatch.undo()
    ledger.close()
    assert short.calls > 30  # every byte was written, a few at a time
    journal = parse_journal((tmp_path / LEDGER_NAME).read_bytes())
    assert journal.tail == b"" and [r["ev"] for r in journal.records] == ["intent", "submitted"]


async def test_a_full_disk_mid_record_raises_and_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "a", crid="c", key="k", model="m")
    good = (tmp_path / LEDGER_NAME).read_bytes()
    monkeypatch.setattr(os, "write", ShortWrites(ledger._fd, chunk=10, fail_after=2))
    with pytest.raises(LedgerError, match="No space left on device"):
        await ledger.record("intent", "b", crid="c" * 200, key="k", model="m")
    monkeypatch.undo()
    assert (tmp_path / LEDGER_NAME).read_bytes() == good  # the 20 bytes written were cut
    # Once a batch is lost, nothing later may be appended after it (nor count as durable).
    with pytest.raises(LedgerError, match="no further records"):
        await ledger.record("submitted", "a", gen="g")
    ledger.close()
    assert (tmp_path / LEDGER_NAME).read_bytes() == good
    reopened = Ledger.open(tmp_path)
    assert {k: s.status for k, s in reopened.states.items()} == {"a": "submitting"}
    assert reopened.recovered_tail is None
    reopened.close()


async def test_a_partial_record_that_cannot_be_cut_is_a_torn_tail_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "a", crid="c", key="k", model="m")

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", ShortWrites(ledger._fd, chunk=10, fail_after=1))
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(LedgerError, match="cutting the partial record failed"):
        await ledger.record("intent", "b", crid="c", key="k", model="m")
    monkeypatch.undo()
    ledger.close()  # writes nothing after the partial record
    reopened = Ledger.open(tmp_path)
    assert set(reopened.states) == {"a"} and reopened.recovered_tail is not None
    reopened.close()


async def test_waiters_on_a_failed_batch_are_not_told_it_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    ledger = Ledger.open(tmp_path)
    monkeypatch.setattr(os, "write", ShortWrites(ledger._fd, chunk=10, fail_after=0))
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await ledger.record("intent", f"j{i}", crid="c", key="k")
            outcomes.append("durable")
        except LedgerError:
            outcomes.append("error")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    monkeypatch.undo()
    ledger.close()
    assert outcomes == ["error"] * 20
    assert (tmp_path / LEDGER_NAME).read_bytes() == b""


def test_an_unreadable_ledger_is_a_ledger_error(tmp_path: Path) -> None:
    (tmp_path / LEDGER_NAME).mkdir()  # a directory where the file should be
    with pytest.raises(LedgerError, match="is a directory, not a ledger file"):
        Ledger.open(tmp_path)


def test_results_document() -> None:
    states = replay([*HAPPY, rec("intent", job="b"), rec("failed", job="b", kind="x", message="y")])
    jobs = [
        Job("c", {"model": "google/veo-3.1-t2v", "prompt": "p"}),
        Job("a", {"model": "google/veo-3.1-t2v", "prompt": "q"}),
    ]
    doc = build_results(states, jobs)
    assert [j["id"] for j in doc["jobs"]] == ["c", "a", "b"]
    assert doc["summary"]["total"] == 3
    assert doc["summary"]["done"] == 1 and doc["summary"]["failed"] == 1
    assert doc["summary"]["pending"] == 1
    a = doc["jobs"][1]
    assert a["file"] == "a.mp4" and a["sha256"] == "ab" and a["error"] is None
    assert doc["jobs"][2]["error"] == {"kind": "x", "message": "y"}


async def test_the_results_writer_matches_a_full_rebuild_as_jobs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [Job(f"j{i}", {"model": "google/veo-3.1-t2v", "prompt": f"p{i}"}) for i in range(5)]
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "old", crid="c", key="k", model="m")  # not in this manifest
    writer = ResultsWriter(ledger, jobs)
    built: list[str] = []
    real = ledger_module.job_result

    def counting(state: JobState, job: Job | None) -> dict[str, Any]:
        built.append(state.id)
        return real(state, job)

    def full() -> bytes:
        return encode_results(build_results(ledger.states, jobs))

    def written() -> bytes:
        built.clear()
        with monkeypatch.context() as m:
            m.setattr(ledger_module, "job_result", counting)
            writer.write(*writer.encode_changed())
        return (tmp_path / RESULTS_NAME).read_bytes()

    assert written() == full()
    assert len(built) == 6  # the first write builds every row
    await ledger.record("intent", "j3", crid="c", key="k", model="m")
    await ledger.record("submitted", "j3", gen="g3")
    await ledger.record("intent", "j0", crid="c", key="k", model="m")
    assert written() == full()
    assert sorted(built) == ["j0", "j3"]  # then only the rows that changed
    assert written() == full()
    assert built == []
    ledger.close()
    doc = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert [j["id"] for j in doc["jobs"]] == ["j0", "j1", "j2", "j3", "j4", "old"]
    assert doc["summary"]["submitted"] == 1 and doc["summary"]["pending"] == 3


async def test_current_results_prefers_the_newer_journal(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "a", crid="c", key="k", model="m")
    ledger.write_results([Job("a", {"model": "m", "prompt": "p"}), Job("z", {"model": "m"})])
    await ledger.record("submitted", "a", gen="g")
    ledger.close()
    assert json.loads((tmp_path / RESULTS_NAME).read_text())["jobs"][0]["status"] == "submitting"
    doc = current_results(tmp_path)
    assert [(j["id"], j["status"]) for j in doc["jobs"]] == [("a", "submitted"), ("z", "pending")]


def test_request_and_verification_figures_replay() -> None:
    """The intent carries the compact request; done carries the probe and its flags."""
    video = {"duration_s": 4.0, "width": 1280, "height": 720, "audio": True}
    records = [
        rec("intent", crid="c1", key="k", model="m", req={"prompt": "a cat", "duration": 8}),
        *HAPPY[1:3],
        rec("done", file="a.mp4", bytes=10, sha256="ab", video=video, flags=["duration: x"]),
    ]
    s = replay(records)["a"]
    assert s.request == {"prompt": "a cat", "duration": 8}
    assert s.video == video and s.flags == ["duration: x"]
    row = build_results(replay(records))["jobs"][0]
    assert row["video"] == video and row["flags"] == ["duration: x"]
    # A new attempt forgets the previous video's figures but keeps the last known request.
    again = replay([*records, rec("intent", crid="c2", key="k2", model="m")])["a"]
    assert again.video is None and again.flags is None and again.request is not None


def test_ledgers_written_before_verification_still_replay() -> None:
    s = replay(HAPPY)["a"]
    assert s.status == "done" and s.video is None and s.flags is None and s.request is None


@pytest.mark.parametrize(
    ("at_create", "at_completion", "want"),
    [
        (0.6, 0.0, 0.6),  # the completing poll reported its own cost, not the generation's
        (0.0, 3.2, 3.2),  # charged after completion, as the contract says
        (None, 3.2, 3.2),
        (0.6, None, 0.6),
        (None, None, None),
        (0.0, 0.0, None),  # each answer's own cost: the generation's charge was not reported
        (None, 0.0, None),
    ],
)
def test_a_generations_charge_is_the_larger_of_the_two_reports(
    at_create: float | None, at_completion: float | None, want: float | None
) -> None:
    created = {} if at_create is None else {"usd": at_create}
    completed = {} if at_completion is None else {"usd": at_completion}
    states = replay(
        [HAPPY[0], rec("submitted", gen="g1", **created), rec("completed", **completed)]
    )
    assert states["a"].usd_spent == want


async def test_half_a_surrogate_pair_from_any_host_is_written_not_fatal(tmp_path: Path) -> None:
    # A CDN redirect's undecodable Location reached a failure message as a lone surrogate:
    # the record could never be written, and every rerun stopped at it.
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "a", crid="c", key="k", model="m")
    await ledger.record("submitted", "a", gen="g")
    await ledger.record("failed", "a", kind="url_rejected", message="https://x/v\udcff.mp4")
    ledger.close()
    assert Ledger.open(tmp_path).state("a").error.message == "https://x/v?.mp4"  # type: ignore[union-attr]
    doc = {"version": 1, "jobs": [{"id": "a", "error": "https://x/v\udcff.mp4"}]}
    assert json.loads(encode_results(doc))["jobs"][0]["error"] == "https://x/v?.mp4"


async def test_an_uncertain_record_can_put_an_earlier_post_back(tmp_path: Path) -> None:
    # A resubmission refused: the job is back to the POST that may exist, with what it asked
    # (an edited job must not take that video for its new request, nor lose its crid).
    ledger = Ledger.open(tmp_path)
    await ledger.record("intent", "a", crid="c1", key="k1", model="m1", req={"prompt": "old"})
    await ledger.record("uncertain", "a", kind="no_answer", message="read timeout")
    first = ledger.state("a").intent_at
    await ledger.record("intent", "a", crid="c2", key="k2", model="m2", req={"prompt": "new"})
    back = {"crid": "c1", "at": first, "model": "m1", "key": "k1", "req": {"prompt": "old"}}
    await ledger.record("uncertain", "a", kind="no_answer", message="refused", **back)
    ledger.close()
    st = load_states(tmp_path)["a"]
    assert (st.status, st.client_request_id, st.intent_at) == ("uncertain", "c1", first)
    assert (st.model, st.key, st.request) == ("m1", "k1", {"prompt": "old"})


# -- a shared output folder: the ledger is never read or written through a link -------------


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling link"])
def test_a_ledger_that_is_a_link_is_refused_never_followed(tmp_path: Path, dangling: bool) -> None:
    # A link planted in place of the ledger: its target was cut back as a "torn tail" and then
    # appended to (a dangling one was created), outside the output folder.
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_bytes(b"precious notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LEDGER_NAME).symlink_to(victim)
    with pytest.raises(LedgerError, match=r"is a symbolic link .*, not a ledger file"):
        Ledger.open(out)
    with pytest.raises(LedgerError, match=r"is a symbolic link .*, not a ledger file"):
        load_states(out)
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_bytes() == b"precious notes\n"
    assert sorted(p.name for p in out.iterdir()) == [LEDGER_NAME]  # no torn tail kept either


def test_a_ledger_that_is_a_fifo_is_refused_without_waiting_on_it(tmp_path: Path) -> None:
    from fifos import fifo_at

    with fifo_at(tmp_path / LEDGER_NAME) as freed:
        with pytest.raises(LedgerError, match="is a FIFO \\(named pipe\\), not a ledger file"):
            load_states(tmp_path)  # `status` and `plan`: they hung for ever
    assert not freed


# -- a folder rerun every night: what each earlier job costs a run ------------------------------


def _night(jobs: int, prefix: str = "n") -> list[dict[str, Any]]:
    """A night's records as a run writes them, ``jobs`` jobs of one model and account."""
    video = {"duration_s": 4.0, "width": 1920, "height": 1080, "audio": False, "codec": "h264"}
    records = []
    for i in range(jobs):
        job, key = f"{prefix}-{i:05d}", f"{i:064x}"
        req = {"prompt": f"shot {i} of a lighthouse at dawn", "duration": 4}
        records += [
            {"t": 1.0, "ev": "intent", "job": job, "crid": f"vb:{job}:1", "key": key, "vkey": key}
            | {"model": "google/veo-3.1-t2v-fast", "est": 0.6, "req": req, "acct": "f58c548b"},
            {"t": 2.0, "ev": "submitted", "job": job, "gen": f"gen-{job}"},
            {"t": 3.0, "ev": "completed", "job": job, "url": f"https://cdn/{job}.mp4"}
            | {"took": [0.0, 2.0], "usd": 0.6},
            {"t": 4.0, "ev": "done", "job": job, "file": f"{job}.mp4", "bytes": 9851}
            | {"sha256": f"{i:064x}", "mtime_ns": 5, "video": video, "flags": []},
        ]
    return records


@pytest.mark.parametrize("how", ["open", "load_states"])
def test_a_long_ledger_is_replayed_as_it_is_read(tmp_path: Path, how: str) -> None:
    # Every record of every earlier night was held in a list (and the file's bytes and lines
    # beside it) before any was replayed: several times the memory the states themselves keep.
    data = _lines(_night(1500))
    (tmp_path / LEDGER_NAME).write_bytes(data)
    tracemalloc.start()
    try:
        if how == "open":
            ledger = Ledger.open(tmp_path)
            states = ledger.states
        else:
            states = load_states(tmp_path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if how == "open":
        ledger.close()
    assert len(states) == 1500 and {s.status for s in states.values()} == {"done"}
    assert peak - kept < len(data) // 10


def test_what_repeats_from_job_to_job_is_held_once() -> None:
    states = replay(parse_journal(_lines(_night(2))).records)  # strings as JSON decodes them
    a, b = states["n-00000"], states["n-00001"]
    assert a.vkey is a.key  # the same video key as the key: one string
    assert a.model is b.model and a.account is b.account
    assert a.video is not None and a.video is b.video  # the same figures: one dict
    assert a.request is not None and b.request is not None
    assert [id(k) for k in a.request] == [id(k) for k in b.request]
    assert (a.video, a.request) == (_night(1)[3]["video"], _night(1)[0]["req"])


def test_videos_figures_are_shared_only_when_written_alike() -> None:
    # 4 and 4.0, 0.0 and -0.0, 1 and true compare equal: shared, results.json would change.
    figures = [{"duration_s": 4.0}, {"duration_s": 4}, {"duration_s": -0.0}, {"duration_s": 0.0}]
    figures += [{"audio": True}, {"audio": 1}, {"duration_s": 4.0}]
    records = []
    for i, video in enumerate(figures):
        records += [{**r, "job": f"j{i}"} for r in HAPPY[:3]]
        records.append(rec("done", job=f"j{i}", file="f", bytes=1, sha256="s", video=video))
    states = replay(parse_journal(_lines(records)).records)
    assert [json.dumps(states[f"j{i}"].video) for i in range(7)] == list(map(json.dumps, figures))
    assert states["j6"].video is states["j0"].video


def _streamed(data: bytes) -> tuple[Any, ...]:
    try:
        r = replay_journal(io.BytesIO(data))
    except LedgerCorruptError as exc:
        return ("refused", exc.message)
    return (r.states, r.good_bytes, r.tail)


def _in_two_steps(data: bytes) -> tuple[Any, ...]:
    try:
        j = parse_journal(data)
        return (replay(j.records), j.good_bytes, j.tail)
    except LedgerCorruptError as exc:
        return ("refused", exc.message)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\n  \n",
        _lines(HAPPY),
        _lines(HAPPY).rstrip(b"\n"),  # a whole last record without its newline
        _lines(HAPPY).replace(b"\n", b"\r\n"),
        _lines(HAPPY[:2]).replace(b"\n", b"\r", 1) + _lines(HAPPY[2:]),  # a lone CR ends a line
        _lines(HAPPY[:2]) + b"\n \n" + _lines(HAPPY[2:]) + b"\n",
        _lines(HAPPY[:3]) + _lines(HAPPY[3:])[:-9],  # torn
        _lines(HAPPY) + b"\x00" * 64 + b"\n\n" + b'{"t":1,"ev":"done"\x00\n',
        _lines(HAPPY[:2]) + b"{broken\r\n" + _lines(HAPPY[2:]),  # damage: refused
        _lines(HAPPY[:1]) + b"junk\n" + b'{"t":1,"ev":"note","job":"a"}\n',  # a newer kind
        _lines([HAPPY[0], HAPPY[3], HAPPY[1]]),  # a transition the machine forbids
        _lines([HAPPY[0], HAPPY[3]]) + b"junk\n" + _lines(HAPPY[1:2]),  # damage is said first
    ],
)
def test_replaying_as_read_is_parsing_then_replaying(data: bytes) -> None:
    streamed, two_steps = _streamed(data), _in_two_steps(data)
    assert streamed == two_steps
    if streamed[0] != "refused":
        assert streamed[1] + len(streamed[2]) == len(data)


def test_results_json_is_written_without_every_row_held_beside_it(tmp_path: Path) -> None:
    # The last write of a run built every row (every earlier job's too) as a dict, then as
    # text, then joined and encoded it: five copies of the document at once.
    (tmp_path / LEDGER_NAME).write_bytes(_lines(_night(1500)))
    ledger = Ledger.open(tmp_path)
    jobs = [Job("n-00007", {"model": "google/veo-3.1-t2v-fast"}), Job("new", {"model": "m"})]
    tracemalloc.start()
    try:
        ledger.write_results(jobs)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ledger.close()
    written = (tmp_path / RESULTS_NAME).read_bytes()
    assert written == encode_results(build_results(ledger.states, jobs))  # the same bytes
    assert peak - kept < 1.5 * len(written)


class _AppendedWhileRead:
    """A ledger another process is appending to, as ``status`` beside a run reads it: the end
    of the file is met once in the middle of a record, and the rest of it shows up after."""

    def __init__(self, data: bytes, at: int) -> None:
        self._parts = [data[:at], b"", data[at:]]  # b"": the end, met mid-record

    def read(self, n: int = -1) -> bytes:
        return self._parts.pop(0) if self._parts else b""

    def __iter__(self) -> Any:  # what iterating the file gave: the half, then the rest
        head, _, tail = self._parts
        yield from io.BytesIO(head)
        yield from io.BytesIO(tail)

    def __enter__(self) -> _AppendedWhileRead:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_record_half_written_when_read_beside_a_run_is_a_torn_tail_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reviewer r11 D2: read line by line, a record met half appended came as two lines with
    # whole records after it: "damaged but later records are valid", exit 3 from status.
    lines = [json.dumps(r).encode() + b"\n" for r in HAPPY]
    more = [rec("intent", "b", crid="c2", key="k2"), rec("intent", "c", crid="c3", key="k3")]
    data = b"".join(lines) + b"".join(json.dumps(r).encode() + b"\n" for r in more)
    (tmp_path / LEDGER_NAME).write_bytes(data)
    at = len(b"".join(lines)) + 20
    monkeypatch.setattr(
        ledger_module.os, "fdopen", lambda fd, *a, **k: _AppendedWhileRead(data, at)
    )
    states = load_states(tmp_path)
    assert set(states) == {"a"} and states["a"].status == "done"  # the rest: the next read
