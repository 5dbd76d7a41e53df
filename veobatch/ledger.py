"""The results ledger: an append-only journal of job state changes, and the summary built from it.

``ledger.jsonl`` is the truth; ``results.json`` is a convenience view rewritten atomically from
it. Every record passes through :func:`apply_record` both when it is written and when it is
replayed, so the journal can only ever contain transitions the state machine allows.

Pure core: :class:`JobState`, :func:`apply_record`, :func:`replay_journal` (or
:func:`parse_journal` then :func:`replay`), :func:`build_results`. Shell: :class:`Ledger`
(recovery on open, group-committed appends).
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import anyio

from .errors import LedgerCorruptError, LedgerError
from .fsutil import (
    NotRegularFileError,
    Offload,
    atomic_write_bytes,
    fsync_dir,
    open_regular,
    to_thread,
)
from .jobs import Job

LEDGER_NAME = "ledger.jsonl"
RESULTS_NAME = "results.json"
GROUP_COMMIT_LINGER_S = 0.010
_encode_record = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

Status = Literal["pending", "submitting", "submitted", "completed", "done", "failed", "uncertain"]
STATUSES: tuple[Status, ...] = get_args(Status)

# event -> the statuses it may follow ("pending" covers a job the ledger has not seen).
_ALLOWED_FROM: dict[str, frozenset[str]] = {
    # A new attempt: first try, retry after a certain non-creation, or a deliberate resubmit.
    "intent": frozenset({"pending", "submitting", "failed", "uncertain", "done"}),
    # The attempt certainly created nothing (e.g. answered 401): back to pending.
    "unsent": frozenset({"submitting", "uncertain"}),  # proved never created
    "submitted": frozenset({"submitting", "uncertain"}),
    # A later run may re-poll a timed-out job, or fetch a fresh URL for a lost file.
    "completed": frozenset({"submitted", "completed", "failed", "done"}),
    "done": frozenset({"completed"}),
    # From "done": the file was lost and fetching it again failed (the video is gone). From
    # "pending" (or "done" with its request changed): a local image changed before it was sent.
    "failed": frozenset(
        {"pending", "submitting", "submitted", "completed", "uncertain", "failed", "done"}
    ),
    "uncertain": frozenset({"submitting", "uncertain"}),  # a later look-up's own verdict
    # A done job's file is missing and the API could not deliver its video again: still done.
    "gone": frozenset({"done"}),
    # The video a job delivered is found in place again (put back from an archive): done
    # again, nothing sent. From "done": the file a "gone" record said missing is back.
    "restored": frozenset({"pending", "failed", "done"}),
}
EVENTS = frozenset(_ALLOWED_FROM)


@dataclass(frozen=True)
class ErrorInfo:
    kind: str  # machine-readable: "invalid_request", "generation_error", "timeout", ...
    message: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class Gone:
    """A done job's file missing, and its video no longer delivered by the API (its generation
    unknown to it, or in error): the video was delivered; only the copy on disk went."""

    since: float  # wall clock of the first run that found so since the job was last done
    settled: bool  # found so again long enough after: left as it is (scheduler.GONE_CONFIRM_S)
    error: ErrorInfo  # what the last run that found so met


@dataclass(slots=True)
class JobState:
    """What the ledger knows of one job."""

    id: str
    status: Status = "pending"
    key: str | None = None
    # The video that key's request asks for (jobs.video_key), recorded since requests spelled
    # differently count as one; None in intents written before.
    vkey: str | None = None
    model: str | None = None
    account: str | None = None  # the last intent's API key fingerprint (Secret.fingerprint)
    attempts: int = 0
    client_request_id: str | None = None
    generation_id: str | None = None
    submitted_at: float | None = None  # wall clock, so deadlines survive restarts
    intent_at: float | None = None  # wall clock of the last attempt's intent: its POST left then
    video_url: str | None = None
    file: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    mtime_ns: int | None = None  # of the finished file, so an unchanged file is not re-hashed
    completed_at: float | None = None  # wall clock: with submitted_at, how long it took
    # When it finished, in seconds from submission, as (after, by) the polls saw it: None when
    # unknown (first polled on a resume or refresh); "old" for a ledger older than the field.
    took: tuple[float, float] | Literal["old"] | None = "old"
    error: ErrorInfo | None = None
    updated_at: float | None = None
    usd_estimate: float | None = None  # at submission, from the price table
    usd_spent: float | None = None  # as the API reported it (x-aimlapi-usd-spent), if it did
    request: dict[str, Any] | None = None  # compact request (jobview.compact_request), for views
    video: dict[str, Any] | None = None  # the finished file's figures (verify.Probe.to_json)
    flags: list[str] | None = None  # how that file differs from the request, if it does
    # A resend of a POST that may have created a generation (--resubmit-uncertain): that
    # earlier POST as the "uncertain" record that puts it back takes it (restore_fields).
    prev: dict[str, Any] | None = None
    # The done facts of the video the job last delivered (its file, size, hash, probe and
    # flags, the request key and generation it was made for) once a later record took them off
    # the state (a refetch that failed, a new attempt): a copy put back in place is then known
    # for the job's own video, never kept aside and paid for again (scheduler.own_video).
    delivered: dict[str, Any] | None = None
    gone: Gone | None = None  # done, its file missing and its video gone from the API

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


def apply_record(states: dict[str, JobState], rec: Mapping[str, Any]) -> JobState:
    """Fold one record into the states; raises LedgerError for a transition the machine forbids."""
    ev = rec.get("ev")
    job_id = rec.get("job")
    if ev not in _ALLOWED_FROM or not isinstance(job_id, str):
        raise LedgerError(f"not a ledger record: {dict(rec)!r}")
    state = states.get(job_id) or JobState(job_id)
    if state.status not in _ALLOWED_FROM[ev]:
        raise LedgerError(f"job {job_id!r}: '{ev}' cannot follow '{state.status}'")
    _APPLY[ev](state, rec)
    state.updated_at = rec.get("t")
    states[job_id] = state
    return state


def _on_intent(s: JobState, r: Mapping[str, Any]) -> None:
    if s.status == "done":  # made anew (its request changed, or --retry-failed): kept known
        s.delivered = _delivered(s)
    s.gone = None
    s.status = "submitting"
    s.attempts += 1
    _take_post(s, r, at=r.get("t"))
    s.usd_spent = None
    s.prev = r.get("prev")
    s.generation_id = s.video_url = s.file = s.sha256 = None
    s.video = s.flags = None
    s.bytes = None
    s.error = None


def _take_post(s: JobState, r: Mapping[str, Any], *, at: float | None) -> None:
    """The POST a record names (an intent's, or an earlier one put back): its request id, when
    it left, and what it asked, with which key."""
    s.intent_at = at
    s.client_request_id = r.get("crid")
    if "key" in r:  # never an earlier request's video key beside this one's key
        _take_keys(s, r)
    s.model = _shared(r.get("model", s.model))
    s.account = _shared(r.get("acct"))
    s.usd_estimate = r.get("est", s.usd_estimate)
    if "req" in r:
        s.request = _shared_keys(r["req"])


def _take_keys(s: JobState, r: Mapping[str, Any]) -> None:
    key, vkey = r["key"], r.get("vkey")
    s.key, s.vkey = key, key if vkey == key else vkey  # one string, not two alike


# A folder rerun every night keeps every earlier job's state (a month of nights, 300,000):
# what repeats from job to job (a model, an account, the names of a request's fields and a
# video's figures) is held once, not once per job as each record's JSON decodes it.
def _shared(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


def _shared_keys(doc: Any) -> Any:
    """``doc`` with its field names (and its short texts, a codec's name) held once."""
    if type(doc) is not dict:
        return doc
    return {
        _shared(k): _shared(v) if type(v) is str and len(v) <= 16 else v for k, v in doc.items()
    }


# Videos' figures seen, each as one dict the states of every video alike share (so never
# changed in place); a few kinds of video in practice, bounded all the same.
_FIGURES: dict[tuple[Any, ...], dict[str, Any]] = {}


def _shared_figures(doc: Any) -> Any:
    if type(doc) is not dict:
        return doc
    # Typed, and floats exact: 4 and 4.0, or 0.0 and -0.0, are not written alike.
    like = tuple((k, type(v), v.hex() if type(v) is float else v) for k, v in doc.items())
    try:
        shared = _FIGURES.get(like)
    except TypeError:  # a figure that is a list or a dict
        return _shared_keys(doc)
    if shared is None:
        if len(_FIGURES) >= 1024:
            _FIGURES.clear()
        shared = _FIGURES[like] = _shared_keys(doc)
    return shared


def _on_unsent(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "pending"
    s.error = None


def _on_submitted(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "submitted"
    s.prev = None
    s.generation_id = r["gen"]
    s.submitted_at = r.get("t")
    s.usd_spent = r.get("usd", s.usd_spent)
    s.error = None


def _on_completed(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "completed"
    s.video_url = r.get("url")
    s.completed_at = r.get("t")
    if "took" in r:
        took = r["took"]
        s.took = (float(took[0]), float(took[1])) if took else None
    s.usd_spent = _charge(s.usd_spent, r.get("usd"))
    s.error = None


def _charge(at_create: float | None, at_completion: float | None) -> float | None:
    """One generation's charge, reported by the create, the completing poll, or both: the
    contract says the charge is recorded after completion, while an answer may report only its
    own cost, nothing. A 0 is that, never a completed generation's charge (failed ones are not
    billed, and those never complete): with no other figure the charge is unknown, and costs
    fall back to the estimate rather than report $0 spent."""
    known = [usd for usd in (at_create, at_completion) if usd]
    return max(known) if known else None


def _on_done(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "done"
    _take_file(s, r)
    s.delivered = s.gone = None  # the video on record is this one


def _take_file(s: JobState, r: Mapping[str, Any]) -> None:
    s.file, s.bytes, s.sha256 = r["file"], r["bytes"], r["sha256"]
    s.mtime_ns = r.get("mtime_ns")
    # Absent in ledgers before verification.
    s.video, s.flags = _shared_figures(r.get("video")), r.get("flags")


def _delivered(s: JobState) -> dict[str, Any] | None:
    """A done state's video, to keep once later records take it off the state."""
    if not (s.file and s.sha256):
        return s.delivered
    facts = {
        "file": s.file,
        "bytes": s.bytes,
        "sha256": s.sha256,
        "mtime_ns": s.mtime_ns,
        "video": s.video,
        "flags": s.flags,
        "key": s.key,
        "vkey": s.vkey,  # the same video, written otherwise since, is still this one
        "gen": s.generation_id,
    }
    return {k: v for k, v in facts.items() if v is not None}


def _on_failed(s: JobState, r: Mapping[str, Any]) -> None:
    if s.status == "done":  # no longer vouched for as in place, but known as its video
        s.delivered = _delivered(s)
        s.file = s.sha256 = None
        s.bytes = s.mtime_ns = None
        s.video = s.flags = None
        s.gone = None
    s.status = "failed"  # the generation id is kept: a later run may poll it instead of paying
    s.error = ErrorInfo(_shared(str(r.get("kind", "unknown"))), str(r.get("message", "")))


def _on_gone(s: JobState, r: Mapping[str, Any]) -> None:
    since = s.gone.since if s.gone is not None else float(r.get("t") or 0.0)
    error = ErrorInfo(_shared(str(r.get("kind", "lost"))), str(r.get("message", "")))
    s.gone = Gone(since, bool(r.get("settled")), error)


def _on_restored(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "done"
    _take_file(s, r)
    if "key" in r:  # set together: a video key belongs to its own key
        _take_keys(s, r)
    s.generation_id = r.get("gen", s.generation_id)
    s.video_url = None
    s.error = None
    s.delivered = s.gone = None


def restore_fields(earlier: JobState) -> dict[str, Any]:
    """An "uncertain" record's fields that put ``earlier``'s POST back on record: its crid,
    intent time, and what it asked (an edited job must not take its video for the new request)."""
    back: dict[str, Any] = {"crid": earlier.client_request_id, "at": earlier.intent_at}
    met = earlier.error if earlier.status == "uncertain" else None  # else a crash mid-POST
    back["kind"] = met.kind if met else "crash"
    back |= {"model": earlier.model} if earlier.model else {}
    back |= {"acct": earlier.account} if earlier.account else {}
    back |= {"key": earlier.key} if earlier.key else {}
    back |= {"vkey": earlier.vkey} if earlier.key and earlier.vkey else {}
    back |= {"req": earlier.request} if earlier.request is not None else {}
    back |= {"est": earlier.usd_estimate} if earlier.usd_estimate is not None else {}
    return back


# Said of a job put back on an earlier POST (restore_fields), whatever made the later one fail.
EARLIER_POST = "an earlier POST of it may have created a generation"


def _on_uncertain(s: JobState, r: Mapping[str, Any]) -> None:
    s.status = "uncertain"
    s.error = ErrorInfo(_shared(str(r.get("kind", "no_answer"))), str(r.get("message", "")))
    if "crid" in r:  # a resubmission refused: back to the earlier POST that may exist
        _take_post(s, r, at=r.get("at"))
        s.prev = None


_APPLY: dict[str, Callable[[JobState, Mapping[str, Any]], None]] = {
    "intent": _on_intent,
    "unsent": _on_unsent,
    "submitted": _on_submitted,
    "completed": _on_completed,
    "done": _on_done,
    "failed": _on_failed,
    "uncertain": _on_uncertain,
    "gone": _on_gone,
    "restored": _on_restored,
}


@dataclass(frozen=True)
class Journal:
    """A parsed ledger file: the good records, and how many bytes of a torn tail follow them."""

    records: list[dict[str, Any]]
    good_bytes: int  # length of the valid prefix
    tail: bytes  # what follows it (empty when the file is clean)


@dataclass(frozen=True)
class _Scanned:
    """What reading a ledger file found besides its records (:func:`_scan`)."""

    good_bytes: int  # length of the valid prefix
    tail: bytes  # what follows it (empty when the file is clean)
    size: int  # of the whole file
    open_end: bool  # its last byte is not a newline (a whole last record whose newline was lost)


@dataclass(frozen=True)
class Replayed(_Scanned):
    """A ledger file replayed as it was read (:func:`replay_journal`): the jobs' states, and
    the torn tail that follows the records they were made of."""

    states: dict[str, JobState]


def _parse_line(line: bytes) -> dict[str, Any] | None:
    if b"\x00" in line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    if rec.get("ev") not in EVENTS and isinstance(rec.get("ev"), str) and "job" in rec:
        raise _UnknownRecord(str(rec["ev"]))
    return rec if rec.get("ev") in EVENTS else None


class _UnknownRecord(Exception):
    """A whole record of a kind this version does not know: written by a newer one, never
    by a torn write (a crash leaves a prefix, and a prefix that parses is a known record)."""


def _scan(lines: Iterable[bytes], take: Callable[[dict[str, Any]], None], name: str) -> _Scanned:
    """Hand each good record of a ledger to ``take`` as it is read, and find the torn tail.

    ``lines``: the file's bytes in pieces that each end at a newline (a binary file iterated),
    so no list of every record, nor of every line, is ever held. Split further as
    ``bytes.splitlines`` splits, so a lone CR ends a line as it always did.
    A bad record with only bad records after it is a torn write from a crash: it is cut.
    A bad record followed by a good one means damage we cannot explain: refuse.
    """
    pos = 0
    newlines = 0  # before pos: the line number an error names
    bad_at: int | None = None
    bad_line = 0
    tail: list[bytes] = []
    last = b"\n"
    for piece in lines:
        if piece:
            last = piece[-1:]
        for raw in piece.splitlines(keepends=True) if b"\r" in piece else (piece,):
            if bad_at is not None:
                tail.append(raw)
            try:
                rec = _parse_line(raw.rstrip(b"\r\n")) if raw.strip() else None
            except _UnknownRecord as exc:
                raise LedgerCorruptError(
                    f"{name}: the record at line {newlines + 1} is of a kind this veobatch does"
                    f" not know ({exc.args[0]!r}): was the ledger written by a newer version?"
                    " Run that version, or move the file aside; nothing is cut or sent."
                ) from None
            if rec is None and (raw.strip() or b"\x00" in raw):  # blank lines are harmless
                if bad_at is None:
                    bad_at, bad_line = pos, newlines + 1
                    tail.append(raw)
            elif rec is not None and bad_at is not None:
                raise LedgerCorruptError(
                    f"{name}: record at line {bad_line} is damaged but later records are valid;"
                    " refusing to guess. Move the file aside or repair that line by hand."
                )
            elif rec is not None:
                take(rec)
            pos += len(raw)
            newlines += raw.endswith(b"\n")
    good = pos if bad_at is None else bad_at
    return _Scanned(good, b"".join(tail), pos, pos > 0 and last != b"\n")


def parse_journal(data: bytes, *, name: str = LEDGER_NAME) -> Journal:
    """Split a ledger into good records and a torn tail (see :func:`_scan`)."""
    records: list[dict[str, Any]] = []
    scanned = _scan(io.BytesIO(data), records.append, name)
    return Journal(records, scanned.good_bytes, scanned.tail)


def replay_journal(lines: Iterable[bytes], *, name: str = LEDGER_NAME) -> Replayed:
    """Replay a ledger while it is read: each record is folded into the states as it is
    parsed, never held in a list of them all (a folder rerun every night keeps every earlier
    job's records). As :func:`parse_journal` then :func:`replay`: damage is refused first,
    then a transition the machine forbids."""
    states: dict[str, JobState] = {}
    failed: list[Exception] = []

    def take(rec: dict[str, Any]) -> None:
        if not failed:  # replay stops at its first error; the scan still looks for damage
            try:
                apply_record(states, rec)
            except Exception as exc:  # raised below, once the scan is done
                failed.append(exc)

    scanned = _scan(lines, take, name)
    if failed:
        if isinstance(failed[0], LedgerError):
            raise LedgerCorruptError(f"{name}: {failed[0].message}") from None
        raise failed[0]
    return Replayed(**vars(scanned), states=states)


def replay(records: Iterable[Mapping[str, Any]], *, name: str = LEDGER_NAME) -> dict[str, JobState]:
    states: dict[str, JobState] = {}
    for rec in records:
        try:
            apply_record(states, rec)
        except LedgerError as exc:
            raise LedgerCorruptError(f"{name}: {exc.message}") from None
    return states


def job_result(state: JobState, job: Job | None) -> dict[str, Any]:
    return {
        "id": state.id,
        "status": state.status,
        "model": job.model if job else state.model,
        "generation_id": state.generation_id,
        "file": state.file,
        "bytes": state.bytes,
        "sha256": state.sha256,
        "error": state.error.to_json() if state.error else None,
        "attempts": state.attempts,
        "key": state.key,
        "usd_estimate": state.usd_estimate,
        "usd_spent": state.usd_spent,
        "video": state.video,
        "flags": state.flags,
    }


def build_results(states: Mapping[str, JobState], jobs: Iterable[Job] = ()) -> dict[str, Any]:
    """The results.json document: manifest jobs in manifest order, then any the ledger adds."""
    by_id = {job.id: job for job in jobs}
    rows = [_row(states, jid, by_id) for jid in _row_order(states, by_id)]
    return results_document(rows)


def _row_order(states: Mapping[str, JobState], jobs: Mapping[str, Job]) -> list[str]:
    return [*jobs, *(jid for jid in states if jid not in jobs)]


def _row(states: Mapping[str, JobState], job_id: str, jobs: Mapping[str, Job]) -> dict[str, Any]:
    return job_result(states.get(job_id) or JobState(job_id), jobs.get(job_id))


def results_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows wrapped with their counts by status: the shape of results.json."""
    return {**_results_head(row["status"] for row in rows), "jobs": rows}


def _results_head(statuses: Iterable[str]) -> dict[str, Any]:
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    total = 0
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
        total += 1
    return {"version": 1, "summary": {"total": total, **counts}}


class Ledger:
    """The open journal of one output directory. Not thread-safe; one event loop uses it.

    Records are applied in memory at once and written in groups: ``record(..., durable=True)``
    returns only after its line (and every line before it) is written and fsynced.
    """

    def __init__(
        self,
        directory: Path,
        states: dict[str, JobState],
        *,
        clock: Callable[[], float],
        offload: Offload = to_thread,
    ) -> None:
        self.directory = directory
        self.offload = offload
        self.changed: set[str] = set()  # jobs with records since a ResultsWriter last looked
        self.path = directory / LEDGER_NAME
        self.states = states
        self._clock = clock
        self._fd = os.open(self.path, _APPEND | os.O_CREAT, 0o644)
        # Where a failed batch is cut back to: known here once, not asked of the disk per batch
        # (the output lock makes this the only writer).
        self._end = os.fstat(self._fd).st_size
        self._buf: list[bytes] = []
        self._seq = 0  # records appended to the buffer
        self._synced = 0  # records known to be on disk
        self._flushing: anyio.Event | None = None
        self._dir_changed = False  # renames in the directory to fsync before the next batch
        self._buf_lock = threading.Lock()  # held only to append or swap the buffer
        self._io_lock = threading.Lock()  # held while a batch is written
        self._broken: LedgerError | None = None  # a batch failed: nothing more may be written
        self.recovered_tail: Path | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        offload: Offload = to_thread,
    ) -> Ledger:
        """Recover a torn tail if there is one, replay the journal, and open it for appends."""
        path = directory / LEDGER_NAME
        try:
            return cls._open(path, clock, offload)
        except OSError as exc:  # the one place the ledger's OS errors are translated on open
            raise LedgerError(f"cannot open {path}: {exc.strerror or exc}") from exc

    @classmethod
    def _open(cls, path: Path, clock: Callable[[], float], offload: Offload) -> Ledger:
        journal = _replay_file(path)
        kept: Path | None = None
        if journal.tail:
            kept = _cut_tail(path, journal, clock())
        elif journal.open_end:
            fd = os.open(path, _APPEND)  # a whole last record whose newline was lost
            try:
                os.write(fd, b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        ledger = cls(path.parent, journal.states, clock=clock, offload=offload)
        ledger.recovered_tail = kept
        if not journal.size:
            fsync_dir(path.parent)
        return ledger

    def state(self, job_id: str) -> JobState:
        return self.states.get(job_id) or JobState(job_id)

    def dir_changed(self) -> None:
        """Files were renamed into the directory: fsync it before the next batch is written,
        so a record naming such a file is never on disk before the file's name is."""
        with self._buf_lock:
            self._dir_changed = True

    async def record(self, ev: str, job_id: str, *, durable: bool = True, **data: Any) -> JobState:
        """Apply and append one record; with ``durable``, wait until it is fsynced.

        Raises :class:`LedgerError` once a write has failed: the caller must not act on a
        record that is not on disk (an intent that is not there must not be followed by a POST).
        """
        self._check_usable()
        rec: dict[str, Any] = {"t": round(self._clock(), 3), "ev": ev, "job": job_id, **data}
        state = apply_record(self.states, rec)
        self.changed.add(job_id)
        # "replace": half a surrogate pair, from any text an API or host sent, is a "?" on
        # disk rather than a record that can never be written (and a run stopped at it).
        line = _encode_record(rec).encode("utf-8", "replace") + b"\n"
        with self._buf_lock:
            self._buf.append(line)
            self._seq += 1
            seq = self._seq
        if durable:
            await self.sync(seq)
        return state

    async def sync(self, upto: int | None = None) -> None:
        """Make every record up to ``upto`` (default: all so far) durable, batching writers."""
        target = self._seq if upto is None else upto
        while self._synced < target:
            self._check_usable()  # a failed batch may have held this waiter's records
            if self._flushing is not None:
                await self._flushing.wait()
                continue
            self._flushing = done = anyio.Event()
            try:
                # Linger a moment so records of other tasks share this write and fsync.
                await anyio.sleep(GROUP_COMMIT_LINGER_S)
                drained = await self.offload(self._drain, linger=False)
                self._synced = max(self._synced, drained)
            finally:
                self._flushing = None
                done.set()

    def _drain(self) -> int:
        """Write and fsync everything buffered; returns the sequence number now on disk.

        The buffer is taken under the I/O lock, so batches reach the file in the order they
        were taken, even when a shutdown path drains from another thread.
        """
        with self._io_lock:
            with self._buf_lock:
                lines, self._buf = self._buf, []
                seq = self._seq
                dir_changed, self._dir_changed = self._dir_changed, False
            self._check_usable()
            try:
                if dir_changed:
                    self._sync_dir()
                if lines:
                    self._write(lines)
            except LedgerError as exc:
                # The batch's records are applied in memory but not on disk, and its waiters
                # cannot be told apart from later ones: stop the ledger for this run. The next
                # run replays what did reach the disk (a lost intent means no POST was sent).
                self._broken = exc
                raise
            return seq

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise LedgerError(f"{self._broken.message}; no further records can be trusted")

    def _sync_dir(self) -> None:
        try:
            fsync_dir(self.directory)
        except OSError as exc:
            raise LedgerError(f"cannot sync {self.directory}: {exc.strerror or exc}") from exc

    def _write(self, lines: list[bytes]) -> None:
        """Append every byte of the batch and fsync, or leave the file as it was.

        os.write may write only part of a buffer (a nearly full disk, a signal). A partial
        record left behind would be a torn tail, and the next successful append would turn it
        into a damaged line in the middle of the journal, so on any failure the file is cut
        back to where this batch started before the error is raised.
        """
        data = memoryview(b"".join(lines))
        start, end = self._end, self._end + len(data)
        try:
            while data:
                written = os.write(self._fd, data)
                if written <= 0:  # never expected from a regular file, but never loop on it
                    raise OSError(errno.EIO, "the disk accepted no bytes")
                data = data[written:]
            os.fsync(self._fd)
        except OSError as exc:
            why = f"cannot write {self.path}: {exc.strerror or exc}"
            raise LedgerError(why + self._cut_back(start)) from exc
        self._end = end

    def _cut_back(self, size: int) -> str:
        """Truncate a failed batch away; returns what the error message should add."""
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:  # the next run cuts the partial record as a torn tail
            return f" (and cutting the partial record failed: {exc.strerror or exc})"
        return ""

    @property
    def broken(self) -> bool:
        """A write failed: the journal holds less than memory, and nothing more is written."""
        return self._broken is not None

    def flush_sync(self) -> None:
        """Write what is buffered without the event loop: for shutdown paths."""
        if self._fd >= 0 and self._broken is None:
            self._synced = max(self._synced, self._drain())

    def write_results(self, jobs: Iterable[Job]) -> None:
        """results.json as :func:`build_results` makes it, each row put in the document as it
        is made: never all the rows (every earlier job's among them) beside the document."""
        by_id = {job.id: job for job in jobs}
        ids = _row_order(self.states, by_id)
        rows = (_encoded_row(_row(self.states, jid, by_id)) for jid in ids)
        doc = _join_results(_rows_head(self.states, ids), rows)
        atomic_write_bytes(self.directory / RESULTS_NAME, doc)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush_sync()
            finally:
                os.close(self._fd)
                self._fd = -1


class ResultsWriter:
    """results.json kept current during a run, re-encoding only the rows of jobs whose state
    changed since the last write: at 10,000 jobs a full rebuild is ~40 ms of CPU, a few
    hundred changed rows about a millisecond. The bytes are the same as a full rebuild's."""

    def __init__(self, ledger: Ledger, jobs: Iterable[Job]) -> None:
        self._ledger = ledger
        self._jobs = {job.id: job for job in jobs}
        self._rows: dict[str, bytes] = {}  # encoded rows in document order

    def encode_changed(self) -> tuple[dict[str, Any], list[bytes]]:
        """The head of the document and its encoded rows; cheap, for the event loop."""
        states = self._ledger.states
        ids = list(self._ledger.changed) if self._rows else _row_order(states, self._jobs)
        self._ledger.changed.clear()
        for jid in ids:
            self._rows[jid] = _encoded_row(_row(states, jid, self._jobs))
        return _rows_head(states, self._rows), list(self._rows.values())

    def write(self, head: dict[str, Any], rows: list[bytes]) -> None:
        """Write what :meth:`encode_changed` gave; safe in a worker thread."""
        atomic_write_bytes(self._ledger.directory / RESULTS_NAME, _join_results(head, rows))


_encode_row = json.JSONEncoder(ensure_ascii=False).encode


def _encoded_row(row: dict[str, Any]) -> bytes:
    # "replace": half a surrogate pair from an API's text is a "?", as in the ledger.
    return _encode_row(row).encode("utf-8", "replace")


def _rows_head(states: Mapping[str, JobState], ids: Iterable[str]) -> dict[str, Any]:
    """The head of a results document whose rows are ``ids``' (one never sent is pending)."""
    return _results_head((st.status if (st := states.get(jid)) else "pending") for jid in ids)


def encode_results(doc: dict[str, Any]) -> bytes:
    """The document with one job per line: as easy to read and grep as indented JSON, and
    encoded by the C encoder (indentation is pure Python, 3x the cost at 10,000 jobs)."""
    head = {k: v for k, v in doc.items() if k != "jobs"}
    return _join_results(head, map(_encoded_row, doc.get("jobs", [])))


def _join_results(head: dict[str, Any], rows: Iterable[bytes]) -> bytes:
    """The document's bytes, each row copied into them once: a folder rerun every night holds
    every earlier job's row, and the text of them all joined, then encoded, took three copies.
    (BytesIO hands its buffer over, uncopied.)"""
    parts = [f"{_encode_row(k)}: {_encode_row(v)}" for k, v in head.items()]
    doc = io.BytesIO()
    doc.write(("{" + ", ".join([*parts, '"jobs": ['])).encode("utf-8", "replace"))
    first = True
    for row in rows:
        doc.write(b"\n    " if first else b",\n    ")
        doc.write(row)
        first = False
    doc.write(b"]}\n" if first else b"\n  ]}\n")
    return doc.getvalue()


def _cut_tail(path: Path, journal: Replayed, now: float) -> Path:
    """Keep the torn bytes beside the ledger, then cut the ledger back to its good prefix."""
    kept = path.with_name(f"{path.name}.torn-{int(now)}")
    n = 1
    while os.path.lexists(kept):
        kept = path.with_name(f"{path.name}.torn-{int(now)}-{n}")
        n += 1
    atomic_write_bytes(kept, journal.tail)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, journal.good_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return kept


def load_states(directory: Path) -> dict[str, JobState]:
    """Read-only replay, for `status` and `plan`: never cuts or writes anything."""
    path = directory / LEDGER_NAME
    return _replay_file(path).states


# The ledger is opened by name in a folder that may be shared: a link there is never followed.
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


def _replay_file(path: Path) -> Replayed:
    """The journal replayed as it is read, a chunk at a time (nothing when there is no file); a
    link, a FIFO or a directory in its place is refused, never followed or opened: a run would
    append to what it points at. Named in full in errors: cron's mail of a run of several
    nightly folders must say which."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return replay_journal((), name=str(path))
    except NotRegularFileError as exc:
        raise LedgerError(
            f"{path} is {exc.what}, not a ledger file: refusing to read or write through it;"
            " put the ledger itself there, or use another --out"
        ) from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        return replay_journal(_lines_until_eof(f), name=str(path))


READ_CHUNK = 1 << 15


def _lines_until_eof(f: BinaryIO) -> Iterator[bytes]:
    """The file's whole lines, read a chunk at a time, then what follows the last newline when
    a read first finds the end. A file iterated line by line may meet the end in the middle
    of a record another process is appending (``status`` beside a run), hand out its first
    half, then read the rest as a second line: damage "followed by valid records". Here a half
    record is only ever the last piece, a torn tail, as a single read of the file made it."""
    parts: list[bytes] = []  # of the line not yet ended (a long one spans many chunks)
    while chunk := f.read(READ_CHUNK):
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            parts.append(chunk)
            continue
        parts.append(chunk[:cut])
        yield from io.BytesIO(b"".join(parts))  # split at each newline, as a file is
        parts = [chunk[cut:]]
    if rest := b"".join(parts):
        yield rest


def result_rows(directory: Path) -> list[dict[str, Any]]:
    """The job rows of a directory's results.json; none when it is missing or unreadable."""
    try:
        rows = json.loads((directory / RESULTS_NAME).read_text(encoding="utf-8")).get("jobs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def current_results(
    directory: Path, states: Mapping[str, JobState] | None = None
) -> dict[str, Any]:
    """results.json brought up to date with the journal (which may be newer after a crash);
    pass ``states`` when the journal has been replayed already.

    Only the order of the rows, the manifest's model names and the jobs a run had yet to
    submit come from results.json, a copy anyone may edit: every job's facts are the
    journal's, and a row the journal does not know of is kept only as a job never sent (a
    hand-made "done" row is not a job; a row that is not an object is skipped)."""
    states = load_states(directory) if states is None else states
    seen: set[str] = set()
    merged = []
    for row in result_rows(directory):
        jid, model = row.get("id"), row.get("model")
        if not isinstance(jid, str) or jid in seen:
            continue
        st = states.get(jid)
        if st is None and row.get("status") != "pending":
            continue
        seen.add(jid)
        merged.append(_merged_row(st or JobState(jid), model if isinstance(model, str) else None))
    merged.extend(job_result(s, None) for jid, s in states.items() if jid not in seen)
    return results_document(merged)


def _merged_row(state: JobState, model: str | None) -> dict[str, Any]:
    row = job_result(state, None)
    return {**row, "model": model or row["model"]}
