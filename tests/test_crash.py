"""Never pay twice, never lose a video: kill -9 at random moments against a faulty API.

The simulator runs in its own process (it outlives every kill), with 5xx answers after
creation, dropped connections after creation, 5xx before creation, poll faults, 429s and
truncated downloads. The runner is killed with SIGKILL 20+ times, then run to completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_process import start_cli

ROOT = Path(__file__).resolve().parent.parent
CANARY = "canary-9b1f0e7c4d2a6e83"
JOBS = 200
KILLS = 22
FAULTS = [
    "create_5xx_after=0.05",
    "create_drop_after=0.05",
    "create_5xx_before=0.03",
    "create_429=0.03",
    "poll_5xx=0.03",
    "truncate_download=0.05",
    "retry_after_s=0.2",
]

pytestmark = pytest.mark.slow


@pytest.fixture
def simulator() -> Iterator[str]:
    # Port 0, read back from its own log line: a port picked here and bound there could be
    # taken by another process in between.
    args = ["simulate", "--port", "0", "--gen-time", "1.0", "--tiny-videos", "--key", CANARY]
    args += ["--seed", "7"]
    for fault in FAULTS:
        args += ["--fault", fault]
    proc = subprocess.Popen(
        [sys.executable, "-m", "veobatch", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    drain = threading.Thread(target=proc.stderr.read, daemon=True)  # a full pipe would block it
    try:
        base = _listening_on(proc)
        drain.start()
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if drain.is_alive():
            drain.join(timeout=10)  # at the end of the pipe now
        proc.stderr.close()


def _listening_on(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if found := re.search(r"simulator API on (http://[^,\s]+)", line):
            return found[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the simulator did not say where it listens within 20 s")


def write_manifest(path: Path) -> None:
    lines = ["version: 1", "settings:", "  concurrency: 25", "jobs:"]
    models = ["google/veo-3.1-t2v-fast", "google/veo-3.1-t2v"]
    for i in range(JOBS):
        lines += [
            f"  - id: job-{i:03d}",
            f"    model: {models[i % 2]}",
            f"    prompt: shot number {i}",
            "    duration: 4",
        ]
    path.write_text("\n".join(lines) + "\n")


def runner(manifest: Path, out: Path, base: str) -> subprocess.Popen[str]:
    env = {"AIMLAPI_KEY": CANARY, "AIMLAPI_BASE_URL": base}
    return start_cli("run", str(manifest), "--out", str(out), "--logs-grace", "2", env=env)


def sim_logs(base: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    offset = 0
    while True:
        req = urllib.request.Request(
            f"{base}/v2/logs?limit=100&offset={offset}",
            headers={"Authorization": f"Bearer {CANARY}"},
        )
        page = json.loads(urllib.request.urlopen(req, timeout=10).read())
        rows += page["data"]
        if not page["pagination"]["has_more"]:
            return rows
        offset += 100


def stats(base: str) -> dict[str, Any]:
    return dict(json.loads(urllib.request.urlopen(base + "/_sim/stats", timeout=10).read()))


def test_kill_loop_never_pays_twice_and_loses_nothing(simulator: str, tmp_path: Path) -> None:
    manifest, out = tmp_path / "night.yaml", tmp_path / "out"
    write_manifest(manifest)
    rng = random.Random(int(os.environ.get("VEOBATCH_KILL_SEED", "20261121")))
    outputs: list[str] = []
    for _ in range(KILLS):
        proc = runner(manifest, out, simulator)
        time.sleep(rng.uniform(0.3, 2.5))
        proc.send_signal(signal.SIGKILL)
        so, se = proc.communicate(timeout=30)
        outputs += [so, se]
    proc = runner(manifest, out, simulator)
    so, se = proc.communicate(timeout=300)
    outputs += [so, se]
    assert proc.returncode == 0, se[-3000:]
    assert so.startswith(f"veobatch: {JOBS} jobs: {JOBS} done, 0 failed, 0 uncertain")

    # Zero generations created twice for one job: count the API's own usage log.
    created = Counter(
        row["client_request_id"].split(":")[1]
        for row in sim_logs(simulator)
        if row["status"] == "succeeded"
    )
    assert len(created) == JOBS
    assert max(created.values()) == 1, created.most_common(3)

    # Every job's video is on disk once, whole, and matches the ledger's hash.
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["done"] == JOBS
    gen_ids = set()
    for row in results["jobs"]:
        data = (out / row["file"]).read_bytes()
        assert len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
        assert data[4:8] == b"ftyp"
        gen_ids.add(row["generation_id"])
    assert len(gen_ids) == JOBS
    assert not list(out.glob("*.part"))

    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    events = Counter(r["ev"] for r in ledger)
    print(f"\nkill loop: {KILLS} kills, ledger events {dict(events)}, simulator {stats(simulator)}")

    # A rerun sends zero POSTs.
    snapshot = stats(simulator)
    before = snapshot["creates_ok"] + snapshot["creates_rejected"]
    proc = runner(manifest, out, simulator)
    so, se = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "0 submitted this run" in so
    after = stats(simulator)
    assert after["creates_ok"] + after["creates_rejected"] == before

    # The key never reached a file or an output, nor the video host.
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert not any(CANARY in text for text in [*outputs, so, se])
    assert stats(simulator)["cdn_auth_headers_seen"] == 0
