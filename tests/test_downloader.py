"""The downloader: URL rules and file checks as tables, then streaming against a local server."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from local_server import serve, serve_raw
from mp4s import FTYP, box, mp4

import veobatch.downloader as dl
from veobatch.downloader import (
    INCOMPLETE,
    Downloaded,
    check_video_url,
    download,
    file_matches,
    looks_like_mp4,
    request_target,
)
from veobatch.errors import DownloadError, UrlRejectedError
from veobatch.simulator.video import VideoSpec, encode_test_card
from veobatch.transfer import (
    Body,
    ContentRange,
    MinimumRate,
    PartInfo,
    mp4_boxes_complete,
    parse_content_range,
    plan_body,
)

MP4 = mp4(bytes(range(256)) * 4000)  # ~1 MB


@pytest.mark.parametrize(
    ("url", "api", "ok"),
    [
        ("https://cdn.aimlapi.com/x.mp4", "https://api.aimlapi.com", True),
        ("http://cdn.aimlapi.com/x.mp4", "https://api.aimlapi.com", False),
        ("http://127.0.0.1:9/x.mp4", "http://127.0.0.1:8", True),  # the simulator
        ("http://localhost:9/x.mp4", "http://127.0.0.1:8", True),
        ("http://127.0.0.1:9/x.mp4", "https://api.aimlapi.com", False),
        ("http://10.0.0.1/x.mp4", "http://127.0.0.1:8", True),  # the API base is plain http
        # A plain-http API on a normal host, e.g. a mock in a container network.
        ("http://mock-api:8080/v/x.mp4", "http://mock-api:8080", True),
        ("http://mock-cdn/x.mp4", "http://mock-api:8080/v2", True),
        ("https://mock-cdn/x.mp4", "http://mock-api:8080", True),
        ("HTTP://mock-cdn/x.mp4", "http://mock-api:8080", True),
        ("http://mock-cdn/x.mp4", "https://mock-api:8080", False),  # a downgrade
        ("http://127.0.0.1:9/x.mp4", "https://127.0.0.1:8", False),
        ("file:///etc/passwd", "http://127.0.0.1:8", False),
        ("ftp://cdn/x.mp4", "https://api.aimlapi.com", False),
        ("ftp://cdn/x.mp4", "http://mock-api:8080", False),
        ("https:///nohost", "https://api.aimlapi.com", False),
        ("http:///nohost", "http://mock-api:8080", False),
        ("//cdn/x.mp4", "http://mock-api:8080", False),
    ],
)
def test_url_rules(url: str, api: str, ok: bool) -> None:
    if ok:
        check_video_url(url, api)
    else:
        with pytest.raises(UrlRejectedError):
            check_video_url(url, api)


def test_url_errors_do_not_show_query_strings() -> None:
    with pytest.raises(UrlRejectedError) as info:
        check_video_url("http://cdn/x.mp4?signature=SECRET", "https://api")
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "api", "reason"),
    [
        ("http://cdn/x.mp4", "https://api", "plain http while the API base is https"),
        ("ftp://cdn/x.mp4", "http://api", "not an https URL"),
        ("http:///x.mp4", "http://api", "the URL has no host"),
    ],
)
def test_url_errors_say_why(url: str, api: str, reason: str) -> None:
    with pytest.raises(UrlRejectedError) as info:
        check_video_url(url, api)
    assert str(info.value).startswith("refusing to fetch video from ")
    assert str(info.value).endswith(reason + " (a downgrade)" * ("plain" in reason))


def test_url_errors_do_not_show_credentials() -> None:
    with pytest.raises(UrlRejectedError) as info:
        check_video_url("http://user:PASSWORD@cdn/x.mp4", "https://api")
    assert "PASSWORD" not in str(info.value) and "http://cdn/x.mp4" in str(info.value)


PORT = "malformed URL: its port is not a number from 1 to 65535"
HOST = "malformed URL: its host cannot be read (look at its [ ] and its characters)"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:99999/x.mp4", PORT),
        ("http://cdn:abc/x.mp4", PORT),
        ("http://cdn:+80/x.mp4", PORT),  # yarl would read 80, urllib nothing: refused
        ("http://cdn:0/x.mp4", PORT),  # nothing listens on port 0
        ("http://[::1/x.mp4", HOST),
        ("http://[zz]/x.mp4", HOST),
        ("http://user:PASSWORD@[::1/x.mp4", HOST),
        # Hosts DNS cannot be asked for, by IDNA's rules: an empty label, one over 63 characters.
        ("http://a..example/x.mp4", "it cannot be sent as written (encoding with 'idna' codec"),
        (f"http://{'a' * 64}.example/x.mp4", "it cannot be sent as written (encoding with 'idna'"),
        ("http://\u2603\ufe0f.example/x.mp4", "it cannot be sent as written (Host '"),
        ("http://cdn/\udcff.mp4", "it cannot be sent as written ('utf-8' codec can't encode"),
    ],
)
def test_a_malformed_url_is_refused_never_raised_as_a_bug(url: str, reason: str) -> None:
    # A ValueError here stopped the whole run, and every rerun (the job stays completed).
    with pytest.raises(UrlRejectedError) as info:
        check_video_url(url + "?sig=SECRET", "http://api:8080")
    assert str(info.value).startswith("refusing to fetch video from http://")
    assert reason in str(info.value)
    assert "SECRET" not in str(info.value) and "PASSWORD" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://[::1]:8443/x%2C.mp4?s=%2C", "https://[::1]:8443/x%2C.mp4?s=%2C"),
        ("https://cdn:65535/x.mp4", "https://cdn:65535/x.mp4"),
        ("https://b\u00fccher.example/x.mp4", "https://xn--bcher-kva.example/x.mp4"),
    ],
)
def test_a_url_that_passes_comes_back_as_it_is_sent(url: str, sent: str) -> None:
    assert str(check_video_url(url, "https://api")) == sent


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        (b"http://cdn2.example:8o80/v.mp4", f"{PORT} (the video host redirected there from"),
        (b"http://[::1/v.mp4", "its Location is a malformed URL (look at its [ ])"),
    ],
)
async def test_a_redirect_to_a_malformed_url_is_refused(
    tmp_path: Path, location: bytes, reason: str
) -> None:
    async def redirect(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n")

    async with serve_raw(redirect) as base:
        with pytest.raises(UrlRejectedError) as info:
            await _get(base, tmp_path)
    assert reason in str(info.value) and f"{base}/v.mp4" in str(info.value)
    assert not info.value.retryable and sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize(
    ("head", "ok"),
    [(MP4[:16], True), (b"\x00\x00\x00\x10styp", True), (b"<html>", False), (b"", False)],
)
def test_mp4_sniffing(head: bytes, ok: bool) -> None:
    assert looks_like_mp4(head) is ok


def test_file_matches(tmp_path: Path) -> None:
    f = tmp_path / "a.mp4"
    f.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    mtime = f.stat().st_mtime_ns
    assert file_matches(f, 3, sha, mtime)
    assert file_matches(f, 3, sha, None)
    assert not file_matches(f, 4, sha, mtime)
    assert not file_matches(f, 3, "0" * 64, None)
    assert file_matches(f, 3, "0" * 64, mtime)  # trusted by mtime unless deep
    assert not file_matches(f, 3, "0" * 64, mtime, deep=True)
    assert not file_matches(tmp_path / "missing.mp4", 3, sha, None)


# How hosts refuse a signed URL past its time: Google Cloud Storage, Azure, S3.
GCS_EXPIRED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code><Message>The"
    b" provided token has expired.</Message><Details>Request signature expired at:"
    b" 2025-01-01T00:00:00+00:00</Details></Error>"
)
AZURE_EXPIRED = (
    b"<Error><Code>AuthenticationFailed</Code><Message>Signature not valid in the specified"
    b" time frame\nRequestId:5c2f</Message></Error>"
)
S3_EXPIRED = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
HOST_ERRORS = {
    "gcs-400": (400, GCS_EXPIRED),
    "azure-401": (401, AZURE_EXPIRED),
    "s3-403": (403, S3_EXPIRED),
    "huge-400": (400, b"<html><body><h1>Bad \x1b[31mRequest</h1>" + b"x" * (1 << 20)),
}


class Cdn:
    """A video host with switchable misbehaviour."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, str]] = []
        self.base = ""
        self.body = MP4
        self.headers: dict[str, str] = {}  # sent with every video answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.mode == "truncate-once":
            self.mode = "ok"
            resp = web.StreamResponse(headers={"Content-Length": str(len(MP4)), **self.headers})
            await resp.prepare(request)
            third = len(MP4) // 3
            for i in range(0, third, 64 * 1024):
                await resp.write(MP4[i : min(i + 64 * 1024, third)])
                await asyncio.sleep(0.005)  # let the client consume what was sent
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if self.mode == "headers-only-once":  # the headers, then not one byte
            self.mode = "ok"
            resp = web.StreamResponse(headers={"Content-Length": str(len(MP4)), "ETag": '"v1"'})
            await resp.prepare(request)
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if self.mode == "slow":  # a little at a time, then cut off
            resp = web.StreamResponse(headers={"Content-Length": str(len(MP4))})
            await resp.prepare(request)
            try:
                for i in range(0, 40_000, 1000):
                    await resp.write(MP4[i : i + 1000])
                    await asyncio.sleep(0.005)
            except ConnectionError:
                pass  # the client gave up first
            if request.transport is not None:
                request.transport.close()
            return resp
        if self.mode == "redirect" and request.path != "/v.mp4":
            raise web.HTTPFound(self.base + "/v.mp4")
        if self.mode == "redirect-loop":
            raise web.HTTPFound(self.base + "/loop.mp4")
        if self.mode == "redirect-ftp":
            raise web.HTTPFound("ftp://example.com/v.mp4")
        if self.mode in ("403", "410", "500", "408"):
            return web.Response(status=int(self.mode))
        if self.mode in HOST_ERRORS:
            status, body = HOST_ERRORS[self.mode]
            return web.Response(status=status, body=body, content_type="application/xml")
        if self.mode == "html":
            return web.Response(body=b"<html>oops</html>", content_type="text/html")
        body = self.body
        rng = request.headers.get("Range")
        if rng and self.mode == "strict-range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(body)}"})
        if rng and self.mode == "ok":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            return web.Response(
                status=206,
                body=body[start:],
                headers={
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                    **self.headers,
                },
            )
        return web.Response(body=body, content_type="video/mp4", headers=self.headers)


@pytest.fixture
async def cdn() -> AsyncIterator[Cdn]:
    c = Cdn()
    app = web.Application()
    app.router.add_get("/{name}", c.handle)
    async with serve(app) as c.base:
        yield c


async def _get(
    cdn: Cdn | str, out: Path, *, max_bytes: int = 1 << 30, probe: bool = False, **kw: Any
) -> Downloaded:
    base = cdn if isinstance(cdn, str) else cdn.base
    async with aiohttp.ClientSession() as s:
        return await download(
            s,
            base + "/v.mp4",
            out,
            "job1",
            api_base_url="http://127.0.0.1:1",
            max_bytes=max_bytes,
            chunk_bytes=64 * 1024,
            probe=probe,
            **kw,
        )


async def test_streams_hashes_and_renames(cdn: Cdn, tmp_path: Path) -> None:
    got = await _get(cdn, tmp_path)
    final = tmp_path / "job1.mp4"
    assert final.read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()
    assert got.bytes == len(MP4) and got.file == "job1.mp4"
    assert not (tmp_path / "job1.mp4.part").exists()
    assert all("Authorization" not in h for h in cdn.requests)


async def test_truncated_body_resumes_with_range(cdn: Cdn, tmp_path: Path) -> None:
    cdn.mode = "truncate-once"
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path)
    assert info.value.retryable
    part = tmp_path / "job1.mp4.part"
    assert 0 < part.stat().st_size < len(MP4)
    assert not (tmp_path / "job1.mp4").exists()
    got = await _get(cdn, tmp_path)
    have = int(cdn.requests[-1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < have <= len(MP4) // 3
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()


async def test_an_answer_cut_before_its_first_byte_leaves_nothing_behind(
    cdn: Cdn, tmp_path: Path
) -> None:
    # Nothing arrived, so there is nothing to resume: no .part, and no sidecar to outlive
    # the finished video beside it.
    cdn.mode = "headers-only-once"
    with pytest.raises(DownloadError):
        await _get(cdn, tmp_path)
    assert sorted(os.listdir(tmp_path)) == []
    await _get(cdn, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["job1.mp4"]


async def test_server_ignoring_range_restarts_cleanly(cdn: Cdn, tmp_path: Path) -> None:
    (tmp_path / "job1.mp4.part").write_bytes(b"stale bytes from another attempt")
    cdn.mode = "no-range"
    got = await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.bytes == len(MP4)


@pytest.mark.parametrize(
    ("mode", "expired", "retryable"),
    [
        ("403", True, True),
        ("410", True, True),
        # Google Cloud Storage and Azure refuse an expired signed URL with 400 and 401.
        ("gcs-400", True, True),
        ("azure-401", True, True),
        ("500", False, True),
        ("408", False, True),
        ("html", False, True),
        ("redirect-loop", False, False),
    ],
)
async def test_failures(
    cdn: Cdn, tmp_path: Path, mode: str, expired: bool, retryable: bool
) -> None:
    cdn.mode = mode
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path)
    assert info.value.url_expired is expired
    assert info.value.retryable is retryable
    # An error page with a 200 (an expired signature, say): the runner asks for a fresh URL.
    assert info.value.not_video is (mode == "html")
    assert not (tmp_path / "job1.mp4").exists()
    assert not (tmp_path / "job1.mp4.part").exists()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "gcs-400",
            "video host answered 400: the URL has expired or is refused"
            " (ExpiredToken: The provided token has expired.)",
        ),
        (
            "azure-401",
            "video host answered 401: the URL has expired or is refused (AuthenticationFailed:"
            " Signature not valid in the specified time frame RequestId:5c2f)",
        ),
        (
            "s3-403",
            "video host answered 403: the URL has expired or is refused"
            " (AccessDenied: Request has expired)",
        ),
    ],
)
async def test_a_refused_url_names_what_the_host_said(
    cdn: Cdn, tmp_path: Path, mode: str, message: str
) -> None:
    cdn.mode = mode
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path)
    assert info.value.message == message


async def test_a_large_error_body_is_read_only_in_part_and_shown_escaped(
    cdn: Cdn, tmp_path: Path
) -> None:
    cdn.mode = "huge-400"
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path)
    said = info.value.message.partition(" (")[2]
    assert said.startswith("Bad \\x1b[31mRequest xxx") and said.endswith("...)")
    assert len(said) <= dl.EXCERPT_CHARS + 1 and "\x1b" not in said


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"", ""),
        (b"Gone", "Gone"),
        (b"<Error><Code>NoSuchKey</Code></Error>", "NoSuchKey"),
        (b"<Error><Message>a &amp; b</Message><Code>X</Code></Error>", "X: a & b"),
        (b'{"error": {"code": 401, "message": "token expired"}}', "token expired"),
        (b"<html><title>403</title>\n<p>Forbidden\r\n\xff</p></html>", "403 Forbidden \ufffd"),
        (b"line1\nline2\x07", "line1 line2\\x07"),
    ],
)
def test_host_error_excerpts(body: bytes, said: str) -> None:
    assert dl.host_error_excerpt(body) == said


async def test_redirects_are_followed_and_rechecked(cdn: Cdn, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as s:
        cdn.mode = "redirect"
        got = await download(
            s,
            cdn.base + "/start.mp4",
            tmp_path,
            "r1",
            api_base_url="http://127.0.0.1:1",
            max_bytes=1 << 30,
        )
        assert got.bytes == len(MP4)
        cdn.mode = "redirect-ftp"  # each hop meets the rules again
        with pytest.raises(UrlRejectedError, match="not an https URL"):
            await download(
                s,
                cdn.base + "/start.mp4",
                tmp_path,
                "r2",
                api_base_url="http://127.0.0.1:1",
                max_bytes=1 << 30,
            )


async def test_size_cap_stops_a_runaway_body(cdn: Cdn, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path, max_bytes=1000)
    assert not info.value.retryable
    assert not (tmp_path / "job1.mp4").exists()


async def test_a_whole_part_left_by_a_crash_is_fetched_again(cdn: Cdn, tmp_path: Path) -> None:
    (tmp_path / "job1.mp4.part").write_bytes(MP4)  # killed after the last byte, before rename
    cdn.mode = "strict-range"
    got = await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()


async def test_large_bodies_stream_through_the_file_in_pieces(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import veobatch.downloader as dl

    monkeypatch.setattr(dl, "FLUSH_BYTES", 100_000)  # ~1 MB body: ten flushes
    got = await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()
    cdn.mode = "truncate-once"
    with pytest.raises(DownloadError):
        await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4.part").stat().st_size > 0  # kept for a Range resume
    resumed = await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert resumed.sha256 == hashlib.sha256(MP4).hexdigest()  # the kept part's bytes counted


async def test_a_large_body_is_dropped_from_the_page_cache_as_it_goes(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1 GB video grew the page cache by a GB (slow to fault in on a VM) and left it all for
    # the final fsync: 40 % of curl's throughput. Only caching changes, never the bytes.
    import veobatch.downloader as dl

    monkeypatch.setattr(dl, "FLUSH_BYTES", 100_000)
    monkeypatch.setattr(dl, "DROP_BEHIND_BYTES", 300_000)
    advised: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(dl.os, "posix_fadvise", spy)
    got = await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()
    assert len(advised) >= 2  # ~1 MB in 131 kB writes: after every third one
    assert {a for _, _, a in advised} == {os.POSIX_FADV_DONTNEED}
    advised.clear()
    monkeypatch.setattr(dl, "FLUSH_BYTES", 4 << 20)
    await _get(cdn, tmp_path)
    assert advised == []  # a small video is written in one go, and left alone


@pytest.mark.parametrize("flush_bytes", [None, 1000])
async def test_the_finished_file_is_probed_in_the_same_hop(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_bytes: int | None
) -> None:
    """From the bytes in memory for a small video; from the file for one streamed to disk."""
    import veobatch.downloader as dl

    clip = tmp_path / "clip.mp4"
    encode_test_card(VideoSpec(160, 90, 2, 4, audio=True), clip)
    cdn.body = clip.read_bytes()
    if flush_bytes:
        monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    out = tmp_path / "out"
    out.mkdir()
    got = await _get(cdn, out, probe=True)
    assert got.probe is not None
    assert (got.probe.width, got.probe.height, got.probe.audio, got.probe.codec) == (
        160,
        90,
        True,
        "h264",
    )
    assert got.probe.duration_s is not None and abs(got.probe.duration_s - 2.0) < 0.3
    assert (await _get(cdn, out)).probe is None  # only when asked


@pytest.mark.parametrize("flush_bytes", [None, 1000])
async def test_a_whole_body_that_is_not_a_readable_video_is_a_failed_download(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_bytes: int | None
) -> None:
    # Its boxes add up, but its moov holds no video track: neither the box reader nor PyAV
    # can read it. Recorded done, a rerun would skip a video nobody can play.
    if flush_bytes:
        monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    cdn.body = FTYP + box(b"mdat", bytes(range(256)) * 20) + box(b"moov", box(b"mvhd", bytes(100)))
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path, probe=True)
    assert info.value.message.startswith("unreadable video: ")
    # all the host has: nothing to resume, and the same URL brings it again
    assert info.value.damaged and info.value.retryable and info.value.not_video
    assert not (tmp_path / "job1.mp4").exists()
    assert not (tmp_path / "job1.mp4.part").exists()
    assert not (tmp_path / "job1.mp4.part.meta").exists()


async def test_a_flush_cut_off_by_cancellation_is_not_written_twice(tmp_path: Path) -> None:
    import time

    import anyio

    from veobatch.downloader import FLUSH_BYTES, _PartWriter

    part = tmp_path / "v.mp4.part"
    writer = _PartWriter(part, hashlib.sha256(), append=False)
    chunk = b"x" * FLUSH_BYTES  # one flush's worth: each write goes to a worker thread
    await writer.write(chunk)  # opens the file and writes the first flush
    file = writer._file

    class SlowDisk:
        """The open file, but each write takes a while in its thread, as on a busy disk; an
        executor future, as aiofiles uses, so cancelling the caller does not stop the write."""

        async def write(self, data: bytes) -> int:
            def slow() -> int:
                written = int(file._file.write(data))
                time.sleep(0.1)  # the bytes are in the file; the call has not returned yet
                return written

            return await asyncio.get_running_loop().run_in_executor(None, slow)

        def __getattr__(self, name: str) -> object:
            return getattr(file, name)

    writer._file = SlowDisk()
    with anyio.move_on_after(0.02):  # cancelled while the thread writes, as on shutdown
        await writer.write(chunk)
    writer._file = file
    with anyio.CancelScope(shield=True):
        await writer.close(sync=False)  # what the download does after a cancellation
    # Every byte handed over reaches the file at most once: a resume continues from its size.
    assert part.stat().st_size == 2 * len(chunk)


# -- resuming: a 206 must prove that it continues the .part --------------------------------

TOTAL = len(MP4)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("bytes 0-9/10", ContentRange(0, 9, 10)),
        (" bytes 5-9/* ", ContentRange(5, 9, None)),
        ("bytes */10", None),  # the form of a 416
        ("bytes 9-5/10", None),
        ("bytes 0-10/10", None),
        ("items 0-9/10", None),
        ("bytes 0-9/10, 20-29/30", None),
        ("", None),
        (None, None),
    ],
)
def test_content_range_parsing(value: str | None, want: ContentRange | None) -> None:
    assert parse_content_range(value) == want


CR = "Content-Range"


@pytest.mark.parametrize(
    ("status", "headers", "have", "part", "want"),
    [
        (200, {"Content-Length": "100"}, 0, None, Body(0, 100, False)),
        (200, {"Content-Length": "100"}, 50, None, Body(0, 100, False)),  # Range ignored
        (200, {"Transfer-Encoding": "chunked"}, 0, None, Body(0, None, False)),
        (200, {}, 0, None, Body(0, None, False)),  # it ends when the connection closes
        (
            200,
            {"Content-Encoding": "gzip", "Content-Length": "40"},
            0,
            None,
            Body(0, None, True),
        ),
        (
            200,
            {"Content-Encoding": "identity", "Content-Length": "9"},
            0,
            None,
            Body(0, 9, False),
        ),
        (
            206,
            {CR: "bytes 50-99/100", "Content-Length": "50"},
            50,
            None,
            Body(50, 100, False),
        ),
        (206, {CR: "bytes 50-99/100"}, 50, PartInfo('"e"', 100), Body(50, 100, False)),
        (206, {CR: "bytes 0-99/100"}, 0, None, Body(0, 100, False)),
        (206, {CR: "bytes 0-99/100"}, 50, None, None),  # not from where the .part ends
        (206, {CR: "bytes 50-59/100"}, 50, None, None),  # not up to the end
        (206, {CR: "bytes 50-99/100", "Content-Length": "10"}, 50, None, None),
        (206, {CR: "bytes 50-99/*"}, 50, None, None),  # no total to hold it to
        (206, {}, 50, None, None),
        (206, {CR: "bytes 50-99/100"}, 50, PartInfo(None, 120), None),  # another file
        # A host that ignored If-Range names another version: its bytes must not be spliced on.
        (206, {CR: "bytes 50-99/100", "ETag": '"f"'}, 50, PartInfo('"e"', 100), None),
        (
            206,
            {CR: "bytes 50-99/100", "ETag": '"e"'},
            50,
            PartInfo('"e"', 100),
            Body(50, 100, False),
        ),
        (
            206,
            {CR: "bytes 50-99/100", "Last-Modified": "Sun, 22 Nov 2026 01:00:00 GMT"},
            50,
            PartInfo("Sat, 21 Nov 2026 01:00:00 GMT", 100),
            None,
        ),
        (206, {CR: "bytes 50-99/100", "Content-Encoding": "gzip"}, 50, None, None),
    ],
)
def test_plan_body(
    status: int, headers: dict[str, str], have: int, part: PartInfo | None, want: Body | None
) -> None:
    assert plan_body(status, headers, have, part) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (PartInfo('"v1"', 10).to_json(), PartInfo('"v1"', 10)),
        (b'{"validator": null, "total": null}', PartInfo(None, None)),
        (b'{"validator": 3, "total": "10"}', PartInfo(None, None)),
        (b'{"total": true}', PartInfo(None, None)),
        (b"{garbled", None),
        (b"[1]", None),
    ],
)
def test_a_garbled_sidecar_only_means_less_to_check(raw: bytes, want: PartInfo | None) -> None:
    assert PartInfo.from_json(raw) == want


def _range_host(
    answer: Callable[[int], tuple[bytes, str | None]], seen: list[str | None]
) -> web.Application:
    """The whole MP4 for a plain GET; ``answer(offset)`` (a body and a Content-Range) as a 206."""

    async def video(request: web.Request) -> web.Response:
        rng = request.headers.get("Range")
        seen.append(rng)
        if rng is None:
            return web.Response(body=MP4)
        body, content_range = answer(int(rng.removeprefix("bytes=").rstrip("-")))
        headers = {CR: content_range} if content_range else {}
        return web.Response(status=206, body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v.mp4", video)
    return app


@pytest.mark.parametrize(
    "answer",
    [
        lambda off: (MP4, f"bytes 0-{TOTAL - 1}/{TOTAL}"),
        lambda off: (MP4[off : off + 1000], f"bytes {off}-{off + 999}/{TOTAL}"),
        lambda off: (MP4[off + 3 :], None),
        lambda off: (MP4[off:], f"bytes {off}-{TOTAL - 1}/*"),
    ],
    ids=["from-zero", "short-range", "no-content-range", "unknown-total"],
)
async def test_a_206_that_does_not_continue_the_part_starts_over(
    tmp_path: Path, answer: Callable[[int], tuple[bytes, str | None]]
) -> None:
    (tmp_path / "job1.mp4.part").write_bytes(MP4[: TOTAL // 2])
    (tmp_path / "job1.mp4.part.meta").write_bytes(PartInfo().to_json())  # kept, no validator
    seen: list[str | None] = []
    async with serve(_range_host(answer, seen)) as base:
        got = await _get(base, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()
    assert seen == [f"bytes={TOTAL // 2}-", None]  # one start over, from zero


async def test_a_part_without_its_sidecar_is_started_again_not_resumed(tmp_path: Path) -> None:
    # A kill mid-download, or a body cut short before its headers were noted, leaves a .part
    # that cannot say which file it began: appending another file's tail would splice two.
    other = b"\x00\x00\x00\x18ftypmp42" + b"\x07" * (TOTAL - 12)
    (tmp_path / "job1.mp4.part").write_bytes(other[: TOTAL // 2])
    seen: list[str | None] = []
    async with serve(
        _range_host(lambda off: (MP4[off:], f"bytes {off}-{TOTAL - 1}/{TOTAL}"), seen)
    ) as base:
        got = await _get(base, tmp_path)
    assert seen == [None]
    assert (tmp_path / "job1.mp4").read_bytes() == MP4 and got.bytes == TOTAL


async def test_a_large_download_notes_its_sidecar_before_its_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So a .part that outlives a kill can be resumed; small videos never leave a .part at all.
    import veobatch.downloader as dl

    monkeypatch.setattr(dl, "FLUSH_BYTES", 1024)
    noted: list[bool] = []
    real = dl._write_info

    def note(part: Path, info: PartInfo) -> None:
        noted.append(part.exists())
        real(part, info)

    monkeypatch.setattr(dl, "_write_info", note)
    async with serve(_range_host(lambda off: (MP4[off:], None), [])) as base:
        await _get(base, tmp_path)
    assert noted == [False]  # written once, before the .part was created
    assert not (tmp_path / "job1.mp4.part.meta").exists()  # and gone with the finished file


async def test_a_206_that_fits_no_request_fails_the_attempt(tmp_path: Path) -> None:
    async def video(request: web.Request) -> web.Response:
        return web.Response(status=206, body=MP4[:10], headers={CR: f"bytes 0-9/{TOTAL}"})

    app = web.Application()
    app.router.add_get("/v.mp4", video)
    async with serve(app) as base:
        with pytest.raises(DownloadError, match="range that does not fit") as info:
            await _get(base, tmp_path)
    assert info.value.retryable and not (tmp_path / "job1.mp4").exists()


async def test_a_kept_part_remembers_its_file_for_the_next_attempt(
    cdn: Cdn, tmp_path: Path
) -> None:
    cdn.headers = {"ETag": '"v1"'}
    cdn.mode = "truncate-once"
    with pytest.raises(DownloadError):
        await _get(cdn, tmp_path)
    meta = tmp_path / "job1.mp4.part.meta"
    assert json.loads(meta.read_bytes()) == {"validator": '"v1"', "total": TOTAL}
    await _get(cdn, tmp_path)
    assert cdn.requests[-1]["If-Range"] == '"v1"' and "Range" in cdn.requests[-1]
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert not meta.exists() and not (tmp_path / "job1.mp4.part").exists()


async def test_a_part_of_a_file_with_another_length_is_not_continued(
    cdn: Cdn, tmp_path: Path
) -> None:
    (tmp_path / "job1.mp4.part").write_bytes(b"x" * 1000)
    (tmp_path / "job1.mp4.part.meta").write_bytes(PartInfo(None, TOTAL + 5).to_json())
    await _get(cdn, tmp_path)
    assert [h.get("Range") for h in cdn.requests] == ["bytes=1000-", None]
    assert (tmp_path / "job1.mp4").read_bytes() == MP4
    assert not (tmp_path / "job1.mp4.part.meta").exists()


# -- bodies that nothing delimits: the MP4's own boxes must add up -------------------------


@pytest.fixture(scope="module")
def real_mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    clip = tmp_path_factory.mktemp("clip") / "clip.mp4"
    encode_test_card(VideoSpec(160, 90, 1, 4, audio=True), clip)
    return clip.read_bytes()


def _boxes_add_up(data: bytes) -> bool:
    return mp4_boxes_complete(io.BytesIO(data), len(data))


def _box(kind: bytes, size: int) -> bytes:
    return size.to_bytes(4, "big") + kind + bytes(size - 8)


def test_a_whole_mp4s_boxes_add_up_and_a_cut_ones_do_not(real_mp4: bytes) -> None:
    assert _boxes_add_up(real_mp4)
    n = len(real_mp4)
    for cut in (1, 7, 8, 9, 100, n // 3, n // 2, n - 8, n - 1):
        assert not _boxes_add_up(real_mp4[:cut]), cut
    assert not _boxes_add_up(real_mp4 + b"\0\0\0")  # too short for one more box


def test_an_mp4_cut_exactly_before_its_moov_box_is_not_whole(real_mp4: bytes) -> None:
    # Cut between two boxes, the boxes still add up: only the missing moov gives it away.
    at = 0
    while real_mp4[at + 4 : at + 8] != b"moov":  # walk the top-level boxes to the moov
        at += int.from_bytes(real_mp4[at : at + 4], "big")
    assert 0 < at < len(real_mp4) and _boxes_add_up(real_mp4)
    assert not _boxes_add_up(real_mp4[:at])


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (_box(b"ftyp", 16) + _box(b"moov", 40) + _box(b"mdat", 100), True),
        (_box(b"ftyp", 16) + _box(b"mdat", 100) + _box(b"moov", 40), True),
        (_box(b"ftyp", 16) + _box(b"mdat", 100), False),  # no moov: no player can read it
        (_box(b"moov", 40) + b"\0\0\0\x01mdat" + (24).to_bytes(8, "big") + bytes(8), True),
        (_box(b"moov", 40) + b"\0\0\0\x01mdat" + (32).to_bytes(8, "big") + bytes(8), False),
        (_box(b"moov", 40) + b"\0\0\0\x01mdat" + (8).to_bytes(8, "big"), False),
        (_box(b"moov", 40) + b"\0\0\0\0mdat" + bytes(50), True),  # size 0: up to the end
        (_box(b"ftyp", 16) + b"\0\0\0\0mdat" + bytes(50), False),  # ... and no moov after it
        (_box(b"ftyp", 16) + b"\0\0\0\0moov" + bytes(50), False),  # no media data at all
        (_box(b"ftyp", 16) + _box(b"moov", 40) + _box(b"free", 16), False),  # cut before mdat
        (b"\0\0\0\x04ftyp", False),  # a size under 8
        (_box(b"ftyp", 16) + _box(b"mdat", 100)[:-1], False),
        (b"", False),
    ],
)
def test_box_walking(data: bytes, ok: bool) -> None:
    assert _boxes_add_up(data) is ok


def _boxed(kind: bytes, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def _faststart(offsets: list[int], wide: bool = False) -> bytes:
    """ftyp, a moov whose one track's chunks start at ``offsets``, then two mdat boxes."""
    table = b"co64" if wide else b"stco"
    entries = b"".join(o.to_bytes(8 if wide else 4, "big") for o in offsets)
    stco = _boxed(table, bytes(4) + len(offsets).to_bytes(4, "big") + entries)
    stbl = _boxed(b"stbl", _boxed(b"stsd", bytes(8)) + stco)
    moov = _boxed(b"moov", _boxed(b"trak", _boxed(b"mdia", _boxed(b"minf", stbl))))
    return _box(b"ftyp", 16) + moov + _box(b"mdat", 100) + _box(b"mdat", 100)


@pytest.mark.parametrize("wide", [False, True])
def test_a_faststart_mp4_cut_between_boxes_is_not_whole(wide: bool) -> None:
    # moov first, then the media: cut on a box boundary, the boxes still add up; only the
    # missing media data, or chunks the index puts past the end, give it away.
    whole = _faststart([], wide)
    head = len(whole) - 200
    whole = _faststart([head + 8, head + 108], wide)
    assert _boxes_add_up(whole)
    assert not _boxes_add_up(whole[:head])  # no mdat at all
    assert not _boxes_add_up(whole[: head + 100])  # the second mdat's chunk is missing
    assert not _boxes_add_up(_faststart([head + 8, 10**9], wide))


def test_a_real_faststart_mp4_cut_before_its_media_is_not_whole(
    real_mp4: bytes, tmp_path: Path
) -> None:
    import av

    out = tmp_path / "faststart.mp4"  # the muxer rewrites the file to move the moov first
    with (
        av.open(io.BytesIO(real_mp4)) as src,
        av.open(str(out), "w", format="mp4", options={"movflags": "faststart"}) as dst,
    ):
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    data = out.read_bytes()
    assert data[4:8] == b"ftyp" and _boxes_add_up(data)
    at = 0
    while data[at + 4 : at + 8] != b"mdat":
        at += int.from_bytes(data[at : at + 4], "big")
    assert b"moov" in data[:at]  # faststart: the index before the media
    assert not _boxes_add_up(data[:at])


def _answer(head: bytes, body: bytes) -> Callable[[bytes, asyncio.StreamWriter], Any]:
    async def write(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body)

    return write


@pytest.mark.parametrize("flush_bytes", [None, 1000])
async def test_a_body_without_a_length_is_whole_only_if_its_boxes_add_up(
    real_mp4: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_bytes: int | None
) -> None:
    if flush_bytes:  # the check reads the file, not the bytes in memory
        monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    half = real_mp4[: len(real_mp4) // 2]
    async with serve_raw(_answer(b"Connection: close\r\n", half)) as base:
        with pytest.raises(DownloadError) as info:
            await _get(base, tmp_path)
    assert info.value.retryable and info.value.message == INCOMPLETE
    assert not (tmp_path / "job1.mp4").exists()
    assert (tmp_path / "job1.mp4.part").read_bytes() == half  # kept for a Range resume
    async with serve_raw(_answer(b"Connection: close\r\n", real_mp4)) as base:
        await _get(base, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == real_mp4


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("flush_bytes", [None, 1000])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_cut_short_that_ends_where_it_said_is_not_a_video(
    real_mp4: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    framing: str,
    flush_bytes: int | None,
) -> None:
    # A cached or half-uploaded object: the host sends half the file, its Content-Length (or
    # its last chunk) where that half ends. Nothing but the MP4's boxes shows it is cut.
    if flush_bytes:
        monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    half = real_mp4[: len(real_mp4) // 2]
    if framing == "length":
        answer = _answer(b"Content-Length: %d\r\n" % len(half), half)
    else:
        answer = _answer(b"Transfer-Encoding: chunked\r\n", _chunked(half))
    async with serve_raw(answer) as base:
        with pytest.raises(DownloadError) as info:
            await _get(base, tmp_path, probe=True)
    assert info.value.retryable and info.value.damaged
    # Cut where it said it would end: the host's whole copy, which the same URL brings again.
    assert info.value.not_video is (framing == "length")
    assert info.value.message.startswith("incomplete MP4: ")
    assert not (tmp_path / "job1.mp4").exists()
    # The whole of what a length announced is all the host has: a Range from its end could
    # only be refused. A chunked body said no length: it may be resumed.
    assert (tmp_path / "job1.mp4.part").exists() is (framing == "chunked")
    whole = _answer(b"Content-Length: %d\r\n" % len(real_mp4), real_mp4)
    async with serve_raw(whole) as base:
        got = await _get(base, tmp_path, probe=True)
    assert (tmp_path / "job1.mp4").read_bytes() == real_mp4 and got.bytes == len(real_mp4)


@pytest.mark.parametrize(
    ("body", "resumable"),
    [
        (Body(0, None, encoded=False), True),  # no length: the connection may have closed early
        (Body(0, 100, encoded=False), False),  # all the length announced came
        (Body(50, 100, encoded=False), False),  # a resume that reached the end
        (Body(0, None, encoded=True), False),  # decoded bytes: no Range can continue them
    ],
)
def test_which_cut_parts_are_kept_for_a_resume(body: Body, resumable: bool) -> None:
    assert body.resumable_when_cut is resumable


def test_a_finished_files_boxes_are_checked_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.mp4"
    f.write_bytes(MP4)
    reads: list[int] = []
    real_open = open

    class Counting(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            reads.append(len(data))
            return data

    def counting_open(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        return Counting(path, "r") if mode == "rb" else real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    assert dl.mp4_file_complete(f)
    assert sum(reads) < 1000 < len(MP4)  # box headers and the moov, never the media data
    monkeypatch.undo()
    f.write_bytes(MP4[:-1])
    assert not dl.mp4_file_complete(f)
    assert not dl.mp4_file_complete(tmp_path / "gone.mp4")


# -- the URL is sent as the API gave it ------------------------------------------------------


async def test_a_signed_url_and_its_redirect_are_requested_byte_for_byte(
    real_mp4: bytes, tmp_path: Path
) -> None:
    # A CDN that checks a signature over the request target refuses ',' for '%2C'.
    targets: list[bytes] = []

    async def cdn(request: bytes, w: asyncio.StreamWriter) -> None:
        targets.append(request.split(b" ")[1])
        if len(targets) == 1:
            w.write(b"HTTP/1.1 302 Found\r\nLocation: /w%2C2.mp4?k=K%2C1&s=a%2Fb%3D\r\n")
            w.write(b"Content-Length: 0\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(real_mp4))
            w.write(real_mp4)

    async with serve_raw(cdn) as base, aiohttp.ClientSession() as s:
        await download(
            s,
            base + "/v%2C1.mp4?Signature=ab%2Fcd%2Bef%3D%3D#part",
            tmp_path,
            "job1",
            api_base_url="http://127.0.0.1:1",
            max_bytes=1 << 30,
            chunk_bytes=64 * 1024,
        )
    assert targets == [b"/v%2C1.mp4?Signature=ab%2Fcd%2Bef%3D%3D", b"/w%2C2.mp4?k=K%2C1&s=a%2Fb%3D"]
    assert (tmp_path / "job1.mp4").read_bytes() == real_mp4


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://cdn.example/a%2Cb.mp4?x=%2F", "/a%2Cb.mp4?x=%2F"),
        ("https://cdn.example/a b.mp4", "/a%20b.mp4"),  # no URI: encoded so it can be sent
        ("https://cdn.example/\u00fc.mp4", "/%C3%BC.mp4"),
        ("https://cdn.example/%zz.mp4", "/%25zz.mp4"),
        # One character a URI cannot hold must not re-quote the rest: a signature's %2F and
        # %2C stay as signed, and a space is %20, never + (which a signer reads as "+").
        (
            "https://cdn.example/v.mp4?sig=ab%2Fcd%2C&rcd=attachment; filename=my video.mp4",
            "/v.mp4?sig=ab%2Fcd%2C&rcd=attachment;%20filename=my%20video.mp4",
        ),
        ("https://cdn.example?k=%2C x", "/?k=%2C%20x"),
    ],
)
def test_request_target(url: str, sent: str) -> None:
    assert request_target(url).raw_path_qs == sent


def test_request_target_of_an_international_host() -> None:
    target = request_target("https://b\u00fccher.example:8443/\u00e4.mp4?s=%2C")
    assert (target.raw_host, target.port) == ("xn--bcher-kva.example", 8443)
    assert target.raw_path_qs == "/%C3%A4.mp4?s=%2C"


# -- encoded bodies: no length to compare, nothing to resume --------------------------------


async def test_a_gzip_body_is_decoded_whole_and_never_resumed(
    real_mp4: bytes, tmp_path: Path
) -> None:
    z = gzip.compress(real_mp4)
    (tmp_path / "job1.mp4.part").write_bytes(real_mp4[:1000])
    head = b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(z)
    async with serve_raw(_answer(head, z)) as base:
        got = await _get(base, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == real_mp4
    assert got.bytes == len(real_mp4) and got.sha256 == hashlib.sha256(real_mp4).hexdigest()


@pytest.mark.parametrize("framing", ["close", "length"])
async def test_a_gzip_body_cut_short_is_an_error_not_a_video(
    real_mp4: bytes, tmp_path: Path, framing: str
) -> None:
    z = gzip.compress(real_mp4)
    head = b"Content-Encoding: gzip\r\n"
    head += b"Connection: close\r\n" if framing == "close" else b"Content-Length: %d\r\n" % len(z)
    async with serve_raw(_answer(head, z[: len(z) // 2])) as base:
        with pytest.raises(DownloadError) as info:
            await _get(base, tmp_path)
    assert info.value.retryable
    assert not (tmp_path / "job1.mp4").exists()
    assert not (tmp_path / "job1.mp4.part").exists()  # decoded bytes: nothing to resume with Range


# -- the disk's errors ---------------------------------------------------------------------


async def test_a_full_disk_fails_the_job_with_its_reason(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: object, data: bytes, sync: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl._PartWriter, "_write_all", full)
    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path)
    assert info.value.message == "cannot write job1.mp4: No space left on device"
    assert not info.value.retryable and not info.value.url_expired


async def test_a_disk_error_at_the_rename_keeps_what_arrived(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def read_only(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(DownloadError, match=r"cannot write job1\.mp4: Read-only file system"):
        await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4.part").read_bytes() == MP4
    assert not (tmp_path / "job1.mp4").exists()


async def test_cancellation_stays_cancellation_when_the_disk_fails_too(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: object, *, sync: bool) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(dl._PartWriter, "close", broken)
    cdn.mode = "slow"
    escaped: list[BaseException] = []
    async with aiohttp.ClientSession() as s:
        with anyio.move_on_after(0.05) as scope:
            try:
                await download(
                    s, cdn.base + "/v.mp4", tmp_path, "j", api_base_url=cdn.base, max_bytes=1 << 30
                )
            except BaseException as exc:
                escaped.append(exc)
                raise
    assert scope.cancelled_caught
    # Not a DownloadError, which a download worker would record and carry on after.
    assert [type(e) for e in escaped] == [anyio.get_cancelled_exc_class()]


# -- slow hosts and hosts that say when to come back ---------------------------------------


def test_throughput_windows() -> None:
    pace = MinimumRate(60.0, 1000, now=0.0)
    assert pace.feed(500, 30.0) is None
    assert pace.feed(400, 59.0) is None
    assert pace.feed(50, 61.0) == 950  # the window ended with fewer than 1000
    pace = MinimumRate(60.0, 1000, now=0.0)
    assert pace.feed(2000, 61.0) is None  # enough: the next window starts here
    assert pace.feed(10, 100.0) is None
    assert pace.feed(10, 122.0) == 20


async def test_a_trickling_host_is_given_up_on_and_the_part_kept(cdn: Cdn, tmp_path: Path) -> None:
    cdn.mode = "slow"
    ticks = iter(range(0, 10**6, 30))  # half a minute passes between reads

    with pytest.raises(DownloadError) as info:
        await _get(cdn, tmp_path, clock=lambda: float(next(ticks)))
    assert info.value.retryable
    assert re.fullmatch(r"video host too slow: \d+ bytes in the last 60 s", info.value.message)
    assert (tmp_path / "job1.mp4.part").stat().st_size > 0  # kept for a Range resume


@pytest.mark.parametrize(
    ("status", "retry_after", "wait_s"),
    [
        (429, "120", 120.0),
        (503, "7", 7.0),
        (429, None, None),
        (429, "86400", 900.0),  # capped at 15 minutes
        (500, "5", None),
    ],
)
async def test_a_host_that_says_when_to_come_back_is_heard(
    tmp_path: Path, status: int, retry_after: str | None, wait_s: float | None
) -> None:
    headers: Mapping[str, str] = {"Retry-After": retry_after} if retry_after else {}

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/v.mp4", busy)
    async with serve(app) as base:
        with pytest.raises(DownloadError) as info:
            await _get(base, tmp_path)
    assert info.value.retryable and info.value.retry_after_s == wait_s


# -- a shared output folder: nothing there is written or read through a link -----------------


@pytest.mark.parametrize("flush_bytes", [None, 100_000], ids=["in one go", "streamed"])
async def test_a_part_that_is_a_link_is_replaced_never_written_through(
    cdn: Cdn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_bytes: int | None
) -> None:
    # --out may be shared: "wb" followed a planted <id>.mp4.part link and wrote the video over
    # the file it pointed to, then renamed the link into place as the job's video.
    if flush_bytes is not None:
        monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "job1.mp4.part").symlink_to(victim)
    got = await _get(cdn, out)
    assert victim.read_bytes() == b"precious data"
    final = out / "job1.mp4"
    assert not final.is_symlink() and final.read_bytes() == MP4
    assert got.sha256 == hashlib.sha256(MP4).hexdigest()


async def test_a_linked_part_with_a_planted_sidecar_is_not_resumed_into_its_target(
    cdn: Cdn, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "job1.mp4.part").symlink_to(victim)
    (out / "job1.mp4.part.meta").write_bytes(PartInfo(None, TOTAL).to_json())
    await _get(cdn, out)
    assert victim.read_bytes() == b"precious data"  # not cut back to a prefix, not appended to
    assert [h.get("Range") for h in cdn.requests] == [None]
    assert (out / "job1.mp4").read_bytes() == MP4


async def test_a_sidecar_that_is_a_link_is_replaced_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dl, "FLUSH_BYTES", 1024)  # a large download notes its sidecar first
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "job1.mp4.part.meta").symlink_to(victim)
    async with serve(_range_host(lambda off: (MP4[off:], None), [])) as base:
        await _get(base, out)
    assert victim.read_bytes() == b"precious data"
    assert (out / "job1.mp4").read_bytes() == MP4


def test_a_finished_file_that_is_a_link_or_a_fifo_is_not_the_video(tmp_path: Path) -> None:
    from fifos import fifo_at

    from veobatch.fsutil import NotRegularFileError

    copy = tmp_path / "copy.mp4"
    copy.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "a.mp4").symlink_to(copy)  # the same bytes, elsewhere
    assert not file_matches(tmp_path / "a.mp4", 3, sha, None)
    assert not file_matches(tmp_path / "a.mp4", 3, sha, copy.stat().st_mtime_ns)
    with fifo_at(tmp_path / "b.mp4") as freed:
        with pytest.raises(NotRegularFileError):
            dl.sha256_file(tmp_path / "b.mp4")
        assert not dl.mp4_file_complete(tmp_path / "b.mp4")
    assert not freed  # never opened: a read of it would have waited for ever
