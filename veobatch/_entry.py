"""The `veobatch` command's entry point: stop signals are caught from the first instant.

Importing the CLI (aiohttp, pydantic, PyAV...) takes a few tenths of a second, before its
own handlers exist; a SIGTERM then would kill the process with the signal instead of exit
75, and a cron line that reruns on 75 would not. Nothing has been written that early, so
exiting 75 is the truth: interrupted, run again. A signal ignored at start (``nohup``)
stays ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

EXIT_INTERRUPTED = 75
# Each means "stop, flush and exit 75": SIGHUP is a closed terminal or a dropped ssh session.
# One ignored when the process started stays ignored: `nohup veobatch run ...` must outlive
# the session it was started from (read at import, before any handler of ours is set).
STOP_SIGNALS = tuple(
    sig
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    if signal.getsignal(sig) is not signal.SIG_IGN
)


class EarlyStop(SystemExit):
    """Exit 75 for a signal the command line's own handling never took: its line is said."""

    def __init__(self, signum: int) -> None:
        super().__init__(EXIT_INTERRUPTED)
        self.signal_name = signal.Signals(signum).name


def _early_stop(signum: int, frame: FrameType | None) -> None:
    ignore_stop_signals()
    line = f"veobatch: interrupted by {signal.Signals(signum).name}; run again\n"
    if wants_json(sys.argv[1:]):
        from .logfmt import exit_record  # only now: nothing but this is loaded this early

        sys.stderr.write(exit_record(line, time.time(), EXIT_INTERRUPTED) + "\n")
    else:
        sys.stderr.write(line)
    if stdout_elsewhere():  # cron's mail, as for every early end (the command line is unread)
        sys.stdout.write(line)
    raise EarlyStop(signum)


def wants_json(args: Sequence[str]) -> bool:
    """Does the unread command line ask for ``--log-format json``? A log collector that reads
    stderr as JSON must get its one line as JSON even this early."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--log-format=json" or (
            arg == "--log-format" and i + 1 < len(args) and args[i + 1] == "json"
        ):
            return True
    return False


def stdout_elsewhere() -> bool:
    """Do stdout and stderr lead to different files (not one terminal, not `2>&1`)?"""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (tests)
        return False
    return (out.st_dev, out.st_ino) != (err.st_dev, err.st_ino)


def ignore_stop_signals() -> None:
    """Once leaving with 75 is decided, a second signal must not change the exit: the
    interpreter's finalization puts back the default action (death by the signal) of every
    handler written in Python, but leaves an ignored signal ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install_early_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _early_stop)


def main() -> None:
    install_early_handlers()
    from .cli import main as cli_main

    cli_main()
