"""Tell someone a run has ended: POST its JSON summary to a webhook.

The body is Slack-compatible (incoming webhooks read ``text``; the structured fields ride along
for anything else). A notification is a courtesy: it has a short timeout, follows no
redirects, never carries the API key, and never raises; a failure is logged and the run's exit
code stays what the run earned. The webhook URL itself may be a secret (Slack's are), so logs
name only its host. Pure: :func:`payload`, :func:`url_problem`, :func:`check_url`,
:func:`safe_target`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .errors import ConfigError

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot take a notification, or None; never raises, never echoes the path.

    The manifest's check and the command line's are this one, so `plan` passes exactly what
    `run` accepts."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError:
        return "expected an http(s) URL, got a malformed one (look at its [host] and :port)"
    if parts.scheme.lower() not in ("http", "https"):
        return f"expected an http(s) URL, got {safe_target(url)}"
    if not parts.hostname or any(c.isspace() for c in url):
        return f"expected an http(s) URL with a host and no spaces, got {safe_target(url)}"
    return None


def check_url(url: str) -> str:
    if (problem := url_problem(url)) is not None:
        raise ConfigError(f"notify URL: {problem}")
    return url


def safe_target(url: str) -> str:
    """Scheme and host only: webhook paths and queries are often credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "(not a URL)"
    return f"{parts.scheme}://{host or '?'}" if parts.scheme else "(not a URL)"


def payload(doc: Mapping[str, Any], text_lines: Sequence[str]) -> dict[str, Any]:
    return {"text": "\n".join(text_lines), **doc}


async def send(url: str, body: Mapping[str, Any], *, timeout_s: float = TIMEOUT_S) -> bool:
    """POST ``body`` as JSON; True when the webhook answered 2xx. Never raises."""
    target = safe_target(url)
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json=dict(body), allow_redirects=False) as resp,
        ):
            if 200 <= resp.status < 300:
                log.info("notified url=%s status=%d", target, resp.status)
                return True
            log.error("notification failed url=%s status=%d", target, resp.status)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        log.error("notification failed url=%s: %s", target, type(exc).__name__)
    return False
