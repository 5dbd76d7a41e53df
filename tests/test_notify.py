"""Webhook notifications against a real local server: delivered, or logged and never raised."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web
from local_server import serve

from veobatch.errors import ConfigError
from veobatch.notify import check_url, payload, safe_target, send, url_problem

SECRET_PATH = "/services/T000/B000/secret-token-123"


@dataclass
class Hook:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    """A Slack-like incoming webhook: 200 "ok" on its path, 500 on /broken, slow on /slow,
    and a redirect on /moved that must not be followed."""
    holder: list[Hook] = []

    async def receive(request: web.Request) -> web.Response:
        holder[0].bodies.append(await request.json())
        holder[0].headers.append(dict(request.headers))
        return web.Response(text="ok")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="no")

    async def slow(request: web.Request) -> web.Response:
        await anyio.sleep(1.5)
        return web.Response(text="late")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(SECRET_PATH)

    app = web.Application()
    app.router.add_post(SECRET_PATH, receive)
    app.router.add_post("/broken", broken)
    app.router.add_post("/slow", slow)
    app.router.add_post("/moved", moved)
    async with serve(app) as base:
        holder.append(Hook(base))
        yield holder[0]


async def test_delivers_a_slack_compatible_body(hook: Hook) -> None:
    body = payload({"exit_code": 1, "counts": {"done": 2}}, ["veobatch: 3 jobs", "failed: 1"])
    assert await send(hook.url + SECRET_PATH, body)
    assert hook.bodies == [
        {"text": "veobatch: 3 jobs\nfailed: 1", "exit_code": 1, "counts": {"done": 2}}
    ]
    assert "Authorization" not in hook.headers[0]


@pytest.mark.parametrize("path", ["/broken", "/moved", "/nothing-here"])
async def test_refusals_are_logged_not_raised(
    hook: Hook, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "veobatch")
    assert not await send(hook.url + path, {"text": "x"})
    assert hook.bodies == []  # the redirect was not followed
    assert "notification failed" in caplog.text


async def test_timeouts_and_dead_hosts_are_logged_not_raised(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(3):
        assert not await send(hook.url + "/slow", {"text": "x"}, timeout_s=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: refused
        assert not await send(f"http://127.0.0.1:{dead}{SECRET_PATH}", {"text": "x"})
    assert caplog.text.count("notification failed") == 2
    assert "secret-token" not in caplog.text  # webhook paths are credentials


def test_urls_are_checked_and_logged_without_their_path() -> None:
    assert check_url("https://hooks.slack.com/services/x") == "https://hooks.slack.com/services/x"
    with pytest.raises(ConfigError):
        check_url("ftp://example.com/x")
    with pytest.raises(ConfigError):
        check_url("hooks.slack.com/services/x")
    assert safe_target("https://hooks.slack.com" + SECRET_PATH) == "https://hooks.slack.com"
    assert json.dumps(payload({}, [])) == '{"text": ""}'


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.slack.com/services/T0/B0/x", None),
        ("HTTPS://hooks.example.com/h", None),  # schemes are case-insensitive (RFC 3986)
        ("http://[::1]:8080/h", None),
        ("ftp://[::1", "malformed"),  # urlsplit raises: must not become an internal error
        ("http://[::1", "malformed"),
        ("https://x.com:99999/h", "malformed"),
        ("https://", "with a host"),
        ("https://x.com/a b", "no spaces"),
        ("ftp://example.com/x", "got ftp://example.com"),
        ("hooks.slack.com/services/x", "got (not a URL)"),
    ],
)
def test_url_problems_never_raise_and_never_echo_the_path(url: str, problem: str | None) -> None:
    found = url_problem(url)
    assert (found is None) == (problem is None)
    if problem is not None:
        assert found is not None and problem in found and "/services" not in found
        with pytest.raises(ConfigError):
            check_url(url)
    assert "services" not in safe_target(url)
