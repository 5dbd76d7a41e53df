"""Time a resume from a ledger of N records in a fresh process.

Writes a manifest of N/4 jobs and a ledger where each job went intent → submitted →
completed → done (files present), then times what a rerun does before its first request:
replaying the ledger, loading the manifest and planning every job.

Usage: resume_probe.py RECORDS WORK_DIR
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from veobatch.jobs import Job  # noqa: E402
from veobatch.ledger import Ledger  # noqa: E402
from veobatch.manifest import load_manifest  # noqa: E402
from veobatch.scheduler import plan_run  # noqa: E402


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
        lines += [f"  - id: {jid}", "    model: google/veo-3.1-t2v-fast", f"    prompt: {prompt}"]
        key = Job(jid, {"model": "google/veo-3.1-t2v-fast", "prompt": prompt}).key
        (out / f"{jid}.mp4").write_bytes(body)
        mtime = (out / f"{jid}.mp4").stat().st_mtime_ns
        t = 1_700_000_000.0 + i
        for rec in (
            {
                "t": t,
                "ev": "intent",
                "job": jid,
                "crid": f"vb:{jid}:1:x",
                "key": key,
                "model": "google/veo-3.1-t2v-fast",
            },
            {"t": t + 1, "ev": "submitted", "job": jid, "gen": f"g-{i}"},
            {"t": t + 4, "ev": "completed", "job": jid, "url": f"https://cdn/{i}.mp4"},
            {
                "t": t + 5,
                "ev": "done",
                "job": jid,
                "file": f"{jid}.mp4",
                "bytes": len(body),
                "sha256": sha,
                "mtime_ns": mtime,
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
    cli = subprocess.run(
        [sys.executable, "-m", "veobatch", "plan", str(manifest), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    t5 = time.monotonic()
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
                "cli_last_line": cli.stdout.splitlines()[-2],
            }
        )
    )


if __name__ == "__main__":
    main()
