"""End to end over real loopback HTTP: the runner and the CLI against the built-in simulator."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import av
import pytest
from cli_process import start_cli

from veobatch.jobs import Job, Manifest
from veobatch.ledger import load_states
from veobatch.manifest import load_manifest
from veobatch.runner import run
from veobatch.settings import PollSettings, RunSettings, Secret
from veobatch.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent
CANARY = "canary-key-7f3a9d5e1b2c"
IMG = "https://example.com/frame.png"

MODELS_AND_FIELDS = [
    ("google/veo-3.1-t2v", {"duration": 4, "aspect_ratio": "9:16"}),
    ("google/veo-3.1-t2v-fast", {"seed": 7, "generate_audio": False}),
    ("google/veo-3.1-i2v", {"image_url": IMG}),
    ("google/veo-3.1-i2v-fast", {"image_url": IMG, "resolution": "1080p"}),
    ("google/veo-3.1-first-last-image-to-video", {"image_url": IMG, "last_image_url": IMG}),
    ("google/veo-3.1-first-last-image-to-video-fast", {"image_url": IMG, "last_image_url": IMG}),
    ("google/veo-3.1-reference-to-video", {"image_urls": [IMG, IMG]}),
]


def mixed_manifest(n: int, tmp: Path) -> Manifest:
    jobs = []
    for i in range(n):
        model, fields = MODELS_AND_FIELDS[i % len(MODELS_AND_FIELDS)]
        request = {"model": model, "prompt": f"scene {i}", **fields}
        jobs.append(Job(f"job-{i:03d}", request, i))
    return Manifest(tmp / "mixed.yaml", tuple(jobs))


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


def fast_settings(out: Path, base_url: str, key: str = CANARY, **kw: object) -> RunSettings:
    poll = PollSettings(first_delay_s=0.1, min_interval_s=0.05, max_interval_s=0.2, growth=0.25)
    s = RunSettings(
        out_dir=out,
        api_key=Secret(key),
        base_url=base_url,
        concurrency=4,
        poll=poll,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    return replace(s, **kw)  # type: ignore[arg-type]


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


@pytest.mark.slow
def test_sigterm_then_rerun_completes_without_paying_twice(tmp_path: Path) -> None:
    out = tmp_path / "o"
    manifest = tmp_path / "m.yaml"
    jobs = "\n".join(
        f"  - id: j{i}\n    model: google/veo-3.1-t2v-fast\n    prompt: clip {i}\n    duration: 4"
        for i in range(12)
    )
    manifest.write_text(f"version: 1\nsettings:\n  concurrency: 4\njobs:\n{jobs}\n")
    args = ("run", str(manifest), "--simulate", "--sim-gen-time", "1.5", "--out", str(out))
    proc = start_cli(*args)
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_text().count('"ev":"submitted"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    first = ledger.read_text()
    assert first.count('"ev":"submitted"') < 12  # it really was interrupted
    proc = start_cli(*args)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    per_job: dict[str, int] = {}
    for r in records:
        if r["ev"] == "submitted":
            per_job[r["job"]] = per_job.get(r["job"], 0) + 1
    assert per_job == {f"j{i}": 1 for i in range(12)}  # each paid for exactly once
    assert len(list(out.glob("*.mp4"))) == 12 and not list(out.glob("*.part"))
