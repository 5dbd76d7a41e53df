"""Stream one URL with veobatch's downloader in a fresh process; print seconds and RSS growth.

Usage: download_probe.py URL OUT_DIR API_BASE_URL
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import aiohttp
import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from veobatch.downloader import READ_BUFFER_BYTES, download


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main(url: str, out: Path, api: str) -> None:
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    # The video session of a run (session._http): no compression, the same read buffer.
    headers = {"Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(headers=headers, read_bufsize=READ_BUFFER_BYTES) as session:
        baseline = rss_mb()
        t0 = time.monotonic()
        got = await download(session, url, out, "big", api_base_url=api, max_bytes=8 << 30)
        seconds = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / got.file).unlink()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": got.bytes,
                "rss_baseline_mb": round(baseline, 1),
                "rss_peak_mb": round(peak, 1),
                "rss_growth_mb": round(max(0.0, peak - baseline), 1),
            }
        )
    )


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], Path(sys.argv[2]), sys.argv[3])
