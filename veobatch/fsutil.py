"""Durable file operations: atomic replace, directory fsync, the output-directory lock, and
the threads that do blocking file work for the event loop.

A rename is only durable once the directory holding it is fsynced; every writer that
promises "on disk" goes through here so that rule lives in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol, TypeVar

import anyio
import anyio.to_thread

from .errors import ConfigError, LockedError

LOCK_NAME = ".veobatch.lock"
T = TypeVar("T")


class Offload(Protocol):
    """Runs a blocking call off the event loop: :func:`to_thread` or a :class:`DiskThreads`.
    The call runs to the end even if the caller is cancelled. ``linger=False`` asks for no
    added wait, from a caller that has already waited to gather a batch of its own."""

    def __call__(self, fn: Callable[[], T], /, *, linger: bool = True) -> Awaitable[T]: ...


async def to_thread(fn: Callable[[], T], /, *, linger: bool = True) -> T:
    """The plain offload: one anyio worker-thread call each."""
    return await anyio.to_thread.run_sync(fn)


_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", bool]  # fn, its future, urgent
_Done = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class DiskThreads:
    """Blocking file work (write, fsync, rename) for the event loop, done in batches.

    A call through ``anyio.to_thread`` costs about 100 µs of CPU when calls come one at a time
    (a thread wake-up, a GIL hand-over and an event-loop wake-up, each): a second of CPU per
    10,000 videos. Here the calls that arrive within ``linger_s`` of the first, or while every
    thread is busy, share one wake-up and one hand-back. Calls made without linger (the
    ledger's commits, which other work waits on) run first in their batch and come back
    before the rest. Up to ``threads`` threads, so a slow batch holds up only itself. For the
    asyncio backend, the one veobatch runs on.
    """

    def __init__(self, *, threads: int = 4, linger_s: float = 0.02) -> None:
        self._max_threads = threads
        self._linger_s = linger_s
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Call] = []
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.TimerHandle | None = None  # the pending hand-over of the queue
        self._kick_at = 0.0
        self.batches = 0  # hand-overs so far, for tests and the curious
        self.calls = 0

    async def __call__(self, fn: Callable[[], T], /, *, linger: bool = True) -> T:
        """Run ``fn`` in a worker thread; without ``linger``, hand the queue over now."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        assert self._loop is loop, "one DiskThreads per event loop"
        fut: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("DiskThreads is closed")
            self._queue.append((fn, fut, not linger))
        self.calls += 1
        at = loop.time() + (self._linger_s if linger else 0.0)
        if self._kick is None or at < self._kick_at:
            if self._kick is not None:
                self._kick.cancel()
            self._kick_at = at
            self._kick = loop.call_at(at, self._hand_over)
        # Like anyio.to_thread: once queued, the work is waited for even on cancellation, so
        # the caller never moves on while its file is half-written.
        with anyio.CancelScope(shield=True):
            result = await fut
        return result

    def _hand_over(self) -> None:
        self._kick = None
        with self._cond:
            if not self._queue:
                return  # a busy thread took it
            self.batches += 1
            if self._idle:
                self._cond.notify()
                return
            if len(self._threads) >= self._max_threads:
                return  # every thread is busy: the first to finish takes the whole queue
            t = threading.Thread(target=self._work, name="veobatch-disk", daemon=True)
            try:
                t.start()
            except RuntimeError as exc:  # the process is out of threads
                if self._threads:
                    return  # a live thread takes the queue when it is done
                stranded, self._queue = self._queue, []
                err = OSError(f"cannot start a disk thread: {exc}")
                _deliver([(fut, None, err) for _, fut, _ in stranded])
                return
            self._threads.append(t)

    def _work(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._queue:
                    return  # closed, nothing left
                batch, self._queue = self._queue, []
            urgent = [c for c in batch if c[2]]
            rest = [c for c in batch if not c[2]]
            try:
                for part in (urgent, rest):
                    if part:
                        loop.call_soon_threadsafe(_deliver, _run_all(part))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def close(self) -> None:
        """Let the threads finish what they hold and exit; new calls are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            orphans = [] if self._threads else self._queue
            self._queue = [] if orphans else self._queue
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        for t in self._threads:
            t.join(timeout=10)
        _deliver(_run_all(orphans))  # queued, never handed over: run here rather than drop


def _run_all(calls: list[_Call]) -> list[_Done]:
    done: list[_Done] = []
    for fn, fut, _ in calls:
        try:
            done.append((fut, fn(), None))
        except StopIteration as exc:  # a future cannot carry one (PEP 479 does the same)
            err = RuntimeError("disk work raised StopIteration")
            err.__cause__ = exc
            done.append((fut, None, err))
        except BaseException as exc:  # handed to the caller, whatever it is
            done.append((fut, None, exc))
    return done


def _deliver(done: list[_Done]) -> None:
    for fut, value, exc in done:
        if fut.done():
            continue
        try:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        except BaseException as err:  # never leave the rest of the batch waiting
            if not fut.done():
                fut.set_exception(RuntimeError(f"disk work result undeliverable: {err!r}"))


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _what(path: Path, mode: int) -> str:
    """What a directory entry that is not a regular file is, in words."""
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


class NotRegularFileError(OSError):
    """Something else than a regular file where veobatch expects one of its files (a video, a
    ``.part``, the ledger): never opened, read or followed. ``what`` says what it is."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file but {what}", str(path))
        self.what = what


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at ``path``, or :class:`NotRegularFileError`.

    The output folder may be shared: a symbolic link there is never followed (a write would
    land outside the folder), and a FIFO or device is never opened by name (a FIFO blocks its
    reader for ever, in a thread no signal can end). Looked at first, then opened without
    following or blocking and checked again, for an entry swapped in between."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, _what(path, st.st_mode))
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, _what(path, st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_regular(path: Path) -> bool:
    """Is there a regular file at ``path`` itself (not a link to one)?"""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def entry_problem(path: Path) -> str | None:
    """What stands at ``path`` if it is anything but nothing or a regular file this process
    can read, in words (``a directory``); None otherwise. Opens nothing but a regular file."""
    try:
        os.close(open_regular(path))
    except FileNotFoundError:
        return None
    except NotRegularFileError as exc:
        return exc.what
    except OSError as exc:
        return f"a file veobatch cannot read ({exc.strerror or exc})"
    return None


def create_new(path: Path, mode: int = 0o666) -> int:
    """A write descriptor of a new, empty file at ``path``: what stood there (a stale file, a
    symbolic link planted in a shared folder) is unlinked, never followed or truncated."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()  # once, at import, before any thread could create a file meanwhile


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends without an error, so a reader
    sees the old or the new file, never a mix; written as it comes, so a large file (the
    report) is never held in memory whole. On an error ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes it 0600; the file is an ordinary result, readable as the umask says
            # (a monitoring user reads results.json and report.html like the videos beside them).
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a mix."""
    with atomic_writer(path) as f:
        f.write(data)


# What a kill -9 in the middle of atomic_writer leaves: mkstemp's eight random characters
# after the name it was writing. Only the names veobatch writes: --out may be a shared folder.
OWN_TEMPS = re.compile(r"\.(?:results\.json|report\.html|ledger\.jsonl\S*)\.[a-z0-9_]{8}\.tmp")
ANY_TEMP = re.compile(r"tmp[a-z0-9_]{8}\.tmp")  # in veobatch's own folders (.thumbs)
STALE_TEMP_S = 900.0  # older than any write in progress: a report may be written meanwhile


def remove_stale_temps(
    directory: Path,
    now: float,
    names: re.Pattern[str] = OWN_TEMPS,
    older_than_s: float = STALE_TEMP_S,
) -> int:
    """Remove the temporary files an interrupted atomic write left in ``directory``; how many.

    Only old ones: `veobatch report` takes no lock, and its write in progress must survive."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not names.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > older_than_s:
                os.unlink(entry.path)
                removed += 1
    return removed


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output directory {path} is not writable")
    return path


class DirLock:
    """An exclusive, non-blocking lock on an output directory, released by the OS on any exit.

    flock dies with the process, so a kill -9 never leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise LockedError(
                f"another veobatch run{who} is working on {self.path.parent}; "
                "wait for it to finish or use another --out directory"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk: "No space left on device" alone names no file
            os.close(fd)
            raise ConfigError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd

    def _open(self) -> int:
        """The lock file, made if missing; never through a link or into a FIFO (the folder
        may be shared: a lock that is a link would truncate the file it points to)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError:
            try:
                mode = os.lstat(self.path).st_mode
            except OSError:
                mode = stat.S_IFREG
            if stat.S_ISREG(mode):
                raise  # a file it may not write, say: the system's own words
            raise self._refused(_what(self.path, mode)) from None
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refused(_what(self.path, mode))
        return fd

    def _refused(self, what: str) -> ConfigError:
        return ConfigError(
            f"{self.path} is {what}, not veobatch's lock file: refusing to use it (nothing was"
            " sent); remove it and run again"
        )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
