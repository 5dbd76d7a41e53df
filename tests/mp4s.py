"""Small MP4s for tests that need a video but not its pictures: their top-level boxes add up
and their ``moov`` has the figures the box reader looks for, so the downloader renames them
into place and the probe reads them with no encoder (a real encode is in test_verify)."""

from __future__ import annotations

import struct

FTYP = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def moov(
    *, width: int = 1920, height: int = 1080, seconds: float = 8.0, audio: bool = True
) -> bytes:
    """A version-0 moov: a movie header and a track of each kind, without sample tables."""
    mvhd = bytes(12) + struct.pack(">II", 1000, round(seconds * 1000)) + bytes(80)
    tkhd = bytes(24) + bytes(52) + struct.pack(">II", width << 16, height << 16)

    def trak(handler: bytes, entry: bytes) -> bytes:
        stbl = box(b"stbl", box(b"stsd", bytes(4) + struct.pack(">I", 1) + entry))
        mdia = box(b"hdlr", bytes(8) + handler + bytes(12)) + box(b"minf", stbl)
        return box(b"trak", box(b"tkhd", tkhd) + box(b"mdia", mdia))

    visual = bytes(24) + struct.pack(">HH", width, height) + bytes(50)
    traks = trak(b"vide", box(b"avc1", visual))
    if audio:
        traks += trak(b"soun", box(b"mp4a", bytes(28)))
    return box(b"moov", box(b"mvhd", mvhd) + traks)


def mp4(
    media: bytes,
    *,
    width: int = 1920,
    height: int = 1080,
    seconds: float = 8.0,
    audio: bool = True,
) -> bytes:
    """ftyp, then ``media`` in an mdat box, then the moov (as most encoders write them)."""
    figures = moov(width=width, height=height, seconds=seconds, audio=audio)
    return FTYP + box(b"mdat", media) + figures
