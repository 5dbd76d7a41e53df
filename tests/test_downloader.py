"""The downloader: URL rules and file checks as tables, then streaming against a local server."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from local_server import serve

from veobatch.downloader import (
    Downloaded,
    check_video_url,
    download,
    file_matches,
    looks_like_mp4,
)
from veobatch.errors import DownloadError, UrlRejectedError
from veobatch.simulator.video import VideoSpec, encode_test_card

MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4000  # ~1 MB, starts like an MP4


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


class Cdn:
    """A video host with switchable misbehaviour."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, str]] = []
        self.base = ""
        self.body = MP4

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.mode == "truncate-once":
            self.mode = "ok"
            resp = web.StreamResponse(headers={"Content-Length": str(len(MP4))})
            await resp.prepare(request)
            third = len(MP4) // 3
            for i in range(0, third, 64 * 1024):
                await resp.write(MP4[i : min(i + 64 * 1024, third)])
                await asyncio.sleep(0.005)  # let the client consume what was sent
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if self.mode == "redirect" and request.path != "/v.mp4":
            raise web.HTTPFound(self.base + "/v.mp4")
        if self.mode == "redirect-loop":
            raise web.HTTPFound(self.base + "/loop.mp4")
        if self.mode == "redirect-ftp":
            raise web.HTTPFound("ftp://example.com/v.mp4")
        if self.mode in ("403", "410", "500"):
            return web.Response(status=int(self.mode))
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
                headers={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"},
            )
        return web.Response(body=body, content_type="video/mp4")


@pytest.fixture
async def cdn() -> AsyncIterator[Cdn]:
    c = Cdn()
    app = web.Application()
    app.router.add_get("/{name}", c.handle)
    async with serve(app) as c.base:
        yield c


async def _get(cdn: Cdn, out: Path, *, max_bytes: int = 1 << 30, probe: bool = False) -> Downloaded:
    async with aiohttp.ClientSession() as s:
        return await download(
            s,
            cdn.base + "/v.mp4",
            out,
            "job1",
            api_base_url="http://127.0.0.1:1",
            max_bytes=max_bytes,
            chunk_bytes=64 * 1024,
            probe=probe,
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
        ("500", False, True),
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
    assert not (tmp_path / "job1.mp4").exists()


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
    await _get(cdn, tmp_path)
    assert (tmp_path / "job1.mp4").read_bytes() == MP4


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


async def test_a_body_that_is_not_a_readable_video_probes_as_an_error(
    cdn: Cdn, tmp_path: Path
) -> None:
    got = await _get(cdn, tmp_path, probe=True)  # starts like an MP4, then noise
    assert got.probe is not None and got.probe.error


async def test_a_flush_cut_off_by_cancellation_is_not_written_twice(tmp_path: Path) -> None:
    import time

    import anyio

    from veobatch.downloader import FLUSH_BYTES, _PartWriter

    part = tmp_path / "v.mp4.part"
    writer = _PartWriter(part, append=False)
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
