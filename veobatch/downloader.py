"""The downloader: stream a finished video to ``<id>.mp4.part``, hash it, fsync, rename.

A video is never visible under its final name until every byte is on disk and it looks like
an MP4, so a crash leaves at worst a ``.part`` that the next run resumes or replaces.
Pure core: :func:`check_video_url`, :func:`looks_like_mp4`, :func:`file_matches`.
Shell: :func:`download`, which uses a session that never carries the API key.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import aiofiles
import aiohttp
import anyio

from .errors import DownloadError, UrlRejectedError
from .fsutil import Offload, fsync_dir, to_thread
from .verify import Probe, probe_video

MAX_REDIRECTS = 5
MP4_BOXES = (b"ftyp", b"styp")
PART_SUFFIX = ".part"
FLUSH_BYTES = 4 << 20  # below this a video is written in one go


@dataclass(frozen=True)
class Downloaded:
    file: str  # relative to the output directory
    bytes: int
    sha256: str
    mtime_ns: int
    probe: Probe | None = None  # the container's figures, read in the same worker-thread hop


def check_video_url(url: str, api_base_url: str) -> None:
    """Only https, or plain http when the API base itself is plain http; always with a host.

    An https API answering with an http video URL would be a downgrade, so that is refused; a
    plain-http API (the simulator, a mock API in a container network) has nothing to lose.
    """
    reason = _url_problem(urlsplit(url), http_ok=urlsplit(api_base_url).scheme == "http")
    if reason:
        raise UrlRejectedError(f"refusing to fetch video from {_safe_url(url)}: {reason}")


def _url_problem(parts: SplitResult, *, http_ok: bool) -> str | None:
    if parts.scheme == "http" and not http_ok:
        return "plain http while the API base is https (a downgrade)"
    if parts.scheme not in ("https", "http"):
        return "not an https URL"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _safe_url(url: str) -> str:
    """A URL without its query string, which may hold a signature, nor any user:password@."""
    p = urlsplit(url)
    host = p.netloc.rpartition("@")[2]
    return f"{p.scheme}://{host}{p.path}"[:200]


def looks_like_mp4(head: bytes) -> bool:
    """An ISO base media file starts with a box whose type is ftyp (or styp for fragments)."""
    return len(head) >= 8 and head[4:8] in MP4_BOXES


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_matches(
    path: Path, size: int | None, sha256: str | None, mtime_ns: int | None, *, deep: bool = False
) -> bool:
    """Is the finished file still what was recorded? Re-hash only if it may have changed."""
    try:
        st = path.stat()
    except OSError:
        return False
    if size is None or st.st_size != size:
        return False
    if not deep and mtime_ns is not None and st.st_mtime_ns == mtime_ns:
        return True
    return sha256 is not None and sha256_file(path) == sha256


def final_name(job_id: str) -> str:
    return f"{job_id}.mp4"


async def download(
    session: aiohttp.ClientSession,
    url: str,
    out_dir: Path,
    job_id: str,
    *,
    api_base_url: str,
    max_bytes: int,
    chunk_bytes: int = 1 << 20,
    client_timeout: aiohttp.ClientTimeout | None = None,
    sync_dir: bool = True,
    probe: bool = False,
    offload: Offload = to_thread,
) -> Downloaded:
    """One attempt: fetch ``url`` into ``<id>.mp4``, resuming a ``.part`` with Range if allowed.

    Without ``sync_dir`` the rename is not yet durable: the caller fsyncs the directory before
    it records the file (the ledger does, for many files at once). With ``probe``, the
    finished file's figures come back too, read while the worker thread has it in hand.
    ``offload`` runs the final write, fsync and rename (a :class:`DiskThreads` batches them).
    """
    final = out_dir / final_name(job_id)
    part = final.with_name(final.name + PART_SUFFIX)
    have = part.stat().st_size if part.exists() else 0
    try:
        resp = await _open(session, url, api_base_url, job_id, have, client_timeout)
    except _RangeRefused:
        # The part is already whole (a crash before the rename) or not this file: start over.
        have = 0
        resp = await _open(session, url, api_base_url, job_id, have, client_timeout)
    async with resp:
        if resp.status != 206:
            have = 0  # the server ignored the Range: start over
        expected = _expected_total(resp, have)
        if expected is not None and expected > max_bytes:
            raise DownloadError(
                f"video is {expected} bytes, over the limit", job_id=job_id, retryable=False
            )
        digest = hashlib.sha256()
        if have:
            digest = await offload(functools.partial(_hash_prefix, part, have))
        writer = _PartWriter(part, append=have > 0, offload=offload)
        try:
            size = await _stream(resp, writer, have, digest, max_bytes, chunk_bytes, job_id)
        except BaseException:
            # Keep what arrived, so the next attempt resumes with Range from there.
            with anyio.CancelScope(shield=True):
                await writer.close(sync=False)
            raise
    if expected is not None and size != expected:
        await writer.close(sync=False)
        raise DownloadError(f"truncated: got {size} of {expected} bytes", job_id=job_id)
    return await writer.finish(
        final, size, digest.hexdigest(), job_id, sync_dir=sync_dir, probe=probe
    )


async def _open(
    session: aiohttp.ClientSession,
    url: str,
    api_base_url: str,
    job_id: str,
    have: int,
    client_timeout: aiohttp.ClientTimeout | None,
) -> aiohttp.ClientResponse:
    """GET with redirects followed by hand, each hop re-checked against the URL rules."""
    # identity: a compressed body would break the length and hash checks
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    for _ in range(MAX_REDIRECTS + 1):
        check_video_url(url, api_base_url)
        try:
            resp = await session.get(
                url, headers=headers, allow_redirects=False, timeout=client_timeout
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise DownloadError(
                f"cannot fetch video: {type(exc).__name__}: {exc}"[:300], job_id=job_id
            ) from None
        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
            url = urljoin(url, resp.headers["Location"])
            resp.release()
            continue
        if resp.status in (200, 206):
            return resp
        resp.release()
        raise _status_error(resp.status, job_id)
    raise DownloadError("too many redirects", job_id=job_id, retryable=False)


class _RangeRefused(DownloadError):
    """416: the bytes we have do not fit what the host serves."""


def _status_error(status: int, job_id: str) -> DownloadError:
    if status in (403, 404, 410):
        return DownloadError(
            f"video host answered {status}: the URL has expired", job_id=job_id, url_expired=True
        )
    if status == 416:
        return _RangeRefused("video host refused the resume range", job_id=job_id)
    retryable = status >= 500 or status == 429
    return DownloadError(f"video host answered {status}", job_id=job_id, retryable=retryable)


def _expected_total(resp: aiohttp.ClientResponse, have: int) -> int | None:
    if resp.content_length is None:
        return None
    return resp.content_length + (have if resp.status == 206 else 0)


def _hash_prefix(part: Path, have: int) -> hashlib._Hash:
    """Seed the hash with the bytes a previous attempt already wrote (and drop any excess)."""
    h = hashlib.sha256()
    with open(part, "rb") as f:
        remaining = have
        while remaining and (block := f.read(min(1 << 20, remaining))):
            h.update(block)
            remaining -= len(block)
    with open(part, "r+b") as f:
        f.truncate(have)
    return h


class _PartWriter:
    """Buffers a download in memory up to FLUSH_BYTES, then streams it through aiofiles.

    A small video costs one worker-thread hop in all (write, fsync, check, rename); a large
    one a hop per FLUSH_BYTES, so memory stays flat whatever the size.
    """

    def __init__(self, part: Path, *, append: bool, offload: Offload = to_thread) -> None:
        self.part = part
        self._append = append
        self._offload = offload
        self._buf = bytearray()
        self._file: Any = None

    async def write(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) >= FLUSH_BYTES:
            if self._file is None:
                self._file = await aiofiles.open(self.part, "ab" if self._append else "wb")
            # Emptied before the write: a write cut off by cancellation may finish in its
            # thread all the same, and close() must not write those bytes a second time.
            data, self._buf = self._buf, bytearray()
            await self._file.write(data)

    async def close(self, *, sync: bool) -> None:
        """Write what is buffered and close; with ``sync``, fsync first."""
        if self._file is not None:
            data, self._buf = self._buf, bytearray()
            await self._file.write(data)
            if sync:
                await self._file.flush()
                await self._offload(functools.partial(os.fsync, self._file.fileno()))
            await self._file.close()
        elif self._buf or not self._append:
            await self._offload(functools.partial(self._write_all, bytes(self._buf), sync))
        self._buf.clear()
        self._file = None
        self._append = True

    def _write_all(self, data: bytes, sync: bool) -> None:
        with open(self.part, "ab" if self._append else "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    async def finish(
        self,
        final: Path,
        size: int,
        sha: str,
        job_id: str,
        *,
        sync_dir: bool = True,
        probe: bool = False,
    ) -> Downloaded:
        if self._file is not None:
            await self.close(sync=True)
            return await self._offload(
                functools.partial(
                    _finish, self.part, final, size, sha, job_id, None, sync_dir, probe
                )
            )
        data, append = bytes(self._buf), self._append
        self._buf.clear()

        def write_and_finish() -> Downloaded:
            self._write_all(data, True)
            # The whole file is in hand: no re-read for the type check or the probe.
            whole = None if append else data
            return _finish(self.part, final, size, sha, job_id, whole, sync_dir, probe)

        return await self._offload(write_and_finish)


async def _stream(
    resp: aiohttp.ClientResponse,
    writer: _PartWriter,
    have: int,
    digest: hashlib._Hash,
    max_bytes: int,
    chunk_bytes: int,
    job_id: str,
) -> int:
    size = have
    try:
        async for chunk in resp.content.iter_chunked(chunk_bytes):
            size += len(chunk)
            if size > max_bytes:
                raise DownloadError("video exceeds the size limit", job_id=job_id, retryable=False)
            digest.update(chunk)
            await writer.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise DownloadError(
            f"download interrupted after {size} bytes: {type(exc).__name__}", job_id=job_id
        ) from None
    return size


def _finish(
    part: Path,
    final: Path,
    size: int,
    sha: str,
    job_id: str,
    whole: bytes | None = None,
    sync_dir: bool = True,
    probe: bool = False,
) -> Downloaded:
    if whole is not None:
        head = whole[:16]
    else:
        with open(part, "rb") as f:
            head = f.read(16)
    if not looks_like_mp4(head):
        part.unlink(missing_ok=True)
        raise DownloadError("the downloaded file is not an MP4", job_id=job_id)
    os.replace(part, final)
    if sync_dir:
        fsync_dir(final.parent)
    figures = probe_video(final, whole) if probe else None
    return Downloaded(final.name, size, sha, final.stat().st_mtime_ns, figures)
