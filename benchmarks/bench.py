"""veobatch's benchmark: the real CLI against the simulator in a separate process, over loopback.

    python benchmarks/bench.py                      # the full run (N=10,000, concurrency 500)
    python benchmarks/bench.py --jobs 2000 --concurrency 100 --skip-download --skip-resume

Reports, for one run of N jobs through `veobatch run`:
- makespan against the ideal for the concurrency limit (greedy list scheduling of the
  simulator's true durations in submission order, each starting the moment a slot frees);
- polls per generation and mean detection lag, counted by the simulator;
- the runner's CPU seconds per job and peak RSS (from wait4 on the runner process), and
  beside it the CPU of the same requests sent through bare aiohttp (the HTTP floor);
- the trade-off curve of polls per generation against lag, for the adaptive schedule and for
  fixed intervals, replayed over the same true durations;
- the adaptive schedule replayed over duration shapes that are not the simulator's lognormal
  (the real API's 1-3 minutes, bimodal, heavy-tailed), against a fixed interval of equal lag;
- a 1 GB download against `curl -o` of the same URL, and RSS growth while streaming;
- the same run as cron runs it, with the morning report at the end (peak RSS, CPU), and
  `veobatch report` alone over its folder (thumbnails made afresh);
- the time to resume from a ledger of 100,000 records, and the peak RSS of `veobatch plan`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from veobatch.schedule import fixed_schedule_cost, schedule_cost  # noqa: E402
from veobatch.settings import PollSettings  # noqa: E402

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=60).read())


def start_simulator(port: int, *extra: str) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "veobatch",
        "simulate",
        "--port",
        str(port),
        "--key",
        KEY,
        *extra,
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            get_json(f"http://127.0.0.1:{port}/_sim/stats")
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("simulator did not start")


def ideal_makespan(durations: list[float], slots: int) -> float:
    """Zero overhead, instant detection: each generation starts the moment a slot frees."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def run_and_measure(
    args: list[str], env: dict[str, str]
) -> tuple[float, resource.struct_rusage, str]:
    """Wall seconds and resource usage (CPU, peak RSS in KiB) of one child, from wait4."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    return wall, usage, out


def bench_run(jobs: int, concurrency: int, work: Path, *, report: bool = False) -> dict[str, Any]:
    """One run of ``jobs`` through the CLI; ``report``: as a user runs it, the morning report
    (thumbnails of every video) written at the end in the same process."""
    port = free_port()
    # Videos as the jobs ask for them (1080p, 4 s, no sound) at 1 frame a second, about 10 KB
    # each: the checks find nothing to flag, as on a good night, and the bytes stay few.
    sim = start_simulator(
        port, "--gen-time", "3", "--gen-spread", "0.3", "--seed", "1", "--video-fps", "1"
    )
    try:
        manifest = work / "bench.yaml"
        lines = ["version: 1", "jobs:"]
        for i in range(jobs):
            lines += [
                f"  - id: b{i:05d}",
                "    model: google/veo-3.1-t2v-fast",
                f"    prompt: benchmark shot {i}",
                "    duration: 4",
                "    generate_audio: false",
            ]
        manifest.write_text("\n".join(lines) + "\n")
        env = {**os.environ, "AIMLAPI_KEY": KEY, "AIMLAPI_BASE_URL": f"http://127.0.0.1:{port}"}
        cmd = [
            sys.executable,
            "-m",
            "veobatch",
            "run",
            str(manifest),
            "--out",
            str(work / "out"),
            "--concurrency",
            str(concurrency),
            "-q",
        ]
        if not report:
            cmd.append("--no-report")  # the runner is measured, not the morning report
        wall, usage, out = run_and_measure(cmd, env)
        cpu = usage.ru_utime + usage.ru_stime
        timeline = get_json(f"http://127.0.0.1:{port}/_sim/generations")["generations"]
        stats = get_json(f"http://127.0.0.1:{port}/_sim/stats")
    finally:
        sim.terminate()
        sim.wait()
    durations = [g["duration_s"] for g in timeline]
    first = min(g["created_at"] for g in timeline)
    unfinished = [g for g in timeline if g["downloaded_at"] is None]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} generations never downloaded: {out[-500:]}")
    last = max(g["downloaded_at"] for g in timeline)
    actual = last - first
    ideal = ideal_makespan(durations, concurrency)
    lags = [g["detected_at"] - (g["created_at"] + g["duration_s"]) for g in timeline]
    first_wave = lags[:concurrency]
    later = lags[concurrency:] or lags
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "summary_line": out.splitlines()[0] if out else "",
        "wall_s": round(wall, 2),
        "makespan_s": round(actual, 2),
        "ideal_makespan_s": round(ideal, 2),
        "efficiency": round(ideal / actual, 4),
        "sum_over_slots_s": round(sum(durations) / concurrency, 2),
        "polls_per_generation": round(stats["polls"] / len(timeline), 3),
        "mean_detection_lag_s": round(statistics.fmean(lags), 4),
        "mean_detection_lag_first_wave_s": round(statistics.fmean(first_wave), 4),
        "mean_detection_lag_after_first_wave_s": round(statistics.fmean(later), 4),
        "p95_detection_lag_s": round(sorted(lags)[int(0.95 * len(lags))], 4),
        "mean_generation_s": round(statistics.fmean(durations), 3),
        "lag_share_of_mean": round(statistics.fmean(lags) / statistics.fmean(durations), 4),
        "runner_cpu_s": round(cpu, 2),
        "runner_cpu_ms_per_job": round(1000 * cpu / jobs, 3),
        # The kernel's share: mostly creating, syncing and renaming the video files. Creating
        # a file costs more on ext4 when many files were deleted in the last few minutes.
        "runner_cpu_user_s": round(usage.ru_utime, 2),
        "runner_cpu_sys_s": round(usage.ru_stime, 2),
        "runner_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "durations": durations,
    }


def bench_report(out: Path) -> dict[str, Any]:
    """`veobatch report DIR` alone, over a run's folder, its thumbnails made afresh."""
    shutil.rmtree(out / ".thumbs", ignore_errors=True)
    cmd = [sys.executable, "-m", "veobatch", "report", str(out)]
    wall, usage, _ = run_and_measure(cmd, os.environ.copy())
    jobs = sum(1 for _ in out.glob("*.mp4"))
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "jobs": jobs,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_job": round(1000 * cpu / max(1, jobs), 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "html_mb": round((out / "report.html").stat().st_size / 1e6, 1),
    }


def bench_http_floor(jobs: int, concurrency: int, polls_per_job: float) -> dict[str, Any]:
    """The same requests through bare aiohttp (benchmarks/http_floor.py), measured the same
    way: how much of the runner's CPU the HTTP library and the loopback cost on their own."""
    port = free_port()
    sim = start_simulator(port, "--gen-time", "0", "--gen-spread", "0", "--video-fps", "1")
    try:
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("http_floor.py")),
            f"http://127.0.0.1:{port}",
            KEY,
            str(jobs),
            str(polls_per_job),
            str(concurrency),
        ]
        wall, usage, out = run_and_measure(cmd, os.environ.copy())
    finally:
        sim.terminate()
        sim.wait()
    counts = json.loads(out)
    requests = sum(counts.values())
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "requests": requests,
        "polls_per_job": round(counts["polls"] / jobs, 3),
        "wall_s": round(wall, 2),
        "cpu_ms_per_job": round(1000 * cpu / jobs, 3),
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_sys_s": round(usage.ru_stime, 2),
        "cpu_us_per_request": round(1e6 * cpu / requests, 1),
    }


def tradeoff(durations: list[float]) -> dict[str, list[dict[str, float]]]:
    """Polls per generation against mean lag, replayed over the run's true durations."""
    mean = statistics.fmean(durations)
    fixed = []
    for interval in (0.1, 0.2, 0.3, 0.36, 0.5, 1.0, 2.0):
        polls, lag = fixed_schedule_cost(durations, interval)
        fixed.append(
            {
                "interval_s": interval,
                "polls": round(polls, 2),
                "lag_s": round(lag, 3),
                "lag_share": round(lag / mean, 4),
            }
        )
    adaptive = []
    for target in (0.02, 0.04, 0.06, 0.08, 0.12):
        polls, lag = schedule_cost(durations, target, PollSettings())
        adaptive.append(
            {
                "lag_target_share": target,
                "polls": round(polls, 2),
                "lag_s": round(lag, 3),
                "lag_share": round(lag / mean, 4),
            }
        )
    return {"fixed": fixed, "adaptive": adaptive}


def shapes(n: int = 5000) -> list[dict[str, Any]]:
    """The adaptive plan on duration shapes other than the simulator's own lognormal.

    The plan fits a lognormal, and the simulator draws from one, so the run flatters it; these
    replays ask what it costs when the API's times look otherwise. Each is compared with the
    fixed interval that gives the same mean lag.
    """
    rng = random.Random(3)

    def lognormal(mean: float, cv: float) -> float:
        sigma = (math.log(1 + cv * cv)) ** 0.5
        return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)

    cases = {
        "lognormal, mean 3 s, CV 0.3 (the run's)": lambda: lognormal(3, 0.3),
        "uniform 60-180 s (the documented 1-3 min)": lambda: rng.uniform(60, 180),
        "bimodal: half ~60 s, half ~150 s": lambda: (
            rng.gauss(60, 5) if rng.random() < 0.5 else rng.gauss(150, 10)
        ),
        "30 s + exponential (mean 90 s)": lambda: 30 + rng.expovariate(1 / 60),
        "lognormal, mean 120 s, CV 1.0 (heavy tail)": lambda: lognormal(120, 1.0),
    }
    s = PollSettings()
    out = []
    for name, draw in cases.items():
        durations = [max(0.1, draw()) for _ in range(n)]
        mean = statistics.fmean(durations)
        polls, lag = schedule_cost(durations, s.lag_target_share, s)
        fixed_polls, fixed_lag = fixed_schedule_cost(durations, 2 * lag)
        out.append(
            {
                "shape": name,
                "mean_s": round(mean, 1),
                "adaptive_polls": round(polls, 2),
                "adaptive_lag_share": round(lag / mean, 4),
                "fixed_interval_s": round(2 * lag, 2),
                "fixed_polls": round(fixed_polls, 2),
                "fixed_lag_share": round(fixed_lag / mean, 4),
            }
        )
    return out


def bench_download(size_mb: int, work: Path) -> dict[str, Any]:
    blobs = work / "blobs"
    blobs.mkdir(exist_ok=True)
    blob = blobs / "big.mp4"
    rng = random.Random(5)
    with open(blob, "wb") as f:
        # A whole MP4 as the downloader checks one: ftyp, the media data, then a moov box.
        f.write(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom")
        f.write(struct.pack(">I4sQ", 1, b"mdat", 16 + (size_mb << 20)))
        chunk = rng.randbytes(1 << 20)
        for _ in range(size_mb):
            f.write(chunk)
        f.write(struct.pack(">I4s", 8, b"moov"))
    size = blob.stat().st_size
    port, cdn_port = free_port(), free_port()
    sim = start_simulator(
        port, "--tiny-videos", "--blob-dir", str(blobs), "--cdn-port", str(cdn_port)
    )
    try:
        url = f"http://127.0.0.1:{cdn_port}/blobs/big.mp4"
        t0 = time.monotonic()
        subprocess.run(["curl", "-s", "-o", str(work / "curl.mp4"), url], check=True)
        curl_s = time.monotonic() - t0
        (work / "curl.mp4").unlink()  # as the target says: curl's file is never flushed
        # Beside it, what a durable copy costs: the same curl, then an fsync of its file
        # (veobatch fsyncs every video before it counts as done).
        t0 = time.monotonic()
        subprocess.run(["curl", "-s", "-o", str(work / "curl.mp4"), url], check=True)
        fd = os.open(work / "curl.mp4", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        curl_fsync_s = time.monotonic() - t0
        (work / "curl.mp4").unlink()
        probe = [
            sys.executable,
            str(Path(__file__).with_name("download_probe.py")),
            url,
            str(work / "dl"),
            f"http://127.0.0.1:{port}",
        ]
        result = json.loads(
            subprocess.run(probe, check=True, capture_output=True, text=True).stdout
        )
    finally:
        sim.terminate()
        sim.wait()
    ours_s = result["seconds"]
    return {
        "size_mb": round(size / 1e6),
        "curl_s": round(curl_s, 2),
        "curl_mb_s": round(size / 1e6 / curl_s),
        "veobatch_s": round(ours_s, 2),
        "veobatch_mb_s": round(size / 1e6 / ours_s),
        "throughput_vs_curl": round(curl_s / ours_s, 3),
        "curl_then_fsync_s": round(curl_fsync_s, 2),
        "throughput_vs_curl_then_fsync": round(curl_fsync_s / ours_s, 3),
        "rss_growth_mb": result["rss_growth_mb"],
    }


def bench_resume(records: int, work: Path) -> dict[str, Any]:
    probe = [
        sys.executable,
        str(Path(__file__).with_name("resume_probe.py")),
        str(records),
        str(work / "resume"),
    ]
    return dict(
        json.loads(subprocess.run(probe, check=True, capture_output=True, text=True).stdout)
    )


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--download-mb", type=int, default=1024)
    ap.add_argument("--resume-records", type=int, default=100_000)
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument(
        "--skip-default-run",
        action="store_true",
        help="skip the second run, with the morning report, and the report alone",
    )
    ap.add_argument("--skip-download", action="store_true")
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    opts = ap.parse_args()
    report: dict[str, Any] = {"machine": machine()}
    print(f"machine: {report['machine']}", flush=True)
    report["shapes"] = shapes()
    print(json.dumps(report["shapes"], indent=2), flush=True)
    with tempfile.TemporaryDirectory(prefix="veobatch-bench-") as tmp:
        work = Path(tmp)
        if not opts.skip_run:
            run = bench_run(opts.jobs, opts.concurrency, work)
            report["tradeoff"] = tradeoff(run.pop("durations"))
            report["run"] = run
            print(json.dumps(run, indent=2), flush=True)
            print(json.dumps(report["tradeoff"], indent=2), flush=True)
            shutil.rmtree(work / "out", ignore_errors=True)
            ppj = run["polls_per_generation"]
            report["http_floor"] = bench_http_floor(opts.jobs, opts.concurrency, ppj)
            print(json.dumps(report["http_floor"], indent=2), flush=True)
            if not opts.skip_default_run:
                # What cron runs: the same jobs with the morning report at the end.
                default = bench_run(opts.jobs, opts.concurrency, work, report=True)
                default.pop("durations")
                report["default_run"] = default
                print(json.dumps(default, indent=2), flush=True)
                report["report"] = bench_report(work / "out")
                print(json.dumps(report["report"], indent=2), flush=True)
                shutil.rmtree(work / "out", ignore_errors=True)
        if not opts.skip_download:
            report["download"] = bench_download(opts.download_mb, work)
            print(json.dumps(report["download"], indent=2), flush=True)
        if not opts.skip_resume:
            report["resume"] = bench_resume(opts.resume_records, work)
            print(json.dumps(report["resume"], indent=2), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
