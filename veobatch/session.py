"""A run's lifetime around the runner: the output directory's lock, the ledger, the stop
signals, the two HTTP sessions and the plan. ``run`` is the package's entry point.

Kept apart from :mod:`veobatch.runner` so that what is set up once per run (and torn down in
a fixed order on every exit path) reads apart from what happens once per job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread

from ._entry import EXIT_INTERRUPTED, STOP_SIGNALS
from .client import ApiClient, HttpApiClient
from .downloader import READ_BUFFER_BYTES, final_name
from .errors import ConfigError, LedgerError, first_leaf
from .fsutil import ANY_TEMP, DirLock, DiskThreads, ensure_dir, remove_stale_temps
from .jobs import Job, Manifest
from .ledger import LEDGER_NAME, RESULTS_NAME, JobState, Ledger, result_rows
from .report import REPORT_NAME, THUMBS_DIR
from .runner import Runner, RunReport, Snapshot
from .scheduler import JobPlan, adopt_recorded_manifest, plan_run
from .settings import ENV_BASE_URL, ENV_KEY, RunSettings, sends_key_in_clear

log = logging.getLogger(__name__)

# Servers close idle connections after a few seconds (Node's default is 5 s). A POST written
# to a connection the server is closing gets no answer, and leaves a paid job uncertain:
# drop idle API connections before a server would.
API_KEEPALIVE_S = 3.0
NO_KEY = f"no API key: set {ENV_KEY} (or use --simulate)"


def unrecorded_results(out: Path, jobs: Iterable[Job], states: Mapping[str, JobState]) -> str:
    """What an output directory holds of these jobs that its ledger does not know of, when
    the ledger knows nothing at all (emptied, deleted); '' when nothing or the ledger has
    records. A run then would pay for every job again and replace its video."""
    if states:
        return ""
    ids = {job.id for job in jobs}
    # Same-named videos count only in what was a veobatch output directory: elsewhere they are
    # the user's own files, which a submission keeps aside (kept_name) rather than replaces.
    ours = _was_veobatch_output(out)
    videos = sorted(jid for jid in ids if (out / final_name(jid)).exists()) if ours else []
    generations = [
        row
        for row in result_rows(out)
        # A hand-edited row whose id is no string (a list: unhashable) names none of them.
        if isinstance(row.get("id"), str)
        and row["id"] in ids
        and (row.get("generation_id") or row.get("attempts"))
    ]
    found = []
    if generations:
        n = len(generations)
        found.append(f"{RESULTS_NAME} records {n} submitted job{'s' * (n != 1)}")
    if videos:
        names = ", ".join(map(final_name, videos[:3])) + (", ..." if len(videos) > 3 else "")
        found.append(f"{len(videos)} video{'s' * (len(videos) != 1)} ({names})")
    return " and ".join(found)


def _was_veobatch_output(out: Path) -> bool:
    """Did a veobatch run write here? Its results, its report, the report's thumbnail cache or
    a torn ledger tail kept aside say so: an operator tidying up may delete the first two."""
    if (out / RESULTS_NAME).exists() or (out / REPORT_NAME).exists():
        return True
    try:
        with os.scandir(out) as entries:
            return any(
                (e.name == THUMBS_DIR and e.is_dir(follow_symlinks=False))
                or e.name.startswith(f"{LEDGER_NAME}.torn-")
                for e in entries
            )
    except OSError:  # no folder yet, or none to read: nothing in it is ours
        return False


def _refuse_unrecorded(out: Path, manifest: Manifest, ledger: Ledger) -> None:
    found = unrecorded_results(out, manifest.jobs, ledger.states)
    if found:
        raise LedgerError(
            f"{out / LEDGER_NAME} is empty or missing, but {out} holds results of this "
            f"manifest: {found}. A run would pay for those jobs again. Restore the ledger "
            "from a backup, or use another --out; to start over here on purpose, move "
            "results.json, report.html, .thumbs and the videos out of the directory first."
        )


@contextlib.asynccontextmanager
async def _http(
    settings: RunSettings, api: ApiClient | None
) -> AsyncIterator[tuple[ApiClient, aiohttp.ClientSession]]:
    """The API client (with the key) and the CDN session (without it): never the same session."""
    # No cookie jar: neither host sets cookies we need, and a jar costs time on every answer.
    async with aiohttp.ClientSession(
        headers={"Accept-Encoding": "identity"},
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=READ_BUFFER_BYTES,
    ) as cdn:
        if api is not None:
            yield api, cdn
            return
        assert settings.api_key is not None, "run() checks for a key before it locks"
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(keepalive_timeout=API_KEEPALIVE_S),
        ) as session:
            yield (
                HttpApiClient(
                    session,
                    settings.base_url,
                    settings.api_key,
                    timeout_s=settings.request_timeout_s,
                    connect_timeout_s=settings.connect_timeout_s,
                    poll_timeout_s=settings.poll_timeout_s,
                ),
                cdn,
            )


@dataclass
class _Control:
    """What the signal watcher needs: alive from the lock to the last byte of the results."""

    ledger: Ledger
    planning: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    main: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    run: Runner | None = None
    interrupted: bool = False
    # Told the line that says why, on a second signal: the summary will never be printed.
    last_words: Callable[[str], None] | None = None

    async def watch_signals(self) -> None:
        # Event loops differ in what they leave behind when a receiver closes (uvloop: the
        # default action, so a late signal would kill instead of exit 75): restore it here.
        before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            await self._receive_signals()
        finally:
            for sig, handler in before.items():
                if handler is not None:
                    signal.signal(sig, handler)

    async def _receive_signals(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for sig in signals:
                if self.interrupted:
                    log.error("second signal: exiting now")
                    try:
                        self.ledger.flush_sync()
                        if self.last_words is not None:
                            name = signal.Signals(sig).name
                            self.last_words(
                                f"veobatch: interrupted; a second {name} ended the"
                                " run at once; run again to resume"
                            )
                    finally:  # even when the disk refuses the last batch: exit means exit
                        os._exit(EXIT_INTERRUPTED)
                self.interrupted = True
                if self.run is not None:
                    self.run.stop_submitting = True
                log.warning("%s: stopping; run again to resume", signal.Signals(sig).name)
                self.planning.cancel()
                self.main.cancel()


async def run(
    manifest: Manifest,
    settings: RunSettings,
    *,
    api: ApiClient | None = None,
    handle_signals: bool = False,
    last_words: Callable[[str], None] | None = None,
    verify: bool = False,
    observer: Callable[[Snapshot], None] | None = None,
    held_lock: DirLock | None = None,
) -> RunReport:
    """Run a manifest to completion (or interruption) and report; resumes what the ledger holds.

    ``held_lock``: the output directory's lock, taken by the caller, who keeps it past the
    run (the command line, for its report and webhook); else the run takes and drops it.
    Raises the package's own errors (or the OSError of a failing disk), never the task
    groups' exception groups that carry them."""
    try:
        return await _run(
            manifest, settings, api, handle_signals, last_words, verify, observer, held_lock
        )
    except BaseExceptionGroup as group:
        leaf = first_leaf(group)
        if leaf is group:
            raise
        raise leaf from None


async def _run(
    manifest: Manifest,
    settings: RunSettings,
    api: ApiClient | None,
    handle_signals: bool,
    last_words: Callable[[str], None] | None,
    verify: bool,
    observer: Callable[[Snapshot], None] | None,
    held_lock: DirLock | None,
) -> RunReport:
    started = time.monotonic()
    if api is None and settings.api_key is None:
        raise ConfigError(NO_KEY)
    if api is None and sends_key_in_clear(settings.base_url):
        log.warning(
            "%s is plain http to another machine: the API key crosses the network unencrypted"
            " (use https://)",
            ENV_BASE_URL,
        )
    out = ensure_dir(settings.out_dir)
    if held_lock is not None and not (held_lock.held and held_lock.path.parent == out):
        raise ValueError(f"held_lock is not a held lock of {out}")
    disk = DiskThreads()  # the ledger's writes and the videos' last write share its batches
    with contextlib.nullcontext() if held_lock is not None else DirLock(out):
        # What a kill -9 mid-write left, long ago.
        remove_stale_temps(out, time.time())
        if not (out / THUMBS_DIR).is_symlink():  # then its temporary files are not ours
            remove_stale_temps(out / THUMBS_DIR, time.time(), ANY_TEMP)
        control = _Control(Ledger.open(out, offload=disk), last_words=last_words)
        manifest = adopt_recorded_manifest(manifest, control.ledger.states)
        try:
            _refuse_unrecorded(out, manifest, control.ledger)
        except LedgerError:
            control.ledger.close()
            disk.close()
            raise
        async with anyio.create_task_group() as outer:
            if handle_signals:
                outer.start_soon(control.watch_signals)
            try:
                report = await _run_locked(manifest, settings, control, api, verify, observer)
            finally:
                try:
                    disk.close()
                finally:
                    try:
                        control.ledger.close()
                        _final_results(control.ledger, manifest)
                    finally:
                        outer.cancel_scope.cancel()
        return replace(report, elapsed_s=time.monotonic() - started)


def _final_results(ledger: Ledger, manifest: Manifest) -> None:
    """The last results.json: a view of the ledger, so failing to write it fails nothing."""
    if ledger.broken:  # memory is ahead of the journal: a view of it would claim too much
        return
    try:
        ledger.write_results(manifest.jobs)
    except OSError as exc:
        log.error(
            "cannot write %s: %s; the ledger holds every result (see `veobatch status`)",
            ledger.directory / RESULTS_NAME,
            exc.strerror or exc,
        )


async def _run_locked(
    manifest: Manifest,
    settings: RunSettings,
    control: _Control,
    api: ApiClient | None,
    verify: bool,
    observer: Callable[[Snapshot], None] | None,
) -> RunReport:
    started = time.monotonic()
    ledger = control.ledger
    # Off the event loop, and given up at a stop signal (it only reads): it stats every
    # finished video, and with --verify hashes each one, long enough for a night's videos
    # that a service manager's stop would otherwise end in a kill.
    plans: list[JobPlan] = []
    with control.planning:
        plans, warnings = await anyio.to_thread.run_sync(
            functools.partial(
                plan_run,
                manifest.jobs,
                ledger.states,
                settings.out_dir,
                verify=verify,
                retry_failed=settings.retry_failed,
            ),
            abandon_on_cancel=True,
        )
        for warning in warnings:
            log.warning("%s", warning)
    async with _http(settings, api) as (client, cdn):
        r = control.run = Runner(manifest, settings, ledger, client, cdn, observer=observer)
        r.stop_submitting = control.interrupted
        with control.main:
            await r.execute(plans)
    if observer is not None:
        observer(replace(r.snapshot(time.monotonic() - started), final=True))
    return r.report(time.monotonic() - started, interrupted=control.interrupted)
