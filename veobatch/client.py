"""The API client: the two video endpoints, with aiohttp's errors translated in one place.

Pure core: :func:`parse_created`, :func:`parse_generation`, :func:`error_from_response`,
:func:`parse_retry_after`. Shell: :class:`HttpApiClient`, which only sends and awaits.

The key is attached per request by this client alone, and only to URLs under the API base:
the downloader uses a session of its own that never carries it.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NoAnswerError,
    NotFoundError,
    NotSentError,
    ProtocolError,
    RateLimitedError,
    RedirectedError,
    ServerError,
)
from .settings import ENV_BASE_URL, Secret

GENERATIONS_PATH = "/v2/video/generations"
LOGS_PATH = "/v2/logs"
MAX_BODY_BYTES = 4 << 20  # an API answer is small; anything bigger is not what we asked for
# A Retry-After beyond this is taken as this: a wrong or hostile header must not park a job for
# hours (the request is simply asked again, and a server that still wants a pause says so).
MAX_RETRY_AFTER_S = 900.0


@dataclass(frozen=True)
class Created:
    """The answer to a create: the generation id the job is now tied to."""

    generation_id: str
    status: str
    usd_spent: float | None = None
    error_name: str | None = None  # a create may answer "error" at once, saying why
    error_message: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "error"


@dataclass(frozen=True)
class Generation:
    """One poll's view of a generation."""

    generation_id: str
    status: str
    video_url: str | None = None
    duration_s: float | None = None
    error_name: str | None = None
    error_message: str | None = None
    usd_spent: float | None = None  # x-aimlapi-usd-spent on this answer, when present

    @property
    def completed(self) -> bool:
        """Done only with a URL: 'completed' without one is treated as still running."""
        return self.status == "completed" and bool(self.video_url)

    @property
    def failed(self) -> bool:
        return self.status == "error"


@dataclass(frozen=True)
class LogEntry:
    """One row of the usage logs: did a request with our client request id create anything?"""

    client_request_id: str | None
    inference_id: str | None
    status: str  # "succeeded" or "failed"
    # When the API says the request was made (epoch seconds, its clock); None if unreadable.
    created: float | None = None


@dataclass(frozen=True)
class LogPage:
    entries: list[LogEntry]
    has_more: bool


class ApiClient(Protocol):
    """What the pipeline needs from the API; tests may pass any object with these methods."""

    async def create(self, body: Mapping[str, Any], *, client_request_id: str) -> Created: ...

    async def fetch(self, generation_id: str) -> Generation: ...

    async def logs(
        self,
        *,
        start: datetime,
        end: datetime,
        models: Sequence[str],
        offset: int,
        limit: int,
        statuses: Sequence[str] = (),
    ) -> LogPage: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), capped at
    MAX_RETRY_AFTER_S."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _error_details(doc: Mapping[str, Any]) -> list[str]:
    """Validation details, in whichever of the shapes APIs use for them."""
    out: list[str] = []
    for key in ("meta", "errors", "details", "issues"):
        items = doc.get(key)
        if not isinstance(items, list):
            continue
        for item in items[:10]:
            if isinstance(item, Mapping):
                path = item.get("path")
                where = ".".join(str(p) for p in path) if isinstance(path, list) else path
                msg = item.get("message") or json.dumps(item)[:200]
                out.append(f"{where}: {msg}" if where else str(msg))
            else:
                out.append(str(item)[:200])
    return out


# Half of a UTF-16 pair: JSON's "\ud83d" escape alone parses to one, which no UTF-8 file
# can hold; written to the ledger, it stopped every run at the same poll.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _whole_text(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) made U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_whole_text(v) for v in value]
    if isinstance(value, dict):
        return {_whole_text(k): _whole_text(v) for k, v in value.items()}
    return value


def _loads(text: str) -> Any:
    """JSON from an answer, whose strings can be recorded: only an escape makes a surrogate,
    so answers without one are not walked."""
    doc = json.loads(text)
    if "\\u" not in text:
        return doc
    try:
        return _whole_text(doc)
    except RecursionError:  # nested deeper than any answer: not one to act on
        raise ValueError("JSON nested too deeply") from None


def describe_error_body(text: str) -> str:
    """A one-line reason from an error body: its message plus any validation details."""
    try:
        doc = _loads(text)
    except ValueError:
        return " ".join(text.split())[:300] or "(empty body)"
    if not isinstance(doc, Mapping):
        return str(doc)[:300]
    message = doc.get("message") or doc.get("error") or doc.get("detail") or ""
    if isinstance(message, Mapping):
        message = message.get("message") or json.dumps(message)
    parts = [str(message)] if message else []
    details = _error_details(doc)
    if details:
        parts.append("; ".join(details))
    return (" - ".join(parts) or json.dumps(doc)[:300])[:1000]


def error_from_response(
    status: int, text: str, headers: Mapping[str, str], *, now: float | None = None
) -> ApiError:
    """Map a non-2xx answer to the error type that tells the pipeline what to do next."""
    reason = f"HTTP {status}: {describe_error_body(text)}"
    if status == 429:
        retry = parse_retry_after(headers.get("Retry-After"), now)
        return RateLimitedError(reason, retry_after_s=retry)
    if status in (401, 403):
        return AuthError(reason, status=status)
    if status == 404:
        return NotFoundError(reason, status=status)
    if 300 <= status < 400:
        where = _whole_text(headers.get("Location"))  # undecodable bytes: surrogates
        to = f" to {where[:200]}" if where else ""
        fix = f"set {ENV_BASE_URL} to the address that answers"
        return RedirectedError(
            f"HTTP {status}: the API base URL redirects{to}; {fix}", status=status
        )
    if status == 408:  # the server gave up waiting: whether it acted is unknown
        return NoAnswerError(reason, status=status)
    if status >= 500:
        retry = parse_retry_after(headers.get("Retry-After"), now)
        return ServerError(reason, status=status, retry_after_s=retry)
    return BadRequestError(reason, status=status)


def _json_object(text: str, what: str) -> Mapping[str, Any]:
    try:
        doc = _loads(text)
    except ValueError:
        raise ProtocolError(f"{what}: answer is not JSON: {text[:200]!r}") from None
    if not isinstance(doc, Mapping):
        raise ProtocolError(f"{what}: answer is not a JSON object")
    return doc


def parse_created(text: str, headers: Mapping[str, str]) -> Created:
    """The new generation's id, from the body or, when the body is unreadable, from the
    ``x-inference-id`` header: the generation exists either way, and losing its id would
    leave a paid job uncertain."""
    try:
        doc = _json_object(text, "create")
    except ProtocolError:
        if not headers.get("x-inference-id"):
            raise
        doc = {}
    gen_id = doc.get("id") or _whole_text(headers.get("x-inference-id"))
    if not isinstance(gen_id, str) or not gen_id:
        raise ProtocolError(f"create: answer has no generation id: {text[:200]!r}")
    view = _generation_of(doc, gen_id, headers)
    status = view.status if doc.get("status") else "queued"
    return Created(gen_id, status, view.usd_spent, view.error_name, view.error_message)


def usd_spent(headers: Mapping[str, str]) -> float | None:
    """The charge the API reports on a JSON answer, when it reports one."""
    try:
        usd = float(headers["x-aimlapi-usd-spent"])
    except (KeyError, ValueError):
        return None
    return usd if math.isfinite(usd) and usd >= 0 else None


def parse_generation(
    text: str, generation_id: str, headers: Mapping[str, str] | None = None
) -> Generation:
    return _generation_of(_json_object(text, "fetch"), generation_id, headers)


def _generation_of(
    doc: Mapping[str, Any], generation_id: str, headers: Mapping[str, str] | None
) -> Generation:
    """A generation as a fetch's (or a create's) JSON object describes it."""
    status = doc.get("status")
    status = status.strip().lower() if isinstance(status, str) else "unknown"
    video = doc.get("video")
    url = video.get("url") if isinstance(video, Mapping) else None
    duration = video.get("duration") if isinstance(video, Mapping) else None
    duration = duration if duration is not None else doc.get("duration")
    err = doc.get("error")
    name = message = None
    if isinstance(err, Mapping):
        name, message = err.get("name"), err.get("message")
        if not name and not message and err:  # free-form ("Description of the error"): keep it
            message = json.dumps(err, ensure_ascii=False, default=str)[:500]
    elif err:
        message = str(err)
    return Generation(
        generation_id=generation_id,
        status=status,
        video_url=url if isinstance(url, str) and url else None,
        duration_s=_seconds(duration),
        error_name=str(name) if name else None,
        error_message=str(message) if message else None,
        usd_spent=usd_spent(headers) if headers is not None else None,
    )


def _seconds(value: Any) -> float | None:
    """A finite number of seconds, or None: JSON's integers have no bound (``1e400`` written
    out in digits is no float) and Python's parser reads NaN and Infinity too."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def parse_log_page(text: str) -> LogPage:
    doc = _json_object(text, "logs")
    rows = doc.get("data")
    if not isinstance(rows, list):
        raise ProtocolError("logs: answer has no data list")
    entries = [
        LogEntry(
            client_request_id=_opt_str(row.get("client_request_id")),
            inference_id=_opt_str(row.get("inference_id")),
            status=str(row.get("status") or ""),
            created=_epoch(row.get("created")),
        )
        for row in rows
        if isinstance(row, Mapping)
    ]
    pagination = doc.get("pagination")
    has_more = bool(pagination.get("has_more")) if isinstance(pagination, Mapping) else False
    return LogPage(entries, has_more)


def _epoch(value: Any) -> float | None:
    """An ISO-8601 time as epoch seconds (UTC when it names no offset); None if unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_View = TypeVar("_View", Created, Generation)  # an answer that may carry an error's words


class HttpApiClient:
    """The real client over aiohttp. One instance per run; the session is the caller's."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: Secret,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 15.0,
        poll_timeout_s: float = 10.0,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        # Polls are most of the requests: their URL is built by hand, and marked as already
        # encoded, rather than parsed and re-quoted by yarl each time.
        self._fetch_prefix = f"{self._base}{GENERATIONS_PATH}?generation_id="
        # No sock_read: an API answer is small, so the total bounds it already, and a read
        # timeout would re-arm a timer on every chunk that arrives.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        # A poll is a small GET, safe to send again: one that hangs is cut short and asked
        # again at its next poll, rather than hold a poll worker for the full request timeout.
        # (A create keeps the long one: a POST cut short leaves its outcome unknown.)
        self._poll_timeout = aiohttp.ClientTimeout(total=poll_timeout_s, connect=connect_timeout_s)

    async def create(self, body: Mapping[str, Any], *, client_request_id: str) -> Created:
        _, text, headers = await self._call(
            "POST",
            GENERATIONS_PATH,
            json_body=body,
            extra={"X-Client-Request-Id": client_request_id},
        )
        created = parse_created(text, headers)
        if self._key.distinctive:  # an id from the header was not scrubbed with the body
            created = replace(created, generation_id=self._key.scrub(created.generation_id))
        return self._scrubbed(created)

    async def fetch(self, generation_id: str) -> Generation:
        url = URL(self._fetch_prefix + quote(generation_id, safe=""), encoded=True)
        _, text, headers = await self._call(
            "GET", GENERATIONS_PATH, url=url, timeouts=self._poll_timeout
        )
        return self._scrubbed(parse_generation(text, generation_id, headers))

    def _scrubbed(self, view: _View) -> _View:
        """An error's words go to records and logs: no run of 8 of the key's characters either.
        (Only the whole key is scrubbed from the rest of a 2xx answer, where a signed video URL
        may hold 8 of its characters by chance.)"""
        if not (view.error_name or view.error_message) or not self._key.distinctive:
            return view

        def scrub(text: str | None) -> str | None:
            return self._key.scrub(text, fragments=True) if text else text

        return replace(
            view, error_name=scrub(view.error_name), error_message=scrub(view.error_message)
        )

    async def logs(
        self,
        *,
        start: datetime,
        end: datetime,
        models: Sequence[str],
        offset: int,
        limit: int,
        statuses: Sequence[str] = (),
    ) -> LogPage:
        # Repeated `model` and `status` parameters (a comma-separated value would match nothing).
        params: list[tuple[str, str]] = [("start", iso_utc(start)), ("end", iso_utc(end))]
        params += [("model", m) for m in models[:50]]
        params += [("status", s) for s in statuses]
        params += [("limit", str(limit)), ("offset", str(offset))]
        _, text, _ = await self._call("GET", LOGS_PATH, params=params)
        return parse_log_page(text)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        extra: Mapping[str, str] | None = None,
        url: URL | None = None,
        timeouts: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, str, Mapping[str, str]]:
        """Send one request; the single place where aiohttp's failures become ours."""
        headers = {"Authorization": f"Bearer {self._key.reveal()}", **(extra or {})}
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        data = json.dumps(json_body).encode() if json_body is not None else None
        try:
            async with self._session.request(
                method,
                url or self._base + path,
                params=params,
                data=data,
                headers=headers,
                timeout=timeouts or self._timeout,
                allow_redirects=False,  # a redirect could carry the key to another host
            ) as resp:
                try:
                    raw = await _read_body(resp.content)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    # The body of a create's 2xx was cut off or stalled: its header already
                    # named the generation, which exists and is paid for (parse_created).
                    if method != "POST" or resp.status >= 300 or not _id_header(resp.headers):
                        raise
                    raw = b""
                # JSON must not start with a BOM, but a parser may skip one (RFC 8259, 8.1)
                text = raw[:MAX_BODY_BYTES].decode("utf-8-sig", "replace")
                if resp.status >= 300:
                    raise self._error(resp.status, text, resp.headers)  # scrubbed there
                if self._key.distinctive:  # an echo of it must not reach records or logs
                    text = self._key.scrub(text)
                if len(raw) > MAX_BODY_BYTES:
                    raise ProtocolError(f"{method} {path}: answer is over {MAX_BODY_BYTES} bytes")
                return resp.status, text, resp.headers
        except ApiError:
            raise
        except (
            aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake: nothing was sent
            aiohttp.ConnectionTimeoutError,
            aiohttp.InvalidURL,  # refused before connecting
        ) as exc:
            raise NotSentError(f"{method} {path}: could not connect: {_brief(exc)}") from None
        except TimeoutError:
            limits = timeouts or self._timeout
            # Which limit, and where it is set: an API slower than it fails every job alike.
            knob = " (--poll-timeout)" if timeouts is self._poll_timeout else ""
            # "no answer: TimeoutError" first: the outage lines' cause (outage.failure_cause).
            raise NoAnswerError(
                f"{method} {path}: no answer: TimeoutError, none within the {limits.total:g}s"
                f" timeout{knob}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise NoAnswerError(f"{method} {path}: no answer: {_brief(exc)}") from None

    def _error(self, status: int, text: str, headers: Mapping[str, str]) -> ApiError:
        """The error for an answer, with no trace of the key an API or proxy echoed back."""
        where = headers.get("Location")
        if where is not None:
            headers = CIMultiDict(headers)
            headers["Location"] = self._key.scrub(where, fragments=True)
        return error_from_response(status, self._key.scrub(text, fragments=True), headers)


def _id_header(headers: Mapping[str, str]) -> bool:
    return bool(headers.get("x-inference-id", "").strip())


async def _read_body(content: aiohttp.StreamReader) -> bytes:
    """The whole body, or its first MAX_BODY_BYTES + 1 bytes when it is longer.

    ``read(n)`` returns what has arrived so far, not n bytes: an answer that comes in several
    packets (a large logs page, a server that streams) needs a loop. Most answers are one packet
    and already at their end after the first read.
    """
    raw = await content.read(MAX_BODY_BYTES + 1)
    if content.at_eof() or not raw:
        return raw
    parts, size = [raw], len(raw)
    while size <= MAX_BODY_BYTES and (chunk := await content.read(MAX_BODY_BYTES + 1 - size)):
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _brief(exc: BaseException) -> str:
    """An exception as one line, with no request headers in it."""
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]
