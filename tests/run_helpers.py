"""What several end-to-end test modules share: the canary key, a mixed manifest, fast settings."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from veobatch.jobs import Job, Manifest
from veobatch.settings import PollSettings, RunSettings, Secret

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


def dead_host() -> str:
    """The base URL of a loopback port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
