"""End to end over real loopback HTTP: the runner and the CLI against the built-in simulator."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import av
import pytest
from cli_process import start_cli
from click.testing import CliRunner
from local_server import webhook_receiver
from run_helpers import CANARY, dead_host, fast_settings, mixed_manifest

from veobatch.cli import main
from veobatch.ledger import load_states
from veobatch.manifest import load_manifest
from veobatch.poller import OTHER_KEY_NOT_FOUND
from veobatch.session import run
from veobatch.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimConfig(
        api_keys=frozenset({CANARY}),
        gen_time_mean_s=0.3,
        gen_time_spread=0.3,
        video_mode="tiny",
    )
    async with Simulator(config) as s:
        yield s


def all_bytes_under(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


async def test_mixed_run_against_the_simulator(sim: Simulator, tmp_path: Path) -> None:
    m = mixed_manifest(21, tmp_path)
    out = tmp_path / "out"
    report = await run(m, fast_settings(out, sim.base_url))
    assert report.exit_code == 0, report
    assert report.counts == {"done": 21} and report.submitted == 21
    stats = sim.stats.summary()
    assert stats["creates_ok"] == 21 and stats["creates_rejected"] == 0
    assert stats["cdn_auth_headers_seen"] == 0  # the key never went to the video host
    assert stats["downloads"] == 21
    results = json.loads((out / "results.json").read_text())
    for row in results["jobs"]:
        video = out / row["file"]
        assert video.stat().st_size == row["bytes"]
        with av.open(str(video)) as container:
            assert container.streams.video, row["id"]
    assert not list(out.glob("*.part"))
    # Every video was probed; the simulator's tiny stand-ins (160x90, 1 s) differ from every
    # request, so each one is flagged, and the ledger kept what was asked for.
    states = load_states(out)
    for job in m.jobs:
        st = states[job.id]
        assert st.video is not None
        assert {st.video["width"], st.video["height"]} == {160, 90}
        assert st.flags and any(f.startswith("duration: 1.0 s, requested") for f in st.flags)
        assert st.request is not None and st.request["prompt"] == job.request["prompt"]
    # The canary key is nowhere on disk.
    assert CANARY.encode() not in all_bytes_under(out)


async def test_rerun_sends_no_post(sim: Simulator, tmp_path: Path) -> None:
    m = mixed_manifest(7, tmp_path)
    out = tmp_path / "out"
    await run(m, fast_settings(out, sim.base_url))
    creates = sim.stats.creates_ok
    report = await run(m, fast_settings(out, sim.base_url))
    assert report.exit_code == 0 and report.submitted == 0
    assert sim.stats.creates_ok == creates


MANIFEST = """\
version: 1
{defaults}
jobs:
  - {{id: fox, model: google/veo-3.1-t2v-fast, prompt: a fox, provider: {provider}}}
  - {{id: owl, model: google/veo-3.1-i2v-fast, prompt: an owl, image_url: {image}}}
"""


async def test_a_rotated_key_fails_the_old_keys_generations_at_once_and_pays_for_none(
    tmp_path: Path,
) -> None:
    # Reviewer R12b: rotated while generations were in flight, the next night polled them
    # (every poll a 404) for the whole job timeout, failed them `timeout` without a word of
    # the key, and later nights abandoned them for --retry-failed to pay for again.
    old, new = "key-AAAA-1111-old", "key-BBBB-2222-new"
    config = SimConfig(
        api_keys=frozenset({old, new}), gen_time_mean_s=2.0, gen_time_spread=0.0, video_mode="tiny"
    )
    m, out = mixed_manifest(3, tmp_path), tmp_path / "out"
    async with Simulator(config) as sim:
        first = await run(m, fast_settings(out, sim.base_url, old, job_timeout_s=0.3))
        assert first.counts == {"failed": 3} and sim.stats.creates_ok == 3
        rotated = await run(m, fast_settings(out, sim.base_url, new, job_timeout_s=20.0))
        assert rotated.polls == 3 * OTHER_KEY_NOT_FOUND  # not polled to the job timeout
        assert {e.kind for _, e in rotated.failed} == {"other_key"} and len(rotated.failed) == 3
        assert all("the API key changed" in e.message for _, e in rotated.failed)
        retried = await run(m, fast_settings(out, sim.base_url, new, retry_failed=True))
        assert {e.kind for _, e in retried.failed} == {"other_key"}
        assert sim.stats.creates_ok == 3  # none made again
        back = await run(m, fast_settings(out, sim.base_url, old))
        assert back.exit_code == 0 and back.counts == {"done": 3} and sim.stats.creates_ok == 3


async def test_a_manifest_that_writes_out_the_apis_defaults_pays_for_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    # Adding the API's own defaults (or writing a provider in capitals) marked every done job
    # changed: each paid for again and its video kept aside, night after night in cron.
    def manifest(defaults: str = "", provider: str = "google") -> Any:
        path = tmp_path / "m.yaml"
        image = "https://example.com/frame.png"
        path.write_text(MANIFEST.format(defaults=defaults, provider=provider, image=image))
        return load_manifest(path)

    out = tmp_path / "out"
    first = await run(manifest(), fast_settings(out, sim.base_url))
    assert first.exit_code == 0 and first.submitted == 2
    written_out = "defaults: {provider: auto, resolution: 1080p, generate_audio: true}"
    again = await run(manifest(written_out, "Google"), fast_settings(out, sim.base_url))
    assert again.exit_code == 0 and again.submitted == 0
    # A ledger written before the video key was recorded: told from the request recorded.
    ledger = out / "ledger.jsonl"
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert all("vkey" in r for r in records if r["ev"] == "intent")
    older = "".join(json.dumps({k: v for k, v in r.items() if k != "vkey"}) + "\n" for r in records)
    ledger.write_text(older)
    shouted = manifest("defaults: {provider: AUTO, duration: 8}", "GOOGLE")
    assert (await run(shouted, fast_settings(out, sim.base_url))).submitted == 0
    assert sim.stats.creates_ok == 2 and not list(out.glob("*@*"))
    edited = await run(manifest("defaults: {duration: 6}"), fast_settings(out, sim.base_url))
    assert edited.submitted == 2 and len(list(out.glob("*@*.mp4"))) == 2  # a change is one


MATRIX = """\
version: 1
jobs:
  - id: teaser
    model: google/veo-3.1-t2v-fast
    prompt: The product turns slowly
    matrix:
      {first}
      {second}
  - id: kite
    model: google/veo-3.1-t2v-fast
    prompt: A kite climbs
    variants: 2
    matrix:
      {second}
      {first}
"""


async def test_a_matrix_with_its_fields_in_another_order_pays_for_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    # A YAML mapping has no order, yet writing a matrix's fields in another order renamed
    # every combination (teaser-16x9-4 became teaser-4-16x9), and each was paid for again;
    # the takes of variants too, whose seeds are made from their ids.
    ratios, durations = 'aspect_ratio: ["16:9", "9:16"]', "duration: [4, 8]"

    def manifest(first: str, second: str) -> Path:
        path = tmp_path / "m.yaml"
        path.write_text(MATRIX.format(first=first, second=second))
        return path

    out = tmp_path / "out"
    m = load_manifest(manifest(ratios, durations))
    first = await run(m, fast_settings(out, sim.base_url))
    assert first.exit_code == 0 and first.submitted == 12
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert "teaser-16x9-4.mp4" in videos and "kite-4-16x9-2.mp4" in videos
    reordered = manifest(durations, ratios)
    plan = await anyio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, ["plan", str(reordered), "--out", str(out)])
    )
    assert plan.exit_code == 0, plan.output
    assert "would submit nothing" in plan.output and "renamed?" not in plan.output
    rows = [line.split("\t") for line in plan.output.splitlines() if "\tdone\t" in line]
    assert sorted(r[0] + ".mp4" for r in rows) == videos
    again = await run(load_manifest(reordered), fast_settings(out, sim.base_url))
    assert again.exit_code == 0 and again.submitted == 0
    assert sim.stats.creates_ok == 12 and sorted(p.name for p in out.glob("*.mp4")) == videos


async def test_requests_match_the_published_schemas(sim: Simulator, tmp_path: Path) -> None:
    """The example manifests' requests pass the simulator's own schema validation."""
    for name in ("example.yaml", "demo.yaml"):
        m = load_manifest(ROOT / "jobs" / name)
        report = await run(m, fast_settings(tmp_path / name, sim.base_url))
        assert report.exit_code == 0, (name, report.failed)
    assert sim.stats.creates_rejected == 0


async def test_wrong_key_exits_3_and_leaves_jobs_pending(sim: Simulator, tmp_path: Path) -> None:
    m = mixed_manifest(5, tmp_path)
    report = await run(m, fast_settings(tmp_path / "o", sim.base_url, key="wrong-key"))
    assert report.exit_code == 3
    assert report.counts == {"pending": 5}
    assert sim.stats.creates_ok == 0


async def test_an_api_nobody_answers_at_stops_submitting_then_the_next_run_submits_all(
    sim: Simulator, tmp_path: Path
) -> None:
    # Nothing listens at the API's address (DNS or network down): 20 jobs at concurrency 4 took
    # 632 s, each failing submit_failed after its 9 tries; 10,000 would take days.
    m = mixed_manifest(20, tmp_path)
    out = tmp_path / "out"
    started = time.monotonic()
    report = await run(m, fast_settings(out, dead_host(), job_timeout_s=1.0))
    assert time.monotonic() - started < 10
    assert report.exit_code == 1 and report.counts == {"pending": 20}
    assert report.gave_up is not None and report.gave_up.startswith(
        "the API could not be reached for 1 s: no create could be sent (POST /v2/video/generations:"
        " could not connect: "
    )
    again = await run(m, fast_settings(out, sim.base_url))
    assert again.exit_code == 0 and again.counts == {"done": 20}
    assert sim.stats.creates_ok == 20


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path: Path) -> None:
    """The README's demo, through the real CLI: all done, then a rerun that sends nothing."""
    out = tmp_path / "demo"
    proc = start_cli("run", "jobs/demo.yaml", "--simulate", "--out", str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("veobatch: 6 jobs: 6 done, 0 failed")
    assert "submitted job=" in stderr  # plain line logs off a terminal
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert len(videos) == 6 and "ballerina.mp4" in videos
    with av.open(str(out / "lighthouse.mp4")) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (1280, 720)
        assert c.duration is not None and abs(c.duration / 1e6 - 4) < 0.5
        assert c.streams.audio  # generate_audio defaults to true
    proc = start_cli("run", "jobs/demo.yaml", "--simulate", "--out", str(out))
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "0 submitted this run" in stdout


def twelve_jobs(tmp: Path) -> Path:
    manifest = tmp / "m.yaml"
    jobs = "\n".join(
        f"  - id: j{i}\n    model: google/veo-3.1-t2v-fast\n    prompt: clip {i}\n    duration: 4"
        for i in range(12)
    )
    manifest.write_text(f"version: 1\nsettings:\n  concurrency: 4\njobs:\n{jobs}\n")
    return manifest


def wait_for_records(ledger: Path, ev: str, n: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_text().count(f'"ev":"{ev}"') >= n:
            return
        time.sleep(0.02)
    pytest.fail(f"no {n} {ev!r} records in {ledger} after {timeout_s:.0f}s")


def submissions_per_job(ledger: Path) -> dict[str, int]:
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    per_job: dict[str, int] = {}
    for r in records:
        if r["ev"] == "submitted":
            per_job[r["job"]] = per_job.get(r["job"], 0) + 1
    return per_job


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_then_rerun_completes_without_paying_twice(
    tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "o"
    args = ("run", str(twelve_jobs(tmp_path)), "--simulate", "--sim-gen-time", "1.5")
    proc = start_cli(*args, "--out", str(out))
    ledger = out / "ledger.jsonl"
    wait_for_records(ledger, "submitted", 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert f"{sig.name}: stopping; run again to resume" in stderr
    assert stdout.startswith("veobatch: 12 jobs: ")  # the summary, as on any stop
    first = ledger.read_text()
    assert first.count('"ev":"submitted"') < 12  # it really was interrupted
    proc = start_cli(*args, "--out", str(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert submissions_per_job(ledger) == {f"j{i}": 1 for i in range(12)}  # paid for once
    assert len(list(out.glob("*.mp4"))) == 12 and not list(out.glob("*.part"))


def completed_not_done(ledger: Path) -> set[str]:
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    done = {r["job"] for r in records if r["ev"] == "done"}
    return {r["job"] for r in records if r["ev"] == "completed"} - done


@pytest.mark.slow
def test_a_simulated_run_killed_before_its_downloads_resumes_them(tmp_path: Path) -> None:
    """The rerun's simulator is a new process: the URLs in the ledger must still lead to the
    videos, at once (no retries against a port that is gone), with nothing paid twice."""
    out = tmp_path / "o"
    ledger = out / "ledger.jsonl"
    args = ("run", str(twelve_jobs(tmp_path)), "--simulate", "--sim-gen-time", "1")
    for _ in range(5):  # a kill lands between a completion and its download most times
        shutil.rmtree(out, ignore_errors=True)
        proc = start_cli(*args, "--out", str(out))
        wait_for_records(ledger, "completed", 1)
        proc.kill()
        proc.communicate(timeout=30)
        if completed_not_done(ledger):
            break
    assert completed_not_done(ledger)
    proc = start_cli(*args, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("veobatch: 12 jobs: 12 done, 0 failed")
    assert "download retry" not in stderr and "fresh URL" not in stderr
    assert submissions_per_job(ledger) == {f"j{i}": 1 for i in range(12)}
    assert len(list(out.glob("*.mp4"))) == 12 and not list(out.glob("*.part"))


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    async with webhook_receiver("/hook") as hook:
        yield hook


def start_on_terminal(terminal: int, *args: str) -> subprocess.Popen[bytes]:
    """The CLI with stdout and stderr on a terminal (the slave side of a pty)."""
    return subprocess.Popen(
        [sys.executable, "-m", "veobatch", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )


def drain_until(master: int, ready: Callable[[], bool], timeout_s: float = 30) -> None:
    """Read the terminal's output (a full one blocks its writer) until ``ready()``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"not ready after {timeout_s:.0f}s")
        if select.select([master], [], [], 0.02)[0]:
            os.read(master, 65536)


@pytest.mark.slow
async def test_a_terminal_that_hangs_up_stops_the_run_like_sigterm(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """A closed terminal window or a dropped ssh session: SIGHUP, and every later write to the
    terminal fails (EIO). The run still stops as on SIGTERM: exit 75 and the webhook told."""
    url, got = webhook
    out = tmp_path / "o"
    args = ("run", str(twelve_jobs(tmp_path)), "--simulate", "--sim-gen-time", "1.5")
    master, terminal = pty.openpty()
    on_terminal = start_on_terminal(terminal, *args, "--out", str(out), "--notify", url)
    os.close(terminal)
    ledger = out / "ledger.jsonl"
    try:
        await anyio.to_thread.run_sync(
            drain_until,
            master,
            lambda: ledger.exists() and ledger.read_text().count('"ev":"submitted"') >= 2,
        )
    finally:
        os.close(master)  # the terminal hangs up; then the kernel's SIGHUP
    on_terminal.send_signal(signal.SIGHUP)
    assert await anyio.to_thread.run_sync(lambda: on_terminal.wait(60)) == 75
    [body] = got
    assert (body["event"], body["exit_code"], body["interrupted"]) == (
        "veobatch.run.finished",
        75,
        True,
    )
    assert body["text"].startswith("veobatch: 12 jobs: ")
    proc = start_cli(*args, "--out", str(out))
    _, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=120))
    assert proc.returncode == 0, stderr
    assert submissions_per_job(ledger) == {f"j{i}": 1 for i in range(12)}
