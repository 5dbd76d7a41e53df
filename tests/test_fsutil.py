"""fsutil: the batched disk threads that take blocking file work off the event loop."""

from __future__ import annotations

import threading
import time

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
