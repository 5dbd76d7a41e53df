"""Operator-facing robustness of `veobatch run`: locks, damaged ledgers, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import start_cli

from veobatch.fsutil import DirLock
from veobatch.ledger import parse_journal, replay

MANIFEST = "version: 1\njobs:\n" + "".join(
    f"  - id: j{i}\n    model: google/veo-3.1-t2v-fast\n    prompt: clip {i}\n    duration: 4\n"
    for i in range(8)
)


def cli(*args: str, base_url: str = "http://127.0.0.1:9") -> subprocess.Popen[str]:
    return start_cli(*args, env={"AIMLAPI_KEY": "k", "AIMLAPI_BASE_URL": base_url})


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that counts connections: proof that nothing was sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)
        yield s


def connections(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = s.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_second_run_on_a_locked_directory_exits_75(tmp_path: Path, listener: socket.socket) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST)
    out = tmp_path / "out"
    out.mkdir()
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with DirLock(out):
        proc = cli("run", str(m), "--out", str(out), base_url=base)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75
    assert "another veobatch run" in err and str(os.getpid()) in err
    assert connections(listener) == 0
    listener.close()


def test_damaged_ledger_refuses_to_run_and_sends_nothing(
    tmp_path: Path, listener: socket.socket
) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST)
    out = tmp_path / "out"
    out.mkdir()
    good = '{"t":1,"ev":"intent","job":"j0","crid":"c","key":"k"}\n'
    (out / "ledger.jsonl").write_text(good + "{damaged\n" + good.replace("j0", "j1"))
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proc = cli("run", str(m), "--out", str(out), base_url=base)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "line 2 is damaged" in err and "Traceback" not in err
    assert connections(listener) == 0
    listener.close()


@pytest.mark.slow
def test_two_signals_exit_at_once_with_a_consistent_ledger(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST.replace("version: 1\n", "version: 1\nsettings:\n  concurrency: 4\n"))
    out = tmp_path / "out"
    args = ("run", str(m), "--simulate", "--sim-gen-time", "2", "--out", str(out))
    proc = cli(*args)
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 30
    while not (ledger.exists() and '"ev":"submitted"' in ledger.read_text()):
        assert time.monotonic() < deadline, "nothing submitted within 30 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    # cron mails stdout: it says why, whether the second signal cut the shutdown short or not
    assert "again to resume" in out, out
    replay(parse_journal(ledger.read_bytes()).records)  # consistent: replays cleanly
    proc = cli(*args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    submitted = [
        json.loads(x)["job"] for x in ledger.read_text().splitlines() if '"ev":"submitted"' in x
    ]
    assert sorted(submitted) == sorted(f"j{i}" for i in range(8))  # each paid for once


@pytest.mark.parametrize("after_s", [0.05, 0.2, 0.4])
def test_two_signals_close_together_while_starting_exit_75(tmp_path: Path, after_s: float) -> None:
    # The first one decides the exit; a second, 5 ms later, arrived during the interpreter's
    # finalization and killed the process by the signal (-15), so cron's "rerun on 75" did not.
    m = tmp_path / "m.yaml"
    m.write_text(MANIFEST)
    proc = cli("run", str(m), "--out", str(tmp_path / "out"), "--no-report")
    # No process can answer a signal before its handler exists: the interpreter's own start
    # comes first (slow under load). From the moment the kernel says it is caught:
    deadline = time.monotonic() + 10
    while not catches(proc.pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "SIGTERM never caught"
        time.sleep(0.002)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err


def catches(pid: int, sig: signal.Signals) -> bool:
    """Has the process a handler for ``sig`` (its SigCgt mask in /proc)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    caught = int(fields.get("SigCgt", "0").strip(), 16)
    return bool(caught >> (sig - 1) & 1)
