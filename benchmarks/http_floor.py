"""The HTTP floor: a benchmark run's requests through bare aiohttp, and nothing else.

Usage: http_floor.py BASE_URL KEY JOBS POLLS_PER_JOB CONCURRENCY

Each job sends one create, then polls (POLLS_PER_JOB on average, so the total matches the
run's), then reads its video into memory; at most CONCURRENCY jobs at once. No ledger, no
files, no poll schedule, no checks: what aiohttp and the kernel's loopback cost on their own,
on the same event loop the runner uses. The parent measures this process's CPU (wait4) and
sets it beside the runner's: a lower bound, since requests sent back to back share loop
turns that a real run's spread-out polls do not. Prints the request counts as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import quote

import aiohttp

BODY = {
    "model": "google/veo-3.1-t2v-fast",
    "prompt": "benchmark shot",
    "duration": 4,
    "generate_audio": False,
}


async def main(base: str, key: str, jobs: int, polls_per_job: float, concurrency: int) -> None:
    total_polls = round(polls_per_job * jobs)
    base_polls, extra = divmod(total_polls, jobs)
    counts = {"creates": 0, "polls": 0, "downloads": 0}
    auth = {"Authorization": f"Bearer {key}"}
    slots = asyncio.Semaphore(concurrency)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as api,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as cdn,
    ):

        async def job(i: int) -> None:
            async with slots:
                body = json.dumps({**BODY, "prompt": f"benchmark shot {i}"}).encode()
                headers = {**auth, "Content-Type": "application/json"}
                async with api.post(
                    f"{base}/v2/video/generations", data=body, headers=headers
                ) as r:
                    gen = json.loads(await r.read())["id"]
                counts["creates"] += 1
                url = None
                polls = base_polls + (1 if i < extra else 0)
                while polls > 0 or url is None:  # poll on until done if the count runs out
                    poll_url = f"{base}/v2/video/generations?generation_id={quote(gen, safe='')}"
                    async with api.get(poll_url, headers=auth) as r:
                        doc = json.loads(await r.read())
                    counts["polls"] += 1
                    polls -= 1
                    if doc.get("status") == "completed":
                        url = doc["video"]["url"]
                    elif url is None and polls <= 0:
                        await asyncio.sleep(0.01)
                async with cdn.get(url) as r:
                    await r.read()
                counts["downloads"] += 1

        await asyncio.gather(*(job(i) for i in range(jobs)))
    print(json.dumps(counts))


def run() -> None:
    base, key, jobs, polls, concurrency = sys.argv[1:6]
    coro = main(base, key, int(jobs), float(polls), int(concurrency))
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    run()
