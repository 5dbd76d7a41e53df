"""The download queue: its order as tables of fetches, then the shell the workers wait on."""

from __future__ import annotations

import anyio
import pytest

from veobatch.download_queue import EARLY_S, DownloadQueue, Fetch, FetchQueue


def drain(q: FetchQueue, now: float) -> list[str]:
    out = []
    while (f := q.pop(now)) is not None:
        out.append(f.job_id)
    return out


@pytest.mark.parametrize(
    ("fetches", "order"),
    [
        # Plain URLs: the oldest first, whatever order they were queued in.
        ([("a", 3.0, False), ("b", 1.0, False), ("c", 2.0, False)], ["b", "c", "a"]),
        # A refreshed URL goes before the whole backlog, however much older that is.
        ([("a", 1.0, False), ("b", 2.0, False), ("r", 9.0, True)], ["r", "a", "b"]),
        # Among refreshed URLs, the oldest first too.
        ([("r2", 9.0, True), ("a", 1.0, False), ("r1", 8.0, True)], ["r1", "r2", "a"]),
        # Equal ages go in the order they came.
        ([("x", 1.0, False), ("y", 1.0, False), ("z", 1.0, False)], ["x", "y", "z"]),
    ],
)
def test_refreshed_urls_first_then_the_oldest(
    fetches: list[tuple[str, float, bool]], order: list[str]
) -> None:
    q = FetchQueue()
    for job, url_at, refreshed in fetches:
        q.put(Fetch(job, f"https://cdn/{job}", url_at, refreshed))
    assert len(q) == len(fetches)
    assert drain(q, now=0.0) == order and len(q) == 0


def test_a_retry_waits_for_its_time_then_takes_its_place_by_rank() -> None:
    q = FetchQueue()
    q.put(Fetch("old", "u", url_at=1.0, attempt=1), not_before=10.0)  # backing off until 10
    q.put(Fetch("new", "u", url_at=5.0))
    assert q.next_at() == 10.0 and len(q) == 2
    assert q.pop(now=9.0) == Fetch("new", "u", 5.0)  # the retry is not handed out early
    assert q.pop(now=9.9) is None
    q.put(Fetch("newer", "u", url_at=6.0))
    q.put(Fetch("fresh", "u", url_at=7.0, refreshed=True))
    # Its wait over, the retry's old URL goes before the newer one queued meanwhile, and a
    # refreshed URL still before both.
    assert drain(q, now=10.0) == ["fresh", "old", "newer"]
    assert q.next_at() is None


def test_retries_due_at_once_keep_their_rank_not_their_due_time() -> None:
    q = FetchQueue()
    q.put(Fetch("late-due", "u", url_at=1.0), not_before=3.0)
    q.put(Fetch("early-due", "u", url_at=2.0), not_before=2.0)
    assert q.next_at() == 2.0
    assert drain(q, now=5.0) == ["late-due", "early-due"]


async def test_a_waiting_worker_gets_a_fetch_put_later() -> None:
    q = DownloadQueue(anyio.current_time)
    got: list[Fetch] = []

    async def worker() -> None:
        got.append(await q.get())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await anyio.wait_all_tasks_blocked()
            q.put(Fetch("a", "u", 0.0))
    assert [f.job_id for f in got] == ["a"] and len(q) == 0


async def test_a_retry_is_handed_out_at_its_time_and_not_before() -> None:
    q = DownloadQueue(anyio.current_time)
    delay = 0.2
    with anyio.fail_after(5):
        start = anyio.current_time()
        q.put(Fetch("retry", "u", 0.0, attempt=1), delay_s=delay)
        q.put(Fetch("other", "u", 1.0))
        first = await q.get()  # the other one at once: the retry's wait holds nobody
        assert first.job_id == "other" and anyio.current_time() - start < delay
        second = await q.get()
    assert second.job_id == "retry"
    assert anyio.current_time() - start >= delay - EARLY_S


async def test_a_fetch_put_while_workers_wait_on_a_retry_is_not_held_behind_it() -> None:
    q = DownloadQueue(anyio.current_time)
    got: list[str] = []

    async def worker() -> None:
        got.append((await q.get()).job_id)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            q.put(Fetch("retry", "u", 0.0, attempt=1), delay_s=60)
            tg.start_soon(worker)
            await anyio.wait_all_tasks_blocked()  # napping until the retry is due, a minute
            q.put(Fetch("now", "u", 1.0))
    assert got == ["now"] and len(q) == 1
