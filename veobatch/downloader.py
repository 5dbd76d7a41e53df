"""The downloader: stream a finished video to ``<id>.mp4.part``, hash it, fsync, rename.

A video is never visible under its final name until every byte is on disk and it is a whole
MP4 (its boxes add up, its figures can be read), so a crash leaves at worst a ``.part`` that
the next run resumes or replaces.
Pure core: :func:`check_video_url`, :func:`looks_like_mp4`; :func:`file_matches` and
:func:`mp4_file_complete` look at a finished file.
Shell: :func:`download`, which uses a session that never carries the API key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import io
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiofiles
import aiohttp
import anyio
from yarl import URL

from .client import describe_error_body, parse_retry_after
from .errors import DownloadError, UrlRejectedError
from .fsutil import Offload, create_new, fsync_dir, open_regular, to_thread
from .logfmt import one_line
from .transfer import Body, MinimumRate, PartInfo, mp4_boxes_complete, plan_body, validator_of
from .verify import Probe, probe_video

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MP4_BOXES = (b"ftyp", b"styp")
PART_SUFFIX = ".part"
INFO_SUFFIX = ".meta"  # <id>.mp4.part.meta: the sidecar that says what the .part is part of
MAX_INFO_BYTES = 64 << 10  # a sidecar is a line of JSON: more than this is not one
FLUSH_BYTES = 4 << 20  # below this a video is written in one go
# aiohttp's read buffer for the video host (its default is 64 KiB): while a block is hashed and
# written in worker threads, the loop keeps reading up to twice this before the socket waits.
READ_BUFFER_BYTES = 4 << 20
# A large video's pages are handed to the disk and dropped from the page cache every this
# many bytes: nobody reads them back soon, and a page cache grown by a GB is slow to grow
# (each new page faulted in, on a VM) and left for the final fsync to write all at once.
DROP_BEHIND_BYTES = 32 << 20
# A body slower than this holds a download worker for nothing: give up and resume later.
MIN_RATE_WINDOW_S = 60.0
MIN_RATE_BYTES = 64 << 10
# A body whose MP4 boxes do not add up; the first words name the cause in the outage tally.
INCOMPLETE = "incomplete MP4: the video host's answer ended with no length to check it by"
NOT_MP4 = "the downloaded file is not an MP4"
# An error answer's body is read this far, this long at most, for the reason it gives: an
# error page may be large, or never end.
ERROR_BODY_BYTES = 4096
ERROR_BODY_WAIT_S = 5.0
EXCERPT_CHARS = 200
# Statuses that say nothing against the URL itself: a read the host gave up waiting for (408),
# a rate limit (429), a resume range that does not fit (416).
NOT_THE_URL = frozenset({408, 416, 429})


# Called with the final path and the new video's sha256 just before the rename (see download).
BeforeReplace = Callable[[Path, str], None]


@dataclass(frozen=True)
class Downloaded:
    file: str  # relative to the output directory
    bytes: int
    sha256: str
    mtime_ns: int
    probe: Probe | None = None  # the container's figures, read in the same worker-thread hop


def check_video_url(url: str, api_base_url: str) -> URL:
    """Only https, or plain http when the API base itself is plain http; always with a host
    that can be looked up and a port from 1 to 65535. Returns the URL to send.

    An https API answering with an http video URL would be a downgrade, so that is refused; a
    plain-http API (the simulator, a mock API in a container network) has nothing to lose.
    Raises only :class:`UrlRejectedError`: a malformed URL from the API (a port out of range,
    an unbalanced ``[``, a host IDNA cannot encode) fails its job, never the run.
    """
    reason = _url_problem(url, http_ok=urlsplit(api_base_url).scheme == "http")
    if reason is None:
        try:
            return _sendable(url)
        except ValueError as exc:  # UnicodeError too: yarl's and the resolver's checks
            reason = f"it cannot be sent as written ({exc})"[:200]
    raise UrlRejectedError(f"refusing to fetch video from {_safe_url(url)}: {reason}")


def _url_problem(url: str, *, http_ok: bool) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ or ], a host NFKC would change
        return "malformed URL: its host cannot be read (look at its [ ] and its characters)"
    if parts.scheme == "http" and not http_ok:
        return "plain http while the API base is https (a downgrade)"
    if parts.scheme not in ("https", "http"):
        return "not an https URL"
    try:
        port = parts.port  # read lazily: only here does a bad one raise
    except ValueError:
        port = 0
    if port == 0:
        return "malformed URL: its port is not a number from 1 to 65535"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _sendable(url: str) -> URL:
    """The URL as it is sent, with what yarl and the resolver would refuse at request time
    asked for now (ValueError), where it can fail the job alone."""
    target = request_target(url)
    host, _ = target.raw_host, target.port  # yarl checks both only when they are read
    if not host:
        raise ValueError("no host")
    if not host.startswith("[") and ":" not in host:  # an IP literal is not looked up
        host.encode("idna")  # as getaddrinfo will: an empty label, or one over 63 characters
    return target


def _safe_url(url: str) -> str:
    """A URL without its query string, which may hold a signature, nor any user:password@."""
    try:
        p = urlsplit(url)
        scheme, netloc, path = p.scheme, p.netloc, p.path
    except ValueError:  # a malformed host: cut by hand
        head = re.split(r"[?#]", url, maxsplit=1)[0]
        scheme, _, rest = head.partition("://")
        netloc, slash, path = rest.partition("/")
        path = slash + path
    host = netloc.rpartition("@")[2]
    return f"{scheme}://{host}{path}"[:200]


def looks_like_mp4(head: bytes) -> bool:
    """An ISO base media file starts with a box whose type is ftyp (or styp for fragments)."""
    return len(head) >= 8 and head[4:8] in MP4_BOXES


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256; only ever of a regular file (:func:`fsutil.open_regular`)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_matches(
    path: Path, size: int | None, sha256: str | None, mtime_ns: int | None, *, deep: bool = False
) -> bool:
    """Is the finished file still what was recorded? Re-hash only if it may have changed."""
    try:
        st = path.lstat()  # a link to a file of the right size is not the video
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or size is None or st.st_size != size:
        return False
    if not deep and mtime_ns is not None and st.st_mtime_ns == mtime_ns:
        return True
    try:
        return sha256 is not None and sha256_file(path) == sha256
    except OSError:  # gone, swapped or unreadable since the look: not the recorded video
        return False


def mp4_file_complete(path: Path) -> bool:
    """Do the file's MP4 boxes add up (:func:`transfer.mp4_boxes_complete`)? False when it
    cannot be read."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            return mp4_boxes_complete(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return False


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
    clock: Callable[[], float] = anyio.current_time,
    before_replace: BeforeReplace | None = None,
) -> Downloaded:
    """One attempt: fetch ``url`` into ``<id>.mp4``, resuming a ``.part`` with Range if allowed.

    Without ``sync_dir`` the rename is not yet durable: the caller fsyncs the directory before
    it records the file (the ledger does, for many files at once). With ``probe``, the
    finished file's figures come back too, read while the worker thread has it in hand.
    ``before_replace(final, sha256)`` runs in that thread just before the whole video is
    renamed to ``final``: the caller's chance to keep aside a file it finds there.
    ``offload`` runs the final write, fsync and rename (a :class:`DiskThreads` batches them).
    A full, read-only or forbidden disk fails the job with its reason, not the run; what
    arrived stays in the ``.part``.
    """
    final = out_dir / final_name(job_id)
    part = final.with_name(final.name + PART_SUFFIX)
    with _disk_errors(final.name, job_id):
        had = _size_or_zero(part)
        info = await offload(functools.partial(_read_info, part)) if had else None
        # Without its sidecar a .part cannot say which file it began (a kill mid-download, a
        # body cut short before the headers were noted): resuming could splice two files.
        have = had if info is not None else 0
        resp, body = await _open_body(
            session, url, api_base_url, job_id, have, info, client_timeout
        )
        async with resp:
            if body.total is not None and body.total > max_bytes:
                raise DownloadError(
                    f"video is {body.total} bytes, over the limit", job_id=job_id, retryable=False
                )
            digest = hashlib.sha256()
            if body.offset:
                digest = await offload(functools.partial(_hash_prefix, part, body.offset))
            elif had:
                _info_path(part).unlink(missing_ok=True)  # a new file: its old sidecar is wrong
            note = None if body.encoded else PartInfo(validator_of(resp.headers), body.total)
            writer = _PartWriter(part, digest, append=body.offset > 0, offload=offload, note=note)
            size = await _take(resp, body, writer, max_bytes, chunk_bytes, job_id, clock)
        return await writer.finish(
            final,
            size,
            job_id,
            sync_dir=sync_dir,
            probe=probe,
            body=body,
            before_replace=before_replace,
        )


@contextlib.contextmanager
def _disk_errors(name: str, job_id: str) -> Iterator[None]:
    """The one boundary for the disk's errors: a full, read-only or forbidden disk fails this
    job with its reason (retrying soon will not help), not the whole run with a traceback."""
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:  # OSErrors too, but the network's
        raise _fetch_error(exc, job_id) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DownloadError(
            f"cannot write {name}: {reason}", job_id=job_id, retryable=False
        ) from exc


async def _take(
    resp: aiohttp.ClientResponse,
    body: Body,
    writer: _PartWriter,
    max_bytes: int,
    chunk_bytes: int,
    job_id: str,
    clock: Callable[[], float],
) -> int:
    """Stream the body into the writer and check its length; on any failure keep what arrived
    (with a sidecar naming the file) for a Range resume, unless it was encoded."""
    size = body.offset
    pace = MinimumRate(MIN_RATE_WINDOW_S, MIN_RATE_BYTES, clock())
    try:
        try:
            async for chunk in resp.content.iter_chunked(chunk_bytes):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(
                        "video exceeds the size limit", job_id=job_id, retryable=False
                    )
                await writer.write(chunk)  # before any slowness verdict: a resume keeps it
                if (short := pace.feed(len(chunk), clock())) is not None:
                    raise DownloadError(
                        f"video host too slow: {short} bytes in the last {pace.window_s:.0f} s",
                        job_id=job_id,
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DownloadError(
                f"download interrupted after {size} bytes: {type(exc).__name__}", job_id=job_id
            ) from None
        if body.total is not None and size != body.total:
            raise DownloadError(f"truncated: got {size} of {body.total} bytes", job_id=job_id)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _after_failure(writer, writer.note)
        raise
    return size


async def _open_body(
    session: aiohttp.ClientSession,
    url: str,
    api_base_url: str,
    job_id: str,
    have: int,
    info: PartInfo | None,
    client_timeout: aiohttp.ClientTimeout | None,
) -> tuple[aiohttp.ClientResponse, Body]:
    """The answer and how to take it: from ``have`` on only if the answer proves it continues
    the ``.part``, else once more from zero (a 416, or a 206 that does not fit)."""
    for offset in (have, 0) if have else (0,):
        validator = info.validator if info is not None and offset else None
        try:
            resp = await _open(
                session, url, api_base_url, job_id, offset, validator, client_timeout
            )
        except _RangeRefused:
            continue  # the part is already whole (a crash before the rename) or not this file
        body = plan_body(resp.status, resp.headers, offset, info if offset else None)
        if body is not None:
            return resp, body
        resp.release()
    raise DownloadError("video host answered with a range that does not fit", job_id=job_id)


async def _after_failure(writer: _PartWriter, keep: PartInfo | None) -> None:
    """Keep what arrived, and its sidecar, so the next attempt resumes with Range from there;
    an encoded body cannot be resumed, so its part goes. Best effort: the disk may be why."""
    try:
        await writer.close(sync=False)
        await writer.offload(functools.partial(_keep_or_drop, writer.part, keep))
    except OSError as exc:
        log.warning("cannot keep %s: %s", writer.part.name, exc.strerror or exc)


def _keep_or_drop(part: Path, keep: PartInfo | None) -> None:
    if keep is None or not _size_or_zero(part):  # nothing arrived: nothing to resume
        _drop(part)
    else:
        _write_info(part, keep)


def _drop(part: Path) -> None:
    """A ``.part`` and its sidecar go together."""
    part.unlink(missing_ok=True)
    _info_path(part).unlink(missing_ok=True)


def _write_info(part: Path, info: PartInfo) -> None:
    with os.fdopen(create_new(_info_path(part)), "wb") as f:
        f.write(info.to_json())


def _size_or_zero(path: Path) -> int:
    """One stat, where ``exists()`` then ``stat()`` would be two. Anything but a regular file
    (a link planted in a shared folder, say) counts as nothing to resume: it is replaced."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _info_path(part: Path) -> Path:
    return part.with_name(part.name + INFO_SUFFIX)


def _read_info(part: Path) -> PartInfo | None:
    try:
        with os.fdopen(open_regular(_info_path(part)), "rb") as f:
            return PartInfo.from_json(f.read(MAX_INFO_BYTES))
    except OSError:
        return None


def drop_part(out_dir: Path, job_id: str) -> None:
    """Forget a ``.part`` and its sidecar (blocking, but only two unlinks)."""
    _drop(out_dir / (final_name(job_id) + PART_SUFFIX))


# A URL made only of what RFC 3986 allows, its % escapes well formed.
_RFC3986 = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


_NOT_URI = re.compile(r"%(?![0-9A-Fa-f]{2})|[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def request_target(url: str) -> URL:
    """The URL to send, byte for byte as the API gave it when it is a valid URI.

    A CDN may sign the exact request target: ``%2C`` and ``,`` are not the same to it
    (RFC 3986, 2.2), yet yarl would normalise one into the other. Only the characters a URI
    cannot hold (a space, non-ASCII, a stray %) are percent-encoded, each where it stands, since
    they could not be sent as they are; every other byte, escapes included, stays as given.
    """
    if _RFC3986.fullmatch(url):
        return URL(url, encoded=True)
    scheme, sep, rest = url.partition("://")
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:end], rest[end:]
    if not authority.isascii():  # an international host name: its IDNA (punycode) form
        authority = URL(f"{scheme}://{authority}").raw_authority
    return URL(f"{scheme}{sep}{authority}{_NOT_URI.sub(_escape, tail)}", encoded=True)


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match[0].encode())


async def _open(
    session: aiohttp.ClientSession,
    url: str,
    api_base_url: str,
    job_id: str,
    have: int,
    validator: str | None,
    client_timeout: aiohttp.ClientTimeout | None,
) -> aiohttp.ClientResponse:
    """GET with redirects followed by hand, each hop re-checked against the URL rules."""
    # identity: a compressed body would break the length and hash checks
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator  # the file changed: the host sends all of it
    came_from: str | None = None  # the URL that redirected here, if one did
    for _ in range(MAX_REDIRECTS + 1):
        target = _checked(url, api_base_url, came_from)
        try:
            resp = await session.get(
                target, headers=headers, allow_redirects=False, timeout=client_timeout
            )
        except ValueError as exc:  # aiohttp's InvalidURL: a URL the checks let through
            why = f"aiohttp cannot request it ({type(exc).__name__})"
            raise _rejected(url, why, came_from) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _fetch_error(exc, job_id) from None
        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
            location = resp.headers["Location"]
            resp.release()
            try:
                url, came_from = urljoin(url, location), url
            except ValueError:  # an unbalanced [ or ] in the Location
                raise UrlRejectedError(
                    f"refusing to follow the video host's redirect from {_safe_url(url)}: its"
                    " Location is a malformed URL (look at its [ ])"
                ) from None
            continue
        if resp.status in (200, 206):
            return resp
        said = "" if resp.status == 416 else await _error_body(resp)
        resp.release()
        raise _status_error(resp.status, job_id, resp.headers.get("Retry-After"), said)
    raise DownloadError("too many redirects", job_id=job_id, retryable=False)


def _checked(url: str, api_base_url: str, came_from: str | None) -> URL:
    """:func:`check_video_url`, its refusal naming the URL that redirected here, if one did."""
    try:
        return check_video_url(url, api_base_url)
    except UrlRejectedError as exc:
        if came_from is None:
            raise
        raise UrlRejectedError(exc.message + _redirected(came_from)) from None


def _rejected(url: str, why: str, came_from: str | None) -> UrlRejectedError:
    return UrlRejectedError(
        f"refusing to fetch video from {_safe_url(url)}: {why}{_redirected(came_from)}"
    )


def _redirected(came_from: str | None) -> str:
    return f" (the video host redirected there from {_safe_url(came_from)})" if came_from else ""


def _fetch_error(exc: BaseException, job_id: str) -> DownloadError:
    """A request that got no answer; ``unreachable`` when no connection was made at all."""
    return DownloadError(
        f"cannot fetch video: {type(exc).__name__}: {exc}"[:300],
        job_id=job_id,
        unreachable=isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError),
    )


class _RangeRefused(DownloadError):
    """416: the bytes we have do not fit what the host serves."""


def _status_error(
    status: int, job_id: str, retry_after: str | None = None, said: str = ""
) -> DownloadError:
    """What an error answer from the video host means for the download, with what it said.

    A signed URL past its time is refused with a 4xx that differs by host: 403 from S3 and
    CloudFront, 400 (``ExpiredToken``) from Google Cloud Storage, 401 (``AuthenticationFailed``)
    from Azure, 404 or 410 from others. No key goes to the video host, so any 4xx refusing the
    URL is taken for that: the API is asked for a fresh URL (at most MAX_URL_REFRESHES)."""
    told = f" ({said})" if said else ""
    if status == 416:
        return _RangeRefused("video host refused the resume range", job_id=job_id)
    if 400 <= status < 500 and status not in NOT_THE_URL:
        return DownloadError(
            f"video host answered {status}: the URL has expired or is refused{told}",
            job_id=job_id,
            url_expired=True,
        )
    retryable = status >= 500 or status in NOT_THE_URL
    # A host that says how long to wait is obeyed: hammering it sooner only prolongs the 429.
    wait_s = parse_retry_after(retry_after) if status in (429, 503) else None
    return DownloadError(
        f"video host answered {status}{told}",
        job_id=job_id,
        retryable=retryable,
        retry_after_s=wait_s,
    )


async def _error_body(resp: aiohttp.ClientResponse) -> str:
    """What an error answer's body says (:func:`host_error_excerpt`), from its first
    ERROR_BODY_BYTES at most, read for ERROR_BODY_WAIT_S at most: never the whole body."""
    data = b""
    with anyio.move_on_after(ERROR_BODY_WAIT_S):
        try:
            while len(data) < ERROR_BODY_BYTES:
                chunk = await resp.content.read(ERROR_BODY_BYTES - len(data))
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, aiohttp.ClientError):
            pass  # what arrived says what it can; the status says the rest
    return host_error_excerpt(data)


# The fields of an S3, Google Cloud Storage or Azure error document that say what went wrong;
# the rest (a request id, the string signed, the signature) says nothing a user can act on.
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]{0,500})</\1>")
_TAG = re.compile(r"<[^>]{0,500}>")


def host_error_excerpt(body: bytes) -> str:
    """A video host's error body in a few words, on one line: an XML error's Code and Message,
    a JSON error's message, else the start of its text (tags dropped); "" when empty."""
    text = body.decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for m in _XML_FIELD.finditer(text):
        fields.setdefault(m[1], " ".join(html.unescape(m[2]).split()))
    if fields.get("Code") or fields.get("Message"):
        text = ": ".join(v for k in ("Code", "Message") if (v := fields.get(k)))
    elif text.lstrip().startswith("{"):
        text = describe_error_body(text)
    else:
        text = " ".join(html.unescape(_TAG.sub(" ", text)).split())
    text = one_line(text)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def _hash_prefix(part: Path, have: int) -> hashlib._Hash:
    """Seed the hash with the bytes a previous attempt already wrote (and drop any excess)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(part, os.O_RDWR), "r+b") as f:
        remaining = have
        while remaining and (block := f.read(min(1 << 20, remaining))):
            h.update(block)
            remaining -= len(block)
        f.truncate(have)
    return h


_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)  # Linux and most Unixes; not macOS


def _drop_behind(fd: int) -> None:
    """Start writing the file's dirty pages and drop the clean ones from the page cache.

    Only caching changes: the final fsync still decides durability. Pages still being
    written stay, and go at the next call."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, _DONTNEED)  # type: ignore[arg-type]


class _PartWriter:
    """Buffers a download in memory up to FLUSH_BYTES, then streams it through aiofiles.

    A small video costs one worker-thread hop in all (write, fsync, check, rename); a large
    one a hop per FLUSH_BYTES, so memory stays flat whatever the size.
    """

    def __init__(
        self,
        part: Path,
        digest: hashlib._Hash,
        *,
        append: bool,
        offload: Offload = to_thread,
        note: PartInfo | None = None,
    ) -> None:
        self.part = part
        self.digest = digest  # of every byte written, in order
        self._append = append
        self.offload = offload
        self.note = note  # the sidecar a .part needs before it may be resumed
        self._sidecar = append  # a .part is only appended to when its sidecar is there
        self._buf = bytearray()
        self._file: Any = None
        self._undropped = 0  # bytes written since the page cache was last told to let go

    async def write(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) >= FLUSH_BYTES:
            if self._file is None:
                if self.note is not None and not self._append:
                    # Before the first byte reaches the disk, so a .part that outlives a kill
                    # can be resumed: one small file per large video, none for small ones.
                    await self.offload(functools.partial(_write_info, self.part, self.note))
                    self._sidecar = True
                self._file = await aiofiles.open(
                    self.part, "ab" if self._append else "wb", opener=self._opener
                )
            # Emptied before the write: a write cut off by cancellation may finish in its
            # thread all the same, and close() must not write those bytes a second time.
            data, self._buf = self._buf, bytearray()
            # Hashed in a worker thread (sha256 lets go of the GIL): the event loop goes on
            # reading the socket into aiohttp's buffer (READ_BUFFER_BYTES) meanwhile.
            await anyio.to_thread.run_sync(self.digest.update, data)
            await self._file.write(data)
            self._undropped += len(data)
            if self._undropped >= DROP_BEHIND_BYTES and _DONTNEED is not None:
                self._undropped = 0
                await self._file.flush()
                await self.offload(functools.partial(_drop_behind, self._file.fileno()))

    async def close(self, *, sync: bool) -> None:
        """Write what is buffered and close; with ``sync``, fsync first."""
        if self._file is not None:
            data, self._buf = self._buf, bytearray()
            self.digest.update(data)  # under FLUSH_BYTES: quick
            await self._file.write(data)
            if sync:
                await self._file.flush()
                await self.offload(functools.partial(os.fsync, self._file.fileno()))
            await self._file.close()
        elif self._buf or not self._append:
            self.digest.update(self._buf)
            await self.offload(functools.partial(self._write_all, bytes(self._buf), sync))
        self._buf.clear()
        self._file = None
        self._append = True

    def _opener(self, path: str, flags: int) -> int:
        """The ``.part``'s descriptor: a new one made afresh (never through a link planted in
        a shared folder, which "wb" would follow and truncate), one resumed appended to only if
        it is a regular file."""
        if self._append:
            return open_regular(Path(path), os.O_WRONLY | os.O_APPEND)
        return create_new(Path(path))

    def _write_all(self, data: bytes, sync: bool) -> None:
        with open(self.part, "ab" if self._append else "wb", opener=self._opener) as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    async def finish(
        self,
        final: Path,
        size: int,
        job_id: str,
        *,
        sync_dir: bool = True,
        probe: bool = False,
        body: Body | None = None,
        before_replace: BeforeReplace | None = None,
    ) -> Downloaded:
        if self._file is not None:
            await self.close(sync=True)
            return await self.offload(
                functools.partial(
                    _finish,
                    self.part,
                    final,
                    size,
                    self.digest.hexdigest(),
                    job_id,
                    None,
                    sync_dir,
                    probe,
                    body,
                    self._sidecar,
                    before_replace,
                )
            )
        data, append, sidecar = bytes(self._buf), self._append, self._sidecar
        self._buf.clear()
        self.digest.update(data)
        sha = self.digest.hexdigest()

        def write_and_finish() -> Downloaded:
            self._write_all(data, True)
            # The whole file is in hand: no re-read for the type check or the probe.
            whole = None if append else data
            return _finish(
                self.part,
                final,
                size,
                sha,
                job_id,
                whole,
                sync_dir,
                probe,
                body,
                sidecar,
                before_replace,
            )

        return await self.offload(write_and_finish)


def _finish(
    part: Path,
    final: Path,
    size: int,
    sha: str,
    job_id: str,
    whole: bytes | None = None,
    sync_dir: bool = True,
    probe: bool = False,
    body: Body | None = None,
    sidecar: bool = True,
    before_replace: BeforeReplace | None = None,
) -> Downloaded:
    """Check, probe and rename in one worker-thread hop. A file is renamed into place only if
    it is an MP4, its boxes add up (a length kept proves only that the host sent what it meant
    to: a cached or half-uploaded object comes whole and short) and, with ``probe``, its
    figures can be read; else it is a failed download, never a video.
    ``sidecar`` says whether a .meta may sit beside the part: most videos have none to remove."""
    with io.BytesIO(whole) if whole is not None else os.fdopen(open_regular(part), "rb") as f:
        head = f.read(16)
        complete = looks_like_mp4(head) and mp4_boxes_complete(f, size)
    if not looks_like_mp4(head):
        _drop(part)
        raise DownloadError(NOT_MP4, job_id=job_id, not_video=True)
    if not complete:
        # Cut where nothing said the length: resumed with Range. Cut at the length announced:
        # that is the host's whole copy, and the same URL brings it again: another URL.
        resumable = body is not None and body.resumable_when_cut
        if not resumable:
            _drop(part)
        reason = _cut_reason(body, size)
        raise DownloadError(reason, job_id=job_id, damaged=True, not_video=not resumable)
    figures = probe_video(part, whole) if probe else None
    if figures is not None and figures.error:
        _drop(part)  # its boxes added up: what came is all the host has, nothing to resume
        reason = f"unreadable video: {figures.error}"
        raise DownloadError(reason, job_id=job_id, damaged=True, not_video=True)
    if before_replace is not None:
        before_replace(final, sha)
    os.replace(part, final)
    if sidecar:
        _info_path(part).unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(final.parent)
    return Downloaded(final.name, size, sha, final.stat().st_mtime_ns, figures)


def _cut_reason(body: Body | None, size: int) -> str:
    if body is None or body.total is None:
        return INCOMPLETE
    return (
        f"incomplete MP4: the video host sent the {size} bytes it announced, but its boxes do"
        " not add up (a cut or half-uploaded file)"
    )
