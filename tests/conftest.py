"""Shared test setup. Coroutine tests run on asyncio (pytest-asyncio, auto mode)."""

from __future__ import annotations

import os
import signal
import types
from pathlib import Path
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse

# Started under nohup or in a shell's background (`.ci/run &`), pytest inherits SIGHUP or
# SIGINT ignored, and veobatch keeps a signal ignored at start ignored, by design: the signal
# tests would then test that instead. Before veobatch is imported, and for the CLI processes
# the tests start, they get their defaults back; the tests of "ignored at start" set it up.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)


class _CompatResponse(ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument
    (pnuckowski/aioresponses#289). A finished request's writer only reports its output size."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


# Only the mock library sees the subclass; real sessions keep aiohttp's own class.
aioresponses.core.ClientResponse = _CompatResponse  # type: ignore[misc]


def beside_or_skip(path: Path, what: str) -> None:
    """Skip a check against ``../shared`` when a clone has nothing beside it (a newcomer's);
    CI sets VEOBATCH_REQUIRE_SHARED, so there a missing folder fails instead of going green."""
    if path.exists():
        return
    message = f"{what} ({path}) is not beside the repository"
    if os.environ.get("VEOBATCH_REQUIRE_SHARED"):
        pytest.fail(message)
    pytest.skip(message)
