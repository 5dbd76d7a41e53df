"""Run settings: one frozen value with every default in one place.

CLI flags, manifest ``settings:`` and the environment all map onto :class:`RunSettings`;
precedence is CLI > manifest > environment > the defaults below.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from yarl import URL

from .errors import ConfigError
from .jobs import ManifestSettings

DEFAULT_BASE_URL = "https://api.aimlapi.com"
ENV_KEY = "AIMLAPI_KEY"
ENV_BASE_URL = "AIMLAPI_BASE_URL"


SCRUB_RUN = 8  # this many characters of the key in a row are scrubbed from error texts


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_encoded", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._encoded: tuple[str, ...] | None = None

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """Eight hex digits of a hash of the key: the ledger tells the key a request was sent
        with from another one (the usage logs show only the asking key's requests) without
        recording the key, or anything that would find it."""
        return hashlib.sha256(b"veobatch-account\0" + self._value.encode()).hexdigest()[:8]

    @property
    def distinctive(self) -> bool:
        """Long enough to be told from ordinary text: a test key such as "tp" would be
        scrubbed out of every "http" in an answer, and its URLs with it."""
        return len(self._value) >= SCRUB_RUN

    def scrub(self, text: str, *, fragments: bool = False) -> str:
        """``text`` with the key replaced by ``***``: an API or proxy may echo it back
        ("invalid key sk-...") in text that is logged and recorded. With ``fragments``, any
        run of 8 or more of its characters goes too (an echo cut short or split)."""
        key = self._value
        if key and key in text:
            text = text.replace(key, "***")
        if fragments and len(key) > SCRUB_RUN:
            for i in range(len(key) - SCRUB_RUN + 1):
                piece = key[i : i + SCRUB_RUN]
                if piece in text:
                    text = text.replace(piece, "***")
        if fragments and len(key) >= SCRUB_RUN:
            for piece in self._base64_forms():
                if piece in text:
                    text = text.replace(piece, "***")
        return text

    def _base64_forms(self) -> tuple[str, ...]:
        """The key as it reads inside base64 at any of the 3 byte alignments (a proxy may echo
        an Authorization header encoded), less the characters its neighbours also shape."""
        if self._encoded is None:
            raw, forms = self._value.encode(), set[str]()
            for pad in range(3):
                text = base64.b64encode(b"\0" * pad + raw).decode()
                lead = -(-pad * 4 // 3)  # characters shaped by the padding bytes before it
                end = (pad + len(raw)) // 3 * 4  # whole groups only: the rest meets what follows
                core = text[lead:end]
                if len(core) >= SCRUB_RUN:
                    forms.update((core, core.replace("+", "-").replace("/", "_")))
            self._encoded = tuple(forms)
        return self._encoded

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class PollSettings:
    """How often the shared poller asks about one generation."""

    first_delay_s: float = 2.0  # after submission, before the first poll (until learnt)
    min_interval_s: float = 0.1  # floor between two polls of one generation
    max_interval_s: float = 15.0  # cap between two polls of one generation
    growth: float = 0.25  # until learnt: interval = growth * age, clamped to [min, max]
    lag_target_share: float = 0.056  # learnt plans aim at this mean lag, as a share of the mean
    max_polls_per_s: float = 1000.0  # across all generations; the API's limits are unpublished
    max_concurrent: int = 64  # poll requests in flight at once
    error_backoff_max_s: float = 60.0


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs besides the manifest."""

    out_dir: Path
    api_key: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = 4  # generations submitted and not yet finished
    download_concurrency: int = 4
    job_timeout_s: float = 1800.0  # from submission to completion
    # From submission: a generation still not finished then (polled again on later nights,
    # briefly) is given up on for good, failed "abandoned".
    abandon_after_s: float = 48 * 3600.0
    request_timeout_s: float = 60.0  # one API call
    poll_timeout_s: float = 10.0  # one poll (a small GET): a hung one is asked again later
    connect_timeout_s: float = 15.0
    download_chunk_bytes: int = 1 << 20
    max_video_bytes: int = 4 << 30  # a runaway body is cut off here
    submit_retries: int = 8  # for requests that certainly did not create anything
    download_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    poll: PollSettings = field(default_factory=PollSettings)
    ledger_flush_interval_s: float = 5.0  # results.json rewrite period during a run
    observe_interval_s: float = 0.5  # live display refresh
    logs_grace_s: float = 60.0  # how long the usage logs may lag behind a request
    lookup_interval_s: float = 5.0  # between sweeps of the usage logs
    logs_calls_per_minute: int = 180  # the endpoint allows 200; leave room for others
    resubmit_uncertain: bool = False  # may pay twice: only when asked
    retry_failed: bool = False
    max_cost_usd: float | None = None  # estimated spend of this run's submissions
    prices: Mapping[str, float] = field(default_factory=dict)  # model -> USD per video second

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.download_concurrency < 1:
            raise ConfigError("download concurrency must be at least 1")
        # Written as "not (x > 0)" so that NaN, which fails every comparison, is refused too.
        for name, value in (
            ("job timeout", self.job_timeout_s),
            ("abandon after", self.abandon_after_s),
            ("request timeout", self.request_timeout_s),
            ("poll timeout", self.poll_timeout_s),
            ("connect timeout", self.connect_timeout_s),
        ):
            if not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name, value in (
            ("logs grace", self.logs_grace_s),
            ("backoff base", self.backoff_base_s),
            ("backoff max", self.backoff_max_s),
            ("ledger flush interval", self.ledger_flush_interval_s),
            ("observe interval", self.observe_interval_s),
            ("lookup interval", self.lookup_interval_s),
        ):
            if not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a number, 0 or more, got {value}")
        if self.max_cost_usd is not None and not self.max_cost_usd >= 0:
            raise ConfigError(f"the cost limit must be 0 or more, got {self.max_cost_usd}")
        for model, usd in self.prices.items():
            if not usd >= 0:
                raise ConfigError(f"the price of {model} must be 0 or more, got {usd}")
        problem = base_url_problem(self.base_url)
        if problem is not None:
            raise ConfigError(f"{ENV_BASE_URL} {problem}{self._shown_base_url()}")
        if self.api_key is not None:
            key = self.api_key.reveal()
            if any(c.isspace() or not c.isprintable() for c in key):
                raise ConfigError(
                    f"{ENV_KEY} holds a space, line break or control character, which no key"
                    " has (was it pasted from two lines?)"
                )

    def _shown_base_url(self) -> str:
        """The refused base URL for its error line, unless it may hold a secret: a password,
        a query (``?api_key=``), or the key itself (the two variables swapped)."""
        url = self.base_url
        if self.api_key is not None and self.api_key.scrub(url, fragments=True) != url:
            return " (it holds the API key: are AIMLAPI_KEY and AIMLAPI_BASE_URL swapped?)"
        if _PLAIN_URL.fullmatch(url):
            return f": {url!r}"
        return ""  # with a user name, a query or a fragment it is not echoed

    def with_overrides(self, **overrides: Any) -> RunSettings:
        """Apply the values that are not None."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# scheme://host[:port][/path], with no user name, query or fragment: safe to echo in an error
_PLAIN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@]*(?:/[^?#@]*)?", re.IGNORECASE)


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the API's base, found before anything is sent: a typo such as
    a port of 187500 would otherwise fail every POST in a way that cannot tell whether it
    left, leaving each job uncertain."""
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError) as exc:  # the reason may quote a password: said if plain
        return f"is not a valid URL ({exc})" if _PLAIN_URL.fullmatch(url) else "is not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "must start with https:// (or http:// for a local mock)"
    if not parsed.raw_host or port is None or not 0 < port < 65536:
        return "needs a host name and a port from 1 to 65535"
    if parsed.raw_user is not None or parsed.raw_password is not None:
        return "must not hold a user name or password (the key goes in AIMLAPI_KEY)"
    if parsed.raw_query_string or parsed.raw_fragment:
        return "must not hold a query string or fragment"
    return None


def sends_key_in_clear(url: str) -> bool:
    """Plain http to another machine: the key would cross the network readable by anyone on
    the way. (Allowed, with a warning: a test double of the API may live on another host.)"""
    parsed = URL(url)
    if parsed.scheme != "http":
        return False
    host = (parsed.raw_host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def normalize_base_url(url: str) -> str:
    """The API's own examples use ``https://api.aimlapi.com/v2`` as base: accept that too."""
    url = url.strip().rstrip("/")
    return url.removesuffix("/v2")


def resolve_settings(
    out_dir: Path,
    manifest: ManifestSettings | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> RunSettings:
    """Merge the sources in precedence order: CLI > manifest > environment > defaults."""
    env = os.environ if env is None else env
    settings = RunSettings(out_dir=out_dir)
    key = env.get(ENV_KEY, "").strip()
    settings = settings.with_overrides(
        api_key=Secret(key) if key else None,
        base_url=normalize_base_url(env.get(ENV_BASE_URL, "")) or None,
    )
    if manifest is not None:
        settings = settings.with_overrides(
            concurrency=manifest.concurrency,
            job_timeout_s=manifest.job_timeout_s,
            abandon_after_s=manifest.abandon_after_s,
            download_concurrency=manifest.download_concurrency,
            resubmit_uncertain=manifest.resubmit_uncertain,
            retry_failed=manifest.retry_failed,
            max_cost_usd=manifest.max_cost_usd,
            prices=dict(manifest.prices) or None,
        )
    if cli:
        settings = settings.with_overrides(**cli)
    return settings
