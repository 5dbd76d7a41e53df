"""The one exception hierarchy of veobatch.

Everything the package raises on purpose derives from :class:`VeobatchError`, so an embedding
program can catch one type. Errors of the libraries underneath (aiohttp, PyYAML, OS) are
translated at one boundary each (the client, the manifest loader, the ledger) with
``raise Mapped(...) from exc``.

    VeobatchError
    ├── ManifestError            invalid manifest: carries every problem found (exit 2)
    ├── ConfigError              missing key, bad setting, unusable output dir (exit 3)
    ├── LockedError              another run holds the output directory (exit 75)
    ├── LedgerError              the ledger cannot be read or trusted
    │   └── LedgerCorruptError   a bad record before a good one: refuse to run
    ├── ApiError                 an answer (or its absence) from the API; ``job_id`` when known
    │   ├── NotSentError         the request never left (refused, DNS, TLS): safe to retry
    │   ├── NoAnswerError        sent, but no answer came back: outcome unknown
    │   ├── RateLimitedError     429; ``retry_after_s`` when the server said
    │   ├── ServerError          5xx; for a create, the outcome is unknown
    │   ├── BadRequestError      400 and other 4xx that retrying will not fix
    │   ├── NotFoundError        404
    │   ├── AuthError            401 or 403: stop submitting (exit 3)
    │   │   └── BaseUrlError     the base URL is wrong (a 404 to a create): the same
    │   │       └── RedirectedError  3xx: the same, and never followed
    │   └── ProtocolError        a 2xx whose body is not what the contract says
    └── DownloadError            fetching a video failed; ``retryable`` says if a retry may help,
        │                        ``retry_after_s`` how long the host asked us to wait
        └── UrlRejectedError     the video URL is not one we are willing to fetch
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class VeobatchError(Exception):
    """Root of every error veobatch raises on purpose."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id

    def __str__(self) -> str:
        if self.job_id is not None:
            return f"job {self.job_id!r}: {self.message}"
        return self.message


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as the input allows."""

    file: str
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    job: str | None = None  # "'ballerina'" or "#3" when the job has no id
    field: str | None = None  # dotted path inside the job, e.g. "image_urls.1"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where]
        if self.job is not None:
            parts.append(f"job {self.job}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + ": " + self.message


class ManifestError(VeobatchError):
    """The manifest is invalid; ``problems`` lists all of them, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        head = f"{count:,} problem{'s' if count != 1 else ''} in manifest"
        lines = [f"  {p}" for p in problems[:SHOWN_PROBLEMS]]
        if count > SHOWN_PROBLEMS:
            # Thousands of lines bury the few distinct mistakes behind them (and fill cron's
            # mail): show the first ones, then where the rest are.
            rest = problems[SHOWN_PROBLEMS:]
            fields = Counter(p.field or "(no field)" for p in rest)
            where = [f"{n:,} in '{f}'" for f, n in fields.most_common(3)]
            where += ["..."] if len(fields) > 3 else []
            lines.append(f"  ... and {len(rest):,} more ({', '.join(where)})")
        super().__init__(head + ":\n" + "\n".join(lines))


SHOWN_PROBLEMS = 50  # in a manifest error's text; ``problems`` keeps them all


class ConfigError(VeobatchError):
    """The run cannot start as configured (no API key, unusable output directory, ...)."""


class LockedError(VeobatchError):
    """Another veobatch process is working on the same output directory."""


class LedgerError(VeobatchError):
    """The results ledger cannot be read or written."""


class LedgerCorruptError(LedgerError):
    """A damaged record sits before a valid one: the ledger cannot be trusted automatically."""


class ApiError(VeobatchError):
    """An API call failed. ``status`` is the HTTP status when there was an answer, and
    ``retry_after_s`` the wait its Retry-After header asked for (429 and 5xx carry one)."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        job_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.status = status
        self.retry_after_s = retry_after_s


class NotSentError(ApiError):
    """The request never reached the server, so nothing can have been created."""

    retryable = True


class NoAnswerError(ApiError):
    """The request may have been received, but no answer arrived (timeout, dropped connection)."""

    retryable = True


class RateLimitedError(ApiError):
    """429: too many requests or too many generations at once."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = 429,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, job_id=job_id, retry_after_s=retry_after_s)


class ServerError(ApiError):
    """5xx from the API."""

    retryable = True


class BadRequestError(ApiError):
    """The API rejected the request itself (400 ``Body validation error`` and the like)."""


class NotFoundError(ApiError):
    """404: the API does not know the resource."""


class AuthError(ApiError):
    """401 (key missing or invalid) or 403 (no credits): nothing else will succeed."""


class BaseUrlError(AuthError):
    """The base URL is not where the API answers, so nothing else will succeed either."""


class RedirectedError(BaseUrlError):
    """A 3xx from the API. Never followed: the key must not go anywhere the user did not
    name."""


class ProtocolError(ApiError):
    """A successful status with a body that breaks the published contract."""


class DownloadError(VeobatchError):
    """Fetching a finished video failed."""

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        retryable: bool = True,
        url_expired: bool = False,
        retry_after_s: float | None = None,
        unreachable: bool = False,
        not_video: bool = False,
        damaged: bool = False,
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.retryable = retryable
        self.retry_after_s = retry_after_s  # a 429's or 503's Retry-After, capped
        # The video host refused the URL (any 4xx but 408, 416 and 429: an expired signature is
        # 400, 401, 403, 404 or 410 by host): a fresh one from the API may work.
        self.url_expired = url_expired
        # No connection at all (refused, no route, no such name): the host may have gone for
        # good, as one in a URL from an earlier run may; a fresh URL may name another.
        self.unreachable = unreachable
        # A 200 whose body is no whole video: an error page, as a CDN may send for a signature
        # it no longer accepts, or a cut copy sent to its announced end. The same URL brings
        # the same body; a fresh one may not.
        self.not_video = not_video
        # The body came to its end but holds no whole, readable video (a cached or
        # half-uploaded object sent whole and short): retried, then asked for anew.
        self.damaged = damaged


class UrlRejectedError(DownloadError):
    """The video URL fails our safety rules (scheme, host)."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id, retryable=False)


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first of our own errors inside a task group's exception group, else the first OS
    error (a disk that filled up), else the group itself: what a caller should see."""
    leaves = _leaves(group)
    for kind in (VeobatchError, OSError):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    return group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
