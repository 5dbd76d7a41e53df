"""The downloader: stream a finished video to ``<id>.mp4.part``, hash it, fsync, rename.

A video is never visible under its final name until every byte is on disk and it looks like
an MP4, so a crash leaves at worst a ``.part`` that the next run resumes or replaces.
Pure core: :func:`check_video_url`, :func:`looks_like_mp4`, :func:`file_matches`.
Shell: :func:`download`, which uses a session that never carries the API key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiofiles
import aiohttp
import anyio.to_thread

from .errors import DownloadError, UrlRejectedError
from .fsutil import fsync_dir

MAX_REDIRECTS = 5
MP4_BOXES = (b"ftyp", b"styp")
PART_SUFFIX = ".part"


@dataclass(frozen=True)
class Downloaded:
    file: str  # relative to the output directory
    bytes: int
    sha256: str
    mtime_ns: int


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_video_url(url: str, api_base_url: str) -> None:
    """Only https, except plain http on loopback when the API itself is plain http on loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    api = urlsplit(api_base_url)
    if (
        parts.scheme == "http"
        and api.scheme == "http"
        and _is_loopback(parts.hostname)
        and _is_loopback(api.hostname)
    ):
        return
    raise UrlRejectedError(f"refusing to fetch video from {_safe_url(url)}: not an https URL")


def _safe_url(url: str) -> str:
    """A URL without its query string, which may hold a signature."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"[:200]


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
) -> Downloaded:
    """One attempt: fetch ``url`` into ``<id>.mp4``, resuming a ``.part`` with Range if allowed."""
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
        digest = await anyio.to_thread.run_sync(_hash_prefix, part, have)
        size = await _stream(resp, part, have, digest, max_bytes, chunk_bytes, job_id)
    if expected is not None and size != expected:
        raise DownloadError(f"truncated: got {size} of {expected} bytes", job_id=job_id)
    return await anyio.to_thread.run_sync(_finish, part, final, size, digest.hexdigest(), job_id)


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
    """Seed the hash with the bytes a previous attempt already wrote, or start an empty part."""
    h = hashlib.sha256()
    if have == 0:
        with open(part, "wb"):
            pass
        return h
    with open(part, "rb") as f:
        remaining = have
        while remaining and (block := f.read(min(1 << 20, remaining))):
            h.update(block)
            remaining -= len(block)
    with open(part, "r+b") as f:
        f.truncate(have)
    return h


async def _stream(
    resp: aiohttp.ClientResponse,
    part: Path,
    have: int,
    digest: hashlib._Hash,
    max_bytes: int,
    chunk_bytes: int,
    job_id: str,
) -> int:
    size = have
    try:
        async with aiofiles.open(part, "ab") as f:
            async for chunk in resp.content.iter_chunked(chunk_bytes):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(
                        "video exceeds the size limit", job_id=job_id, retryable=False
                    )
                digest.update(chunk)
                await f.write(chunk)
            await f.flush()
            await anyio.to_thread.run_sync(os.fsync, f.fileno())
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise DownloadError(
            f"download interrupted after {size} bytes: {type(exc).__name__}", job_id=job_id
        ) from None
    return size


def _finish(part: Path, final: Path, size: int, sha: str, job_id: str) -> Downloaded:
    with open(part, "rb") as f:
        head = f.read(16)
    if not looks_like_mp4(head):
        part.unlink(missing_ok=True)
        raise DownloadError("the downloaded file is not an MP4", job_id=job_id)
    os.replace(part, final)
    fsync_dir(final.parent)
    return Downloaded(final.name, size, sha, final.stat().st_mtime_ns)
