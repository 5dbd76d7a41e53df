"""fsutil: the batched disk threads that take blocking file work off the event loop."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from veobatch.fsutil import DiskThreads, to_thread


async def test_runs_off_the_loop_and_returns_the_value() -> None:
    disk = DiskThreads()
    try:
        loop_thread = threading.get_ident()
        assert await disk(threading.get_ident) != loop_thread
        assert await disk(lambda: 6 * 7) == 42
    finally:
        disk.close()


async def test_an_exception_reaches_the_caller() -> None:
    disk = DiskThreads()

    def boom() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space left"):
            await disk(boom)
        assert await disk(lambda: "still working") == "still working"
    finally:
        disk.close()


async def test_calls_within_the_linger_share_one_hand_over() -> None:
    disk = DiskThreads(linger_s=0.05)
    threads: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(20):

                async def one() -> None:
                    threads.append(await disk(threading.get_ident))

                tg.start_soon(one)
        assert len(threads) == 20
        assert disk.calls == 20
        assert disk.batches == 1
        assert len(set(threads)) == 1  # one thread took the whole batch
    finally:
        disk.close()


async def test_without_linger_the_queue_goes_at_once() -> None:
    disk = DiskThreads(linger_s=30.0)
    try:
        with anyio.fail_after(5):
            assert await disk(lambda: "now", linger=False) == "now"
    finally:
        disk.close()


async def test_a_call_already_queued_finishes_even_when_its_caller_is_cancelled() -> None:
    disk = DiskThreads(linger_s=0.0)
    finished = threading.Event()

    def slow_write() -> None:
        time.sleep(0.2)
        finished.set()

    try:
        with anyio.move_on_after(0.05) as scope:
            await disk(slow_write)
        # The caller waited the write out (no half-written file behind its back) and then
        # saw its cancellation.
        assert finished.is_set()
        assert scope.cancel_called
    finally:
        disk.close()


async def test_close_runs_what_was_queued_and_refuses_more() -> None:
    disk = DiskThreads(linger_s=30.0)  # the hand-over would come long after close
    results: list[str] = []

    async def queued() -> None:
        results.append(await disk(lambda: "written"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(queued)
        await anyio.sleep(0.01)
        disk.close()
    assert results == ["written"]
    with pytest.raises(RuntimeError, match="closed"):
        await disk(lambda: None)


async def test_busy_threads_take_later_calls_without_a_new_thread_each() -> None:
    disk = DiskThreads(threads=2, linger_s=0.0)
    seen: set[int] = set()

    def work() -> None:
        seen.add(threading.get_ident())
        time.sleep(0.005)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(disk, work)
        assert len(seen) <= 2
        assert disk.calls == 40
        assert disk.batches < 40
    finally:
        disk.close()


async def test_the_plain_offload_matches() -> None:
    assert await to_thread(lambda: 7) == 7
    assert await to_thread(lambda: 8, linger=False) == 8


async def test_a_stop_iteration_fails_its_own_call_and_not_the_rest_of_the_batch() -> None:
    disk = DiskThreads(linger_s=0.02)
    got: dict[str, object] = {}

    def stops() -> None:
        raise StopIteration  # an asyncio future refuses to carry this one as it is

    async def call(name: str, fn: Callable[[], object]) -> None:
        try:
            got[name] = await disk(fn)
        except RuntimeError as exc:
            got[name] = exc

    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "before", lambda: 1)
                tg.start_soon(call, "stops", stops)
                tg.start_soon(call, "after", lambda: 2)
        assert got["before"] == 1 and got["after"] == 2
        assert isinstance(got["stops"], RuntimeError)
        assert isinstance(got["stops"].__cause__, StopIteration)
    finally:
        disk.close()


async def test_calls_without_linger_run_first_in_their_batch_and_come_back_first() -> None:
    disk = DiskThreads(threads=1, linger_s=0.05)
    order: list[str] = []
    back: list[str] = []

    def slow_file() -> None:
        time.sleep(0.05)
        order.append("file")

    def commit() -> None:
        order.append("commit")

    async def call(name: str, fn: Callable[[], None], linger: bool) -> None:
        await disk(fn, linger=linger)
        back.append(name)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call, "file", slow_file, True)
            await anyio.sleep(0.01)  # the files linger; the commit hands the queue over now
            tg.start_soon(call, "commit", commit, False)
        assert order == ["commit", "file", "file", "file"]
        assert back[0] == "commit"
        assert disk.batches == 1
    finally:
        disk.close()


async def test_queued_work_fails_rather_than_hangs_when_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    disk = DiskThreads(linger_s=0.0)
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", cannot_start)
        with anyio.fail_after(5), pytest.raises(OSError, match="cannot start a disk thread"):
            await disk(lambda: 1)
    assert await disk(lambda: 2) == 2  # threads can start again: back to normal
    disk.close()


def test_an_atomically_written_file_is_readable_as_the_umask_says(tmp_path: Path) -> None:
    # results.json and report.html were 0600 (mkstemp's mode) beside 0644 videos: a
    # monitoring user could read the report's videos but not the results.
    from veobatch.fsutil import _UMASK, atomic_write_bytes

    target = tmp_path / "results.json"
    atomic_write_bytes(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_UMASK


def test_an_atomic_writer_replaces_the_file_only_when_its_block_ends_well(tmp_path: Path) -> None:
    # The report is streamed into it card by card: a reader sees yesterday's page until the
    # whole new one is there, and a failure midway leaves yesterday's and no temporary file.
    import os

    from veobatch.fsutil import _UMASK, OWN_TEMPS, atomic_writer

    target = tmp_path / "report.html"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_writer(target) as f:
        f.write(b"new, half")
        f.flush()
        (tmp,) = [n for n in os.listdir(tmp_path) if n != "report.html"]
        assert OWN_TEMPS.fullmatch(tmp)  # a name remove_stale_temps knows
        assert target.read_bytes() == b"old"
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["report.html"] and target.read_bytes() == b"old"
    with atomic_writer(target) as f:
        for part in (b"new, ", b"whole"):
            f.write(part)
    assert os.listdir(tmp_path) == ["report.html"] and target.read_bytes() == b"new, whole"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_UMASK


def test_stale_temporary_files_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    # A kill -9 mid-write left '.results.json.<8>.tmp' (512 KB at 2,000 jobs) for good.
    import os
    import time

    from veobatch.fsutil import remove_stale_temps

    names = [".results.json.ab12cd_9.tmp", ".report.html.zz99yy88.tmp"]
    keep = ["results.json", "job.tmp", ".results.json.short.tmp", "a.mp4.part", ".veobatch.lock"]
    keep += ["tmpab12cd_9.tmp", ".notes.txt.ab12cd_9.tmp"]  # not veobatch's: --out may be shared
    for name in names + keep + ["fresh"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".results.json.fresh000.tmp").write_bytes(b"in progress")
    old = time.time() - 3600
    for name in names + keep:
        os.utime(tmp_path / name, (old, old))
    assert remove_stale_temps(tmp_path, time.time()) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*keep, "fresh", ".results.json.fresh000.tmp"])  # a write may be going on
    assert remove_stale_temps(tmp_path / "missing", time.time()) == 0


# -- a shared output folder: its entries are never followed, FIFOs never opened -------------


def test_only_a_regular_file_is_opened_and_what_else_stands_there_is_said(tmp_path: Path) -> None:
    import os

    from fifos import fifo_at

    from veobatch.fsutil import NotRegularFileError, entry_problem, open_regular

    regular = tmp_path / "a.mp4"
    regular.write_bytes(b"video")
    os.close(open_regular(regular))
    (tmp_path / "link.mp4").symlink_to(regular)
    (tmp_path / "dir.mp4").mkdir()
    assert entry_problem(regular) is None and entry_problem(tmp_path / "none.mp4") is None
    assert entry_problem(tmp_path / "link.mp4") == f"a symbolic link (to {regular})"
    assert entry_problem(tmp_path / "dir.mp4") == "a directory"
    with fifo_at(tmp_path / "fifo.mp4") as freed:
        with pytest.raises(NotRegularFileError, match="not a regular file but a FIFO"):
            open_regular(tmp_path / "fifo.mp4")
        assert entry_problem(tmp_path / "fifo.mp4") == "a FIFO (named pipe)"
    assert not freed


@pytest.mark.parametrize("what", ["link", "dangling link", "fifo", "directory"])
def test_a_lock_that_is_not_a_file_is_refused_never_followed(tmp_path: Path, what: str) -> None:
    # --out may be a shared folder: a lock planted as a link truncated the file it pointed to
    # (and a dangling one created it), outside the folder.
    import os

    from veobatch.errors import ConfigError
    from veobatch.fsutil import LOCK_NAME, DirLock

    victim = tmp_path / "victim.conf"
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    if what == "link":
        victim.write_text("precious config")
        lock.symlink_to(victim)
    elif what == "dangling link":
        lock.symlink_to(victim)
    elif what == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    kind = {"fifo": "a FIFO", "directory": "a directory"}.get(what, "a symbolic link")
    with pytest.raises(ConfigError, match=f"is {kind}.*not veobatch's lock file"):
        DirLock(out).acquire()
    if what == "link":
        assert victim.read_text() == "precious config"
    else:
        assert not victim.exists()


def test_an_output_folder_reached_through_a_link_is_locked_as_usual(tmp_path: Path) -> None:
    from veobatch.fsutil import DirLock

    real = tmp_path / "data" / "videos"
    real.mkdir(parents=True)
    (tmp_path / "out").symlink_to(real)  # --out /data/videos, /data a link: legitimate
    with DirLock(tmp_path / "out") as lock:
        assert lock.held and (real / ".veobatch.lock").is_file()


def test_a_lock_whose_pid_cannot_be_written_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk said only "system error: No space left on device", naming no file.
    import errno
    import os

    from veobatch import fsutil
    from veobatch.errors import ConfigError
    from veobatch.fsutil import DirLock

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = DirLock(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(fsutil.os, "write", full)
        with pytest.raises(ConfigError) as raised:
            lock.acquire()
    assert str(raised.value) == f"cannot write {lock.path}: No space left on device"
    assert not lock.held
    with DirLock(tmp_path):  # the failed attempt let go of the file
        assert (tmp_path / ".veobatch.lock").read_text() == f"{os.getpid()}\n"
