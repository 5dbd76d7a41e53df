"""Start `python -m veobatch` as a real process, with a controlled environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """The CLI in the repository root; AIMLAPI_* come only from ``env``, never from the caller."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIMLAPI_")}
    return subprocess.Popen(
        [sys.executable, "-m", "veobatch", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
