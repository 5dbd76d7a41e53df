"""Check a downloaded video, and take its thumbnail.

A file that downloaded intact can still be the wrong video: too short, the wrong resolution,
sound where none was asked for. :func:`probe_mp4` reads those figures from the MP4's ``moov``
box (ISO/IEC 14496-12) with no decoding and no FFmpeg: it runs once per video, and opening
the file with PyAV cost more CPU than everything else the runner does for a job. Files the box
reader cannot make sense of (fragmented or unusual MP4s) go to PyAV, as does the thumbnail.
The pure :func:`compare` turns the figures and the request into flags, and the runner records
both in the ledger's ``done`` record. The file functions block: call them in a worker thread.
"""

from __future__ import annotations

import fractions
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import open_regular
from .jobview import Expected, expected_video

DURATION_TOLERANCE_S = 0.5
THUMB_WIDTH = 240
MAX_MOOV_BYTES = 64 << 20  # a moov box indexes every frame; hours of video stay well under this
# Enough for an MP4's moov box; without these, opening decodes frames to guess what it holds.
_FAST_OPEN = {"analyzeduration": "0", "probesize": "32"}
_CODECS = {
    b"avc1": "h264",
    b"avc3": "h264",
    b"hvc1": "hevc",
    b"hev1": "hevc",
    b"vp09": "vp9",
    b"av01": "av1",
    b"mp4v": "mpeg4",
}
_CONTAINERS = {b"trak", b"mdia", b"minf", b"stbl"}


@dataclass(frozen=True)
class Probe:
    """What the container says about a video; ``error`` is set when it could not be read."""

    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    audio: bool | None = None
    codec: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Probe | None:
        if not isinstance(doc, Mapping):
            return None
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)

    def describe(self) -> str:
        if self.error:
            return f"unreadable: {self.error}"
        parts = []
        if self.duration_s is not None:
            parts.append(f"{self.duration_s:.1f} s")
        if self.width and self.height:
            parts.append(f"{self.width}×{self.height}")
        if self.audio is not None:
            parts.append("audio" if self.audio else "no audio")
        if self.codec:
            parts.append(self.codec)
        return " · ".join(parts)


# -- the box reader (pure) ----------------------------------------------------------------


class _Unreadable(ValueError):
    """The bytes are not an MP4 the box reader understands."""


def box_header(head: bytes, at: int, room: int) -> tuple[bytes, int, int]:
    """(type, header length, box length) of the box at ``head[at:]``, which has ``room``
    bytes before its container ends (size 0: up to that end; size 1: a 64-bit size follows)."""
    size, kind = struct.unpack_from(">I4s", head, at)
    header = 8
    if size == 1:
        if len(head) < at + 16 or room < 16:
            raise _Unreadable(f"box {kind.decode('latin-1')!r} is cut short")
        (size,) = struct.unpack_from(">Q", head, at + 8)
        header = 16
    elif size == 0:
        size = room
    if size < header or size > room:
        raise _Unreadable(f"box {kind.decode('latin-1')!r} overruns its container")
    return kind, header, size


def boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in ``data[start:end]``."""
    pos = start
    while pos + 8 <= end:
        kind, header, size = box_header(data, pos, end - pos)
        yield kind, pos + header, pos + size
        pos += size


def _version(data: bytes, start: int, end: int) -> int:
    """A full box's version byte (0 for an empty box, which then fails its length check)."""
    return data[start] if end > start else 0


@dataclass
class _Track:
    handler: bytes = b""
    codec: bytes = b""
    width: int = 0
    height: int = 0


def _walk_track(data: bytes, start: int, end: int, track: _Track) -> None:
    for kind, s, e in boxes(data, start, end):
        if kind in _CONTAINERS:
            _walk_track(data, s, e, track)
        elif kind == b"hdlr" and e - s >= 12:
            track.handler = data[s + 8 : s + 12]
        elif kind == b"tkhd" and not track.width:
            # 16.16 fixed point after the version's time fields, reserved words and matrix
            at = s + (88 if _version(data, s, e) == 1 else 76)
            if at + 8 <= e:
                w, h = struct.unpack_from(">II", data, at)
                track.width, track.height = w >> 16, h >> 16
        elif kind == b"stsd" and e - s >= 16:
            # The first sample entry: its type names the codec; a visual one carries the
            # coded size, which is what a decoder (and PyAV) reports.
            track.codec = data[s + 12 : s + 16]
            entry = s + 8
            if track.handler == b"vide" and entry + 36 <= e:
                track.width, track.height = struct.unpack_from(">HH", data, entry + 32)


def parse_moov(data: bytes, start: int = 0, end: int | None = None) -> Probe:
    """The figures from a ``moov`` box's payload; raises :class:`ValueError` when they are
    not all there (the caller then asks FFmpeg)."""
    end = len(data) if end is None else end
    duration: float | None = None
    tracks: list[_Track] = []
    for kind, s, e in boxes(data, start, end):
        if kind == b"mvhd" and e - s >= (32 if (v := _version(data, s, e)) == 1 else 20):
            if v == 1:  # 64-bit times, then timescale and duration
                timescale, length = struct.unpack_from(">IQ", data, s + 20)
            else:
                timescale, length = struct.unpack_from(">II", data, s + 12)
            if timescale and length not in (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
                duration = length / timescale
        elif kind == b"trak":
            track = _Track()
            _walk_track(data, s, e, track)
            tracks.append(track)
    video = next((t for t in tracks if t.handler == b"vide"), None)
    if video is None or not video.width or duration is None:
        raise _Unreadable("no video track with a size and a duration in the moov box")
    return Probe(
        duration_s=round(duration, 3),
        width=video.width,
        height=video.height,
        audio=any(t.handler == b"soun" for t in tracks),
        codec=_CODECS.get(video.codec, video.codec.decode("latin-1").strip() or None),
    )


def probe_mp4(data: bytes) -> Probe:
    """The figures of a whole MP4 held in memory."""
    for kind, s, e in boxes(data, 0, len(data)):
        if kind == b"moov":
            return parse_moov(data, s, e)
    raise _Unreadable("no moov box")


# -- files (blocking) ---------------------------------------------------------------------


def _read_moov(path: Path) -> bytes:
    """Walk the top-level boxes with seeks (past the media data) and read the moov box."""
    with os.fdopen(open_regular(path), "rb") as f:  # never a link, a FIFO or a device
        file_size = f.seek(0, 2)
        pos = 0
        while pos + 8 <= file_size:
            f.seek(pos)
            kind, header, size = box_header(f.read(16), 0, file_size - pos)
            if kind == b"moov":
                if size > MAX_MOOV_BYTES:
                    raise _Unreadable("moov box too large")
                f.seek(pos + header)
                return f.read(size - header)
            pos += size
    raise _Unreadable("no moov box")


def probe_video(path: Path, data: bytes | None = None) -> Probe:
    """The figures of a video file (``data``: its bytes, when already in memory); never raises
    for a bad file."""
    try:
        if data is not None:
            return probe_mp4(data)
        return parse_moov(_read_moov(path))
    except _Unreadable:
        pass  # a layout the box reader does not follow: let FFmpeg try
    except OSError as exc:
        return Probe(error=str(exc.strerror or type(exc).__name__)[:200])
    return _probe_with_av(path)


def _probe_with_av(path: Path) -> Probe:
    """For files the box reader cannot follow: FFmpeg's libraries are large, imported here."""
    try:
        probe = _av_read(path, _FAST_OPEN)
        if not probe.width or probe.duration_s is None:
            probe = _av_read(path, None)  # not in the header: let FFmpeg look further
        return probe
    except Exception as exc:  # FFmpeg's wrapper on hostile bytes: "never raises" is the promise
        # (a cut moov gave a stream with no codec context: AttributeError ended the whole run)
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Probe(error=str(reason)[:200])


def _av_read(path: Path, options: dict[str, str] | None) -> Probe:
    import av

    with av.open(str(path), options=options or {}) as container:
        if not container.streams.video:
            return Probe(error="no video stream")
        video = container.streams.video[0]
        codec = video.codec_context
        if codec is None:  # a stream FFmpeg found but could not open (a cut moov, say)
            return Probe(error="the video stream cannot be decoded")
        duration = container.duration / 1e6 if container.duration is not None else None
        if duration is None and video.duration is not None and video.time_base is not None:
            duration = float(video.duration * video.time_base)
        return Probe(
            duration_s=round(duration, 3) if duration is not None else None,
            width=codec.width or None,
            height=codec.height or None,
            audio=bool(container.streams.audio),
            codec=codec.name,
        )


def compare(expected: Expected, probe: Probe) -> list[str]:
    """Flags, each ``"<what>: <detail>"``, for every way the video differs from the request."""
    if probe.error:
        return [f"unreadable: {probe.error}"]
    flags = []
    if probe.duration_s is None:
        flags.append("duration: unknown")
    elif abs(probe.duration_s - expected.duration_s) > DURATION_TOLERANCE_S:
        flags.append(f"duration: {probe.duration_s:.1f} s, requested {expected.duration_s:g} s")
    size = (probe.width, probe.height)
    wanted = {(expected.width, expected.height)}
    if expected.any_orientation:
        wanted.add((expected.height, expected.width))
    if expected.width and expected.height and size not in wanted:
        flags.append(
            f"resolution: {probe.width}×{probe.height}, "
            f"requested {expected.width}×{expected.height}"
        )
    if probe.audio is not None and probe.audio != expected.audio:
        flags.append("audio: " + ("no audio track" if expected.audio else "audio not requested"))
    return flags


@dataclass(frozen=True)
class Verified:
    """A probe and its flags, as the ledger's ``done`` record carries them."""

    probe: Probe
    flags: list[str]

    def record_fields(self) -> dict[str, Any]:
        return {"video": self.probe.to_json(), "flags": self.flags}


def check(probe: Probe, model: str, request: Mapping[str, Any]) -> Verified:
    return Verified(probe, compare(expected_video(model, request), probe))


def verify_file(path: Path, model: str, request: Mapping[str, Any]) -> Verified:
    return check(probe_video(path), model, request)


_ONE_KEY_FRAME = {"skip_frame": "nonkey", "threads": "1"}  # for the streams' probe too


def thumbnail_jpeg(path: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """One key frame from about a third of the way in, scaled and encoded as JPEG."""
    import av

    try:
        # Key frames only, in this thread, from the start: opening probed the streams by
        # decoding up to seven frames of H.264 the picture does not need, and decoder threads
        # cost more than they give for one frame (the report runs several thumbnails at once).
        # The same picture for about 30 % less CPU (2.5 ms instead of 3.5-4 for 1080p).
        with av.open(str(path), options=_ONE_KEY_FRAME) as container:
            video = container.streams.video[0]
            video.codec_context.skip_frame = "NONKEY"
            video.codec_context.thread_count = 1
            if container.duration:
                container.seek(container.duration // 3)
            frame = next(container.decode(video), None)
            if frame is None:
                return None
            return _encode_jpeg(frame, min(width, frame.width))
    except Exception:  # a picture for the report, never a reason for it to fail
        return None


def _encode_jpeg(frame: Any, width: int) -> bytes:
    import av

    height = max(2, round(frame.height * width / frame.width / 2) * 2)
    width -= width % 2
    small = frame.reformat(width=width, height=height, format="yuvj420p")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    codec.time_base = fractions.Fraction(1, 25)
    return b"".join(bytes(p) for p in [*codec.encode(small), *codec.encode(None)])
