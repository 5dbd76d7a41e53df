"""The operator's view through the real CLI: stdout carries only the summary, stderr the
log lines (text or JSON), the report is written and the webhook is told."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from cli_process import start_cli
from local_server import webhook_receiver

MANIFEST = """\
version: 1
jobs:
  - id: one
    model: google/veo-3.1-t2v-fast
    prompt: a cat
    duration: 4
    resolution: 720p
    generate_audio: false
  - id: two
    model: google/veo-3.1-t2v-fast
    prompt: a dog
    duration: 4
    resolution: 720p
    aspect_ratio: "9:16"
"""
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) \S")


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    async with webhook_receiver("/hook/secret") as hook:
        yield hook


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = start_cli(*args)
    out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=120))
    return proc.returncode, out, err


@pytest.mark.slow
async def test_cron_run_text_logs_summary_report_and_webhook(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = webhook
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    args = ("run", str(manifest), "--simulate", "--sim-gen-time", "0.2", "--out", str(out))
    code, stdout, stderr = await run_cli(*args, "--notify", url)
    assert code == 0, stderr
    # stdout: the summary only.
    lines = stdout.splitlines()
    assert lines[0].startswith("veobatch: 2 jobs: 2 done, 0 failed, 0 uncertain")
    assert lines[-1] == f"report: {out / 'report.html'}"
    assert (
        "spend: about $1.20 estimated for 2 creates this run that may be billed; "
        "the API reported $1.20 for 2 of them"
    ) in lines
    assert not any(TEXT_LINE.match(line) for line in lines)
    # stderr: one plain line per event worth knowing, then the progress line.
    err_lines = stderr.splitlines()
    assert err_lines and all(TEXT_LINE.match(line) for line in err_lines), stderr
    for needle in ("submitted job=one gen=", "completed job=two", "done job=one file=one.mp4"):
        assert needle in stderr
    assert re.search(r"INFO progress finished=2/2 pending=0 .* done=2 failed=0", stderr)
    assert "video differs" not in stderr  # the simulator's faithful videos match
    # The report and the webhook.
    assert (out / "report.html").read_text().count('<article class="card') == 2
    assert len(got) == 1 and got[0]["text"] == stdout.rstrip("\n")
    assert got[0]["exit_code"] == 0 and got[0]["counts"]["done"] == 2
    assert "secret" not in stderr.replace(str(tmp_path), "")  # the hook's path is not logged


@pytest.mark.slow
async def test_json_logs_and_a_dead_webhook_do_not_fail_the_run(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
        code, stdout, stderr = await run_cli(
            "run", str(manifest), "--simulate", "--sim-gen-time", "0.2",
            "--out", str(tmp_path / "o"), "--log-format", "json", "--no-report", "--notify", dead,
        )  # fmt: skip
    assert code == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines()]
    assert {"ts", "level", "event", "job", "fields"} <= set(records[0])
    events = [(r["event"], r["job"]) for r in records]
    assert ("submitted", "one") in events and ("done", "two") in events
    failed = [r for r in records if r["event"] == "notification_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error"
    assert stdout.startswith("veobatch: 2 jobs: 2 done") and "report:" not in stdout
    assert not (tmp_path / "o" / "report.html").exists()


@pytest.mark.parametrize(
    ("extra", "code", "why"),
    [
        ((), 75, "another veobatch run"),  # the output directory is locked
        # a directory of the real API's results: no simulated run there
        (("real",), 3, "holds results of the real API"),
    ],
)
async def test_a_run_that_aborts_still_tells_the_webhook(
    tmp_path: Path,
    webhook: tuple[str, list[dict[str, Any]]],
    extra: tuple[str, ...],
    code: int,
    why: str,
) -> None:
    from veobatch.fsutil import DirLock

    url, got = webhook
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    out.mkdir()
    if extra == ("real",):
        (out / "ledger.jsonl").write_text('{"t": "intent", "job": "one"}\n')
        extra = ()
    with DirLock(out):
        args = ("run", str(manifest), "--simulate", "--out", str(out), "--notify", url, *extra)
        exit_code, _, stderr = await run_cli(*args)
    assert exit_code == code, stderr
    assert len(got) == 1, stderr
    body = got[0]
    assert body["event"] == "veobatch.run.aborted" and body["exit_code"] == code
    assert body["manifest"] == "m.yaml" and why in body["error"] and why in body["text"]
    assert body["interrupted"] is False  # another run holds the directory: not interrupted
    assert "secret" not in json.dumps(body) and "secret" not in stderr.replace(str(tmp_path), "")


@pytest.mark.slow
async def test_a_simulated_run_ignores_the_real_api_settings_of_the_environment(
    tmp_path: Path,
) -> None:
    # The demo must run whatever the shell holds: these would be refused for a real run.
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    env = {"AIMLAPI_KEY": "sk-real\rkey", "AIMLAPI_BASE_URL": "http://127.0.0.1:187500"}
    proc = start_cli(
        "run", str(manifest), "--simulate", "--sim-gen-time", "0.2", "--out", str(out), env=env
    )
    stdout, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=120))
    assert proc.returncode == 0, stderr
    assert stdout.startswith("veobatch: 2 jobs: 2 done")
    assert "sk-real" not in stdout + stderr


async def test_a_bad_manifest_is_said_on_stdout_too_and_told_to_the_webhook(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    # Under cron, stdout is the mail and stderr a log file: the one line that says why a run
    # did not start went only to the log, and the webhook heard nothing of exit 2.
    url, got = webhook
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST.replace("duration: 4", "duration: 5", 1))
    code, stdout, stderr = await run_cli("run", str(manifest), "--simulate", "--notify", url)
    assert code == 2
    assert "field 'duration': expected one of 4, 6, 8, got 5" in stdout
    assert stdout.strip() in stderr  # with the webhook's line after it
    assert len(got) == 1 and got[0]["exit_code"] == 2 and got[0]["interrupted"] is False
    assert "got 5" in got[0]["error"]


async def test_json_logs_say_why_a_run_did_not_start_as_json(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST.replace("duration: 4", "duration: 5"))
    code, _, stderr = await run_cli("run", str(manifest), "--simulate", "--log-format", "json")
    assert code == 2
    records = [json.loads(line) for line in stderr.splitlines()]
    assert records[0]["message"] == "2 problems in manifest:"
    assert all(r["level"] == "error" and r["exit_code"] == 2 for r in records)
    assert all(r["message"].startswith(f"{manifest}:") for r in records[1:])


async def test_a_simulated_run_leaves_the_manifests_webhook_alone(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    # settings.notify_url is the team's real channel: the simulator's videos are not results.
    url, got = webhook
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST.replace("jobs:", f"settings:\n  notify_url: {url}\njobs:", 1))
    args = ("run", str(manifest), "--simulate", "--sim-gen-time", "0.1", "--out")
    code, _, stderr = await run_cli(*args, str(tmp_path / "out"))
    assert code == 0, stderr
    assert got == []
    code, _, stderr = await run_cli(*args, str(tmp_path / "out2"), "--notify", url)
    assert code == 0 and len(got) == 1  # named on the command line: asked for


@pytest.mark.slow
async def test_simulated_and_real_results_never_share_a_directory(tmp_path: Path) -> None:
    # A --simulate trial of the night's manifest recorded every job done with the simulator's
    # test videos: the first real run then skipped them all and exited 0.
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    args = ("run", str(manifest), "--out", str(out))
    code, _, stderr = await run_cli(*args, "--simulate", "--sim-gen-time", "0.1")
    assert code == 0, stderr
    real = {"AIMLAPI_KEY": "sk-test-0123456789", "AIMLAPI_BASE_URL": "http://127.0.0.1:9"}
    proc = start_cli(*args, env=real)
    _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
    assert proc.returncode == 3
    assert "holds a --simulate run's results" in stderr
    # The other way round: a directory of real results refuses a simulated run.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "ledger.jsonl").write_text("")
    code, _, stderr = await run_cli(*args[:2], "--out", str(tmp_path / "real"), "--simulate")
    assert code == 0, stderr  # an empty ledger holds nothing to mix with
    shutil.rmtree(tmp_path / "real" / ".simulator")
    code, _, stderr = await run_cli(*args[:2], "--out", str(tmp_path / "real"), "--simulate")
    assert code == 3 and "holds results of the real API" in stderr


@pytest.mark.slow
async def test_the_lock_is_held_and_the_exit_kept_while_the_webhook_is_told(
    tmp_path: Path,
) -> None:
    # The report and the webhook belong to the run: another run must not start on its
    # directory meanwhile, and a stop signal then (the work is done) must not turn the run's
    # exit into a silent 75.
    import signal
    import time

    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    async with webhook_receiver("/slow", answer_after_s=4.0) as (url, got):
        args = ("run", str(manifest), "--simulate", "--sim-gen-time", "0.2", "--out", str(out))
        first = start_cli(*args, "--notify", url)
        deadline = time.monotonic() + 60
        while not got:
            assert time.monotonic() < deadline and first.poll() is None, "never told the hook"
            await anyio.sleep(0.05)
        journal = out / ".simulator" / "generations.jsonl"
        before = journal.read_bytes()
        code, _, stderr = await run_cli(*args)
        assert code == 75 and "another veobatch run" in stderr
        assert journal.read_bytes() == before  # its simulator never started on a busy folder
        assert "simulator listening" not in stderr
        first.send_signal(signal.SIGTERM)
        stdout, _ = await anyio.to_thread.run_sync(lambda: first.communicate(timeout=30))
    assert first.returncode == 0
    assert stdout.startswith("veobatch: 2 jobs: 2 done")
    assert (out / "report.html").exists()
