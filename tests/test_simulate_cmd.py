"""`veobatch simulate` as a process: how it stops, and what a restart with --state-dir keeps."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cli_process import start_cli

pytestmark = pytest.mark.slow


def _serve(*args: str, tmp: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    env = {"TMPDIR": str(tmp)} if tmp is not None else None
    proc = start_cli(
        "simulate", "--port", "0", "--tiny-videos", "--gen-time", "0.2", *args, env=env
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if found := re.search(r"simulator API on (http://[^,\s]+)", line):
            return proc, found[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.communicate()
    pytest.fail("the simulator did not say where it listens within 20 s")


def _call(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": "Bearer k"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, object] = json.load(resp)
        return doc


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_simulator_with_exit_0(sig: signal.Signals) -> None:
    # Stopping is how a simulator's work ends: not "interrupted; run again" and exit 75.
    proc, _ = _serve()
    code, err = _stop(proc, sig)
    assert code == 0, err
    assert f"simulator stopped by {sig.name}" in err and "run again" not in err


def test_a_stopped_simulator_leaves_no_temporary_folder(tmp_path: Path) -> None:
    # Its video cache went with the listeners' cleanup, which a stop signal cancels: every
    # benchmark or test run left a veobatch-sim-* folder behind in the temporary directory.
    proc, base = _serve(tmp=tmp_path)
    try:
        created = _call(
            f"{base}/v2/video/generations", {"model": "google/veo-3.1-t2v", "prompt": "x"}
        )
        assert created["id"] and list(tmp_path.iterdir())
    finally:
        code, err = _stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []


def test_a_simulator_restarted_with_its_state_dir_still_knows_its_generations(
    tmp_path: Path,
) -> None:
    state = str(tmp_path)
    proc, base = _serve("--state-dir", state)
    try:
        created = _call(
            f"{base}/v2/video/generations", {"model": "google/veo-3.1-t2v", "prompt": "x"}
        )
    finally:
        code, err = _stop(proc, signal.SIGTERM)
    assert code == 0, err
    time.sleep(0.3)  # past its generation time
    proc, base = _serve("--state-dir", state)
    try:
        polled = _call(f"{base}/v2/video/generations?generation_id={created['id']}")
    finally:
        _stop(proc, signal.SIGTERM)
    assert polled["id"] == created["id"] and polled["status"] == "completed"
