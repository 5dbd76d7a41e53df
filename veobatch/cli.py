"""The command line: `run`, `plan`, `status`, `simulate`.

Thin by design: parse flags into :class:`RunSettings`, call the library, print, and map
errors to exit codes. Logs go to stderr; stdout carries only results (or why there are none),
so cron mails what matters.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ._entry import (
    EXIT_INTERRUPTED,
    STOP_SIGNALS,
    EarlyStop,
    ignore_stop_signals,
    stdout_elsewhere,
)
from .errors import (
    ConfigError,
    LedgerError,
    LockedError,
    ManifestError,
    VeobatchError,
    first_leaf,
)
from .fsutil import DirLock, ensure_dir
from .jobs import Manifest
from .ledger import LEDGER_NAME, current_results, load_states
from .logfmt import LogFormat, exit_record, formatter
from .manifest import load_manifest
from .notify import check_url, payload, send
from .outcome import run_extras
from .progress import LiveProgress, LogProgress
from .report import REPORT_NAME, write_report
from .runner import EXIT_CONFIG, EXIT_USAGE, RunReport, Snapshot
from .scheduler import adopt_recorded_manifest, plan_run
from .session import NO_KEY, run, unrecorded_results
from .settings import RunSettings, Secret, resolve_settings
from .summary import (
    abort_doc,
    plan_rows,
    plan_summary,
    rerun_rows,
    rerun_summary,
    run_summary,
    status_counts,
    status_rows,
    summary_doc,
)

log = logging.getLogger("veobatch")
T = TypeVar("T")
SIM_KEY = "sim-local"  # --simulate: the built-in simulator takes any key


STDERR = Console(stderr=True)


def _setup_logging(verbosity: int, log_format: LogFormat = "text") -> logging.Handler:
    """Plain timestamped lines off a terminal (cron, files), or JSON lines for collectors;
    rich lines on a terminal. Returns the handler, so a live display can mute it."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler: logging.Handler
    if STDERR.is_terminal and log_format == "text":
        handler = RichHandler(console=STDERR, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("veobatch").setLevel(level)
    return handler


SIM_STATE = ".simulator"  # in the output directory: the simulator's journal of a --simulate run
_fatal_json = False  # --log-format json: the line that says why is a JSON record too


def _guard(fn: Callable[[], T], on_abort: Callable[[int, str, bool], None] | None = None) -> T:
    """Turn the error tree into exit codes with one clear line each, never a traceback.

    ``on_abort(code, line, interrupted)`` hears of the exits that end a run early (2, 3 and
    75), before exiting.
    """
    try:
        try:
            return fn()
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
    except (VeobatchError, OSError) as exc:
        _end(*_exit_for(exc), on_abort)
    except Exception as exc:  # a bug: still one line, and an exit a unit counts as failed
        log.debug("traceback of the error below", exc_info=exc)  # shown with -v
        line = (
            f"veobatch: internal error: {_where(exc)} (a bug: please report it with this"
            " line; -v shows the traceback; what is on record is safe, and a rerun resumes)"
        )
        _end(EXIT_CONFIG, line, on_abort)
    except SystemExit as exc:  # a signal outside the run's own handling: still exit 75
        if exc.code == EXIT_INTERRUPTED:
            _leave_hung_up_terminal()
            by = f" by {exc.signal_name}" if isinstance(exc, (_Interrupted, EarlyStop)) else ""
            line = f"veobatch: interrupted{by}; run again to resume"
            # The start-up handler (status, report, ...) has said its line already.
            _end(
                EXIT_INTERRUPTED, line, on_abort, interrupted=True, said=isinstance(exc, EarlyStop)
            )
        raise


def _where(exc: BaseException) -> str:
    """A bug's first leaf, with the place it was raised: a rare one seen only in a cron log
    must be traceable from that one line, without -v."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "veobatch" in f.filename] or frames
    at = f" at {Path(own[-1].filename).name}:{own[-1].lineno} in {own[-1].name}" if own else ""
    return f"{type(exc).__name__}: {exc}{at}"[:500]


def _end(
    code: int,
    line: str,
    on_abort: Callable[[int, str, bool], None] | None,
    *,
    interrupted: bool = False,
    said: bool = False,
) -> NoReturn:
    """Say why, tell ``on_abort`` of a run ended early (2, 3 or 75), and exit ``code``."""
    if not said:
        _say_why(code, line)
    if on_abort is not None and code in (EXIT_USAGE, EXIT_CONFIG, EXIT_INTERRUPTED):
        on_abort(code, line, interrupted)
    sys.exit(code)


def _say_why(code: int, text: str) -> None:
    """The lines that say why a command ended early: on stderr (as JSON records with
    --log-format json), and on stdout too when it goes elsewhere, as under cron, where stdout
    is the mail and stderr a log file nobody reads until something is wrong."""
    if _fatal_json:
        now = time.time()
        for line in text.splitlines():
            click.echo(exit_record(line, now, code), err=True)
    else:
        click.echo(text, err=True)
    if stdout_elsewhere():
        click.echo(text)


def _last_words(line: str) -> None:
    """The why-line for cron's mail when the process is about to leave with os._exit: the log
    line on stderr is said already, and nothing will flush stdout for us."""
    if stdout_elsewhere():
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _exit_for(exc: VeobatchError | OSError) -> tuple[int, str]:
    """The exit code and the one line that says why."""
    if isinstance(exc, ManifestError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, LockedError):
        return EXIT_INTERRUPTED, f"veobatch: {exc}"
    if isinstance(exc, (ConfigError, LedgerError)):
        return EXIT_CONFIG, f"veobatch: {exc}"
    if isinstance(exc, VeobatchError):
        return 1, f"veobatch: {exc}"
    # The disk or the system, not the jobs: a person must look (exit 3).
    log.debug("traceback of the error below", exc_info=exc)  # shown with -v
    where = f"{exc.filename}: " if exc.filename else ""
    return EXIT_CONFIG, f"veobatch: system error: {where}{exc.strerror or exc}"


def _notify_abort(
    url: str, manifest: Path, out_dir: Path, code: int, line: str, interrupted: bool
) -> None:
    """Tell the webhook of a run that ended early; never raises, never changes the exit."""
    try:
        _arun(send, url, abort_doc(manifest.name, out_dir, code, line, interrupted=interrupted))
    except Exception as exc:  # a courtesy: the exit code is the run's
        log.error("notification failed: %s", type(exc).__name__)


def _arun(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """anyio.run on uvloop when it is installed (`pip install veobatch[fast]`): the event loop
    is most of the runner's CPU at scale."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return anyio.run(fn, *args)
    return anyio.run(fn, *args, backend_options={"use_uvloop": True})


def _exit_now(code: int) -> None:
    """Leave without interpreter finalization once everything is on disk and printed.

    Finalization resets signal handlers to their defaults, so a second SIGTERM arriving in
    it would kill the process (-15) instead of the promised exit 75. The ledger, results and
    lock are closed by now, so nothing is lost by skipping it.
    """
    if sys.stdout is not sys.__stdout__:  # invoked in-process (click's test runner): be polite
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)


class _Interrupted(SystemExit):
    """Exit 75 for a signal outside the run's own handling, naming the signal for the line."""

    def __init__(self, signum: int) -> None:
        super().__init__(EXIT_INTERRUPTED)
        self.signal_name = signal.Signals(signum).name


def _interrupted(signum: int, frame: object) -> None:
    ignore_stop_signals()
    raise _Interrupted(signum)


def _leave_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null if they are on a terminal that has hung up.

    A closed terminal window or a dropped ssh session sends SIGHUP, and then every write to
    that terminal fails with EIO: the display's last redraw or the summary would end the
    process with a traceback (exit 1) before the webhook is told. Nobody is there to read them.
    """
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError as exc:
            if exc.errno != errno.EIO:
                continue  # not a hung-up terminal (closed, or a broken pipe): leave it be
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


def _default_out(manifest_path: Path) -> Path:
    return Path("output") / manifest_path.stem


def _ledger_elsewhere(manifest_path: Path, out: Path, job_ids: Iterable[str]) -> Path | None:
    """An earlier run's output folder for this manifest, when the default one (relative to the
    working directory) has no ledger: a run from another directory, cron's home say, would
    start a new ledger there and pay for every job again. Only a ledger that knows some of
    these jobs counts: another manifest of the same name has its own."""
    if _has_records(out):
        return None
    here, folder = out.resolve(), manifest_path.resolve().parent
    ids = set(job_ids)
    for base in (folder, folder.parent):
        found = (base / _default_out(manifest_path)).resolve()
        if found != here and _has_records(found) and _knows_any(found, ids):
            return found
    return None


def _knows_any(out: Path, job_ids: set[str]) -> bool:
    try:
        return not job_ids.isdisjoint(load_states(out))
    except (VeobatchError, OSError):
        return True  # unreadable: say so rather than start beside it


def _check_default_out(manifest_path: Path, out: Path, job_ids: Iterable[str]) -> None:
    if found := _ledger_elsewhere(manifest_path, out, job_ids):
        raise ConfigError(
            f"{out} (relative to {Path.cwd()}) has no ledger, but {found} holds earlier runs"
            f" of {manifest_path.name}: a run here would pay for every job again; run from"
            f" {found.parent.parent} or pass --out {found} (or --out {out} to start anew)"
        )


def _has_records(out: Path) -> bool:
    try:
        return (out / LEDGER_NAME).stat().st_size > 0
    except OSError:
        return False


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    console = Console(soft_wrap=not sys.stdout.isatty())
    if not sys.stdout.isatty():
        for row in rows:
            click.echo("\t".join(row))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


class Finite(click.FloatRange):
    """A float range without ``inf`` and ``nan``, which pass its bounds: ``--poll-timeout inf``
    overflowed a timer once the creates were sent and paid for."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="veobatch")
def main() -> None:
    """Turn a YAML manifest of Veo 3.1 video jobs into MP4 files, resumably."""


@main.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (default: output/<manifest stem>).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    help="Generations in flight at once (overrides settings.concurrency; default 4).",
)
@click.option(
    "--job-timeout",
    "job_timeout_s",
    type=Finite(min=0, min_open=True),  # as settings.job_timeout_s takes
    help="Seconds from submission before a job is given up (default 1800).",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Run against the built-in simulator on loopback: no key, no network.",
)
@click.option(
    "--sim-gen-time",
    "sim_gen_time_s",
    type=Finite(min=0),
    default=3.0,
    show_default=True,
    help="With --simulate: mean generation time in seconds.",
)
@click.option(
    "--verify", is_flag=True, help="Re-hash finished files instead of trusting size and mtime."
)
@click.option(
    "--logs-grace",
    "logs_grace_s",
    type=Finite(min=0),
    help="Seconds the usage logs may lag behind a request (default 60).",
)
@click.option(
    "--poll-timeout",
    "poll_timeout_s",
    type=Finite(min=0, min_open=True),  # as settings.poll_timeout_s takes
    help="Seconds a poll may take before it is asked again at its next poll time (default 10).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    default=None,
    help="Submit again jobs that failed (invalid request, generation error, lost video).",
)
@click.option(
    "--resubmit-uncertain",
    is_flag=True,
    default=None,
    help="Submit again jobs whose earlier submission may exist: may pay twice.",
)
@click.option(
    "--max-cost",
    "max_cost_usd",
    type=Finite(min=0),
    help="Submit no more than USD of estimated cost this run (overrides settings.max_cost_usd).",
)
@click.option("-v", "--verbose", count=True, help="More log detail.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr log lines: plain text, or one JSON object per line (no live display).",
)
@click.option(
    "--notify",
    "notify_url",
    metavar="URL",
    help="POST the run's JSON summary to this webhook when it ends (or settings.notify_url).",
)
@click.option(
    "--report/--no-report",
    "make_report",
    default=True,
    show_default=True,
    help="Write DIR/report.html at the end of the run.",
)
def run_cmd(
    manifest: Path,
    out_dir: Path | None,
    concurrency: int | None,
    job_timeout_s: float | None,
    simulate: bool,
    sim_gen_time_s: float,
    verify: bool,
    logs_grace_s: float | None,
    poll_timeout_s: float | None,
    retry_failed: bool | None,
    resubmit_uncertain: bool | None,
    max_cost_usd: float | None,
    verbose: int,
    quiet: bool,
    log_format: LogFormat,
    notify_url: str | None,
    make_report: bool,
) -> None:
    """Validate MANIFEST, then submit, poll and download every job not yet done."""
    global _fatal_json
    _fatal_json = log_format == "json"
    console_log = _setup_logging(-1 if quiet else verbose, log_format)
    # While a run is under way its own handler takes signals; before and after it, a signal
    # still means "interrupted" (exit 75), never a bare kill.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupted)
    out = out_dir or _default_out(manifest)
    notify_to = notify_url  # the manifest's own URL counts once the manifest is loaded

    def abort(code: int, line: str, interrupted: bool) -> None:
        if notify_to:
            _notify_abort(notify_to, manifest, out, code, line, interrupted)

    m = _guard(lambda: load_manifest(manifest), abort)  # a large one takes a while
    for w in m.warnings:
        log.warning("%s", w)
    cli = {
        "concurrency": concurrency,
        "job_timeout_s": job_timeout_s,
        "retry_failed": retry_failed or None,
        "logs_grace_s": logs_grace_s,
        "poll_timeout_s": poll_timeout_s,
        "resubmit_uncertain": resubmit_uncertain or None,
        "max_cost_usd": max_cost_usd,
    }
    # A simulated run tells only a webhook named on its command line: the manifest's is the
    # team's real one, and the simulator's videos are not results.
    notify_to = notify_url or (None if simulate else m.settings.notify_url)
    if notify_to:
        _guard(lambda: check_url(notify_to))
    # The simulator brings its own address and key: a real key or base URL in the
    # environment plays no part, and one that would be refused must not stop the demo.
    env: dict[str, str] | None = {} if simulate else None
    settings = _guard(lambda: resolve_settings(out, m.settings, cli, env), abort)
    _guard(lambda: _check_not_mixed(out, simulate), abort)
    if out_dir is None:
        _guard(lambda: _check_default_out(manifest, out, (j.id for j in m.jobs)), abort)
    sim_gen_s = sim_gen_time_s if simulate else None  # None: the real API
    # The manifest's objects live as long as the run: the collector need not walk them on
    # every full collection.
    gc.freeze()
    started_wall = time.time()
    # Held until the process exits, past the run: its report and webhook are the run's too,
    # and a --simulate run's simulator must not touch a directory another run is working on.
    lock = DirLock(settings.out_dir)
    _guard(lambda: _lock(lock, settings, simulated=sim_gen_s is not None), abort)
    if STDERR.is_terminal and not quiet and log_format == "text":
        with LiveProgress(STDERR, mute=None if verbose else console_log) as live:
            report = _guard(
                lambda: _arun(_run_async, m, settings, sim_gen_s, verify, live, lock), abort
            )
            _leave_hung_up_terminal()  # before the display's last redraw
    else:
        observer = LogProgress() if not quiet else None
        report = _guard(
            lambda: _arun(_run_async, m, settings, sim_gen_s, verify, observer, lock), abort
        )
        _leave_hung_up_terminal()
    report_file = None
    m = adopt_recorded_manifest(m, report.states)  # as the run named its jobs
    try:
        if make_report and not report.interrupted:
            report_file = _final_report(m, report)
    except _Interrupted as exc:  # the work is done and on record: only its view is cut short
        log.warning("%s: report.html not written; the run itself finished", exc.signal_name)
    # The summary and the webhook (10 s at most) are said whatever comes now, and the exit
    # is the run's own: a stop signal after the work is done does not make it "interrupted".
    ignore_stop_signals()
    extras = run_extras(report.states, m.jobs, started_wall, report_file)
    lines = run_summary(report, report.total, extras)
    for line in lines:
        click.echo(line)
    if notify_to:
        body = payload(summary_doc(report, report.total, extras), lines)
        _arun(send, notify_to, body)
    _exit_now(report.exit_code)


def _lock(lock: DirLock, settings: RunSettings, *, simulated: bool) -> None:
    """The output directory, made and locked; not for a run that cannot start (no key)."""
    if not simulated and settings.api_key is None:
        raise ConfigError(NO_KEY)
    ensure_dir(lock.path.parent)
    lock.acquire()


def _check_not_mixed(out: Path, simulate: bool) -> None:
    """Refuse to mix the simulator's results and the real API's in one directory: a real run
    would take the simulator's test videos as done, and a simulated one would find the real
    generations unknown to its simulator and record them lost."""
    if not _has_records(out):
        return
    simulated = (out / SIM_STATE).is_dir()
    if simulate and not simulated:
        raise ConfigError(
            f"{out} holds results of the real API: a --simulate run must not mix the "
            "simulator's test videos into them; give it another --out"
        )
    if simulated and not simulate:
        raise ConfigError(
            f"{out} holds a --simulate run's results: a real run there would take the "
            f"simulator's test videos as done; use another --out, or delete {out} first"
        )


def _final_report(m: Manifest, report: RunReport) -> Path | None:
    """The morning report; a run never fails because of it."""
    try:
        return write_report(report.out_dir, m.jobs, states=report.states)
    except OSError as exc:  # a view of the results, not a result: log it and go on
        where = exc.filename or report.out_dir / REPORT_NAME
        log.error("report failed: cannot write %s: %s", where, exc.strerror or exc)
        return None
    except Exception as exc:
        log.error("report failed: %s: %s", type(exc).__name__, exc)
        return None


async def _run_async(
    m: Manifest,
    settings: RunSettings,
    sim_gen_s: float | None,
    verify: bool,
    observer: Callable[[Snapshot], None] | None,
    lock: DirLock,
) -> RunReport:
    go = functools.partial(
        run,
        m,
        handle_signals=True,
        last_words=_last_words,
        verify=verify,
        observer=observer,
        held_lock=lock,
    )
    if sim_gen_s is None:
        return await go(settings)
    from .simulator import SimConfig, Simulator

    # Generations are journaled beside the run's ledger, so an interrupted demo resumes; the
    # usage logs it restores belong to a digest of the key, so the key stays the same.
    key = SIM_KEY
    state = settings.out_dir / SIM_STATE
    # Made before the ledger holds anything: it is what marks the directory as simulated
    # (_check_not_mixed), even for a run stopped before the simulator journaled a request.
    state.mkdir(parents=True, exist_ok=True)
    config = SimConfig(api_keys=None, gen_time_mean_s=sim_gen_s, state_dir=state)
    async with Simulator(config) as server:
        log.info("simulator listening on %s (videos on %s)", server.base_url, server.cdn_url)
        return await go(settings.with_overrides(base_url=server.base_url, api_key=Secret(key)))


@main.command("plan")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory whose ledger to compare with (default: output/<stem>).",
)
@click.option("--retry-failed", is_flag=True, help="Show failed jobs as to be submitted again.")
@click.option(
    "--max-cost",
    type=Finite(min=0),
    help="Show what a cost limit of USD would hold back (overrides settings.max_cost_usd).",
)
def plan_cmd(
    manifest: Path, out_dir: Path | None, retry_failed: bool, max_cost: float | None
) -> None:
    """Validate MANIFEST and show what a run would do. Sends nothing."""
    m = _guard(lambda: load_manifest(manifest))
    for w in m.warnings:
        click.echo(f"warning: {w}", err=True)
    out = out_dir or _default_out(manifest)
    if out_dir is None and (earlier := _ledger_elsewhere(manifest, out, (j.id for j in m.jobs))):
        click.echo(
            f"warning: {out} has no ledger, but {earlier} holds earlier runs of {manifest.name}:"
            f" compare with it by --out {earlier}",
            err=True,
        )
    states = _guard(lambda: load_states(out))
    m = adopt_recorded_manifest(m, states)
    # The run's own precedence (command line over manifest); no environment: plan sends nothing.
    cli = {"retry_failed": retry_failed or None, "max_cost_usd": max_cost}
    s = _guard(lambda: resolve_settings(out, m.settings, cli, env={}))
    plans, warnings = plan_run(m.jobs, states, out, retry_failed=s.retry_failed)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if found := unrecorded_results(out, m.jobs, states):
        click.echo(f"warning: no ledger records in {out}, but {found}: `run` refuses", err=True)
    columns = ("job", "model", "standing", "action", "why")
    _table(f"plan for {manifest} -> {out}", columns, plan_rows(plans))
    for line in plan_summary(plans, s.prices, s.max_cost_usd):
        click.echo(line)


@main.command("schema")
def schema_cmd() -> None:
    """Print the manifest's JSON Schema (for editors; see jobs/manifest.schema.json)."""
    from .schema import schema_text

    click.echo(schema_text(), nl=False)


def _need_dir(directory: Path) -> None:
    """Refuse a folder no run wrote: "0 jobs" there would read as a run that did nothing."""
    if not directory.is_dir():
        click.echo(f"veobatch: {directory} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    if os.path.lexists(directory / LEDGER_NAME):  # not a file: the ledger's reader names it
        return
    found = sorted(p.parent for p in directory.glob(f"*/{LEDGER_NAME}"))
    hint = f"; run output folders in it: {', '.join(map(str, found[:5]))}" if found else ""
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    what = f"has no {LEDGER_NAME}: not a veobatch run's output folder"
    click.echo(f"veobatch: {directory} {what}{hint}{more}", err=True)
    sys.exit(EXIT_USAGE)


@main.command("status")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the results document as JSON.")
@click.option("--retry-failed", is_flag=True, help="Show what a rerun with --retry-failed does.")
@click.option(
    "--resubmit-uncertain", is_flag=True, help="Show what a rerun with --resubmit-uncertain does."
)
def status_cmd(
    directory: Path, as_json: bool, retry_failed: bool, resubmit_uncertain: bool
) -> None:
    """Show the jobs recorded in an output DIRECTORY, and what a rerun would do with each."""
    _need_dir(directory)
    states = _guard(lambda: load_states(directory))
    results: dict[str, Any] = _guard(lambda: current_results(directory, states))
    reruns = rerun_rows(
        results, states, directory, retry_failed=retry_failed, resubmit_uncertain=resubmit_uncertain
    )
    if as_json:
        for row, (action, why) in zip(results.get("jobs", []), reruns, strict=True):
            row["rerun"] = {"action": action, "reason": why}
        click.echo(json.dumps(results, indent=2))
        return
    _table(
        f"jobs in {directory}",
        ("job", "status", "model", "generation", "file / error", "a rerun would"),
        [(*row, action) for row, (action, _) in zip(status_rows(results), reruns, strict=True)],
    )
    click.echo(status_counts(results))
    click.echo(rerun_summary(reruns))


@main.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def report_cmd(directory: Path) -> None:
    """Write DIRECTORY/report.html: a card per job with a thumbnail, filters, inline videos."""
    _need_dir(directory)
    _setup_logging(-1)  # warnings only (a thumbnail cache that cannot be written)
    path = _guard(lambda: write_report(directory))
    click.echo(str(path))


@main.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8750, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--cdn-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port of the stand-in video host (default: any free port).",
)
@click.option(
    "--gen-time",
    "gen_time_s",
    default=3.0,
    show_default=True,
    type=Finite(min=0),
    help="Mean generation time in seconds.",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    help="Accepted API key (repeatable; default: any non-empty Bearer token).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="NAME=VALUE",
    help="Inject a fault, e.g. create_5xx_after=0.05 (repeatable; see README).",
)
@click.option(
    "--gen-spread",
    default=0.3,
    show_default=True,
    type=Finite(min=0),
    help="Coefficient of variation of the generation time.",
)
@click.option("--tiny-videos", is_flag=True, help="Serve 160x90, 1 s videos (fast tests).")
@click.option(
    "--video-fps",
    default=24,
    show_default=True,
    type=click.IntRange(min=1),
    help="Frame rate of the served videos (1 keeps full-size videos small).",
)
@click.option(
    "--blob-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also serve the files of this folder at <video host>/blobs/<name>.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Journal generations here: a simulator restarted with it still knows them, "
    "and serves their videos on the same video port.",
)
def simulate_cmd(
    host: str,
    port: int,
    cdn_port: int,
    gen_time_s: float,
    keys: tuple[str, ...],
    seed: int,
    faults: tuple[str, ...],
    gen_spread: float,
    tiny_videos: bool,
    video_fps: int,
    blob_dir: Path | None,
    state_dir: Path | None,
) -> None:
    """Serve the built-in API simulator until stopped (Ctrl-C or SIGTERM: exit 0)."""
    _setup_logging(0)
    from .simulator import Faults, SimConfig, serve

    try:
        fault_config = Faults.parse(list(faults), seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    config = SimConfig(
        api_keys=frozenset(keys) or None,
        gen_time_mean_s=gen_time_s,
        gen_time_spread=gen_spread,
        seed=seed,
        faults=fault_config,
        video_mode="tiny" if tiny_videos else "faithful",
        video_fps=video_fps,
        blob_dir=blob_dir,
        state_dir=state_dir,
    )
    stopped_by = _guard(lambda: _arun(_serve_until_stopped, serve, config, host, port, cdn_port))
    log.info("simulator stopped by %s", stopped_by)


async def _serve_until_stopped(serve: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> str:
    """Serve until a stop signal, and name it: stopping is how a simulator's work ends, so
    it is exit 0, not the run's 75 ("interrupted; run again")."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, *args)
            async for received in signals:
                name = signal.Signals(received).name
                tg.cancel_scope.cancel()
                break
    ignore_stop_signals()  # a second signal while the listeners close changes nothing
    return name
