"""Local servers for tests that need a real host to talk to (a CDN, a webhook)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

RawHandler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def webhook_receiver(
    path: str, *, answer_after_s: float = 0.0
) -> AsyncIterator[tuple[str, list[Any]]]:
    """A webhook endpoint at ``path``: yields its URL and the JSON bodies posted to it (each
    recorded on arrival, answered ``answer_after_s`` later)."""
    got: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        got.append(await request.json())
        await asyncio.sleep(answer_after_s)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(path, receive)
    async with serve(app) as base:
        yield f"{base}{path}", got


@contextlib.asynccontextmanager
async def serve_raw(handler: RawHandler) -> AsyncIterator[str]:
    """A host that writes its answers byte by byte, for framings aiohttp's server never sends
    (a body that ends when the connection closes, say). ``handler`` gets the request head and
    writes the answer; the connection is closed after it returns."""

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await handler(head, writer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()
