"""The scheduler: decide what each job needs, then submit new ones under the concurrency limit.

Pure core: :func:`plan_jobs` maps (manifest job, ledger state, file on disk) to one
:class:`Action`; :class:`AdaptiveLimit` is the concurrency the API's 429s allow;
:func:`backoff_delay_s`, :func:`rest_until` and :func:`client_request_id` are small pure helpers.
Shell: :class:`Submitter`, which records the intent durably before every POST and the
generation id durably before anything else happens to the job.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from .client import GENERATIONS_PATH, ApiClient, Created
from .costs import estimate_usd
from .downloader import file_matches, final_name, mp4_file_complete
from .errors import (
    ApiError,
    AuthError,
    BadRequestError,
    BaseUrlError,
    LedgerError,
    NotFoundError,
    NotSentError,
    RateLimitedError,
    ServerError,
)
from .fsutil import entry_problem, is_regular
from .images import ImageChangedError, Inliner
from .jobs import MODEL_PREFIX, Job, Manifest, request_key, variant_seed, video_key
from .jobview import compact_request
from .ledger import EARLIER_POST, JobState, Ledger, restore_fields
from .outage import OutageLog
from .settings import ENV_BASE_URL

log = logging.getLogger(__name__)


class Action(enum.Enum):
    """What a run does with a job, decided before anything is sent."""

    SKIP = "done"  # finished and its file is intact
    SUBMIT = "submit"  # never submitted (or its request changed after it finished)
    POLL = "poll"  # has a generation id: follow it, never submit again
    DOWNLOAD = "download"  # completed with a URL not yet fetched
    REFETCH = "refetch"  # done, but the file is missing, altered or damaged: poll for a fresh URL
    HOLD_FAILED = "failed"  # failed earlier; left alone (see --retry-failed)
    LOOKUP = "lookup"  # may have been created: ask the usage logs before anything else
    BLOCKED = "blocked"  # to submit, but its video's name is taken by what cannot be kept aside
    GONE = "gone"  # delivered, its file since moved or deleted, and the API no longer has it


@dataclass(frozen=True)
class JobPlan:
    job: Job
    action: Action
    reason: str
    state: JobState
    removed: bool = False  # in the ledger, no longer in the manifest (see removed_plans)
    # Put the job's delivered video back on record first (a "restored" record: done, as it
    # was; see own_video), then act: it is in place again, or is fetched again.
    restore: bool = False


# The flag of a finished video altered in place whose generation could not deliver it again:
# the file as found is the job's video on record, never fetched again, even when unreadable.
KEPT_AS_FOUND = "altered after it was fetched, and its generation is gone: kept as found"

# Failures whose generation may still deliver: a later run polls instead of paying again.
# A refused video URL too: the generation is finished and paid for, and a new poll may give
# another URL.
# other_key: the API does not show it to this run's key; a run with the key that created it
# can (never remade by --retry-failed: that would pay for one that exists).
REPOLL_KINDS = frozenset({"timeout", "download", "lost", "url_rejected", "other_key"})
# Never sent: where its video goes stands something that cannot be kept aside (see blocked_by).
OUTPUT_BLOCKED = "output_blocked"
# A done job's file is damaged and its generation cannot deliver it again (written, for a
# missing file too, by versions before the "gone" record: see _own_video_back).
REFETCH_FAILED = "refetch_failed"
# A done job's missing file the API said it no longer has is left as gone only when a run at
# least this long after the first that found so finds so again: a 404 blip, or an API that
# briefly forgot, must not settle it on one night; the next night's run asks again.
GONE_CONFIRM_S = 12 * 3600.0
# How a refetch of a done job's video could fail before the "gone" record (then a failure).
_REFETCH_KINDS = REPOLL_KINDS | {REFETCH_FAILED, "generation_error"}
GONE_WORDS = (
    "delivered earlier; its file since moved or deleted, and the API no longer has the video"
)


def video_in_the_way(out_dir: Path, job_id: str, state: JobState) -> tuple[Path, str | None, str]:
    """The file a new generation of the job would replace, and how it is kept aside: (path,
    tag, why). A finished video of an earlier request under its request's hash (tag); anything
    else under its own content's hash (tag None): a video this ledger does not vouch for
    (restored, copied in, altered) is never overwritten."""
    if state.status == "done" and state.file and state.key:  # submitted again: request changed
        return out_dir / state.file, state.key[:8], "request changed"
    return out_dir / final_name(job_id), None, "video not made by this ledger"


def blocked_by(path: Path) -> str | None:
    """Why a new generation cannot be made while ``path`` holds what it holds (a directory,
    a FIFO, a symbolic link, a file veobatch cannot read), or None. Only a regular file can
    be kept aside: anything else is never opened, followed or moved, and the job is not sent."""
    what = entry_problem(path)
    if what is None:
        return None
    return (
        f"{path} is {what}: only a regular file veobatch can read is kept aside there, so"
        " nothing is sent for this job until that is moved away (the next run then submits it)"
    )


def request_changed(job: Job, state: JobState) -> bool:
    """The ledger knows this job by a request the API would make another video of than the
    manifest's. Written differently is not changed (a default written out, a provider's
    case: :func:`jobs.video_key`): nothing is paid for it, nor any video kept aside."""
    if state.key is None or state.key == job.key:
        return False
    recorded = recorded_video_key(state)
    return recorded is None or recorded != job.vkey


def respelled(job: Job, state: JobState) -> bool:
    """The manifest writes the job's request otherwise than the ledger's, same video."""
    return state.key is not None and state.key != job.key and not request_changed(job, state)


def recorded_video_key(state: JobState) -> str | None:
    """The video the ledger's request for the job asks for; None when that cannot be told.

    Intents record it (``vkey``); for one written before, it is made from the request the
    intent recorded, when that is the request itself: its key is the recorded one (no image
    summarised or hashed). Otherwise None: the keys alone say whether it changed."""
    if state.vkey is not None:
        return state.vkey
    if state.key is None or state.request is None or not state.model:
        return None
    request = {"model": state.model, **state.request}
    return video_key(request, state.key) if request_key(request) == state.key else None


# A derived id (jobs.derived_id), with its take's number when it is one of several.
_DERIVED_ID = re.compile(r"(?P<base>(?P<short>.+)-[0-9a-f]{10})(?:-(?P<take>[1-9][0-9]*))?")


def adopt_recorded_manifest(manifest: Manifest, states: Mapping[str, JobState]) -> Manifest:
    """``manifest`` with its jobs' ids as :func:`adopt_recorded_ids` gives them."""
    jobs = adopt_recorded_ids(manifest.jobs, states)
    if all(a is b for a, b in zip(jobs, manifest.jobs, strict=True)):
        return manifest
    return replace(manifest, jobs=tuple(jobs))


def adopt_recorded_ids(jobs: Sequence[Job], states: Mapping[str, JobState]) -> list[Job]:
    """``jobs``, each one whose id is unknown to the ledger under the id the ledger knows its
    video by, when that id is one the same job had before and the manifest no longer lists it.

    Derived ids were once made from the request as written, so a default written out gave
    another id than the same video without it; ledgers from then know those jobs by those ids.
    A matrix combination's id follows the order its matrix writes its fields in, which a YAML
    mapping does not have: written in another order, the combination takes back the id that
    order gave it. Matched by model, take number and video (for takes whose seed was made from
    the id, by the seed that id gave: the job takes that seed back). Each recorded id is taken
    once; an id written in the manifest is never changed otherwise."""
    listed = {job.id for job in jobs}
    if not any(_may_take_back(job) and job.id not in states for job in jobs):
        return list(jobs)
    by_video: dict[tuple[str, str], list[JobState]] = {}  # (model, key or video key)
    by_unseeded: dict[tuple[str, str], list[JobState]] = {}  # (model, video key but its seed)
    for st in states.values():
        if st.id in listed or st.key is None or not st.model:
            continue
        for key in dict.fromkeys((st.key, recorded_video_key(st))):
            if key is not None:
                by_video.setdefault((st.model, key), []).append(st)
        if (unseeded := _unseeded_key(st)) is not None:
            by_unseeded.setdefault((st.model, unseeded), []).append(st)
    taken: set[str] = set()
    out = []
    for job in jobs:
        if job.id in states or not _may_take_back(job):
            out.append(job)
            continue
        out.append(_take_back(job, by_video, by_unseeded, taken))
    return out


def _may_take_back(job: Job) -> bool:
    return job.derived or job.matrix_id is not None


def _recorded_base(job: Job, st: JobState) -> str | None:
    """The id before any take number under which the ledger's ``st`` may be this job, or
    None: another derived id of its model and take, or its matrix's fields in another order."""
    if job.matrix_id is not None:
        return job.matrix_id.reordered_base(st.id)
    m, own = _DERIVED_ID.fullmatch(st.id), _DERIVED_ID.fullmatch(job.id)
    if not job.derived or m is None or own is None or m["take"] != own["take"]:
        return None
    return m["base"] if m["short"] == job.model.removeprefix(MODEL_PREFIX) else None


def _take_back(
    job: Job,
    by_video: Mapping[tuple[str, str], list[JobState]],
    by_unseeded: Mapping[tuple[str, str], list[JobState]],
    taken: set[str],
) -> Job:
    """``job`` under a recorded id not yet taken that made its video, else itself: the one of
    its very request first, then of the same video written otherwise; among several, the one
    that delivered it before one still making it, and a failed one last (its id would hold
    the job failed, and --retry-failed pay for a video the folder already has)."""
    wanted = [(by_video, job.key), (by_video, job.vkey)]
    if job.seeded_take:
        unseeded = dict(job.identity if job.identity is not None else job.request)
        unseeded.pop("seed", None)
        wanted.append((by_unseeded, video_key(unseeded)))
    for found, key in wanted:
        for st in sorted(found.get((job.model, key), ()), key=_adoption_rank):
            base = None if st.id in taken else _recorded_base(job, st)
            if base is None:
                continue
            if found is by_video:
                taken.add(st.id)
                return replace(job, id=st.id)
            seed = variant_seed(base, job.seeded_take)
            if st.request is None or st.request.get("seed") != seed:
                continue  # not the seed that id gave this take
            taken.add(st.id)
            identity = None if job.identity is None else {**job.identity, "seed": seed}
            return replace(job, id=st.id, request={**job.request, "seed": seed}, identity=identity)
    return job


def _adoption_rank(st: JobState) -> int:
    return 0 if st.status == "done" else 2 if st.status == "failed" else 1


def _unseeded_key(st: JobState) -> str | None:
    """The video key of the ledger's request without its seed, when it has one and is the
    request itself (no image summarised): a take whose seed was made from its id is found by
    it, and takes that seed back if it is the one the recorded id gave."""
    if st.request is None or not isinstance(st.request.get("seed"), int):
        return None
    request = {"model": st.model, **st.request}
    if request_key(request) != st.key:  # images summarised: not the request itself
        return None
    del request["seed"]
    return video_key(request)


def plan_job(
    job: Job, state: JobState, out_dir: Path, *, verify: bool = False, retry_failed: bool = False
) -> JobPlan:
    """One job's action: the whole resume policy lives in this function and the next."""
    plan = _plan_job(job, state, out_dir, verify=verify, retry_failed=retry_failed)
    if plan.action is Action.SUBMIT:
        why = blocked_by(video_in_the_way(out_dir, job.id, state)[0])
        if why is not None:
            return JobPlan(job, Action.BLOCKED, why, state)
    return plan


def _plan_job(
    job: Job, state: JobState, out_dir: Path, *, verify: bool, retry_failed: bool
) -> JobPlan:
    changed = request_changed(job, state)

    def p(action: Action, reason: str) -> JobPlan:
        return JobPlan(job, action, reason, state)

    st = state.status
    if st in ("pending", "failed"):
        back = _own_video_back(job, state, out_dir, verify=verify, retry_failed=retry_failed)
        if back is not None:
            return back
    if st == "pending":
        return p(Action.SUBMIT, "new")
    if st == "done":
        if changed:
            return p(Action.SUBMIT, "request changed since it was made")
        return _plan_done(job, state, out_dir, verify=verify, retry_failed=retry_failed)
    if st in ("submitted", "completed"):
        suffix = (
            " (request changed: finishing the one paid for, then, delivered or not, the new one)"
            if changed
            else ""
        )
        if st == "completed" and state.video_url:
            return p(Action.DOWNLOAD, "completed, not yet downloaded" + suffix)
        return p(Action.POLL, "in flight" + suffix)
    if st == "failed":
        kind = state.error.kind if state.error else ""
        if _repollable(state) and not (retry_failed and kind == "lost"):
            # Paid for: followed again even when the request changed since; then remade in the
            # same run, whether it delivers or fails again (or the edit would wait on it forever).
            suffix = (
                " (request changed: then making it as it now reads, even if it fails again)"
                if changed
                else ""
            )
            return p(Action.POLL, f"failed ({kind}) earlier: polling its generation again{suffix}")
        if changed:
            return p(Action.SUBMIT, "request changed since it failed")
        if retry_failed:
            return p(Action.SUBMIT, f"failed ({kind}) earlier: --retry-failed")
        if kind == "submit_failed":  # never reached the API, or refused by its limits: unpaid
            return p(Action.SUBMIT, "never created earlier (submit_failed): submitting again")
        if kind == OUTPUT_BLOCKED:  # never sent: what was in its video's way, if it has gone
            return p(Action.SUBMIT, f"never sent earlier ({kind}): submitting")
        return p(Action.HOLD_FAILED, f"failed: {state.error.message if state.error else kind}")
    # "submitting" (a crash between intent and answer) or "uncertain": the POST may have
    # created a billed generation that we cannot see. Never resubmit blindly: ask the logs.
    return p(Action.LOOKUP, "submission outcome unknown: checking the usage logs")


def _plan_done(
    job: Job, state: JobState, out_dir: Path, *, verify: bool, retry_failed: bool
) -> JobPlan:
    """A finished job's action, its request unchanged: skipped while its file is intact."""
    path = out_dir / (state.file or "")
    if not file_matches(path, state.bytes, state.sha256, state.mtime_ns, deep=verify):
        if not (state.file and is_regular(path)):  # a link there is not the video
            return _plan_missing(job, state, retry_failed=retry_failed)
        return JobPlan(
            job,
            Action.REFETCH,
            "file altered since it was fetched: fetching it again (the altered file is"
            f" then kept as {job.id}@<first 8 hex of its sha256>.mp4)",
            state,
        )
    # A file a run found missing, and the API gone, is in place again (put back from an
    # archive): on record as in place, so that it is not left as gone if it goes again.
    back = state.gone is not None

    def p(action: Action, reason: str) -> JobPlan:
        return JobPlan(
            job, action, reason + (" (in place again)" if back else ""), state, restore=back
        )

    if KEPT_AS_FOUND in (state.flags or ()):  # the user's edit, the original gone for good
        return p(Action.SKIP, "done (altered after it was fetched, kept as found)")
    if (state.video or {}).get("error"):  # recorded done by a version that let it pass
        return p(Action.REFETCH, "file recorded as unreadable: fetching it again")
    if verify and not mp4_file_complete(path):
        return p(Action.REFETCH, "file incomplete (its MP4 boxes do not add up): fetching it again")
    if respelled(job, state):  # a default written out, say: the same video, kept
        return p(Action.SKIP, "done (its request is written otherwise, same video)")
    return p(Action.SKIP, "done")


def _plan_missing(job: Job, state: JobState, *, retry_failed: bool) -> JobPlan:
    """A finished job whose file is not there: fetched again while the API may have it; once
    it has said twice, far enough apart (GONE_CONFIRM_S), that it has not, left as it is: the
    video was delivered, and its file moved (archived) or deleted since."""
    gone = state.gone
    if gone is None:
        return JobPlan(job, Action.REFETCH, "file missing: fetching it again", state)
    if not gone.settled:
        return JobPlan(
            job,
            Action.REFETCH,
            f"file missing, and the API said it no longer has the video ({gone.error.kind}):"
            " asking again (a second answer so, at least"
            f" {GONE_CONFIRM_S / 3600:.0f} h after the first, leaves it as gone)",
            state,
        )
    if retry_failed:
        return JobPlan(
            job,
            Action.SUBMIT,
            f"{GONE_WORDS}: --retry-failed generates it anew (a new charge)",
            state,
        )
    return JobPlan(
        job,
        Action.GONE,
        f"{GONE_WORDS}: left as it is, never polled again; put the file back to have it in"
        " place, or --retry-failed generates it anew (a new charge)",
        state,
    )


def own_video(job: Job, state: JobState) -> dict[str, Any] | None:
    """The video this job delivered for the request it asks now, as a "restored" record puts
    it back: a done job's own, or the one a later record (a refetch that failed, an attempt
    since) took off the state (JobState.delivered). With no request on record (``status``
    has no manifest), any is taken for the same request."""
    if state.status == "done":
        return None if request_changed(job, state) or not state.file else done_facts(state)
    own = state.delivered
    if own is None or state.status not in ("pending", "failed"):
        return None
    if state.key is not None and own.get("key") != job.key and own.get("vkey") != job.vkey:
        return None  # another request's (the same video written otherwise is this one's)
    return own


def done_facts(st: JobState) -> dict[str, Any]:
    """A done record's fields as the state holds them: to put a finished job back."""
    facts: dict[str, Any] = {"file": st.file, "bytes": st.bytes, "sha256": st.sha256}
    if st.mtime_ns is not None:
        facts["mtime_ns"] = st.mtime_ns
    if st.video is not None:
        facts["video"] = st.video
    if st.flags is not None:
        facts["flags"] = st.flags
    return facts


def _own_video_back(
    job: Job, state: JobState, out_dir: Path, *, verify: bool, retry_failed: bool
) -> JobPlan | None:
    """A job not done whose delivered video is in place again: done again, never paid for
    again. And one that an earlier version failed when it could not fetch its missing file
    again (its facts taken off the record): done again, and fetched again, as a done job."""
    own = own_video(job, state)
    if own is None:
        return None
    path = out_dir / str(own.get("file") or final_name(job.id))
    if own_video_intact(path, own, verify=verify):
        why = f"done: its video {path.name} is in place again (the one on record): nothing sent"
        return JobPlan(job, Action.SKIP, why, state, restore=True)
    kind = state.error.kind if state.error else ""
    gen = state.generation_id
    refetched = kind in _REFETCH_KINDS and gen is not None and own.get("gen") == gen
    if not refetched or is_regular(path) or (retry_failed and kind in (REFETCH_FAILED, "lost")):
        return None
    why = f"done earlier, its file missing and fetching it again failed ({kind}): asking again"
    return JobPlan(job, Action.REFETCH, why, state, restore=True)


def own_video_intact(path: Path, own: Mapping[str, Any], *, verify: bool) -> bool:
    """Is the file at ``path`` the delivered video ``own`` records, and whole?"""
    sha, size = own.get("sha256"), own.get("bytes")
    if not file_matches(path, size, sha, own.get("mtime_ns"), deep=verify):
        return False
    if (own.get("video") or {}).get("error"):  # recorded unreadable: not a video to keep
        return False
    return not verify or mp4_file_complete(path)


def plan_run(
    jobs: Iterable[Job],
    states: Mapping[str, JobState],
    out_dir: Path,
    *,
    verify: bool = False,
    retry_failed: bool = False,
) -> tuple[list[JobPlan], list[str]]:
    """Every job's plan, the manifest's then any it no longer lists that a run still fetches,
    and the warnings a user should hear: jobs it no longer lists, and ids renamed."""
    jobs = list(jobs)
    plans = plan_jobs(jobs, states, out_dir, verify=verify, retry_failed=retry_failed)
    listed = {job.id for job in jobs}
    removed = removed_plans(states, listed)
    unsettled = [
        st.id
        for st in states.values()
        if st.id not in listed and st.status in _MAY_EXIST and not _can_look_up(st)
    ]
    note = removed_note(removed, unsettled)
    warnings = [note] if note else []
    return plans + removed, warnings + list(renamed_notes(plans, states, listed))


def renamed_notes(
    plans: Iterable[JobPlan], states: Mapping[str, JobState], listed: Set[str]
) -> Iterator[str]:
    """A new job asking exactly what a job no longer listed got (or is getting): most likely
    the same job under a new id, about to be paid for again. Said, not refused: a second take
    of a request may be wanted."""
    new = [p for p in plans if p.state.status == "pending"]
    earlier: dict[str, JobState] = {}
    for st in states.values() if new else ():
        if st.id not in listed and st.key and st.status in _PAID_OR_MAYBE:
            earlier.setdefault(st.key, st)
            if (vkey := recorded_video_key(st)) is not None:  # the same video, spelled otherwise
                earlier.setdefault(vkey, st)
    for p in new:
        if (was := earlier.get(p.job.key) or earlier.get(p.job.vkey)) is not None:
            if was.status in _MAY_EXIST:  # its POST's outcome is unknown: it may have been made
                got = f"asked ({was.status}: its POST may have created a generation)"
                keep = "to have it looked up instead"
            else:
                got = f"got ({was.status}, generation {was.generation_id})"
                keep = "to keep that video instead"
            yield (
                f"job {p.job.id!r} asks exactly what {was.id!r} in the ledger {got}: renamed?"
                f" As it is, it is generated and paid for again; give it back the id {was.id!r}"
                f" {keep}"
            )


def removed_plans(states: Mapping[str, JobState], listed: Set[str]) -> list[JobPlan]:
    """Jobs the manifest no longer lists whose generation is paid for and still to fetch.

    Taking a job out of the manifest must not throw away a video already bought: its
    generation is followed and downloaded as if it were still listed (in flight, or failed in
    a way a later poll may mend), and nothing new is ever submitted for it. Whatever else such
    a job holds (done, failed for good, a look-up) stays as recorded; so does one failed
    ``lost``: the API answered that it no longer knows the generation, and asking again every
    night would only fail it again (a job no longer listed is never remade instead).
    """
    plans = []
    why = "not in the manifest any more: fetching the generation already paid for"
    for st in states.values():
        if st.id in listed or not st.model:
            continue
        job = Job(st.id, {"model": st.model, **(st.request or {})}, index=-1)
        if _can_look_up(st):  # its POST may have created one: found, it is fetched
            looked_up = "not in the manifest any more: looking up whether its POST created one"
            plans.append(JobPlan(job, Action.LOOKUP, looked_up, st, removed=True))
            continue
        in_flight = st.status in ("submitted", "completed") and bool(st.generation_id)
        gone = st.error is not None and st.error.kind == "lost"
        if not (in_flight or (_repollable(st) and not gone)):
            continue
        action = Action.DOWNLOAD if st.status == "completed" and st.video_url else Action.POLL
        plans.append(JobPlan(job, action, why, st, removed=True))
    return plans


def _can_look_up(st: JobState) -> bool:
    """A POST that may have created a generation, recorded well enough to find in the logs."""
    return st.status in _MAY_EXIST and bool(st.client_request_id) and bool(st.model)


def will_remake(plan: JobPlan) -> bool:
    """A listed job whose request changed while a paid generation of the old one is followed:
    the run finishes that one, then submits the request as the manifest now reads."""
    followed = plan.action in (Action.POLL, Action.DOWNLOAD)
    return followed and not plan.removed and request_changed(plan.job, plan.state)


def pays_for_request(plan: JobPlan) -> bool:
    """The run submits the job's request as the manifest now reads: what `plan` prices. A job
    to submit; an edited one whose paid generation is followed first (:func:`will_remake`), or
    whose POST is looked up: found, it is remade after it; never created, it is sent as edited.
    """
    if plan.action is Action.SUBMIT:
        return True
    return will_remake(plan) or (
        plan.action is Action.LOOKUP and not plan.removed and request_changed(plan.job, plan.state)
    )


def _repollable(st: JobState) -> bool:
    """Failed, but its paid generation may still deliver: a later run polls it again."""
    kind = st.error.kind if st.error else ""
    return st.status == "failed" and kind in REPOLL_KINDS and bool(st.generation_id)


_MAY_EXIST = frozenset({"submitting", "uncertain"})  # a POST may have created a generation
_PAID_OR_MAYBE = frozenset({"done", "submitted", "completed"}) | _MAY_EXIST


def removed_note(removed: Sequence[JobPlan], unsettled: Sequence[str]) -> str | None:
    """A line on removed jobs with a generation paid for or perhaps paid for; None if none.

    Removed jobs that are done, failed or never sent need no word: `status` lists them."""
    if not removed and not unsettled:
        return None

    def some(ids: Sequence[str]) -> str:
        return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")

    parts = []
    fetched = [p.job.id for p in removed if p.action is not Action.LOOKUP]
    looked_up = [p.job.id for p in removed if p.action is Action.LOOKUP]
    if fetched:
        parts.append(
            f"{len(fetched)} with a generation paid for, fetched all the same ({some(fetched)})"
        )
    if looked_up:
        parts.append(
            f"{len(looked_up)} whose submission may have created a generation, looked up in the"
            f" usage logs and fetched if it did, never submitted again ({some(looked_up)})"
        )
    if unsettled:
        parts.append(
            f"{len(unsettled)} whose submission may have created a generation, left uncertain"
            f" ({some(unsettled)}): put them back in the manifest to settle them"
        )
    total = len(removed) + len(unsettled)
    jobs = "job in the ledger is" if total == 1 else "jobs in the ledger are"
    return f"{total} {jobs} not in the manifest: " + "; ".join(parts)


CATEGORIES = ("new", "changed", "unchanged", "resumable", "failed", "removed")


def category(plan: JobPlan) -> str:
    """Where a job stands against the ledger, as `plan` groups them."""
    st, action = plan.state, plan.action
    if plan.removed:
        return "removed"
    if st.status == "pending":
        return "new"
    if action in (Action.SUBMIT, Action.BLOCKED) and request_changed(plan.job, st):
        return "changed"
    if action in (Action.SKIP, Action.GONE):
        return "unchanged"
    if st.status == "failed" and action in (Action.SUBMIT, Action.HOLD_FAILED, Action.BLOCKED):
        return "failed"
    return "resumable"  # in flight, completed, a file to fetch again, or a lookup


def plan_jobs(
    jobs: Iterable[Job],
    states: Mapping[str, JobState],
    out_dir: Path,
    *,
    verify: bool = False,
    retry_failed: bool = False,
) -> list[JobPlan]:
    return [
        plan_job(
            j, states.get(j.id) or JobState(j.id), out_dir, verify=verify, retry_failed=retry_failed
        )
        for j in jobs
    ]


@dataclass
class AdaptiveLimit:
    """Concurrency that backs off while the API answers 429 and settles at a cap it enforces.

    A 429 is either a passing refusal or a cap on the generations a key may have in flight; the
    number of ours in flight when it comes (its level) tells them apart: a cap refuses again and
    again at the same level, and never accepts a create above it.

    - A 429 at about the level of the last one, with no create accepted above that level since,
      is taken for a cap: the limit goes down to that level (one slot lower if already there,
      at most once per ``cooldown_s``) and grows above it only by the slow probe.
    - Any other 429 takes a quarter off (at most once per ``cooldown_s``: a burst of 429s is one
      signal), and the level the limit had is regained at one slot per accepted create; above
      it, the slow probe adds one slot per ``current`` accepted creates (as TCP grows fast up
      to its threshold, then additively).
    - A create accepted above the level of the last 429 shows it was no cap: what a cut for it
      took away is regained at one slot per accepted create too.
    - The limit never goes below the level of a 429: the API evidently holds that many, so a
      lower limit would only idle slots.
    """

    ceiling: int
    cooldown_s: float = 2.0
    current: int = 0
    threshold: int = 0  # regained at one slot per accepted create up to here
    # The in-flight level of the last 429, until a create accepted above it says it was no cap.
    level: int | None = None
    capped: bool = False  # the last cut was taken for a cap
    _regain: int = 0  # what the last cut taken for a cap took away, given back if it was none
    _last_cut: float = float("-inf")
    _successes: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or self.ceiling
        self.threshold = self.threshold or self.current

    def on_rate_limited(self, now: float, in_flight: int) -> int:
        """A 429 came with ``in_flight`` generations of ours accepted and not seen finished."""
        level, last = max(1, in_flight), self.level
        self.level = level
        cooling = now - self._last_cut < self.cooldown_s
        if last is not None and level >= last - _slack(last):  # refused again there: a cap
            cap = max(level, last)
            if self.current > cap or not cooling:
                self._regain = max(self.threshold, self.current)
                self._cut(now, min(self.current - 1, cap))
                self.threshold, self.capped = self.current, True
        elif not cooling:
            self.threshold, self._regain = max(self.threshold, self.current), 0
            self._cut(now, min(self.current - 1, self.current * 3 // 4))
            self.capped = False
        # Never below what the API holds (the first answers to a burst of creates can come
        # before acceptances still on their way: the level rises as they land).
        self.current = max(self.current, min(level, self.ceiling))
        return self.current

    def on_success(self, in_flight: int) -> int:
        """A create accepted with ``in_flight`` generations of ours already in flight."""
        if self.level is not None and in_flight > self.level:  # so that 429 was no cap
            self.level = None
            self.threshold, self._regain = max(self.threshold, self._regain), 0
        if self.current < self.threshold:
            self.current += 1
            return self.current
        self._successes += 1
        if self._successes >= self.current and self.current < self.ceiling:
            self.current += 1
            self._successes = 0
        return self.current

    def _cut(self, now: float, to: int) -> None:
        self.current = max(1, to)
        self._last_cut, self._successes = now, 0


def _slack(level: int) -> int:
    """How far apart two in-flight levels may be and still be the same: our count runs ahead
    of the API's by the generations finished and not yet polled."""
    return max(1, level // 10)


REST_SAID_AGAIN_S = 60.0  # a pause under way lengthened by this much is said again


def rest_until(paused_until: float, now: float, retry_after_s: float | None) -> tuple[float, bool]:
    """When submissions may go again after an answer with ``retry_after_s`` (None or 0: not
    asked), and whether that is worth a log line: a new pause is, and so is one lengthened by
    a minute or more; the 429s of creates sent before a pause began only lengthen it silently.
    """
    if not retry_after_s or now + retry_after_s <= paused_until:
        return paused_until, False
    until = now + retry_after_s
    return until, paused_until <= now or until - paused_until >= REST_SAID_AGAIN_S


def _streak(met: Set[str], minutes: str) -> str:
    """What a run's creates met while none got through, for the line that stops it."""
    if met == {"429"}:
        return f"the API has refused every create for {minutes}"
    if met == {"unsent"}:
        return f"the API could not be reached for {minutes}: no create could be sent"
    return f"no create has got through for {minutes}: refused with 429, or not sent at all"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def backoff_delay_s(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return (rng or random).uniform(0.0, min(cap_s, base_s * (2 ** min(attempt, 30))))


CRID_MAX_LEN = 128  # the API silently drops a longer X-Client-Request-Id
# The API also allows ':', but it separates the id's parts, so it never comes from a job id.
_CRID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CRID_HASH_LEN = 16


def client_request_id(job_id: str, attempt: int) -> str:
    """``vb:<job>:<attempt>:<random>``: unique per job attempt, always valid for the API.

    The API keeps 1-128 chars of ``A-Za-z0-9._:-`` and silently drops anything else, which would
    leave a lost create impossible to find in the usage logs. Look-ups match the id recorded
    with the intent, never one rebuilt from the job id, so ids already in a ledger (even an
    older, longer form) are still found as recorded.
    """
    tail = f":{attempt}:{uuid.uuid4().hex[:16]}"
    return f"vb:{crid_job_part(job_id, CRID_MAX_LEN - len('vb:') - len(tail))}{tail}"


def crid_job_part(job_id: str, room: int) -> str:
    """The job id when it fits ``room`` and the alphabet, else a readable prefix and a hash.

    The prefix is the start of the id's allowed characters; the hash covers the whole id, so
    distinct jobs stay distinct however alike their prefixes are.
    """
    if job_id and len(job_id) <= room and not _CRID_UNSAFE.search(job_id):
        return job_id
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:_CRID_HASH_LEN]
    prefix = _CRID_UNSAFE.sub("", job_id)[: max(0, room - _CRID_HASH_LEN - 1)]
    return f"{prefix}-{digest}" if prefix else digest


class SubmitOutcome(enum.Enum):
    SUBMITTED = "submitted"
    REJECTED = "rejected"  # the API refused the request: the job failed
    UNCERTAIN = "uncertain"  # may exist, may not
    STOPPED = "stopped"  # not sent because the run stops submitting
    AUTH = "auth"  # 401/403: the run must stop submitting


@dataclass
class Submitter:
    """Submits one job at a time; the caller owns the slots and the concurrency."""

    api: ApiClient
    ledger: Ledger
    retries: int
    backoff_base_s: float
    backoff_max_s: float
    should_stop: Callable[[], bool]
    on_submitted: Callable[[Job, Created], Awaitable[None]]
    rng: random.Random | None = None
    on_rate_limited: Callable[[], None] = lambda: None
    # A 429 is the API's rate or concurrency limit: nothing was created and waiting is the cure,
    # so 429s do not use up the tries meant for requests that never arrived; a job gives up
    # after this long refused. ``yield_slot`` lets the limit a 429 lowered apply to this job.
    # Also how long the run goes on with no create getting through (``refused_since``).
    rate_limit_patience_s: float = 1800.0
    yield_slot: Callable[[Job], Awaitable[None]] | None = None
    clock: Callable[[], float] = time.monotonic
    # The estimate the intent records: the run's budget holds it already (Budget.estimate).
    estimate: Callable[[Job], float] = lambda job: estimate_usd(job, {})
    # A 429 or 5xx to a create that says Retry-After: the API asks for rest, so no submission
    # (a new one, a refused one, or one the usage logs proved safe to send again) goes before
    # then. A wait, not an answer: it neither ends nor extends a streak of refusals by itself.
    paused_until: float = float("-inf")
    # Since when no create, of any job, has got through: each refused with a 429 or not sent
    # at all (connection refused, DNS: the API cannot be reached). None: one was answered
    # otherwise since. Past the patience the run submits nothing more: one job after another
    # waiting out its own patience (or its tries, two minutes each) would stretch a night's run
    # to days, then lock out the next night's.
    refused_since: float | None = None
    refused_by: set[str] = field(default_factory=set)  # what the streak met: "429", "unsent"
    gave_up: str | None = None  # why this run submits nothing more
    account: str | None = None  # the API key's fingerprint, recorded with each intent
    # Told each create's client request id as it leaves, after its intent is on disk: the
    # usage-logs look-ups take a logged row of a later create as proof the logs caught up.
    on_sent: Callable[[str], None] = lambda crid: None
    # Makes each create's body, its local images read and encoded only then (off the loop).
    inliner: Inliner = field(default_factory=Inliner)
    # This run's tries of each job that use up ``retries``: not sent, or answered with a 5xx or
    # not at all (the usage logs then decide). Not a 429 (the API's limits: patience decides),
    # nor an earlier night's (the ledger's ``attempts`` counts every POST ever sent).
    tries: Counter[str] = field(default_factory=Counter)
    # A create outage fails every submission in flight, again and again: counted, not a line each.
    failures: OutageLog = field(init=False)

    def __post_init__(self) -> None:
        self._waits: set[anyio.CancelScope] = set()  # jobs waiting to try again
        self.failures = OutageLog(
            log, "submission", "submissions succeed again", "submitting continues", clock=self.clock
        )

    async def submit(self, job: Job, *, earlier: JobState | None = None) -> SubmitOutcome:
        """Submit until the outcome is known; waits between tries can be cancelled.

        ``earlier``: the job as recorded before this submission when an earlier POST of it may
        have created a generation (a resubmission the user risked). A try that certainly
        created nothing then puts that POST back on record, never "never sent": a later
        look-up must still find it, and a later run must not pay for the job again."""
        if earlier is not None and not earlier.client_request_id:
            earlier = None  # nothing on record to put back
        limited = 0
        limited_since: float | None = None
        unsent_since: float | None = None  # this job's first try that was not sent
        while True:
            if self.should_stop() or self.gave_up is not None:
                return SubmitOutcome.STOPPED
            if (pause := self.paused_until - self.clock()) > 0:
                # In short steps: a stop (a 401 elsewhere, a signal) must not wait it out.
                await anyio.sleep(min(pause, 1.0))
                continue
            # Once the intent is on disk the POST and the record of its answer run to the end
            # even on shutdown: cutting them off would leave a generation with no id on record.
            with anyio.CancelScope(shield=True):
                outcome, retry = await self._attempt(job, earlier)
            if outcome is SubmitOutcome.STOPPED:  # never sent: no answer to learn from
                return outcome
            limited_by_api = isinstance(retry, RateLimitedError)
            if retry is None or not (limited_by_api or isinstance(retry, NotSentError)):
                # Any other answer ends "no create got through"
                self.refused_since = None
                self.refused_by.clear()
            if retry is None:
                if outcome is SubmitOutcome.UNCERTAIN:
                    self.tries[job.id] += 1
                return outcome
            now = self.clock()
            self._blocked(now, retry)
            if limited_by_api:
                limited += 1
                limited_since = now if limited_since is None else limited_since
                stop = await self._refused(job, earlier, retry, limited_since)
                if stop is not None:
                    return stop
            else:
                self.tries[job.id] += 1
                attempt = self.tries[job.id]
                unsent_since = now if unsent_since is None else unsent_since
                if self.gave_up is not None:
                    await self._not_created(job, earlier, f"sent again, refused: {retry}")
                    return SubmitOutcome.STOPPED
                # While no create of the run has got through since this job's first try, the
                # API is unreachable, not this job: the run's patience decides, not its tries
                # (an outage shorter than it costs nothing; a longer one leaves it pending).
                outage = self.refused_since is not None and self.refused_since <= unsent_since
                if attempt > self.retries and not outage:  # nothing was created: safe to fail
                    why = f"gave up after {attempt} tries: {retry}"
                    await self._not_created(job, earlier, why, fail_as="submit_failed")
                    return SubmitOutcome.REJECTED
            await self._not_created(job, earlier, f"sent again, refused: {retry}")
            await self._wait(retry, limited if limited_by_api else self.tries[job.id], job)
            if limited_by_api and self.yield_slot is not None:
                await self.yield_slot(job)

    async def _refused(
        self, job: Job, earlier: JobState | None, retry: ApiError, limited_since: float
    ) -> SubmitOutcome | None:
        """After a 429: the job fails past its own patience; the run's submissions stop once
        no create has got through that long (the job then waits for a rerun, pending)."""
        now = self.clock()
        if (waited := now - limited_since) > self.rate_limit_patience_s:
            refused = f"refused by the API's limits for {_minutes(waited)}: {retry}"
            # Nothing was created: unpaid.
            await self._not_created(job, earlier, refused, fail_as="submit_failed")
            return SubmitOutcome.REJECTED
        if self.gave_up is not None:
            await self._not_created(job, earlier, f"sent again, refused: {retry}")
            return SubmitOutcome.STOPPED
        return None

    def _blocked(self, now: float, retry: ApiError) -> None:
        """A create refused with a 429 or not sent at all: the run's streak of creates that got
        nothing through goes on, and past the patience the run gives up submitting."""
        self.refused_since = now if self.refused_since is None else self.refused_since
        self.refused_by.add("429" if isinstance(retry, RateLimitedError) else "unsent")
        if now - self.refused_since > self.rate_limit_patience_s:
            self._give_up_run(now - self.refused_since, retry)

    def _give_up_run(self, refused_s: float, retry: ApiError) -> None:
        if self.gave_up is None:
            self.gave_up = (
                f"{_streak(self.refused_by, _minutes(refused_s))} ({retry.message});"
                " no more submissions this run: the jobs not yet submitted stay pending for"
                " the next run"
            )
            log.error("%s", self.gave_up)
            for scope in self._waits:
                scope.cancel()

    async def _attempt(
        self, job: Job, earlier: JobState | None = None
    ) -> tuple[SubmitOutcome, ApiError | None]:
        """One POST. Returns the outcome, or the error when trying again is safe."""
        try:
            body = await self.inliner.body(job.request)
        except ImageChangedError as exc:  # never sent, nothing paid: a rerun submits it again
            await self._not_created(job, earlier, str(exc), fail_as="submit_failed")
            return SubmitOutcome.REJECTED, None
        crid = client_request_id(job.id, self.ledger.state(job.id).attempts + 1)
        est = round(self.estimate(job), 4)
        extra: dict[str, Any] = {"acct": self.account} if self.account else {}
        if earlier is not None:  # found again if this one is lost in a crash
            extra["prev"] = restore_fields(earlier)
        await self.ledger.record(
            "intent",
            job.id,
            crid=crid,
            key=job.key,
            vkey=job.vkey,
            model=job.model,
            est=est,
            req=compact_request(job.request),
            **extra,
        )
        if self.should_stop() or self.gave_up is not None:
            # The stop came while the intent was being written (a 401 to a poll, say): the
            # POST must not leave after the run said "no new submissions". Never sent.
            await self._not_created(job, earlier, "submissions stopped before it was sent")
            return SubmitOutcome.STOPPED, None
        self.on_sent(crid)
        try:
            created = await self.api.create(body, client_request_id=crid)
            del body  # the encoded images go as soon as the POST is answered
        except (NotSentError, RateLimitedError) as exc:
            if isinstance(exc, RateLimitedError):
                self._rest(exc)
                self.on_rate_limited()
            return SubmitOutcome.REJECTED, exc
        except NotFoundError as exc:
            # "Unknown resource" for the create endpoint itself: nothing was created, and with
            # this base URL nothing will be (a wrong path prefix, say). Stop, as for a 3xx.
            await self._not_created(job, earlier, f"sent again, refused: {exc.message}")
            message = (
                f"{exc.message}: nothing answers POST {GENERATIONS_PATH} at this base URL;"
                f" set {ENV_BASE_URL} to the API's address"
            )
            log.error("submission refused job=%s: %s", job.id, message)
            raise BaseUrlError(message, status=404) from None
        except AuthError as exc:
            if exc.status == 303:  # "see other": the POST may have been acted on
                await self.ledger.record("uncertain", job.id, kind="no_answer", message=exc.message)
            else:
                await self._not_created(job, earlier, f"sent again, refused: {exc.message}")
            # Every create in flight hears the same 403 (hundreds at a high concurrency): the
            # first is said in full, the rest counted into one line at the end.
            msg = "submission refused job=%s: %s"
            self.failures.failed(exc, msg, job.id, exc.message, level=logging.ERROR)
            raise
        except BadRequestError as exc:
            await self._not_created(job, earlier, exc.message, fail_as="invalid_request")
            return SubmitOutcome.REJECTED, None
        except ApiError as exc:  # 5xx, no answer, unreadable 2xx: it may exist
            # A 504 ("Generation timeout") is a gateway that gave up waiting while the API may
            # go on and create it, its row logged only then, after later requests': absence
            # from the logs cannot prove it was never made, as for a POST left unanswered.
            gave_up = isinstance(exc, ServerError) and exc.status == 504
            kind = "server_error" if isinstance(exc, ServerError) and not gave_up else "no_answer"
            self._rest(exc)
            # Counted as it is answered, before the record's wait: in the order the API answered.
            self.failures.failed(exc, "submission outcome unknown job=%s: %s", job.id, exc.message)
            await self.ledger.record("uncertain", job.id, kind=kind, message=exc.message)
            return SubmitOutcome.UNCERTAIN, None
        self.failures.succeeded()
        # Async video is charged on completion, so a create answer often reports 0 spent.
        usd: dict[str, Any] = {"usd": created.usd_spent} if created.usd_spent else {}
        try:
            await self.ledger.record("submitted", job.id, gen=created.generation_id, **usd)
        except LedgerError:
            # Made and billed, its id in no file: said where cron's mail sees it before the
            # run stops (the next run finds it in the usage logs, if they can be read).
            log.error(
                "unrecorded job=%s gen=%s: created, but the ledger could not record it; the"
                " next run looks it up in the usage logs",
                job.id,
                created.generation_id,
            )
            raise
        await self.on_submitted(job, created)
        return SubmitOutcome.SUBMITTED, None

    def _rest(self, exc: ApiError) -> None:
        """A Retry-After holds every submission of the run; said once per pause."""
        now = self.clock()
        until, announce = rest_until(self.paused_until, now, exc.retry_after_s)
        if announce:
            log.warning(
                "the API asked for %ss of rest (HTTP %s): no submission before then",
                f"{until - now:.3g}",
                exc.status,
            )
        self.paused_until = until

    async def _not_created(
        self, job: Job, earlier: JobState | None, message: str, *, fail_as: str | None = None
    ) -> None:
        """This POST certainly created nothing: back to never sent, or failed as ``fail_as``;
        but when an earlier POST of the job may have (``submit(earlier=)``), that one is put
        back on record, uncertain, for a look-up to settle."""
        if earlier is not None:
            why = f"{message}; {EARLIER_POST}"
            await self.ledger.record("uncertain", job.id, message=why, **restore_fields(earlier))
        elif fail_as is None:
            await self.ledger.record("unsent", job.id)
        else:
            await self._fail(job, fail_as, message)

    async def not_sent(self, job: Job, earlier: JobState | None, kind: str, message: str) -> None:
        """Not sent after all, for a reason of the caller's (``kind``): failed as that, or,
        when an earlier POST of it may exist, that POST back on record (see :meth:`submit`)."""
        if earlier is not None and not earlier.client_request_id:
            earlier = None
        await self._not_created(job, earlier, message, fail_as=kind)
        if earlier is not None:
            log.warning("not sent again job=%s: %s; %s", job.id, message, EARLIER_POST)

    async def _fail(self, job: Job, kind: str, message: str) -> None:
        await self.ledger.record("failed", job.id, kind=kind, message=message)
        log.error("failed job=%s kind=%s: %s", job.id, kind, message)  # as the runner words it

    async def _wait(self, exc: ApiError, attempt: int, job: Job) -> None:
        delay = backoff_delay_s(attempt, self.backoff_base_s, self.backoff_max_s, self.rng)
        if isinstance(exc, RateLimitedError) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        what = "submit retry job=%s attempt=%d in %.1fs: %s"
        self.failures.failed(exc, what, job.id, attempt, delay, exc.message, level=logging.INFO)
        # Cut short when the run gives up submitting: a wait of up to a minute would hold the
        # run for nothing once none of these jobs will be sent.
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                if self.gave_up is None:  # not while its record of this try was written
                    await anyio.sleep(delay)
            finally:
                self._waits.discard(scope)
