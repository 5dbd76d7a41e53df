"""A corpus of broken manifests: each exits 2, names the line and field, and sends nothing.

Every file in tests/manifests/broken/ says what it expects in its first line:
``# expect: [file NAME] line N [field F]``. Each is run through the real CLI (``veobatch run``
in its own process) against a loopback server that counts every request it receives.
"""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from cli_process import start_cli

from veobatch.images import MAX_FILE_BYTES

CORPUS = Path(__file__).parent / "manifests" / "broken"
EXPECT = re.compile(
    r"#\s*expect:\s*(?:file (?P<file>\S+)\s+)?line (?P<line>\d+)(?:\s+field (?P<field>\S+))?"
)


@dataclass(frozen=True)
class Case:
    path: Path
    file: str
    line: int
    field: str | None


def cases() -> list[Case]:
    out = []
    for path in sorted(CORPUS.glob("*.yaml")):
        match = EXPECT.match(path.read_text().splitlines()[0])
        assert match, f"{path.name} has no '# expect:' first line"
        out.append(Case(path, match["file"] or path.name, int(match["line"]), match["field"]))
    return out


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def _any(self) -> None:
        self.hits.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def counting_server() -> Iterator[tuple[str, list[str]]]:
    hits: ClassVar[list[str]] = []
    handler = type("Handler", (_Counting,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the corpus plus the one file too big to commit (sparse: no disk used)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(CORPUS, root, dirs_exist_ok=True)
    with (root / "files" / "huge.png").open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1_000_000)
    return root


def test_the_corpus_is_big_enough() -> None:
    assert len(cases()) >= 25


def test_every_broken_manifest_exits_2_names_line_and_field_and_sends_nothing(
    corpus: Path, counting_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, hits = counting_server
    env = {"AIMLAPI_KEY": "corpus-test-key", "AIMLAPI_BASE_URL": url, "NO_COLOR": "1"}

    def run(case: Case) -> tuple[Case, subprocess.CompletedProcess[str]]:
        manifest = corpus / case.path.name
        out = tmp_path / case.path.stem
        proc = start_cli("run", str(manifest), "--out", str(out), env=env)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return case, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, cases()))
    failures = []
    for case, done in results:
        text = done.stderr + done.stdout
        where = re.search(rf"{re.escape(case.file)}:{case.line}(:\d+)?: ", text)
        field_ok = case.field is None or f"field '{case.field}'" in text
        if done.returncode != 2 or where is None or not field_ok:
            failures.append(f"{case.path.name}: exit {done.returncode}\n{text}")
        # stdout (cron's mail) says why too, and nothing else: the same lines as stderr.
        assert done.stdout and done.stdout in done.stderr, f"{case.path.name}: {done.stdout!r}"
    assert not failures, "\n\n".join(failures)
    assert hits == [], f"requests were sent: {hits}"


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.path.stem)
def test_plan_reports_the_same_problem(case: Case, corpus: Path) -> None:
    from veobatch.errors import ManifestError
    from veobatch.manifest import load_manifest

    with pytest.raises(ManifestError) as err:
        load_manifest(corpus / case.path.name)
    hit = [
        p
        for p in err.value.problems
        if Path(p.file).name == case.file
        and p.line == case.line
        and (case.field is None or p.field == case.field)
    ]
    assert hit, "\n".join(str(p) for p in err.value.problems)
    assert all(p.message for p in err.value.problems)
