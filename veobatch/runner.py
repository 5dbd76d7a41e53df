"""The runner: one task group owns the submitter, the shared poller and the download workers.

It holds the run's only mutable coordination state: the concurrency slots (one per generation
submitted and not yet finished), the set of jobs still open, and the stop flags. Every stage
reports back here, and every state change goes through the ledger before the next step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import anyio
import anyio.to_thread

from ._entry import EXIT_INTERRUPTED
from .client import ApiClient, Created, Generation
from .costs import Budget
from .download_queue import DownloadQueue, Fetch
from .downloader import (
    Downloaded,
    download,
    drop_part,
    file_matches,
    final_name,
    sha256_file,
)
from .errors import (
    ApiError,
    AuthError,
    BaseUrlError,
    DownloadError,
    LedgerError,
    NotFoundError,
    UrlRejectedError,
    first_leaf,
)
from .fsutil import fsync_dir, is_regular, to_thread
from .jobs import Job, Manifest
from .ledger import (
    EARLIER_POST,
    ErrorInfo,
    JobState,
    Ledger,
    ResultsWriter,
)
from .outage import OutageLog
from .poller import MAX_NOT_FOUND, NOT_FOUND_STREAK_S, Poller, Tracked
from .reconcile import Cause, Decision, Lookup, RateBudget, Reconciler, Verdict
from .schedule import DurationModel
from .scheduler import (
    GONE_CONFIRM_S,
    GONE_WORDS,
    KEPT_AS_FOUND,
    OUTPUT_BLOCKED,
    REFETCH_FAILED,
    Action,
    AdaptiveLimit,
    JobPlan,
    SubmitOutcome,
    Submitter,
    backoff_delay_s,
    blocked_by,
    done_facts,
    own_video,
    own_video_intact,
    request_changed,
    video_in_the_way,
    will_remake,
)
from .settings import RunSettings
from .verify import Probe, Verified, check, probe_video

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3  # EXIT_INTERRUPTED: 75
MAX_URL_REFRESHES = 3
HELD_BACK_LOGGED = 20  # jobs held back by the cost limit, one log line each; the rest counted
# Failed jobs whose generation may still be running.
OTHER_KEY = "other_key"  # another API key created it: the API shows it only to that key
STUCK_KINDS = frozenset({"timeout", "lost", OTHER_KEY})
# A generation re-polled long after its job timeout is polled this long (a few polls), not for
# a whole job timeout again: stuck ones would take a night's slots and time every night.
REPOLL_WINDOW_S = 180.0
ABANDONED = "abandoned"  # stuck past settings.abandon_after_s: no longer polled
# The API gave a job the generation id it had given another job: never fetched for both.
DUPLICATE_GENERATION = "duplicate_generation"
RESULTS_COST_FACTOR = 100  # results.json waits at least this many times its last rewrite


@dataclass(frozen=True)
class RunReport:
    """What a run achieved; ``exit_code`` is what cron sees."""

    out_dir: Path
    counts: dict[str, int]
    failed: list[tuple[str, ErrorInfo]]
    uncertain: list[str]
    pending: list[str]
    interrupted: bool = False
    auth_error: str | None = None
    gave_up: str | None = None  # why submitting stopped before the end (no create got through)
    submitted: int = 0
    polls: int = 0
    elapsed_s: float = 0.0
    recovered_tail: Path | None = None
    adopted: int = 0  # generations found in the usage logs instead of paid for again
    # Of those, the ones whose POST's outcome no record held (a crash, a failed ledger write
    # after the answer), not an answer lost in transit.
    adopted_unrecorded: int = 0
    risked_duplicates: int = 0  # uncertain jobs resubmitted on request
    cost_limit_usd: float | None = None
    over_budget: list[str] = field(default_factory=list)  # left pending by the cost limit
    estimated_usd: float = 0.0  # this run's submissions at list (or configured) prices
    estimated_jobs: int = 0  # submissions behind that estimate
    reported_usd: float = 0.0  # what the API reported for those of them it reported on
    reported_jobs: int = 0
    # Done jobs whose file is missing and whose video the API no longer has: delivered, so no
    # failure; left as they are (gone), and of those the ones found so this run, with why.
    gone: list[str] = field(default_factory=list)
    gone_now: list[tuple[str, str]] = field(default_factory=list)
    # Done jobs whose missing file could not be fetched again this run, and why: the next run
    # tries again (no failure either: the video was delivered).
    not_refetched: list[tuple[str, str]] = field(default_factory=list)
    # The ledger's view at the end, so the summary need not replay the journal again.
    states: Mapping[str, JobState] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total(self) -> int:
        """Jobs the run accounted for: the manifest's and any removed one it fetched."""
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.auth_error:
            return EXIT_CONFIG
        if self.failed or self.uncertain or self.pending or self.over_budget:
            return EXIT_FAILED
        return EXIT_OK


@dataclass(frozen=True)
class Snapshot:
    """A run in progress, for live displays and periodic log lines."""

    total: int
    counts: dict[str, int]
    elapsed_s: float
    submitted: int
    polls: int
    generating: int = 0  # of the "submitted" jobs, those the API reports as generating
    final: bool = False  # the last snapshot of the run, taken when it has ended
    # Of the done and failed jobs, those this run works on again (a failed one submitted or
    # polled again, a done one fetched again or remade): not finished until the run ends them.
    reopened: int = 0

    @property
    def finished(self) -> int:
        return self.counts.get("done", 0) + self.counts.get("failed", 0) - self.reopened


@dataclass
class Runner:
    """The state of one run in progress; see the module docstring."""

    manifest: Manifest
    settings: RunSettings
    ledger: Ledger
    api: ApiClient
    cdn: aiohttp.ClientSession
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    auth_error: str | None = None
    submitted: int = 0
    adopted: int = 0
    adopted_unrecorded: int = 0
    risked_duplicates: int = 0
    held_back: int = 0  # jobs the cost limit kept from being submitted
    observer: Callable[[Snapshot], None] | None = None

    def __post_init__(self) -> None:
        self.jobs = {j.id: j for j in self.manifest.jobs}
        self.slots = anyio.CapacityLimiter(self.settings.concurrency)
        self.limit = AdaptiveLimit(self.settings.concurrency)
        self.holding: set[str] = set()
        # Of those, the jobs whose generation the API holds for us (accepted, not seen finished):
        # what a 429 is measured against. Not a URL refresh or a re-poll, which hold no slot.
        self.running: set[str] = set()
        # Look-ups open, each lending its job's slot to the run: a look-up may wait for a later
        # create to be logged, and with every slot held by look-ups none could be sent.
        self.lent = 0
        # Jobs resubmitted after a look-up that could not rule out an earlier generation: one
        # of their POSTs may exist and be billed, whatever later look-ups say of the last one.
        self.maybe_billed: set[str] = set()
        self.open: set[str] = set()
        self.settled = anyio.Event()
        self.stop_submitting = False
        # A 401/403 to a poll or a usage-logs read stopped both: the run ends once the
        # downloads under way and queued (the video host needs no key) are over.
        self.api_stopped = False
        self.downloading = 0  # downloads a worker has in hand
        self.refreshes: dict[str, int] = {}
        self.remake: set[str] = set()  # see execute
        self.results_warned = False
        self.budget = Budget(self.settings.max_cost_usd, self.settings.prices)
        key = self.settings.api_key
        self.account = key.fingerprint() if key is not None else None
        self.removed: set[str] = set()  # jobs the manifest no longer lists (execute)
        # Each generation id on record and the job it was first given to (execute): one the
        # API gives a second job is that job's failure, never its video (_claim).
        self.owners: dict[str, str] = {}
        self.gone: list[str] = []  # see RunReport
        self.gone_now: list[tuple[str, str]] = []
        self.not_refetched: list[tuple[str, str]] = []
        # No total: a large video may take long; a stalled read or connect still times out.
        self.download_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.settings.connect_timeout_s,
            sock_read=self.settings.request_timeout_s,
        )
        self.poller = Poller(self.api, self, self.settings.poll, clock=self.clock, rng=self.rng)
        # A video host down, or URLs expiring while downloads queue: a line per job would bury
        # the log, so failures are counted and summed up (the jobs that fail are said each).
        self.download_failures = OutageLog(
            log, "download", "downloads succeed again", "downloads continue", clock=self.clock
        )
        self.fetches = DownloadQueue(self.clock)
        self.submitter = Submitter(
            api=self.api,
            ledger=self.ledger,
            retries=self.settings.submit_retries,
            backoff_base_s=self.settings.backoff_base_s,
            backoff_max_s=self.settings.backoff_max_s,
            should_stop=lambda: self.stop_submitting,
            on_submitted=self._on_submitted,
            rng=self.rng,
            on_rate_limited=self._on_rate_limited,
            estimate=self.budget.estimate,
            rate_limit_patience_s=self.settings.job_timeout_s,
            yield_slot=self._yield_slot,
            clock=self.clock,
            account=self.account,
            on_sent=lambda crid: self.reconciler.note_sent(crid),
        )
        self.reconciler = Reconciler(
            self.api,
            self._on_lookup,
            grace_s=self.settings.logs_grace_s,
            interval_s=self.settings.lookup_interval_s,
            budget=RateBudget(self.settings.logs_calls_per_minute, 60.0, time.monotonic),
            wall_clock=time.time,
        )

    # -- orchestration -------------------------------------------------------------------

    async def execute(self, plans: list[JobPlan]) -> None:
        self.jobs.update((p.job.id, p.job) for p in plans if p.removed)
        self.removed.update(p.job.id for p in plans if p.removed)
        # Edited while in flight: the generation paid for is finished first, then the request
        # the manifest now holds is made, in this run (the first video is kept beside it).
        self.remake = {p.job.id for p in plans if will_remake(p)}
        await self._restore([p for p in plans if p.restore])
        self.gone = [p.job.id for p in plans if p.action is Action.GONE]
        self.open = {p.job.id for p in plans if p.action not in _IDLE}
        self.owners = generation_owners(self.ledger.states.values())
        try:
            if self.open:
                await self._execute(plans)
        finally:  # what the logs have not told of the failures counted in silence
            for failures in self._failure_logs():
                failures.flush()

    def _failure_logs(self) -> tuple[OutageLog, ...]:
        return (
            self.submitter.failures,
            self.poller.failures,
            self.download_failures,
            self.reconciler.failures,
        )

    async def _restore(self, plans: list[JobPlan]) -> None:
        """Videos delivered earlier and in place again (copied back from an archive), or an
        earlier version's failed refetch: back on record as done before anything else."""
        out = self.settings.out_dir
        for p in plans:
            own = own_video(p.job, p.state)
            if own is None:  # never planned so
                continue
            if p.action is Action.SKIP:
                check = functools.partial(_in_place, out / str(own["file"]), own)
                own = await self.ledger.offload(check) or own
                log.info(
                    "restored job=%s: %s, in place again, is its video on record",
                    p.job.id,
                    own["file"],
                )
            await self.ledger.record("restored", p.job.id, durable=False, **own)

    async def _own_video_in_place(self, job: Job) -> bool:
        """About to submit a job, its delivered video is at its file again (put back since
        the plan): done again, nothing sent, never kept aside and paid for again."""
        own = own_video(job, self.ledger.state(job.id))
        if own is None:
            return False
        path = self.settings.out_dir / str(own["file"])
        got = await self.ledger.offload(lambda: _in_place(path, own))
        if got is None:
            return False
        await self.ledger.record("restored", job.id, durable=False, **got)
        log.warning(
            "not submitted job=%s: %s is in place again, the video it delivered (sha256 %s):"
            " done, nothing sent",
            job.id,
            path.name,
            str(own["sha256"])[:8],
        )
        return True

    async def _execute(self, plans: list[JobPlan]) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self._api_loop)
            for _ in range(self.settings.download_concurrency):
                tg.start_soon(self._download_worker)
            tg.start_soon(self._results_loop)
            if self.observer is not None:
                tg.start_soon(self._observe_loop, self.observer)
            self._resume(plans)
            tg.start_soon(self._refuse_blocked, [p for p in plans if p.action is Action.BLOCKED])
            tg.start_soon(self._submit_all, [p.job for p in plans if p.action is Action.SUBMIT])
            await self.settled.wait()
            tg.cancel_scope.cancel()

    async def _api_loop(self) -> None:
        """Polls and usage-log look-ups. A 401 or 403 to either stops both, and submissions:
        the jobs in flight and the open look-ups stay as recorded for a rerun, while the
        videos already found still download (their host needs no key), then the run ends."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.poller.run)
                tg.start_soon(self.reconciler.run)
        except* AuthError as group:
            self._stop_on_auth(first_leaf(group))
        self.api_stopped = True
        self._settle_when_drained()

    def _settle_when_drained(self) -> None:
        """After the API refused the key, the run is over once no download is left."""
        if self.api_stopped and not self.downloading and not len(self.fetches):
            self.settled.set()

    def _stop_on_auth(self, exc: BaseException) -> None:
        if self.stop_submitting and self.auth_error is not None:
            return  # every job in flight hears it too: said once
        message = exc.message if isinstance(exc, AuthError) else str(exc)
        if isinstance(exc, AuthError) and not isinstance(exc, BaseUrlError):
            # 401: the key; 403: the account (no credits, say), as the API's message tells.
            whose = "the key" if exc.status == 401 else "the request"
            message = f"the API refused {whose}: {message}"
        self.auth_error = message
        self.stop_submitting = True
        self.reconciler.close()
        log.error("%s; no new submissions", message)

    def _close(self, job_id: str) -> None:
        self.open.discard(job_id)
        if not self.open:
            self.settled.set()

    def _file_gone(self, job_id: str, st: JobState) -> bool:
        """Its delivered video is not in place (moved to an archive, deleted; a link there is
        not it either): a refetch whose 404s may settle it as gone."""
        return not is_regular(self.settings.out_dir / (st.file or final_name(job_id)))

    def _other_key(self, st: JobState) -> str | None:
        """The fingerprint of the key this job's last POST was sent with, when not this run's."""
        return sent_with_other_key(st, self.account)

    def _release(self, job_id: str) -> None:
        self.running.discard(job_id)
        if job_id in self.holding:
            self.holding.remove(job_id)
            self.slots.release_on_behalf_of(job_id)

    def _learn_from_history(self) -> None:
        """Earlier runs' durations give the poller a plan from the first minute of the night."""
        learn_history(
            self.poller.durations, self.ledger.states.values(), self.settings.job_timeout_s
        )

    def _resume(self, plans: list[JobPlan]) -> None:
        """Pick up where an earlier run stopped: poll what is in flight, fetch what is finished."""
        self._learn_from_history()
        plans = self._drop_duplicates(plans)
        polls = [p for p in plans if p.action in (Action.POLL, Action.REFETCH)]
        lookups = [p for p in plans if p.action is Action.LOOKUP]
        now = time.time()
        ages = {p.job.id: max(0.0, now - (p.state.submitted_at or now)) for p in polls}
        terms = {p.job.id: resume_terms(p.state, ages[p.job.id], self.settings) for p in polls}
        in_flight = [p for p in polls if terms[p.job.id][0]] + lookups
        # Slots taken over from an earlier run may exceed today's limit: take them all, then
        # lower the limit again so no new submission starts until enough have finished.
        self.slots.total_tokens = max(self.settings.concurrency, len(in_flight))
        for p in in_flight:
            self.slots.acquire_on_behalf_of_nowait(p.job.id)
            self.holding.add(p.job.id)
            if p.action is not Action.LOOKUP:  # a generation the API may still be making
                self.running.add(p.job.id)
        self.slots.total_tokens = self.settings.concurrency
        for p in polls:
            st = p.state
            assert st.generation_id is not None
            self.poller.track(
                p.job.id,
                st.generation_id,
                model=p.job.model,
                age_s=ages[p.job.id],
                remaining_s=terms[p.job.id][1],
                first=False,
                delivered=p.action is Action.REFETCH and self._file_gone(p.job.id, st),
                other_key=self._other_key(st) is not None,
            )
            log.info("resume job=%s action=%s gen=%s", p.job.id, p.action.value, st.generation_id)
        for p in lookups:
            cause: Cause = "crash" if p.state.status == "submitting" else lookup_cause(p.state)
            self._lookup(p.job, cause)
        for p in plans:
            if p.action is Action.DOWNLOAD and p.state.video_url:
                # Handed out when its completion was recorded: the oldest go first.
                age = max(0.0, now - (p.state.completed_at or now))
                self.fetches.put(Fetch(p.job.id, p.state.video_url, self.clock() - age))

    # -- submission ----------------------------------------------------------------------

    async def _submit_all(self, jobs: list[Job]) -> None:
        async with anyio.create_task_group() as tg:
            for i, job in enumerate(jobs):
                if not self.stop_submitting and not self.budget.reserve(job):
                    self._over_budget(job)
                    self._close(job.id)
                    continue
                if not self.stop_submitting:
                    try:
                        await self.slots.acquire_on_behalf_of(job.id)
                    except BaseException:  # cancelled while waiting for a slot: never sent
                        self.budget.release(job.id)
                        raise
                    self.holding.add(job.id)
                if self.stop_submitting:
                    self._release(job.id)
                    self.budget.release(job.id)  # reserved while waiting for a slot, never sent
                    for rest in jobs[i:]:
                        self._close(rest.id)
                    return
                tg.start_soon(self._submit_one, job)
        if self.held_back > HELD_BACK_LOGGED:
            log.warning(
                "not submitted: %d more jobs over the cost limit (listed in the summary)",
                self.held_back - HELD_BACK_LOGGED,
            )

    def _over_budget(self, job: Job) -> None:
        self.held_back += 1
        limit = self.budget.limit_usd
        # A night's manifest over a small limit would bury the log in one line per job: the
        # first ones are said, the rest counted (all are in the summary and results.json).
        log.log(
            logging.WARNING if self.held_back <= HELD_BACK_LOGGED else logging.DEBUG,
            "not submitted job=%s: over the cost limit of $%.2f (estimated $%.2f committed)",
            job.id,
            limit or 0.0,
            self.budget.spent_usd,
        )

    async def _submit_one(self, job: Job, *, risked: bool = False) -> None:
        """Submit ``job``; ``risked``: an earlier POST of it may exist, so this one may be
        billed on top of it and reserves a fresh estimate."""
        outcome = SubmitOutcome.STOPPED
        reserved = False
        try:
            if self.stop_submitting:  # a resubmission that waited out a stop: nothing to reserve
                await self._settle_unsent(job, risked, "submissions stopped before it was resent")
                return
            if not self.budget.reserve(job, again=risked):  # a resubmission after a lookup
                self._over_budget(job)
                await self._settle_unsent(job, risked, "held back by the cost limit")
                return
            reserved = True
            if not risked and await self._own_video_in_place(job):
                self.budget.release(job.id)  # done again, nothing sent
                return
            may_exist = risked or job.id in self.maybe_billed
            earlier = replace(self.ledger.state(job.id)) if may_exist else None
            if (blocked := await self._prepare_new_generation(job)) is not None:
                await self.submitter.not_sent(job, earlier, OUTPUT_BLOCKED, blocked)
                outcome = SubmitOutcome.REJECTED  # sent nothing: settled below, as a refusal
                return
            outcome = await self.submitter.submit(job, earlier=earlier)
            if risked and outcome in (SubmitOutcome.SUBMITTED, SubmitOutcome.UNCERTAIN):
                self.risked_duplicates += 1  # a POST that may have made a second one
            if outcome is SubmitOutcome.STOPPED:  # stopped before its POST: as above
                await self._settle_unsent(job, risked, "submissions stopped before it was resent")
            if self.submitter.gave_up is not None:
                self.stop_submitting = True  # the slots waiting must not send one more
                self.reconciler.close()
        except AuthError as exc:
            self._stop_on_auth(exc)
            outcome = SubmitOutcome.AUTH
        finally:
            if outcome is SubmitOutcome.UNCERTAIN:
                self._lookup(job, lookup_cause(self.ledger.state(job.id)))  # keeps its slot
            elif outcome is not SubmitOutcome.SUBMITTED:
                if self.ledger.state(job.id).status in ("pending", "failed"):
                    self.budget.release(job.id)  # certainly created nothing: not billed
                elif risked and reserved:  # this POST made nothing; the earlier one may have
                    self.budget.release(job.id)
                self._release(job.id)
                self._close(job.id)

    async def _settle_unsent(self, job: Job, risked: bool, why: str) -> None:
        """A look-up's job not sent again after all (the cost limit, a stop): say on record
        what may exist, not what its last POST met before the look-up settled it."""
        status = self.ledger.state(job.id).status
        if status not in ("submitting", "uncertain"):
            return  # a job's first submission: nothing was sent
        if risked or job.id in self.maybe_billed:
            if status == "submitting":  # an uncertain one keeps its look-up's words
                await self.ledger.record("uncertain", job.id, kind="no_answer", message=why)
        else:  # the look-up proved nothing was created: back to never sent
            await self.ledger.record("unsent", job.id)

    async def _prepare_new_generation(self, job: Job) -> str | None:
        """Clear the way for a new generation without losing or mixing up an earlier one;
        why it cannot be sent, if it cannot.

        A ``.part`` left by an earlier generation must not be resumed into this one, and a
        finished video of an earlier version of the request is kept under a versioned name.
        What cannot be kept aside there (a directory, a FIFO, a link, a file that cannot be
        read or moved) is never opened or followed, and keeps this job alone from being sent.
        """
        out = self.settings.out_dir
        st = self.ledger.state(job.id)
        if st.attempts or st.generation_id:
            # Only an earlier attempt can have left a .part (one copied in has no sidecar and
            # is never resumed), so a first submission skips the two unlinks.
            drop_part(out, job.id)
        old, tag, why = video_in_the_way(out, job.id, st)
        try:
            old.lstat()  # on the loop: nothing there is by far the most common answer
        except FileNotFoundError:
            return None

        def keep() -> Path | str:  # a foreign video may be large: hash it off the event loop
            if (blocked := blocked_by(old)) is not None:
                return blocked
            try:
                kept = kept_name(out, job.id, tag or sha256_file(old)[:8])
                os.replace(old, kept)
                fsync_dir(out)
            except OSError as exc:
                return (
                    f"{old} cannot be kept aside ({exc.strerror or exc}): nothing is sent for"
                    " this job until it is moved away (the next run then submits it)"
                )
            return kept

        kept = await to_thread(keep)
        if isinstance(kept, str):
            return kept
        log.info("%s job=%s: previous video kept as %s", why, job.id, kept.name)
        return None

    async def _refuse_blocked(self, plans: list[JobPlan]) -> None:
        """Jobs the plan found blocked (:func:`scheduler.blocked_by`): failed, never sent, one
        by one; the other jobs go on."""
        for p in plans:
            error = p.state.error
            if p.state.status != "failed" or error != ErrorInfo(OUTPUT_BLOCKED, p.reason):
                await self.ledger.record("failed", p.job.id, kind=OUTPUT_BLOCKED, message=p.reason)
            log.error("failed job=%s kind=%s: %s", p.job.id, OUTPUT_BLOCKED, p.reason)
            self._close(p.job.id)

    async def _yield_slot(self, job: Job) -> None:
        """After a 429 that lowered the limit, a job over it waits for a slot again rather
        than keep asking: the API said it has enough from us in flight."""
        if job.id not in self.holding or self.slots.borrowed_tokens <= self.slots.total_tokens:
            return
        self.holding.remove(job.id)
        self.slots.release_on_behalf_of(job.id)
        await self.slots.acquire_on_behalf_of(job.id)
        self.holding.add(job.id)

    def _on_rate_limited(self) -> None:
        # The generations the API has accepted and we have not seen finish: what it evidently
        # holds for us, whatever else holds a slot (a create on its way, a look-up).
        in_flight = len(self.running)
        before = self.limit.current
        limit = self.limit.on_rate_limited(self.clock(), in_flight)
        if limit < before:
            log.warning(
                "429 from the API in_flight=%d: concurrency lowered to %d%s",
                in_flight,
                limit,
                " (429s again at that level: taken for the API's cap)" if self.limit.capped else "",
            )
        self._apply_limit(limit)

    def _apply_limit(self, limit: int) -> None:
        """The adaptive limit, plus the slots look-ups lend, becomes the slots' size, touched
        only when it moved. Lowered under what is held, nothing new starts until enough end."""
        if limit + self.lent != self.slots.total_tokens:
            self.slots.total_tokens = limit + self.lent

    # -- ambiguous submissions -----------------------------------------------------------

    def _lookup(self, job: Job, cause: Cause) -> None:
        self.lent += 1  # given back when it settles (_on_lookup)
        self._apply_limit(self.limit.current)
        st = self.ledger.state(job.id)
        assert st.client_request_id is not None
        recorded = st.updated_at if st.updated_at is not None else time.time()
        timeout = self.settings.request_timeout_s
        if st.intent_at is not None:
            # The POST left just after its intent and was answered (or given up) within the
            # request timeout: later records (an "uncertain" verdict, another night) move
            # neither end of the window the logs can hold its row in.
            since, recorded = st.intent_at, min(recorded, st.intent_at + timeout)
        else:  # a ledger older than the intent's time: it may have left that long before
            since = recorded - timeout
        # The model the request was sent with, not the manifest's now: an edited model would
        # filter the logs past the row, and "absent" means "submit again" (pay twice).
        model = st.model or job.model
        self.reconciler.add(
            Lookup(
                job.id,
                st.client_request_id,
                model,
                since,
                cause,
                recorded_wall=recorded,
                other_key=self._other_key(st),
            )
        )

    async def _on_lookup(self, lookup: Lookup, decision: Decision) -> None:
        self.lent -= 1  # adopted, it runs over the limit until enough others finish
        self._apply_limit(self.limit.current)
        job = self.jobs[lookup.job_id]
        if decision.verdict is Verdict.LEAVE:  # the next run's look-up settles it
            log.info("lookup job=%s left for a later run: %s", job.id, decision.reason)
            self._release(job.id)
            self._close(job.id)
            return
        if decision.verdict is Verdict.ADOPT and decision.generation_id:
            # Edited since its POST: made again as it now reads, once this one is fetched (not
            # a job no longer listed, whose request here is the ledger's copy, not the manifest's).
            if job.id not in self.removed and request_changed(job, self.ledger.state(job.id)):
                self.remake.add(job.id)
            await self.ledger.record("submitted", job.id, gen=decision.generation_id)
            self.adopted += 1
            self.adopted_unrecorded += lookup.cause == "crash"
            log.info("adopted job=%s gen=%s (from the usage logs)", job.id, decision.generation_id)
            if (owner := self._claim(job.id, decision.generation_id)) is not None:
                await self._duplicate(job.id, decision.generation_id, owner)
                return
            age = max(0.0, time.time() - lookup.settled_wall)
            if job.id in self.holding:
                self.running.add(job.id)
            self.poller.track(
                job.id,
                decision.generation_id,
                model=lookup.model,
                age_s=age,
                remaining_s=max(self.settings.job_timeout_s - age, 60.0),
                first=False,
            )
            return
        prev = self.ledger.state(job.id).prev
        if decision.verdict is Verdict.RESUBMIT and prev is not None:
            # The lost POST was a resend (--resubmit-uncertain) that never got through: the
            # earlier POST it was sent after is what may exist. Back on record, looked up.
            why = f"{decision.reason}; {EARLIER_POST}"
            await self.ledger.record("uncertain", job.id, message=why, **prev)
            log.info(
                "lookup job=%s: the resend was never created; looking up its earlier POST", job.id
            )
            self._lookup(job, lookup_cause(self.ledger.state(job.id)))  # keeps its slot
            return
        if job.id in self.removed:  # nothing is ever submitted for a job no longer listed
            await self._settle_removed(job, lookup, decision)
            return
        risked = decision.verdict is Verdict.UNCERTAIN
        if risked and not self.settings.resubmit_uncertain:
            await self._leave_uncertain(job, decision.reason, _kept_cause(lookup, decision))
            return
        if risked:
            self.maybe_billed.add(job.id)
        # This run's tries that created nothing, not the ledger's attempts: those count 429s
        # too (each a POST of its own) and every earlier night's.
        tries = self.submitter.tries[job.id]
        if tries > self.settings.submit_retries:
            why = f"gave up after {tries} tries: {decision.reason}"
            if job.id in self.maybe_billed:  # failed would let --retry-failed pay again
                await self._leave_uncertain(job, why, _kept_cause(lookup, decision))
            else:
                why += last_answer(self.ledger.state(job.id))  # the API's words, not only ours
                await self._fail(job.id, "submit_failed", why)
            return
        if risked and not self.stop_submitting:
            log.warning("resubmitting uncertain job=%s: may be paid twice", job.id)
        delay = (
            0.0
            if lookup.cause == "crash" or self.stop_submitting  # a stop settles it at once
            else backoff_delay_s(
                tries, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng
            )
        )
        self.tg.start_soon(self._resubmit, job, delay, risked)

    async def _settle_removed(self, job: Job, lookup: Lookup, decision: Decision) -> None:
        if decision.verdict is not Verdict.RESUBMIT:
            # Still unknown: recorded and warned of, but no job of the manifest's, so it does
            # not fail the run night after night (`status` still lists it).
            await self._leave_uncertain(job, decision.reason, _kept_cause(lookup, decision))
            log.warning("job %s, not in the manifest, stays uncertain: %s", job.id, decision.reason)
        else:  # never created, and not wanted any more: back to never sent
            await self.ledger.record("unsent", job.id)
            log.info(
                "lookup job=%s: %s; not in the manifest: not submitted", job.id, decision.reason
            )
        self.jobs.pop(job.id, None)  # out of this run's accounts
        self._release(job.id)
        self._close(job.id)

    async def _leave_uncertain(self, job: Job, reason: str, cause: Cause) -> None:
        """Record the look-up's verdict. Its kind is the cause the next look-up starts from
        (lookup_cause): what the POST met (a crash, a 5xx, no answer), or no_answer once the
        logs showed the request made; a later run's verdict is what the summary says."""
        st = self.ledger.state(job.id)
        again = st.status == "uncertain" and (st.error is None or st.error.message != reason)
        if st.status == "submitting" or again:
            await self.ledger.record("uncertain", job.id, kind=cause, message=reason)
        self._release(job.id)
        self._close(job.id)

    async def _resubmit(self, job: Job, delay_s: float, risked: bool) -> None:
        await anyio.sleep(delay_s)
        await self._submit_one(job, risked=risked)  # the slot is still held

    async def _on_submitted(self, job: Job, created: Created) -> None:
        self.submitted += 1
        self._apply_limit(self.limit.on_success(len(self.running)))  # before it is counted
        log.info("submitted job=%s gen=%s", job.id, created.generation_id)
        if created.failed:  # refused at once (a content policy, say): nothing to poll for
            await self._generation_failed(job.id, created.error_name, created.error_message)
            return
        if (owner := self._claim(job.id, created.generation_id)) is not None:
            await self._duplicate(job.id, created.generation_id, owner)
            return
        self.running.add(job.id)
        self.poller.track(
            job.id,
            created.generation_id,
            model=job.model,
            age_s=0.0,
            remaining_s=self.settings.job_timeout_s,
            first=True,
        )

    # -- poll sink -----------------------------------------------------------------------

    async def generation_finished(self, tracked: Tracked, generation: Generation) -> None:
        if generation.completed and generation.video_url:
            self._release(tracked.job_id)
            took = self.poller.sample_of(tracked)
            extra: dict[str, Any] = {"took": took and [round(took[0], 3), round(took[1], 3)]}
            if generation.usd_spent:  # a 0 is the poll's own cost, not the generation's
                extra["usd"] = generation.usd_spent
            # Not waited for: lost in a crash, it costs one poll for the URL again.
            await self.ledger.record(
                "completed", tracked.job_id, durable=False, url=generation.video_url, **extra
            )
            log.info("completed job=%s polls=%d", tracked.job_id, tracked.polls)
            # A URL that replaces a refused one goes before the backlog, or it expires too.
            refreshed = tracked.job_id in self.refreshes
            fetch = Fetch(tracked.job_id, generation.video_url, self.clock(), refreshed)
            self.fetches.put(fetch)
            return
        await self._generation_failed(
            tracked.job_id, generation.error_name, generation.error_message
        )

    async def _generation_failed(self, job_id: str, name: str | None, message: str | None) -> None:
        self.budget.release(job_id)  # generations that end in error are not billed
        why = f"{name or 'error'}: {message or 'the generation ended in error'}"
        await self._fail(job_id, "generation_error", why)

    def _claim(self, job_id: str, generation_id: str) -> str | None:
        """Take ``generation_id`` for ``job_id``; the job that has it already, if another."""
        owner = self.owners.setdefault(generation_id, job_id)
        return owner if owner != job_id else None

    def _drop_duplicates(self, plans: list[JobPlan]) -> list[JobPlan]:
        """The plans less those of jobs recorded with another job's generation (a crash came
        before the run that got it could say so): failed, neither polled nor fetched."""
        kept = []
        for p in plans:
            gen, st = p.state.generation_id, p.state
            owner = self.owners.get(gen, p.job.id) if gen else p.job.id
            if (
                p.action in (Action.POLL, Action.DOWNLOAD)
                and st.status != "done"
                and owner != p.job.id
            ):
                assert gen is not None
                self.tg.start_soon(self._duplicate, p.job.id, gen, owner)
            else:
                kept.append(p)
        return kept

    async def _duplicate(self, job_id: str, generation_id: str, owner: str) -> None:
        """The API gave this job the generation id it gave ``owner``: one generation is not two
        requests' video. The first job keeps it; this one fails rather than be done with the
        other's video, and is sent again only on request (--retry-failed: a new charge)."""
        log.warning(
            "duplicate generation job=%s gen=%s: the API gave job %s the same id for another"
            " create; %s keeps it (check its video: it may be either request's), %s fails",
            job_id,
            generation_id,
            owner,
            owner,
            job_id,
        )
        why = (
            f"the API gave this job generation {generation_id}, the id it had given job"
            f" {owner}: one generation cannot be both videos, so only {owner} fetches it;"
            " --retry-failed submits this job again (a new charge)"
        )
        await self._fail(job_id, DUPLICATE_GENERATION, why)

    async def generation_timed_out(self, tracked: Tracked) -> None:
        st = self.ledger.state(tracked.job_id)
        age = self.clock() - tracked.started
        sent_with = self._other_key(st)
        if sent_with and isinstance(tracked.last_error, NotFoundError) and tracked.not_found:
            # Out of time before its few 404s in a row: the key change explains them all the same.
            why = other_key_reason(tracked, tracked.last_error, sent_with, self.account)
            await self._fail(tracked.job_id, OTHER_KEY, why)
            return
        if may_abandon(st, self.account) and age >= self.settings.abandon_after_s:
            await self._fail(
                tracked.job_id, ABANDONED, abandoned_reason(tracked, age, self.settings)
            )
            return
        if _still_lost(st, tracked):  # re-polled, and the API still does not know it
            why = f"the API still does not know it ({tracked.not_found} polls answered 404)"
            assert tracked.last_error is not None
            await self._fail(tracked.job_id, "lost", f"{why}: {tracked.last_error.message}")
            return
        why = timed_out_reason(tracked, self.settings.job_timeout_s)
        await self._fail(tracked.job_id, "timeout", why)

    async def generation_lost(self, tracked: Tracked, error: ApiError) -> None:
        if sent_with := self._other_key(self.ledger.state(tracked.job_id)):
            # Not "lost": --retry-failed would pay for one that exists. Polled again by the
            # next run, which finds it if its key is the one that created it.
            why = other_key_reason(tracked, error, sent_with, self.account)
            await self._fail(tracked.job_id, OTHER_KEY, why)
            return
        if isinstance(error, NotFoundError):
            streak = self.clock() - (tracked.missing_since or self.clock())
            others = "" if tracked.delivered else " while it answered other generations' polls"
            why = (
                f"the API no longer knows it: {tracked.not_found} polls answered 404 over"
                f" {streak / 60:.0f} min{others}: {error.message}"
            )
        else:
            why = f"the API refuses to report on it: {error.message}"
        await self._fail(tracked.job_id, "lost", why)

    async def _fail(self, job_id: str, kind: str, message: str) -> None:
        """Record the failure, free the job's slot if it holds one, and close it (unless an
        edited job's request is made again now: :meth:`_failed_aside`)."""
        self._release(job_id)
        st = self.ledger.state(job_id)
        if st.file and st.status in ("done", "completed"):  # a finished video fetched again
            path = self.settings.out_dir / st.file
            found = await self.ledger.offload(lambda: recorded_file(path, st))
            if found == "altered" and await self._altered_kept(job_id, kind, message):
                return  # the user's file, on disk: never a failure, never wiped
            if found == "missing":  # delivered once: never a failure, never wiped
                await self._missing_kept(job_id, kind, message)
                return
            if st.status == "done":
                kind, message = refetch_failure(st.generation_id, kind, message)
        # On disk before a remake's intent: a crash between the two polls the old one again.
        await self.ledger.record("failed", job_id, kind=kind, message=message)
        if not self._failed_aside(job_id, kind, message):
            log.error("failed job=%s kind=%s: %s", job_id, kind, message)
            self._close(job_id)

    async def _altered_kept(self, job_id: str, kind: str, message: str) -> bool:
        """A finished video altered in place (trimmed, tagged, appended to) whose original
        could not be fetched again: the altered file stays where it is and the job stays done.
        With its generation gone for good, the file as it now is becomes the job's video on
        record (flagged), so later runs leave it be; otherwise the record keeps the original's
        facts, and the next run tries again. False, nothing done: the file is no video at all
        (a disk fault, a bad edit), never recorded done: the job fails as a damaged video."""
        st = self.ledger.state(job_id)
        assert st.file is not None
        name, gen, path = st.file, st.generation_id, self.settings.out_dir / st.file
        got = None
        if kind in GONE_KINDS:
            with contextlib.suppress(OSError):  # gone meanwhile: the next run finds it missing
                got = await self.ledger.offload(lambda: _file_facts(path))
        if got is None:
            await self._done_as_it_was(st)
            log.warning(
                "refetch failed job=%s kind=%s: %s; %s, altered since it was fetched, stays as"
                " it is, and the next run fetches the original again",
                job_id,
                kind,
                message,
                name,
            )
            self._finished(job_id)
            return True
        if got.probe.error:
            return False
        await self._record_as_found(job_id, got)
        log.warning(
            "altered video kept job=%s: generation %s can no longer be fetched (%s: %s); %s"
            " stays as it is, on record as the job's video from now on",
            job_id,
            gen,
            kind,
            message,
            name,
        )
        self._finished(job_id)
        return True

    async def _done_as_it_was(self, st: JobState) -> JobState:
        """A finished job polled again this run (its refetch failed): done again, as it was."""
        if st.status != "completed":
            return st
        await self.ledger.record("done", st.id, durable=False, **done_facts(st))
        return self.ledger.state(st.id)

    async def _missing_kept(self, job_id: str, kind: str, message: str) -> None:
        """A finished video whose file is missing (moved to an archive, deleted) could not be
        fetched again: the job stays done, its record as it was. Once the API has said, on
        two runs far enough apart, that it no longer has the video, the job is left as gone;
        until then, and after a timeout or a failed download, the next run asks again."""
        st = await self._done_as_it_was(self.ledger.state(job_id))
        name, gen = st.file, st.generation_id
        if kind not in GONE_KINDS:
            why = f"{name} is missing and fetching it again failed ({kind}: {message})"
            self.not_refetched.append((job_id, f"{why}; the next run tries again"))
            log.warning(
                "refetch failed job=%s: %s; the next run tries again, at no charge", job_id, why
            )
            self._finished(job_id)
            return
        settled = gone_settles(st, time.time())
        await self.ledger.record(
            "gone", job_id, durable=False, kind=kind, message=message, settled=settled
        )
        if settled:
            why = f"{GONE_WORDS} (generation {gen}: {kind}: {message})"
            self.gone.append(job_id)
            self.gone_now.append((job_id, why))
            log.warning("video gone job=%s: %s; left as it is, done", job_id, why)
        else:
            why = (
                f"{name} is missing and the API said it no longer has generation {gen}"
                f" ({kind}: {message})"
            )
            self.not_refetched.append((job_id, f"{why}; the next run asks again"))
            log.warning(
                "refetch failed job=%s: %s; the next run asks again (a second answer so, at"
                " least %.0f h after this one, leaves it as gone)",
                job_id,
                why,
                GONE_CONFIRM_S / 3600,
            )
        self._finished(job_id)

    def _check_as_asked(self, st: JobState, probe: Probe) -> Verified:
        """The video against the request its generation was made for, as its intent recorded
        it (a job edited since asks otherwise); an old ledger's intent holds none."""
        job = self.jobs[st.id]
        asked = st.request if st.request is not None else job.request
        return check(probe, st.model or job.model, asked)

    async def _record_as_found(self, job_id: str, got: _Facts) -> None:
        """The file at a finished job's path, as it now is, on record as its video, flagged."""
        st = self.ledger.state(job_id)
        checked = self._check_as_asked(st, got.probe)
        if st.status == "done":  # "done" follows only "completed"
            await self.ledger.record("completed", job_id, durable=False)
        flagged = Verified(checked.probe, [*checked.flags, KEPT_AS_FOUND])
        await self._record_done(job_id, st.file, got, flagged)

    async def _record_done(
        self, job_id: str, file: str | None, got: _Facts | Downloaded, checked: Verified
    ) -> None:
        """The video's ``done`` record, not waited for: lost in a crash, the next run finds the
        job completed and fetches or checks the video again, at no charge."""
        await self.ledger.record(
            "done",
            job_id,
            durable=False,
            file=file,
            bytes=got.bytes,
            sha256=got.sha256,
            mtime_ns=got.mtime_ns,
            **checked.record_fields(),
        )

    def _failed_aside(self, job_id: str, kind: str, message: str) -> bool:
        """A failure that does not fail the run, said as a warning; False for any other.

        An edited job's earlier generation: the request as it now reads is made in this run all
        the same (the user's edit must not wait, night after night, on a generation that may
        never deliver). A job no longer listed: left as recorded (a later run polls it again if
        its kind says so), out of this run's accounts, or it would fail every night's run."""
        if job_id in self.remake:
            self.remake.discard(job_id)
            log.warning("failed job=%s kind=%s: %s", job_id, kind, message)
            gen = self.ledger.state(job_id).generation_id
            why = f"generation {gen} of its earlier request failed ({kind})"
            self.tg.start_soon(self._make_current_request, self.jobs[job_id], why)
            return True
        if job_id in self.removed:
            log.warning(
                "failed job=%s kind=%s: %s; not in the manifest: left as recorded, not failing"
                " the run",
                job_id,
                kind,
                message,
            )
            self.jobs.pop(job_id, None)
            self._close(job_id)
            return True
        return False

    # -- downloads -----------------------------------------------------------------------

    async def _download_worker(self) -> None:
        while True:
            fetch = await self.fetches.get()
            self.downloading += 1
            try:
                await self._download(fetch)
            finally:
                self.downloading -= 1
            self._settle_when_drained()

    async def _download(self, fetch: Fetch) -> None:
        """One attempt; a retry goes back to the queue for its wait, leaving the worker free."""
        s, job_id = self.settings, fetch.job_id
        try:
            got = await download(
                self.cdn,
                fetch.url,
                s.out_dir,
                job_id,
                api_base_url=s.base_url,
                max_bytes=s.max_video_bytes,
                chunk_bytes=s.download_chunk_bytes,
                client_timeout=self.download_timeout,
                sync_dir=False,  # the ledger batch that carries "done" syncs it
                probe=True,
                offload=self.ledger.offload,
                before_replace=functools.partial(keep_unrecorded, job_id, self._vouched(job_id)),
            )
        except UrlRejectedError as exc:
            await self._fail(job_id, "url_rejected", exc.message)
        except DownloadError as exc:
            await self._download_failed(fetch, exc)
        except LedgerError:  # never one job's failure: the run stops (exit 3)
            raise
        except Exception as exc:  # a bug met by one video: that job fails, not the whole run
            log.error("download crashed job=%s (a bug: please report it)", job_id, exc_info=exc)
            why = f"unexpected error fetching the video: {type(exc).__name__}: {exc}"[:300]
            await self._fail(job_id, "download", why)
        else:
            await self._downloaded(job_id, got)

    def _vouched(self, job_id: str) -> str | None:
        """The sha256 of the video the ledger records at ``<id>.mp4``, if it records one."""
        st = self.ledger.state(job_id)
        return st.sha256 if st.file == final_name(job_id) else None

    async def _download_failed(self, fetch: Fetch, exc: DownloadError) -> None:
        s, job_id = self.settings, fetch.job_id
        last = fetch.attempt == s.download_retries
        if exc.url_expired:
            return await self._refresh_url(job_id, exc, "video URL refused")
        if exc.not_video:  # an error page or a cut copy: the same URL brings it again
            return await self._refresh_url(job_id, exc, "video host sent no whole video")
        if exc.retryable and last and exc.unreachable:
            return await self._refresh_url(job_id, exc, "video host unreachable")
        if exc.retryable and last and exc.damaged:  # the host's copy may stay cut: another URL
            return await self._refresh_url(job_id, exc, "video damaged")
        if not exc.retryable or last:
            return await self._fail(job_id, "download", exc.message)
        delay = backoff_delay_s(fetch.attempt, s.backoff_base_s, s.backoff_max_s, self.rng)
        delay = max(delay, exc.retry_after_s or 0.0)  # the host said how long
        what = "download retry job=%s in %.1fs: %s"
        self.download_failures.failed(exc, what, job_id, delay, exc.message)
        self.fetches.put(replace(fetch, attempt=fetch.attempt + 1), delay_s=delay)

    async def _downloaded(self, job_id: str, got: Downloaded) -> None:
        self.download_failures.succeeded()
        assert got.probe is not None
        checked = self._check_as_asked(self.ledger.state(job_id), got.probe)
        self.ledger.dir_changed()  # the file is already on disk, under its name
        await self._record_done(job_id, got.file, got, checked)
        log.info("done job=%s file=%s bytes=%d", job_id, got.file, got.bytes)
        if checked.flags:
            log.warning("video differs job=%s: %s", job_id, "; ".join(checked.flags))
        self._finished(job_id)

    def _finished(self, job_id: str) -> None:
        """A job's generation is done with: close it, or make its edited request now."""
        if job_id in self.remake:
            self.remake.discard(job_id)
            self.tg.start_soon(self._make_current_request, self.jobs[job_id])
            return
        self._close(job_id)

    async def _make_current_request(
        self, job: Job, why: str = "the generation paid for is done"
    ) -> None:
        log.info(
            "request changed while in flight job=%s: %s; submitting the request the manifest"
            " now holds",
            job.id,
            why,
        )
        self.refreshes.pop(job.id, None)  # the fresh URLs the earlier generation used up
        if self.stop_submitting:
            self._close(job.id)
            return
        try:
            await self.slots.acquire_on_behalf_of(job.id)
        except BaseException:  # cancelled while waiting: never sent
            self._close(job.id)
            raise
        self.holding.add(job.id)
        await self._submit_one(job)

    async def _refresh_url(self, job_id: str, exc: DownloadError, why: str) -> None:
        """The video host refused an old URL, sent an error page for it, could not be reached
        at all (a URL of an earlier run whose host has gone), or sent a damaged video every
        time: ask the API for the generation again."""
        if self.api_stopped:  # no poll can be sent: the rerun downloads it, or asks anew
            log.warning("%s job=%s: no fresh URL this run (the API refused the key)", why, job_id)
            self._close(job_id)
            return
        n = self.refreshes[job_id] = self.refreshes.get(job_id, 0) + 1
        gen = self.ledger.state(job_id).generation_id
        if n > MAX_URL_REFRESHES or gen is None:
            await self._fail(job_id, "download", f"{exc.message} (after {n - 1} fresh URLs)")
            return
        # The first at once (an expired URL); then a pause, growing: a host that refuses a
        # fresh URL too (a copy still spreading, a brief 403) may take a while to come round.
        s = self.settings
        pause = 0.0 if n == 1 else min(s.backoff_max_s, 5 * s.backoff_base_s * 4 ** (n - 2))
        what = "%s job=%s: polling for a fresh URL in %.0fs: %s"
        self.download_failures.failed(exc, what, why, job_id, pause, exc.message)
        self.poller.track(
            job_id,
            gen,
            model=self.jobs[job_id].model,
            age_s=0.0,
            remaining_s=self.settings.job_timeout_s,
            first=False,
            after_s=pause,
            other_key=self._other_key(self.ledger.state(job_id)) is not None,
        )

    # -- housekeeping --------------------------------------------------------------------

    async def _results_loop(self) -> None:
        """Keep results.json near-current during long runs; the final write is in run()."""
        pause_s = self.settings.ledger_flush_interval_s
        results = ResultsWriter(self.ledger, self.manifest.jobs)
        try:
            while True:
                await anyio.sleep(pause_s)
                await self.ledger.sync()  # records nobody waited for are on disk within a period
                if not self.ledger.changed:
                    continue  # nothing happened since the last write
                started = time.monotonic()
                # Rows encoded here, where the states live; joined and written in a worker thread.
                head, rows = results.encode_changed()
                try:
                    await anyio.to_thread.run_sync(results.write, head, rows)
                except OSError as exc:  # a copy of the ledger: the run must not die for it
                    self._results_failed(exc)
                # A rewrite costs time in proportion to the jobs: keep it near 1% of the run.
                cost_s = time.monotonic() - started
                pause_s = max(self.settings.ledger_flush_interval_s, RESULTS_COST_FACTOR * cost_s)
        finally:
            # Every job's row, the ledger's history included: the traceback of this task's
            # cancellation keeps its frame until the run ends, past the final write.
            del results

    def _results_failed(self, exc: OSError) -> None:
        """Warn once: on a full disk every rewrite fails, and cron's log must not fill up too."""
        if not self.results_warned:
            self.results_warned = True
            log.warning(
                "cannot write results.json: %s; the ledger has every result, the run goes on",
                exc.strerror or exc,
            )

    async def _observe_loop(self, observer: Callable[[Snapshot], None]) -> None:
        started = self.clock()
        while True:
            observer(self.snapshot(self.clock() - started))
            await anyio.sleep(self.settings.observe_interval_s)

    def _states(self) -> list[JobState]:
        """This run's jobs as the ledger knows them: the manifest's in its order, then any
        removed from it whose paid generation this run fetches."""
        return [self.ledger.state(job_id) for job_id in self.jobs]

    def snapshot(self, elapsed_s: float) -> Snapshot:
        counts: dict[str, int] = dict(Counter(st.status for st in self._states()))
        ended = ("done", "failed")
        return Snapshot(
            len(self.jobs),
            counts,
            elapsed_s,
            self.submitted,
            self.poller.polls_sent,
            generating=self.poller.generating(),
            reopened=sum(self.ledger.state(job_id).status in ended for job_id in self.open),
        )

    def report(self, elapsed_s: float, *, interrupted: bool = False) -> RunReport:
        states = self._states()
        counts: dict[str, int] = dict(Counter(st.status for st in states))
        failed: list[tuple[str, ErrorInfo]] = []
        uncertain: list[str] = []
        pending: list[str] = []
        over_budget: list[str] = []
        for st in states:
            # Held back whatever it was before (done with a changed request, failed and retried),
            # unless an earlier POST of it may exist: then it is uncertain.
            if self.budget.was_refused(st.id) and st.id not in self.maybe_billed:
                over_budget.append(st.id)
            elif st.status == "failed" and st.error:
                failed.append((st.id, st.error))
            elif st.status in ("uncertain", "submitting"):
                uncertain.append(st.id)
            elif st.status != "done":
                pending.append(st.id)
        charged = [
            st.usd_spent
            for job_id in self.budget.reserved
            if (st := self.ledger.state(job_id)).usd_spent is not None
        ]
        return RunReport(
            out_dir=self.settings.out_dir,
            counts=counts,
            failed=failed,
            uncertain=uncertain,
            pending=pending,
            interrupted=interrupted,
            auth_error=self.auth_error,
            gave_up=self.submitter.gave_up,
            submitted=self.submitted,
            adopted=self.adopted,
            adopted_unrecorded=self.adopted_unrecorded,
            risked_duplicates=self.risked_duplicates,
            polls=self.poller.polls_sent,
            elapsed_s=elapsed_s,
            recovered_tail=self.ledger.recovered_tail,
            cost_limit_usd=self.budget.limit_usd,
            over_budget=over_budget,
            estimated_usd=self.budget.spent_usd,
            estimated_jobs=self.budget.reservations,
            reported_usd=sum(charged),
            reported_jobs=len(charged),
            gone=self.gone,
            gone_now=self.gone_now,
            not_refetched=self.not_refetched,
            states=self.ledger.states,
        )


_IDLE = frozenset({Action.SKIP, Action.HOLD_FAILED, Action.GONE})


def generation_owners(states: Iterable[JobState]) -> dict[str, str]:
    """Each generation id on record and the job it was given to first (by submission time):
    a later job recorded with the same id was given another's (failed as a duplicate, or
    about to be)."""
    owners: dict[str, str] = {}
    given = [
        st
        for st in states
        if st.generation_id and not (st.error and st.error.kind == DUPLICATE_GENERATION)
    ]
    for st in sorted(given, key=lambda st: st.submitted_at or math.inf):
        owners.setdefault(st.generation_id or "", st.id)
    return owners


def timed_out_reason(tracked: Tracked, timeout_s: float) -> str:
    """Why the job timeout ended a job, as its last polls saw it: still running, refused with
    404 (too soon or too few to take the generation for lost), or failing."""
    error = tracked.last_error
    kept = f"generation {tracked.generation_id} is kept and will be polled again on the next run"
    if isinstance(error, NotFoundError) and tracked.not_found:
        polls = "1 poll" if tracked.not_found == 1 else f"{tracked.not_found} polls"
        return (
            f"the API answered 404 (unknown generation) to {polls} until the job timeout"
            f" ({timeout_s:.0f}s), too few or too soon to take it for lost (that takes"
            f" {NOT_FOUND_STREAK_S / 60:.0f} min of them, {MAX_NOT_FOUND} at least, while the"
            f" API answers other generations' polls): {error.message}; {kept}"
        )
    said = last_status_note(tracked.api_status)
    if error is not None:
        failed = f"its last poll failed: {error.message}"
        return f"not finished after {timeout_s:.0f}s{said}; {failed}; {kept}"
    return f"not finished after {timeout_s:.0f}s{said}; {kept}"


# What the API documents for a generation still running, and what its own examples treat so.
RUNNING_STATUSES = frozenset({"queued", "generating", "waiting", "active"})
MAX_STATUS_CHARS = 40


def last_status_note(status: str) -> str:
    """What a timed-out job's last status was, when it was no plain "still running": the API
    said ``completed`` with no usable video URL, or a status it does not document (both are
    taken for running, as the contract asks, but a user must not read "still running")."""
    if status in RUNNING_STATUSES:
        return ""
    shown = status if len(status) <= MAX_STATUS_CHARS else status[: MAX_STATUS_CHARS - 3] + "..."
    if status == "completed":
        return "; the API last reported 'completed' with no usable video URL"
    return f"; its last status was {shown!r} (not one the API documents)"


def history_samples(
    states: Iterable[JobState], longest_s: float
) -> Iterator[tuple[str, float, float]]:
    """(model, finished after, finished by), in seconds from submission, of the ledger's
    completions that were followed from their submission.

    One first polled on a resume, a refresh or an adoption finished at an unknown time, and
    its record says so. A ledger written before the record said it gives the time from
    submission to the completion record, over the job timeout never (seen by a later run)."""
    for st in states:
        if not st.model:
            continue
        if st.took != "old":
            if st.took is not None:
                yield st.model, *st.took
        elif st.submitted_at is not None and st.completed_at is not None:
            took = st.completed_at - st.submitted_at
            if 0 < took <= longest_s:
                yield st.model, 0.98 * took, took


def learn_history(durations: DurationModel, states: Iterable[JobState], longest_s: float) -> int:
    """Feed the ledger's earlier completions to the poll plan; returns how many there were."""
    n = 0
    for model, after, by in history_samples(states, longest_s):
        durations.observe(model, after, by, earlier=True)
        n += 1
    return n


GONE_KINDS = frozenset({"lost", "generation_error"})  # the generation cannot deliver again


def recorded_file(path: Path, st: JobState) -> Literal["missing", "recorded", "altered"]:
    """What is at a finished job's recorded path: "missing", "recorded" (the file the ledger
    records: fetched again because it is unreadable or incomplete) or "altered"."""
    if not is_regular(path):  # a link there, even to the video, is not it: as if missing
        return "missing"
    return "recorded" if file_matches(path, st.bytes, st.sha256, st.mtime_ns) else "altered"


def refetch_failure(gen: str | None, kind: str, message: str) -> tuple[str, str]:
    """The kind and words of a finished job's failed refetch, its file damaged (a missing one
    is no failure: Runner._missing_kept)."""
    what = "damaged (unreadable or incomplete)"
    if kind in GONE_KINDS:
        return REFETCH_FAILED, (
            f"the video file is {what} and generation {gen} cannot be fetched again ({kind}:"
            f" {message}); --retry-failed generates it anew (a new charge)"
        )
    return kind, (
        f"the video file is {what} and fetching it again failed ({message}); the next run"
        f" polls generation {gen} again, at no charge"
    )


def gone_settles(st: JobState, now: float) -> bool:
    """Does the API's answer now that it no longer has a done job's video settle the job as
    gone? Only when an earlier run's answer said so at least GONE_CONFIRM_S before: one
    night's 404s (a blip, an API briefly forgetful) leave it to be asked again."""
    return st.gone is not None and now - st.gone.since >= GONE_CONFIRM_S


def _in_place(path: Path, own: dict[str, Any]) -> dict[str, Any] | None:
    """The delivered video's facts, with its file's mtime now, when ``path`` holds it whole:
    a copy put back without its mtime is hashed once, not on every later run."""
    try:
        before = path.lstat().st_mtime_ns
    except OSError:
        return None
    if not own_video_intact(path, own, verify=False):
        return None
    return {**own, "mtime_ns": before}


def keep_unrecorded(job_id: str, vouched: str | None, final: Path, sha: str) -> None:
    """Before a video is renamed to ``final``: a different file there that the ledger does
    not record (altered in place, copied in) is kept as ``<id>@<its sha8>.mp4``, never
    overwritten. Runs in the download's worker thread."""
    try:
        if not stat.S_ISREG(os.lstat(final).st_mode):
            return
        have = sha256_file(final)
    except FileNotFoundError:
        return
    if have in (sha, vouched):  # the same video, or the one on record (damaged): replaced
        return
    kept = kept_name(final.parent, job_id, have[:8])
    os.replace(final, kept)
    log.warning(
        "video kept job=%s: %s was not the video on record (altered or copied in): kept as %s;"
        " the video fetched takes its place",
        job_id,
        final.name,
        kept.name,
    )


@dataclass(frozen=True)
class _Facts:
    bytes: int
    sha256: str
    mtime_ns: int
    probe: Probe


def _file_facts(path: Path) -> _Facts:
    st = path.stat()
    return _Facts(st.st_size, sha256_file(path), st.st_mtime_ns, probe_video(path))


def kept_name(out: Path, job_id: str, tag: str) -> Path:
    """``<id>@<tag>.mp4``, numbered if taken: a kept video never replaces another one.
    ('@' cannot appear in a job id, so it never collides with a job's own file.)"""
    kept, n = out / f"{job_id}@{tag}.mp4", 1
    while os.path.lexists(kept):  # a link there too, dangling or not, is someone's
        n += 1
        kept = out / f"{job_id}@{tag}-{n}.mp4"
    return kept


def _kept_cause(lookup: Lookup, decision: Decision) -> Cause:
    """What an uncertain job's record keeps: a request the logs showed was made is never
    taken for absent again, whatever its POST met (a row may age out of the logs)."""
    return "no_answer" if decision.seen else lookup.cause


def last_answer(state: JobState) -> str:
    """What the API said to the job's last POST, as its "uncertain" record keeps it (a 5xx, a
    2xx with an error and no id): the words a give-up reason must not drop."""
    if state.status != "uncertain" or state.error is None or not state.error.message:
        return ""
    return f"; the API's last answer: {state.error.message}"


def lookup_cause(state: JobState) -> Cause:
    """What an uncertain job's POST met, as its recorded kind says: after a crash or a 5xx
    absence from the usage logs proves it never created anything; after no answer it does not."""
    kind = state.error.kind if state.error else ""
    if kind == "server_error":
        return "server_error"
    return "crash" if kind == "crash" else "no_answer"


def may_be_running(st: JobState) -> bool:
    """A generation on record that the API may still be making: in flight, or failed in a way
    that leaves it so (timed out, lost, refused to this key)."""
    if st.status == "submitted":
        return True
    return st.status == "failed" and st.error is not None and st.error.kind in STUCK_KINDS


def sent_with_other_key(st: JobState, account: str | None) -> str | None:
    """The fingerprint of the key the job's last POST was sent with, when not ``account``
    (this run's key's); None when either is unknown (an intent older than fingerprints)."""
    if st.account and account and st.account != account:
        return st.account
    return None


def may_abandon(st: JobState, account: str | None) -> bool:
    """Stuck, as far as this run can tell: in flight, timed out or lost. (Not one another key
    created, whatever it was recorded as: a run with that key can still collect it, and a
    remake would pay again.)"""
    kind = st.error.kind if st.error is not None else ""
    return may_be_running(st) and kind != OTHER_KEY and not sent_with_other_key(st, account)


def other_key_reason(tracked: Tracked, error: ApiError, sent_with: str, account: str | None) -> str:
    """Why a generation another key created fails ``other_key``: the key changed since its
    create, and the API shows a generation only to the key that created it."""
    if isinstance(error, NotFoundError):
        polls = "1 poll" if tracked.not_found == 1 else f"{tracked.not_found} polls"
        answer = f"answers 404 (unknown generation) to this key: {polls} in a row"
    else:
        answer = "refuses to report on it to this key"
    return (
        f"the API key changed: generation {tracked.generation_id} was created with another API"
        f" key (fingerprint {sent_with}; this run's is {account}), and the API {answer}:"
        f" {error.message}; not lost: a run with the key that created it polls it again, and"
        " --retry-failed never makes it anew (it exists, paid for)"
    )


def _still_lost(st: JobState, tracked: Tracked) -> bool:
    """Recorded lost, and every poll of this run's answered 404 (too few, or too soon, to
    judge it lost again): it stays lost, rather than become a timeout that --retry-failed
    would not remake."""
    lost = st.status == "failed" and st.error is not None and st.error.kind == "lost"
    return (
        lost
        and isinstance(tracked.last_error, NotFoundError)
        and (0 < tracked.polls == tracked.not_found)
    )


def resume_terms(st: JobState, age_s: float, s: RunSettings) -> tuple[bool, float]:
    """Whether a generation followed again on resuming holds a concurrency slot, and how long
    it is polled, ``age_s`` after its submission.

    Within its job timeout it is in flight like any other: a slot, and the rest of its time.
    Past it (an earlier night's timeout, a crash long ago), it was paid for and counted long
    ago: no slot, so new work never waits on it, and a few polls over a few minutes (never
    longer than the job timeout), enough to collect one that has finished since. Any other
    (a refetch, a download's fresh URL): no slot, a whole job timeout, as its video is ready."""
    timeout = s.job_timeout_s
    if not may_be_running(st):
        return False, timeout
    short = min(timeout, max(3 * s.poll.max_interval_s, REPOLL_WINDOW_S))
    if age_s < timeout:
        return True, max(timeout - age_s, short)
    return False, short


def abandoned_reason(tracked: Tracked, age_s: float, s: RunSettings) -> str:
    """Why a generation stuck past ``abandon_after_s`` is no longer polled, as its last polls
    saw it."""
    error = tracked.last_error
    if isinstance(error, NotFoundError):
        last = f"the API answers 404 (unknown generation): {error.message}"
    elif error is not None:
        last = f"its last poll failed: {error.message}"
    else:
        last = "still running" + last_status_note(tracked.api_status)
    return (
        f"generation {tracked.generation_id} not finished {age_s / 3600:.0f} h after submission"
        f" ({last}); stuck past the {s.abandon_after_s / 3600:g} h limit (abandon_after_s), it"
        " is no longer polled: --retry-failed submits the job again (a new charge)"
    )
