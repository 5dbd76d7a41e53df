"""A FIFO for tests of code that must never open one: a read stuck on it is freed after a
while, so code that opens it fails its test instead of hanging the suite for ever."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fifo_at(path: Path, free_after_s: float = 5.0) -> Iterator[list[bool]]:
    """Make a FIFO at ``path``; yields a list that gets an item each time a reader stuck on it
    had to be freed (a writer opened and closed, so the read ends). Empty: nobody opened it
    for reading (a non-blocking open for writing fails while nobody reads)."""
    os.mkfifo(path)
    freed: list[bool] = []
    stop = threading.Event()

    def free() -> None:
        if stop.wait(free_after_s):
            return
        while not stop.wait(0.05):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # nobody reading (ENXIO), or moved away
                continue
            os.close(fd)
            freed.append(True)

    helper = threading.Thread(target=free, name="fifo-freer", daemon=True)
    helper.start()
    try:
        yield freed
    finally:
        stop.set()
        helper.join()
