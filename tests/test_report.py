"""The morning report: cards from the ledger, escaping, no network, and a real browser."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixture import EVIL, REQUESTS, T2V, VIDEOS, make_output_dir

from veobatch.jobs import MADE_ID_MAX_LEN
from veobatch.ledger import ErrorInfo, JobState
from veobatch.report import (
    THUMBS_DIR,
    Card,
    _thumb,
    build_cards,
    card_for,
    render_html,
    write_report,
)
from veobatch.simulator.video import encode_test_card
from veobatch.verify import Probe


def test_card_from_a_results_row_and_the_ledger() -> None:
    row = {
        "id": "a",
        "status": "done",
        "model": "google/veo-3.1-t2v",
        "generation_id": "g",
        "file": "a.mp4",
        "bytes": 2_500_000,
        "error": None,
        "video": {"duration_s": 4.0, "width": 1280, "height": 720, "audio": True},
        "flags": ["duration: 4.0 s, requested 8 s"],
    }
    st = JobState("a", "done", generation_id="g", submitted_at=100.0, completed_at=160.0)
    card = card_for(row, st, {"prompt": "p", "resolution": "720p"})
    assert (card.prompt, card.params, card.group) == ("p", {"resolution": "720p"}, "done")
    assert card.video == Probe(4.0, 1280, 720, True) and card.flags == (row["flags"][0],)
    assert card.gen_time_s == 60.0 and card.cost_usd == pytest.approx(3.2)  # 8 s x $0.40
    failed = card_for(
        {"id": "b", "status": "failed", "error": {"kind": "invalid_request", "message": "no"}},
        JobState("b", "failed"),
        None,
    )
    assert failed.error == "invalid_request: no" and failed.cost_usd is None  # never created
    assert card_for({"id": "c", "status": "submitting"}, None, None).group == "uncertain"
    errored = JobState(
        "d", "failed", generation_id="g2", error=ErrorInfo("generation_error", "blocked")
    )
    row = {"id": "d", "status": "failed", "model": "google/veo-3.1-t2v"}
    assert card_for(row, errored, {"prompt": "p"}).cost_usd is None  # errors are not billed
    lost = JobState("e", "failed", generation_id="g3", error=ErrorInfo("timeout", "slow"))
    row = {"id": "e", "status": "failed", "model": "google/veo-3.1-t2v"}
    assert card_for(row, lost, {"prompt": "p"}).cost_usd == pytest.approx(3.2)  # may be billed


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_escapes_user_text_and_loads_nothing_from_the_network() -> None:
    cards = [
        Card("x", "failed", "google/veo-3.1-t2v", prompt=EVIL, error=f"kind: {EVIL}"),
        Card("y", "done", "m", file="y.mp4", thumb=b"\xff\xd8jpeg", flags=("audio: x",)),
    ]
    page = render_html(cards, title=f"t {EVIL}", generated_at=0.0)
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    parser = _Tags()
    parser.feed(page)
    assert [t for t, _ in parser.tags].count("script") == 1  # ours, inline
    assert [t for t, _ in parser.tags].count("img") == 1  # y's thumbnail only
    for tag, attrs in parser.tags:
        for name in ("src", "href", "poster", "data-video"):
            value = attrs.get(name) or ""
            assert not re.match(r"^\s*(https?:)?//", value), (tag, name, value)
        if tag == "img":
            assert (attrs["src"] or "").startswith("data:image/jpeg;base64,")
            assert attrs["data-video"] == "y.mp4"
    csp = next(a for t, a in parser.tags if a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in (csp["content"] or "")
    assert 'data-f="failed" aria-pressed="false">failed 1<' in page
    assert 'data-f="flagged" aria-pressed="false">flagged 1<' in page


async def test_build_cards_from_a_directory(tmp_path: Path) -> None:
    await make_output_dir(tmp_path)
    cards = {c.id: c for c in build_cards(tmp_path)}
    assert list(cards) == list(REQUESTS)
    assert {c.id for c in cards.values() if c.thumb} == {"sunrise", "portrait", "short"}
    assert cards["short"].flags[0] == "duration: 1.0 s, requested 8 s"
    assert cards["sunrise"].flags and "resolution" in cards["sunrise"].flags[0]  # 128x72
    assert cards["broken"].error == "invalid_request: HTTP 400: nope"
    assert cards["lost"].group == "uncertain" and cards["waiting"].group == "unfinished"
    assert cards["portrait"].prompt == EVIL and cards["sunrise"].gen_time_s == 42.0
    assert len(list((tmp_path / THUMBS_DIR).glob("*.jpg"))) == 3  # cached for the next report
    (tmp_path / "sunrise.mp4").unlink()
    again = {c.id: c for c in build_cards(tmp_path)}
    assert again["sunrise"].file is None and again["sunrise"].thumb is None


async def test_the_report_opens_no_link_or_fifo_and_writes_no_thumbnail_through_a_link(
    tmp_path: Path,
) -> None:
    # --out may be shared: a video that is a link is not the job's video (nor read through),
    # a FIFO is never opened (the report hung), and thumbnails are not cached through a link.
    from fifos import fifo_at

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    await make_output_dir(out, with_probes=False)
    elsewhere.mkdir()
    (out / "sunrise.mp4").rename(elsewhere / "sunrise.mp4")
    (out / "sunrise.mp4").symlink_to(elsewhere / "sunrise.mp4")
    (out / "short.mp4").unlink()
    (out / THUMBS_DIR).symlink_to(elsewhere, target_is_directory=True)
    with fifo_at(out / "short.mp4") as freed:
        cards = {c.id: c for c in build_cards(out)}
    assert not freed
    assert cards["sunrise"].file is None and cards["short"].file is None
    assert cards["portrait"].thumb is not None  # the regular one is shown as ever
    assert sorted(p.name for p in elsewhere.iterdir()) == ["sunrise.mp4"]


async def test_ledgers_without_probes_are_probed_for_the_report(tmp_path: Path) -> None:
    await make_output_dir(tmp_path, with_probes=False)
    cards = {c.id: c for c in build_cards(tmp_path)}
    assert cards["short"].video is not None and cards["short"].video.duration_s == 1.0
    assert cards["short"].flags[0] == "duration: 1.0 s, requested 8 s"


def test_a_thumbnail_of_the_longest_made_id_fits_a_file_name(tmp_path: Path) -> None:
    # A made id may be 236 characters; "<id>-<tag>.jpg" and its temporary name must fit 255.
    jid = "x" * MADE_ID_MAX_LEN
    encode_test_card(VIDEOS["sunrise"], tmp_path / f"{jid}.mp4")
    card = Card(jid, "done", T2V, file=f"{jid}.mp4", file_bytes=1)
    thumb = _thumb(tmp_path, card, "ab" * 32)
    assert thumb is not None and thumb.startswith(b"\xff\xd8")  # a JPEG
    (cached,) = (tmp_path / THUMBS_DIR).iterdir()
    assert len(cached.name) <= 255 and cached.read_bytes() == thumb
    assert _thumb(tmp_path, card, "ab" * 32) == thumb  # read from the cache
    other = Card("x" * (MADE_ID_MAX_LEN - 1) + "y", "done", T2V, file=f"{jid}.mp4", file_bytes=1)
    _thumb(tmp_path, other, "ab" * 32)
    assert len(list((tmp_path / THUMBS_DIR).iterdir())) == 2  # ids alike in their start


async def test_a_thumbnail_that_cannot_be_cached_is_shown_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk failed the whole report and left an empty temporary file in .thumbs/.
    import errno
    import logging

    from veobatch import report

    await make_output_dir(tmp_path)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd: int) -> None:
            self.f = real_fdopen(fd, "wb")

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.WARNING, "veobatch")
    with monkeypatch.context() as m:
        # os is shared: only the thumbnail's write fails, the ledger and videos still read
        m.setattr(
            report.os,
            "fdopen",
            lambda fd, mode, *a, **k: Full(fd) if mode == "wb" else real_fdopen(fd, mode, *a, **k),
        )
        cards = build_cards(tmp_path)
    assert os.listdir(tmp_path / THUMBS_DIR) == []  # no temporary file left behind
    assert sum(1 for c in cards if c.thumb) == 3  # the pictures, all the same
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned  # once, not once per video
    assert warned[0].startswith(f"thumbnails not cached: cannot write {tmp_path / THUMBS_DIR}/")
    assert warned[0].endswith(": No space left on device (the report shows them all the same)")
    write_report(tmp_path)  # the next report caches them
    assert len(os.listdir(tmp_path / THUMBS_DIR)) == 3


async def test_the_report_page_is_readable_as_the_umask_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It holds the prompts and a frame of every video: under umask 077 it was made 0644.
    import stat

    from veobatch import fsutil

    await make_output_dir(tmp_path)
    monkeypatch.setattr(fsutil, "_UMASK", 0o077)
    assert stat.S_IMODE(write_report(tmp_path).stat().st_mode) == 0o600
    monkeypatch.setattr(fsutil, "_UMASK", 0o022)
    assert stat.S_IMODE(write_report(tmp_path).stat().st_mode) == 0o644


async def test_a_report_that_cannot_be_written_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from veobatch import report

    await make_output_dir(tmp_path)
    (tmp_path / "report.html").write_bytes(b"yesterday's")
    written = []
    real_writer = report.atomic_writer

    @contextlib.contextmanager
    def full(path: Path) -> Iterator[object]:
        with real_writer(path) as f:

            class Full:
                def write(self, data: bytes) -> int:
                    if written:  # the disk fills up after the header
                        raise OSError(errno.ENOSPC, "No space left on device")  # no file named
                    written.append(data)
                    return f.write(data)

            yield Full()

    monkeypatch.setattr(report, "atomic_writer", full)
    with pytest.raises(OSError) as raised:
        write_report(tmp_path)
    assert raised.value.filename == str(tmp_path / "report.html")
    assert raised.value.errno == errno.ENOSPC
    assert (tmp_path / "report.html").read_bytes() == b"yesterday's"  # the old page, whole
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("with_probes", [True, False])
async def test_the_streamed_page_is_the_whole_page_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_probes: bool
) -> None:
    # The report is written card by card; the page must be what render_html makes of the
    # same cards: counts in the header after the files are looked at (a link is no video,
    # an old ledger's video is probed and flagged), thumbnails, failed and flagged cards.
    import time
    from types import SimpleNamespace

    from veobatch import report

    await make_output_dir(tmp_path, with_probes=with_probes)
    (tmp_path / "portrait.mp4").rename(tmp_path / "elsewhere.mp4")
    (tmp_path / "portrait.mp4").symlink_to(tmp_path / "elsewhere.mp4")
    clock = SimpleNamespace(
        time=lambda: 1_800_000_000.0, strftime=time.strftime, localtime=time.localtime
    )
    monkeypatch.setattr(report, "time", clock)
    cards = build_cards(tmp_path)
    assert [c.id for c in cards if c.thumb] == ["sunrise", "short"]  # thumbnails
    flagged = ["sunrise", "portrait", "short"] if with_probes else ["sunrise", "short"]
    assert [c.id for c in cards if c.flags] == flagged  # a link is not probed
    assert [c.id for c in cards if c.file] == ["sunrise", "short"]  # not the link
    assert [c.status for c in cards].count("failed") == 1
    page = render_html(cards, title="t", generated_at=1_800_000_000.0)
    assert write_report(tmp_path, title="t").read_bytes() == page.encode()
    size = sum((tmp_path / f"{jid}.mp4").stat().st_size for jid in ("sunrise", "short"))
    assert f">flagged {len(flagged)}<" in page and f"· {report._size(size)} of video ·" in page


def test_a_report_holds_a_window_of_thumbnails_not_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 10,000 jobs the report took 280 MB on top of the run: every card with its thumbnail,
    # then the page as one string, then its bytes. Written card by card, memory stays flat.
    import tracemalloc

    from veobatch import report

    n, thumb = 2_000, 20_000
    states = {}
    for i in range(n):
        jid = f"j{i:04d}"
        (tmp_path / f"{jid}.mp4").write_bytes(b"")
        states[jid] = JobState(
            jid,
            "done",
            model=T2V,
            file=f"{jid}.mp4",
            bytes=1_000_000,
            sha256=f"{i:064x}",
            video=Probe(4.0, 1920, 1080, False).to_json(),
            request={"prompt": f"shot {i}", "duration": 4},
        )
    made = []

    def fake_thumb(directory: Path, card: Card, sha256: str | None, cache: object = None) -> bytes:
        made.append(card.id)
        return bytes(thumb)  # a new 20 KB picture each time, as a decoder makes them

    monkeypatch.setattr(report, "_thumb", fake_thumb)
    tracemalloc.start()
    try:
        path = write_report(tmp_path, states=states)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(made) == n and path.read_bytes().count(b'<img class="thumb"') == n
    assert path.stat().st_size > n * thumb  # 53 MB of page: 40 MB of pictures, base64
    assert peak < 12_000_000, peak  # 3 MB; 313 MB when every card was kept and joined


def test_cards_come_in_order_with_a_window_in_flight() -> None:
    # pool.map submitted every card at once and kept every result until the end.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from veobatch.report import _in_order

    third_done = threading.Event()
    pulled = []

    def items() -> Iterator[int]:
        for i in range(100):
            pulled.append(i)
            yield i

    def work(i: int) -> int:
        if i == 0:  # the first finishes after the third: still handed back first
            assert third_done.wait(10)
        if i == 2:
            third_done.set()
        return i * i

    with ThreadPoolExecutor(2) as pool:
        got = []
        for n, result in enumerate(_in_order(pool, work, items(), window=3)):
            assert len(pulled) <= n + 4  # the one handed back, and three in flight
            got.append(result)
        assert got == [i * i for i in range(100)]
        calls = []
        cards = _in_order(pool, calls.append, range(100), window=5)
        next(cards)
        cards.close()  # the consumer stopped (a full disk): the rest is never started
    assert len(calls) <= 5


# -- in a real browser ---------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str:
    """The browser, or a failure: CI installs it (.ci/run); skip only when asked to."""
    if os.environ.get("VEOBATCH_SKIP_BROWSER") == "1":
        pytest.skip("VEOBATCH_SKIP_BROWSER=1")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium not found: apt-get install -y chromium (or VEOBATCH_SKIP_BROWSER=1)")
    return found


def browse(url: str, tmp: Path, *extra: str) -> str:
    cmd = [
        chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def selfcheck(dom: str) -> dict[str, str]:
    tag = re.search(r"<output id=\"selfcheck\"[^>]*>", dom)
    assert tag is not None, dom[:500]
    return dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', tag.group(0)))


@pytest.mark.browser
async def test_report_renders_cards_thumbnails_filters_and_video_in_chromium(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    await make_output_dir(out)
    page = write_report(out).resolve()
    dom = browse(f"{page.as_uri()}?selftest=play", tmp_path, "--dump-dom")
    assert 'data-rendered="1"' in dom  # the page's script ran
    check = selfcheck(dom)
    assert check["data-cards"] == "6" and check["data-visible"] == "6"
    assert check["data-thumbs"] == "3" and check["data-thumbs-ok"] == "3"  # decoded images
    assert check["data-video-width"] == "128"  # the first video played from its file
    assert "data-video-error" not in check
    assert dom.count('class="card') == 6 and "&lt;script&gt;alert" in dom
    for fragment, visible in (("failed", 1), ("uncertain", 1), ("flagged", 3), ("done", 3)):
        check = selfcheck(browse(f"{page.as_uri()}#{fragment}", tmp_path, "--dump-dom"))
        assert (check["data-filter"], check["data-visible"]) == (fragment, str(visible))
    png = tmp_path / "report.png"
    browse(page.as_uri(), tmp_path, f"--screenshot={png}", "--window-size=1200,900")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
