"""Make the README's screenshots: a mixed output directory's report, and the live display.

    .venv/bin/python docs/screenshots.py   # then, with Chromium:
    chromium --headless --window-size=1280,1000 --screenshot=docs/report.png \
        file://$PWD/output/screenshots/report.html
    chromium --headless --window-size=1288,222 --screenshot=docs/live.png file://$PWD/output/live.svg
"""

import shutil
from pathlib import Path

import anyio
from rich.console import Console

from veobatch.jobview import compact_request
from veobatch.ledger import Ledger
from veobatch.progress import Throughput, progress_view, render
from veobatch.report import write_report
from veobatch.runner import Snapshot
from veobatch.simulator.video import VideoSpec, encode_test_card
from veobatch.verify import verify_file

F = "google/veo-3.1-t2v-fast"
JOBS = [
    (
        "lighthouse",
        {
            "model": F,
            "prompt": "A lighthouse on a cliff at dusk, waves crashing below, slow aerial orbit",
            "duration": 4,
            "resolution": "720p",
        },
        "done",
        VideoSpec(1280, 720, 4, 12, True),
    ),
    (
        "city-vertical",
        {
            "model": F,
            "prompt": "Neon-lit street in the rain, handheld, reflections in puddles",
            "duration": 4,
            "aspect_ratio": "9:16",
            "resolution": "720p",
            "generate_audio": False,
        },
        "done",
        VideoSpec(720, 1280, 4, 12, False),
    ),
    (
        "ballerina",
        {
            "model": "google/veo-3.1-reference-to-video",
            "prompt": "A graceful ballerina dancing outside a circus tent on green grass",
            "image_urls": ["https://example.com/a.png"],
            "resolution": "720p",
        },
        "done",
        VideoSpec(1280, 720, 6, 12, True),
    ),
    (
        "forest-walk",
        {
            "model": F,
            "prompt": "Walking through a misty pine forest, morning light",
            "duration": 6,
            "resolution": "720p",
        },
        "done",
        VideoSpec(1280, 720, 6, 12, True),
    ),
    (
        "logo-sting",
        {"model": F, "prompt": "Our logo assembles from sparks", "duration": 4},
        "failed",
        None,
    ),
    (
        "crowd",
        {"model": F, "prompt": "A stadium crowd doing the wave", "duration": 8},
        "uncertain",
        None,
    ),
    (
        "harbour",
        {"model": F, "prompt": "Fishing boats leaving the harbour at dawn", "duration": 8},
        "submitted",
        None,
    ),
]


async def make(out: Path) -> None:
    now = [1_795_230_000.0]
    ledger = Ledger.open(out, clock=lambda: now[0])
    for jid, req, status, spec in JOBS:
        now[0] += 7
        await ledger.record(
            "intent", jid, crid="c", key="k", model=req["model"], req=compact_request(req)
        )
        if status == "failed":
            await ledger.record("submitted", jid, gen=f"5f0c{jid}:{req['model']}")
            await ledger.record(
                "failed",
                jid,
                kind="generation_error",
                message="content_policy: the prompt was blocked by the provider's safety filter",
            )
            continue
        if status == "uncertain":
            await ledger.record(
                "uncertain",
                jid,
                kind="no_answer",
                message="no answer within 60s; not in the usage logs after 60s",
            )
            continue
        await ledger.record("submitted", jid, gen=f"9a1e-{jid}:{req['model']}")
        if status == "submitted":
            continue
        now[0] += 95
        await ledger.record("completed", jid, url="https://cdn.example/x.mp4")
        path = out / f"{jid}.mp4"
        encode_test_card(spec, path)
        v = verify_file(path, req["model"], req)
        await ledger.record(
            "done",
            jid,
            file=path.name,
            bytes=path.stat().st_size,
            sha256=jid * 3,
            **v.record_fields(),
        )
    ledger.close()
    ledger.write_results(())


out = Path("output/screenshots")
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
anyio.run(make, out)
print(write_report(out, title="veobatch report: nightly 2026-11-21"))

c = Console(record=True, width=104, force_terminal=True, color_system="truecolor")
t = Throughput()
t.add(0, 0)
snap = Snapshot(
    500,
    {
        "pending": 212,
        "submitting": 3,
        "submitted": 91,
        "completed": 6,
        "done": 177,
        "failed": 9,
        "uncertain": 2,
    },
    1985.0,
    291,
    1432,
    64,
)
problems = [
    "01:31:07 error failed job=logo-sting kind=generation_error: content_policy: the prompt was blocked",  # noqa: E501
    "01:32:40 warning download retry job=harbour-017 in 1.4s: connection reset by peer",
    "01:33:02 warning video differs job=ballerina-042: duration: 6.0 s, requested 8 s",
]
c.print(render(progress_view(snap, t), problems, 14))
Path("output/live.svg").write_text(c.export_svg(title="veobatch run jobs/nightly.yaml"))
