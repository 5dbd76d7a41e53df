"""The command line: exit codes, what goes to stdout and stderr, plan and status views."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from veobatch.cli import main
from veobatch.fsutil import ensure_dir
from veobatch.ledger import Ledger
from veobatch.manifest import load_manifest

GOOD = """\
version: 1
jobs:
  - id: one
    model: google/veo-3.1-t2v
    prompt: a cat
    duration: 4
  - id: two
    model: google/veo-3.1-t2v-fast
    prompt: a dog
"""

BAD = """\
version: 1
jobs:
  - id: one
    model: google/veo-3.1-t2v
    prompt: a cat
    duration: 5
  - id: two
    model: google/veo-3.1-t2vv
    prompt: a dog
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_invalid_manifest_exits_2_with_every_problem(runner: CliRunner, tmp_path: Path) -> None:
    m = write(tmp_path, BAD)
    res = runner.invoke(main, ["run", str(m), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "m.yaml:6:15: job 'one': field 'duration'" in res.stderr
    assert "m.yaml:8:12: job 'two': field 'model'" in res.stderr
    assert "did you mean" in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "o").exists()  # nothing started, nothing sent


@pytest.mark.parametrize(
    "option", ["--poll-timeout", "--job-timeout", "--logs-grace", "--max-cost", "--sim-gen-time"]
)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_number_that_is_not_finite_is_refused_before_anything_starts(
    runner: CliRunner, tmp_path: Path, option: str, value: str
) -> None:
    # --poll-timeout inf passed its range, the creates were sent and paid for, then a timer
    # overflowed; --sim-gen-time nan never finished.
    m = write(tmp_path, GOOD)
    res = runner.invoke(
        main, ["run", str(m), "--simulate", "--out", str(tmp_path / "o"), option, value]
    )
    assert res.exit_code == 2
    assert "is not a finite number" in res.stderr or "is not in the range" in res.stderr
    assert not (tmp_path / "o").exists()


def test_settings_refuse_a_timeout_that_is_not_finite() -> None:
    from veobatch.errors import ConfigError
    from veobatch.settings import RunSettings

    with pytest.raises(ConfigError, match="poll timeout must be a positive number, got inf"):
        RunSettings(out_dir=Path("o"), poll_timeout_s=float("inf"))


def test_a_bug_is_one_line_and_exit_3_not_a_traceback(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash inside a run (a video PyAV could not read) ended in a traceback and exit 1,
    # which the README's systemd unit counts as success.
    def boom(path: Path) -> None:
        raise AttributeError("'NoneType' object has no attribute 'width'")

    monkeypatch.setattr("veobatch.cli.load_manifest", boom)
    res = runner.invoke(main, ["run", str(write(tmp_path, BAD)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3
    assert "veobatch: internal error: AttributeError: 'NoneType' object has no attribute" in (
        res.stderr
    )
    assert "Traceback" not in res.stderr


def test_a_bug_inside_a_task_group_names_its_leaf_and_where_it_was_raised(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception)" was all a cron log
    # kept of a rare bug: the line must say what and where without -v.
    def boom(*args: object) -> None:
        raise KeyError("job7")

    async def grouped(*args: object, **kw: object) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(boom)

    monkeypatch.setattr("veobatch.cli.run", grouped)
    monkeypatch.setenv("AIMLAPI_KEY", "sk-test-0123456789")  # checked before the run starts
    res = runner.invoke(main, ["run", str(write(tmp_path, GOOD)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3, res.stderr
    assert "internal error: KeyError: 'job7' at test_cli.py:" in res.stderr
    assert "in boom" in res.stderr and "ExceptionGroup" not in res.stderr


def test_a_simulated_run_marks_its_directory_before_anything_is_recorded(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # .simulator/ appeared only when the simulator journaled its first request: a simulated
    # run stopped between its first intent and that (a Ctrl-C) left a ledger that the next
    # simulated run took for the real API's, and refused (exit 3).
    from veobatch.errors import ConfigError

    seen: list[bool] = []

    async def first_record(manifest: object, settings: Any, **kw: object) -> None:
        seen.append((settings.out_dir / ".simulator").is_dir())
        raise ConfigError("stopped before the first record")

    monkeypatch.setattr("veobatch.cli.run", first_record)
    out = tmp_path / "o"
    res = runner.invoke(main, ["run", str(write(tmp_path, GOOD)), "--simulate", "--out", str(out)])
    assert res.exit_code == 3 and seen == [True]


def test_plan_invalid_manifest_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["plan", str(write(tmp_path, BAD))])
    assert res.exit_code == 2


def test_missing_key_exits_3(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIMLAPI_KEY", raising=False)
    res = runner.invoke(main, ["run", str(write(tmp_path, GOOD)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3
    assert "AIMLAPI_KEY" in res.stderr
    assert not (tmp_path / "o").exists()  # a run that cannot start leaves no folder behind


def test_usage_error_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["run", str(write(tmp_path, GOOD)), "--concurrency", "0"])
    assert res.exit_code == 2


async def test_plan_reads_the_ledger_and_sends_nothing(runner: CliRunner, tmp_path: Path) -> None:
    m = write(tmp_path, GOOD)
    out = tmp_path / "o"
    out.mkdir()
    ledger = Ledger.open(out)
    one = load_manifest(m).jobs[0]  # as sent, not edited since: its look-up pays for nothing
    await ledger.record("intent", "one", crid="c", key=one.key, model="google/veo-3.1-t2v")
    ledger.close()
    res = runner.invoke(main, ["plan", str(m), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [line.split("\t") for line in res.stdout.splitlines() if "\t" in line]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("one", "resumable", "lookup"),
        ("two", "new", "submit"),
    ]
    assert "would submit 1 generation, about $1.20" in res.stdout  # t2v-fast: 8 s x $0.15


async def test_status_table_and_json(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    ledger = Ledger.open(out)
    await ledger.record("intent", "one", crid="c", key="k", model="google/veo-3.1-t2v")
    await ledger.record("submitted", "one", gen="gen-1")
    await ledger.record("intent", "two", crid="c2", key="k", model="google/veo-3.1-t2v")
    await ledger.record("failed", "two", kind="invalid_request", message="HTTP 400: nope")
    ledger.close()
    res = runner.invoke(main, ["status", str(out)])
    assert res.exit_code == 0
    assert "one\tsubmitted\tveo-3.1-t2v\tgen-1" in res.stdout
    assert "two\tfailed" in res.stdout and "invalid_request: HTTP 400: nope" in res.stdout
    assert "2 jobs: 1 submitted, 1 failed" in res.stdout
    assert res.stdout.splitlines()[0].endswith("\tpoll")  # what a rerun would do
    assert res.stdout.splitlines()[1].endswith("\thold")
    assert "a rerun would: 1 poll, 1 hold" in res.stdout
    doc = json.loads(runner.invoke(main, ["status", str(out), "--json"]).stdout)
    assert doc["summary"]["submitted"] == 1 and doc["jobs"][0]["generation_id"] == "gen-1"
    assert doc["jobs"][0]["rerun"] == {"action": "poll", "reason": "in flight"}
    res = runner.invoke(main, ["status", str(out), "--json", "--retry-failed"])
    assert json.loads(res.stdout)["jobs"][1]["rerun"]["action"] == "submit"


async def test_a_hand_edited_results_json_neither_breaks_status_nor_adds_jobs(
    runner: CliRunner, tmp_path: Path
) -> None:
    # results.json is a copy anyone may edit: a note in its list made status and report exit
    # 3 ("internal error"), and a made-up row was listed as a job.
    out = tmp_path / "o"
    out.mkdir()
    ledger = Ledger.open(out)
    await ledger.record("intent", "one", crid="c", key="k", model="google/veo-3.1-t2v")
    await ledger.record("submitted", "one", gen="gen-1")
    ledger.write_results([])
    ledger.close()
    doc = json.loads((out / "results.json").read_text())
    doc["jobs"] += [
        "note: re-check one tomorrow",
        {"id": "ghost", "status": "done", "file": "ghost.mp4", "generation_id": "g"},
        {"id": "later", "status": "pending", "model": "google/veo-3.1-t2v"},  # not yet sent
        {"id": ["one"], "status": "pending"},
    ]
    (out / "results.json").write_text(json.dumps(doc))
    res = runner.invoke(main, ["status", str(out)])
    assert res.exit_code == 0, res.output
    ids = [line.split("\t")[0] for line in res.stdout.splitlines() if "\t" in line]
    assert ids == ["one", "later"]
    assert "2 jobs: 1 pending, 1 submitted" in res.stdout
    res = runner.invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    assert page.count('<article class="card') == 2 and "ghost" not in page


async def test_report_command_writes_the_page(runner: CliRunner, tmp_path: Path) -> None:
    from report_fixture import make_output_dir

    await make_output_dir(tmp_path)
    res = runner.invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.count('<article class="card') == 6
    assert runner.invoke(main, ["report", str(tmp_path / "nope")]).exit_code == 2


def test_notify_url_in_the_manifest_is_checked(runner: CliRunner, tmp_path: Path) -> None:
    bad = GOOD.replace("jobs:", "settings:\n  notify_url: hooks.example.com/x\njobs:", 1)
    res = runner.invoke(main, ["plan", str(write(tmp_path, bad))])
    assert res.exit_code == 2 and "notify_url" in res.stderr and "http(s) URL" in res.stderr


def test_a_bad_notify_url_in_the_manifest_is_not_echoed(runner: CliRunner, tmp_path: Path) -> None:
    for url in ("hooks.example.com/T0/B0/SECRET", "ftp://hooks.example.com/T0/B0/SECRET"):
        bad = GOOD.replace("jobs:", f"settings:\n  notify_url: {url}\njobs:", 1)
        res = runner.invoke(main, ["plan", str(write(tmp_path, bad))])
        assert res.exit_code == 2 and "notify_url" in res.stderr
        assert "SECRET" not in res.stderr and "T0" not in res.stderr


def test_status_of_a_missing_directory_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(main, ["status", str(tmp_path / "nope")]).exit_code == 2


def test_errors_inside_task_groups_are_reported_plainly() -> None:
    from veobatch.errors import LedgerError, first_leaf

    inner = LedgerError("cannot write ledger.jsonl: No space left on device")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
    assert first_leaf(group) is inner
    plain = ExceptionGroup("g", [ValueError("x")])
    assert first_leaf(plain) is plain


def test_an_os_error_is_one_line_and_exit_3(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import errno
    import logging

    from veobatch.cli import _guard

    def full() -> None:
        inner = OSError(errno.ENOSPC, "No space left on device", "/srv/out/x")
        raise ExceptionGroup("run", [ExceptionGroup("tasks", [inner])])

    with pytest.raises(SystemExit) as exited:
        _guard(full)
    assert exited.value.code == 3
    err = capsys.readouterr().err
    assert err == "veobatch: system error: /srv/out/x: No space left on device\n"
    assert not caplog.records  # no traceback unless -v asks for it
    caplog.set_level(logging.DEBUG, "veobatch")
    with pytest.raises(SystemExit):
        _guard(full)
    assert caplog.records[0].exc_info is not None


async def test_a_report_that_cannot_be_written_names_its_file(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk said "report failed: OSError: [Errno 28] No space left on device".
    import contextlib
    import errno
    import logging

    from veobatch import report
    from veobatch.cli import _final_report
    from veobatch.manifest import Manifest
    from veobatch.runner import RunReport

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")  # names no file

    @contextlib.contextmanager
    def full(path: Path) -> Iterator[Full]:
        yield Full()

    out = tmp_path / "o"
    out.mkdir()
    Ledger.open(out).close()
    monkeypatch.setattr(report, "atomic_writer", full)
    caplog.set_level(logging.ERROR, "veobatch")
    done = RunReport(out, {}, [], [], [])
    assert _final_report(Manifest(tmp_path / "m.yaml", ()), done) is None
    page = out / "report.html"
    assert caplog.messages == [f"report failed: cannot write {page}: No space left on device"]
    res = runner.invoke(main, ["report", str(out)])
    assert res.exit_code == 3
    assert res.stderr == f"veobatch: system error: {page}: No space left on device\n"


def test_plan_warns_when_videos_sit_beside_an_empty_ledger(
    runner: CliRunner, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "ledger.jsonl").write_bytes(b"")
    (out / "one.mp4").write_bytes(b"video")
    manifest = str(write(tmp_path, GOOD))
    res = runner.invoke(main, ["plan", manifest, "--out", str(out)])
    assert res.exit_code == 0 and "warning" not in res.stderr  # not a veobatch directory
    (out / "results.json").write_text('{"jobs": []}')  # it was one: the video is ours
    res = runner.invoke(main, ["plan", manifest, "--out", str(out)])
    assert res.exit_code == 0
    assert "warning: no ledger records" in res.stderr and "1 video (one.mp4)" in res.stderr


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook in a thread of its own: the CLI under test blocks the test's thread."""
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Hook) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
        finally:
            server.shutdown()
            thread.join()


# What a run must stop on: a hangup is a closed terminal or a dropped ssh session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture
def own_signals() -> Iterator[None]:
    """`run` installs its signal handlers in this process: give the old ones back. Ignored
    until then, so a signal the CLI leaves alone fails the test instead of killing pytest."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("own_signals")
@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_the_manifest_is_validated_says_so_and_tells_the_webhook(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    webhook: tuple[str, list[dict[str, Any]]],
    sig: int,
) -> None:
    def validating(path: Path) -> None:  # a large manifest takes seconds to validate
        os.kill(os.getpid(), sig)
        time.sleep(3)  # the handler ends this at once
        raise AssertionError("not interrupted")

    monkeypatch.setattr("veobatch.cli.load_manifest", validating)
    url, got = webhook
    out = tmp_path / "o"
    res = runner.invoke(
        main, ["run", str(write(tmp_path, GOOD)), "--out", str(out), "--notify", url]
    )
    name = signal.Signals(sig).name
    assert res.exit_code == 75
    assert res.stderr.startswith(f"veobatch: interrupted by {name}; run again to resume\n")
    assert got == [
        {
            "text": f"veobatch: m.yaml: run aborted (exit 75): interrupted by {name}; run again "
            "to resume",
            "event": "veobatch.run.aborted",
            "exit_code": 75,
            "interrupted": True,
            "manifest": "m.yaml",
            "out_dir": str(out),
            "error": f"interrupted by {name}; run again to resume",
        }
    ]
    assert res.stdout == "" and not out.exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_while_the_command_starts_exits_75(sig: str) -> None:
    # Before the CLI's imports end its own handlers do not exist yet: a cron line that
    # reruns on 75 must see 75, not a death by the signal.
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from veobatch._entry import install_early_handlers\n"
        "install_early_handlers()\n"
        f"os.kill(os.getpid(), signal.{sig})\n"
        "time.sleep(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 75
    assert proc.stderr == f"veobatch: interrupted by {sig}; run again\n"
    assert proc.stdout == proc.stderr  # cron's mail (stdout) is told too, as for any early end


def test_a_stop_signal_while_the_command_starts_is_a_json_record_when_asked() -> None:
    import json
    import subprocess
    import sys

    code = (
        "import os, signal, sys, time\n"
        "sys.argv = ['veobatch', 'run', 'm.yaml', '--log-format', 'json']\n"
        "from veobatch._entry import install_early_handlers\n"
        "install_early_handlers()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 75
    record = json.loads(proc.stderr)
    assert record["event"] == "exit" and record["exit_code"] == 75 and record["level"] == "error"
    assert record["message"] == "veobatch: interrupted by SIGTERM; run again"
    assert proc.stdout == "veobatch: interrupted by SIGTERM; run again\n"  # the mail stays text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "m.yaml", "--log-format", "json"], True),
        (["run", "--log-format=json", "m.yaml"], True),
        (["run", "m.yaml", "--log-format", "text"], False),
        (["run", "m.yaml", "--log-format"], False),
        (["run", "--", "--log-format=json"], False),
        (["run", "m.yaml"], False),
    ],
)
def test_the_early_handler_reads_the_log_format_from_the_unread_command_line(
    args: list[str], expected: bool
) -> None:
    from veobatch._entry import wants_json

    assert wants_json(args) is expected


def test_a_hangup_ignored_before_the_command_starts_stays_ignored() -> None:
    import subprocess
    import sys

    code = (
        "import os, signal\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from veobatch._entry import install_early_handlers\n"
        "install_early_handlers()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "True\n"


def test_importing_the_package_does_not_import_the_pipeline() -> None:
    import subprocess
    import sys

    code = "import sys, veobatch\nprint('aiohttp' in sys.modules, veobatch.Job.__name__)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout == "False Job\n", proc.stderr


@pytest.mark.parametrize("command", ["status", "report"])
def test_a_folder_no_run_wrote_is_refused_with_the_runs_in_it(
    runner: CliRunner, tmp_path: Path, command: str
) -> None:
    # `status output` for `status output/nightly`: "0 jobs" would read as a run that did nothing.
    (tmp_path / "nightly").mkdir()
    (tmp_path / "nightly" / "ledger.jsonl").write_bytes(b"")
    res = runner.invoke(main, [command, str(tmp_path)])
    assert res.exit_code == 2
    assert "has no ledger.jsonl" in res.stderr
    assert str(tmp_path / "nightly") in res.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("command", ["status", "report"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_ledger_that_is_no_file_is_named_with_exit_3(
    runner: CliRunner, tmp_path: Path, command: str, kind: str
) -> None:
    # As plan and run do: the ledger is there, it is what it is that is wrong.
    ledger = tmp_path / "ledger.jsonl"
    if kind == "directory":
        ledger.mkdir()
    else:
        os.mkfifo(ledger)
    res = runner.invoke(main, [command, str(tmp_path)])
    assert res.exit_code == 3, res.output
    assert f"{ledger} is a" in res.stderr and "has no ledger.jsonl" not in res.stderr
    assert not (tmp_path / "report.html").exists()


def test_plan_beside_a_results_row_whose_id_is_a_list_plans(
    runner: CliRunner, tmp_path: Path
) -> None:
    # A hand-edited results.json and no ledger: such a row names no job, never a traceback.
    out = ensure_dir(tmp_path / "out")
    (out / "results.json").write_text('{"jobs":[{"id":["one"],"generation_id":"g"}]}')
    res = runner.invoke(main, ["plan", str(write(tmp_path, GOOD)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "would submit 2 generations" in res.stdout and "no ledger records" not in res.stderr


def test_a_run_from_another_directory_does_not_start_a_second_ledger(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cron starts in $HOME: the default output/<stem> would be a new, empty ledger there.
    proj = tmp_path / "proj"
    m = write(ensure_dir(proj / "jobs"), GOOD)
    earlier = ensure_dir(proj / "output" / "m")
    (earlier / "ledger.jsonl").write_text('{"ev":"intent","job":"one"}\n')
    monkeypatch.chdir(ensure_dir(tmp_path / "home"))
    res = runner.invoke(main, ["run", str(m), "--simulate"])
    assert res.exit_code == 3
    assert "holds earlier runs of m.yaml" in res.stderr and f"--out {earlier}" in res.stderr
    assert not (tmp_path / "home" / "output").exists()  # nothing started, nothing sent
    res = runner.invoke(main, ["plan", str(m)])
    assert res.exit_code == 0 and f"compare with it by --out {earlier}" in res.stderr
    # Saying where is enough, even to start anew.
    res = runner.invoke(main, ["plan", str(m), "--out", "output/m"])
    assert res.exit_code == 0 and "earlier runs" not in res.stderr
    # From the manifest's own folder, named relatively: its parent's output/ is found too.
    monkeypatch.chdir(proj / "jobs")
    res = runner.invoke(main, ["run", "m.yaml", "--simulate"])
    assert res.exit_code == 3 and f"--out {earlier}" in res.stderr
    # Another manifest of the same name, whose jobs that ledger never saw, is its own.
    other = write(ensure_dir(proj / "archive"), GOOD.replace("id: one", "id: uno"))
    other.write_text(other.read_text().replace("id: two", "id: dos"))
    res = runner.invoke(main, ["plan", str(other)])
    assert res.exit_code == 0 and "earlier runs" not in res.stderr


@pytest.mark.parametrize(("value", "ok"), [("0.5", True), ("0", False), ("-1", False)])
def test_job_timeout_takes_what_the_manifest_setting_takes(
    runner: CliRunner, tmp_path: Path, value: str, ok: bool
) -> None:
    # settings.job_timeout_s takes any positive number; the flag that overrides it refused 0.5.
    res = runner.invoke(main, ["run", str(tmp_path / "none.yaml"), "--job-timeout", value])
    assert res.exit_code == 2
    assert ("--job-timeout" in res.stderr) is not ok


def test_poll_timeout_reaches_the_run_settings(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import veobatch.cli as cli
    from veobatch.errors import ConfigError
    from veobatch.settings import RunSettings

    seen: list[RunSettings] = []
    real = cli.resolve_settings

    def resolve(*args: Any) -> RunSettings:
        seen.append(real(*args))
        raise ConfigError("stop here")  # nothing is sent

    monkeypatch.setattr(cli, "resolve_settings", resolve)
    m = write(tmp_path, GOOD)
    out = str(tmp_path / "o")
    res = runner.invoke(main, ["run", str(m), "--out", out, "--poll-timeout", "2.5"])
    assert res.exit_code == 3 and [s.poll_timeout_s for s in seen] == [2.5]
    res = runner.invoke(main, ["run", str(m), "--poll-timeout", "0"])
    assert res.exit_code == 2 and "--poll-timeout" in res.stderr


def test_a_signal_the_start_up_handler_took_is_said_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `veobatch report` interrupted printed its line twice: the start-up handler's, then
    # _guard's. The webhook of a run is still told.
    from veobatch._entry import EarlyStop
    from veobatch.cli import _guard

    told: list[tuple[int, bool]] = []

    def stopped() -> None:
        raise EarlyStop(signal.SIGTERM)

    with pytest.raises(SystemExit) as exc:
        _guard(stopped, lambda code, line, interrupted: told.append((code, interrupted)))
    assert exc.value.code == 75
    assert capsys.readouterr().err == ""
    assert told == [(75, True)]
