"""An output directory with one job in each state a report must show, made with the real
ledger and real (tiny) videos."""

from __future__ import annotations

from pathlib import Path

from veobatch.jobview import compact_request
from veobatch.ledger import Ledger
from veobatch.simulator.video import VideoSpec, encode_test_card
from veobatch.verify import verify_file

T2V = "google/veo-3.1-t2v-fast"
EVIL = '<script>alert("x")</script> & <img src=https://evil.example/p.png>'
REQUESTS = {
    "sunrise": {
        "model": T2V,
        "prompt": "A sunrise over hills",
        "duration": 4,
        "resolution": "720p",
    },
    "portrait": {
        "model": T2V,
        "prompt": EVIL,
        "duration": 4,
        "aspect_ratio": "9:16",
        "resolution": "720p",
        "generate_audio": False,
    },
    "short": {"model": T2V, "prompt": "Flagged: too short", "duration": 8, "resolution": "720p"},
    "broken": {"model": T2V, "prompt": "Rejected by the API", "duration": 4},
    "lost": {"model": T2V, "prompt": "Nobody knows", "duration": 4},
    "waiting": {"model": T2V, "prompt": "Still generating", "duration": 4},
}
VIDEOS = {
    "sunrise": VideoSpec(128, 72, 4, 4, audio=True),
    "portrait": VideoSpec(72, 128, 4, 4, audio=False),
    "short": VideoSpec(128, 72, 1, 4, audio=True),
}


async def make_output_dir(out: Path, *, with_probes: bool = True) -> None:
    """``with_probes=False`` writes done records as ledgers did before verification existed."""
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (test setup)
    now = [1_800_000_000.0]
    ledger = Ledger.open(out, clock=lambda: now[0])
    for jid, req in REQUESTS.items():
        model = req["model"]
        await ledger.record(
            "intent", jid, crid=f"c-{jid}", key="k", model=model, req=compact_request(req)
        )
        if jid == "broken":
            await ledger.record("failed", jid, kind="invalid_request", message="HTTP 400: nope")
            continue
        if jid == "lost":
            await ledger.record("uncertain", jid, kind="no_answer", message="timed out")
            continue
        await ledger.record("submitted", jid, gen=f"gen-{jid}")
        if jid == "waiting":
            continue
        now[0] += 42  # every generation takes 42 s
        await ledger.record("completed", jid, url=f"https://cdn.example/{jid}.mp4")
        path = out / f"{jid}.mp4"
        encode_test_card(VIDEOS[jid], path)
        extra = verify_file(path, model, req).record_fields() if with_probes else {}
        await ledger.record(
            "done", jid, file=path.name, bytes=path.stat().st_size, sha256=jid * 4, **extra
        )
    ledger.close()
    ledger.write_results(())
