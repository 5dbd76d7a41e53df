"""The pure rules of one video transfer, for the downloader's shell to ask.

What a host's answer promises about its body (which bytes, how many, encoded or not), whether
the bytes make a whole video (the MP4's own top-level boxes: a length kept only says the host
sent what it meant to, and a cached or half-uploaded object is sent whole and short), what a
kept ``.part`` remembers about the answer that started it, and how slow is too slow. A resumed
body that does not continue the ``.part``, or a body cut short, must never be renamed into
place as a video.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from .verify import MAX_MOOV_BYTES, box_header, boxes

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)


@dataclass(frozen=True)
class ContentRange:
    """``bytes START-END/TOTAL`` of a 206; ``total`` is None when the host says ``*``."""

    start: int
    end: int
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """The header's range, or None when it is missing, malformed or impossible."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if m is None:
        return None
    start, end = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if end < start or (total is not None and end >= total):
        return None
    return ContentRange(start, end, total)


@dataclass(frozen=True)
class PartInfo:
    """The sidecar of a kept ``.part``: how the answer that started it named the file."""

    validator: str | None = None  # a strong ETag or a Last-Modified date, sent as If-Range
    total: int | None = None  # the whole file's size, when that answer said it

    def to_json(self) -> bytes:
        return json.dumps({"validator": self.validator, "total": self.total}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PartInfo | None:
        """None for anything garbled: its ``.part`` is then not resumed, only started again."""
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        validator, total = doc.get("validator"), doc.get("total")
        return cls(
            validator if isinstance(validator, str) and validator else None,
            total if isinstance(total, int) and not isinstance(total, bool) else None,
        )


def validator_of(headers: Mapping[str, str]) -> str | None:
    """What If-Range may carry: a strong ETag (a weak one is not allowed), else Last-Modified."""
    etag = headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified", "").strip() or None


@dataclass(frozen=True)
class Body:
    """How to take an answer's body, decided from its status and headers alone."""

    offset: int  # bytes of the .part this body continues; 0 starts the file over
    total: int | None  # the size the file must reach, when the answer says it
    encoded: bool  # decoded on the way in: no length to compare, nothing to resume with Range

    @property
    def resumable_when_cut(self) -> bool:
        """Whether a ``.part`` whose MP4 does not add up may be resumed with Range: only when
        no length said where the body ends (the connection may have closed early). One that
        reached its stated length is all the host has: a Range from its end can only be
        refused, and the next attempt must start over."""
        return self.total is None and not self.encoded


def plan_body(
    status: int, headers: Mapping[str, str], have: int, part: PartInfo | None = None
) -> Body | None:
    """The plan for a 200 or 206 that answered a request for the bytes from ``have`` on.

    None when a 206 does not prove that it continues the ``.part``: no or a malformed
    Content-Range, another start, not up to the end, a length that disagrees, a total or a
    validator (ETag, Last-Modified) other than the ``.part`` started with, or an encoding (its
    ranges count encoded bytes).
    """
    encoding = headers.get("Content-Encoding", "").strip().lower()
    encoded = encoding not in ("", "identity")
    length = _length(headers.get("Content-Length"))
    if status != 206:
        return Body(0, None if encoded else length, encoded=encoded)
    got = parse_content_range(headers.get("Content-Range"))
    if encoded or got is None or got.total is None or got.start != have:
        return None
    if got.end != got.total - 1 or (length is not None and length != got.end - got.start + 1):
        return None
    if part is not None and part.total is not None and part.total != got.total:
        return None
    # A host that ignored If-Range says which file it sent: not the .part's, no splice.
    if part is not None and part.validator is not None:
        now = validator_of(headers)
        if now is not None and now != part.validator:
            return None
    return Body(have, got.total, encoded=False)


def _length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def mp4_boxes_complete(f: BinaryIO, size: int) -> bool:
    """Do the top-level boxes of the ``size`` bytes in ``f`` add up to exactly ``size``, with a
    ``moov`` and media data among them, and the ``moov``'s chunks inside the file?

    Asked of every body, whatever its length said: a file cut short ends inside its last box,
    or, cut exactly between boxes, lacks the ``moov`` that a player needs (it often comes last,
    after the media data) or, with the ``moov`` first (faststart), the media data it indexes.
    Only the box headers and the ``moov`` are read, never the media data: a large file costs a
    few seeks. The boxes are read as :func:`verify.box_header` reads them.
    """
    pos, moov, mdat = 0, None, False
    try:
        while pos < size:
            if size - pos < 8:
                return False
            f.seek(pos)
            kind, header, box = box_header(f.read(16), 0, size - pos)
            if kind == b"moov" and moov is None:
                moov = (pos + header, box - header)  # its payload
            mdat = mdat or kind == b"mdat"
            pos += box
        if moov is None or not mdat or pos != size or moov[1] > MAX_MOOV_BYTES:
            return False
        f.seek(moov[0])
        payload = f.read(moov[1])
        # A file cut exactly between two media data boxes still adds up, but its index
        # (the chunk offsets of stco/co64) points past the end.
        return max(_chunk_offsets(payload, 0, len(payload), _TABLE_PATH), default=-1) < size
    except (ValueError, struct.error):  # a box under its header or over the file's end
        return False


_TABLE_PATH = (b"trak", b"mdia", b"minf", b"stbl")  # from a moov to its chunk tables


def _chunk_offsets(data: bytes, start: int, end: int, path: tuple[bytes, ...]) -> Iterator[int]:
    """Every chunk offset of the stco/co64 tables below ``path``."""
    for kind, s, e in boxes(data, start, end):
        if path and kind == path[0]:
            yield from _chunk_offsets(data, s, e, path[1:])
        elif not path and kind in (b"stco", b"co64"):
            wide = kind == b"co64"
            (count,) = struct.unpack_from(">I", data, s + 4)
            if s + 8 + count * (8 if wide else 4) > e:
                raise ValueError(f"{kind.decode()} lists more chunks than it holds")
            yield from struct.unpack_from(f">{count}{'Q' if wide else 'I'}", data, s + 8)


class MinimumRate:
    """A body must bring ``min_bytes`` per ``window_s``: a trickle would hold a worker forever.

    Checked as chunks arrive; a host that sends nothing at all is the read timeout's to stop.
    """

    def __init__(self, window_s: float, min_bytes: int, now: float) -> None:
        self.window_s = window_s
        self.min_bytes = min_bytes
        self._start = now
        self._count = 0

    def feed(self, n: int, now: float) -> int | None:
        """Count ``n`` more bytes; the window's count if a window ended short, else None."""
        self._count += n
        if now - self._start < self.window_s:
            return None
        if self._count < self.min_bytes:
            return self._count
        self._start, self._count = now, 0
        return None
