"""Time a resume from a ledger of N records in a fresh process.

Writes a manifest of N/4 jobs and a ledger where each job went intent → submitted →
completed → done (files present), each record with every field this version writes (the
compact request, the price, the video's verified figures), then times what a rerun does
before its first request: replaying the ledger, loading the manifest and planning every job;
and the peak RSS of `veobatch plan` over it, in its own process.

Usage: resume_probe.py RECORDS WORK_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from veobatch.jobs import Job  # noqa: E402
from veobatch.ledger import Ledger  # noqa: E402
from veobatch.manifest import load_manifest  # noqa: E402
from veobatch.scheduler import plan_run  # noqa: E402

VIDEO = {"duration_s": 4.0, "width": 1920, "height": 1080, "audio": False, "codec": "h264"}


def build(records: int, work: Path) -> Path:
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    jobs = records // 4
    lines = ["version: 1", "jobs:"]
    body = b"\x00\x00\x00\x18ftypmp42"
    sha = hashlib.sha256(body).hexdigest()
    ledger_lines = []
    for i in range(jobs):
        jid = f"r{i:06d}"
        prompt = f"resume shot {i}"
        lines += [
            f"  - id: {jid}",
            "    model: google/veo-3.1-t2v-fast",
            f"    prompt: {prompt}",
            "    duration: 4",
            "    generate_audio: false",
        ]
        req = {"prompt": prompt, "duration": 4, "generate_audio": False}
        job = Job(jid, {"model": "google/veo-3.1-t2v-fast", **req})
        (out / f"{jid}.mp4").write_bytes(body)
        mtime = (out / f"{jid}.mp4").stat().st_mtime_ns
        t = 1_700_000_000.0 + i
        for rec in (
            {
                "t": t,
                "ev": "intent",
                "job": jid,
                "crid": f"vb:{jid}:1:{i:016x}",
                "key": job.key,
                "vkey": job.vkey,
                "model": "google/veo-3.1-t2v-fast",
                "est": 0.6,
                "req": req,
                "acct": "f58c548b",
            },
            {"t": t + 1, "ev": "submitted", "job": jid, "gen": f"{uuid.UUID(int=i)}"},
            {
                "t": t + 4,
                "ev": "completed",
                "job": jid,
                "url": f"https://cdn.example.com/files/{uuid.UUID(int=i)}.mp4",
                "took": [60.0, 62.5],
                "usd": 0.6,
            },
            {
                "t": t + 5,
                "ev": "done",
                "job": jid,
                "file": f"{jid}.mp4",
                "bytes": len(body),
                "sha256": sha,
                "mtime_ns": mtime,
                "video": VIDEO,
                "flags": [],
            },
        ):
            ledger_lines.append(json.dumps(rec, separators=(",", ":")))
    (out / "ledger.jsonl").write_text("\n".join(ledger_lines) + "\n")
    manifest = work / "resume.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> None:
    records, work = int(sys.argv[1]), Path(sys.argv[2])
    manifest = build(records, work)
    out = work / "out"
    t0 = time.monotonic()
    ledger = Ledger.open(out)
    t1 = time.monotonic()
    m = load_manifest(manifest)
    t2 = time.monotonic()
    plans, _ = plan_run(m.jobs, ledger.states, out)  # what a run plans, removed jobs too
    t3 = time.monotonic()
    ledger.close()
    assert all(p.action.value == "done" for p in plans)
    t4 = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-m", "veobatch", "plan", str(manifest), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert cli.stdout is not None
    stdout = cli.stdout.read()
    _, status, usage = os.wait4(cli.pid, 0)
    t5 = time.monotonic()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"veobatch plan failed: {stdout[-500:]}")
    print(
        json.dumps(
            {
                "records": records,
                "jobs": len(m.jobs),
                "ledger_replay_s": round(t1 - t0, 3),
                "manifest_load_s": round(t2 - t1, 3),
                "plan_s": round(t3 - t2, 3),
                "resume_total_s": round(t3 - t0, 3),
                "ledger_and_plan_s": round((t1 - t0) + (t3 - t2), 3),
                "cli_plan_wall_s": round(t5 - t4, 3),
                "cli_plan_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "cli_plan_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "cli_last_line": stdout.splitlines()[-2],
            }
        )
    )


if __name__ == "__main__":
    main()
