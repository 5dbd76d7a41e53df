"""Check a downloaded video with PyAV, and take its thumbnail.

A file that downloaded intact can still be the wrong video: too short, the wrong resolution,
sound where none was asked for. :func:`probe_video` reads the container's figures (no decoding),
the pure :func:`compare` turns them and the request into flags, and the runner records both in
the ledger's ``done`` record. :func:`thumbnail_jpeg` decodes one key frame for the report.
The file functions block: call them in a worker thread.
"""

from __future__ import annotations

import fractions
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

from .jobview import Expected, expected_video

DURATION_TOLERANCE_S = 0.5
THUMB_WIDTH = 240
# Enough for an MP4's moov box; without these, opening decodes frames to guess what it holds.
_FAST_OPEN = {"analyzeduration": "0", "probesize": "32"}


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


def probe_video(path: Path) -> Probe:
    """Open the container and read its figures; never raises for a bad file."""
    try:
        probe = _read(path, _FAST_OPEN)
        if not probe.width or probe.duration_s is None:
            probe = _read(path, None)  # not in the header: let FFmpeg look further
        return probe
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Probe(error=str(reason)[:200])


def _read(path: Path, options: dict[str, str] | None) -> Probe:
    with av.open(str(path), options=options or {}) as container:
        if not container.streams.video:
            return Probe(error="no video stream")
        video = container.streams.video[0]
        duration = container.duration / 1e6 if container.duration is not None else None
        if duration is None and video.duration is not None and video.time_base is not None:
            duration = float(video.duration * video.time_base)
        return Probe(
            duration_s=round(duration, 3) if duration is not None else None,
            width=video.codec_context.width or None,
            height=video.codec_context.height or None,
            audio=bool(container.streams.audio),
            codec=video.codec_context.name,
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
    if (
        expected.width
        and expected.height
        and (probe.width, probe.height)
        != (
            expected.width,
            expected.height,
        )
    ):
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


def verify_file(path: Path, model: str, request: Mapping[str, Any]) -> Verified:
    probe = probe_video(path)
    return Verified(probe, compare(expected_video(model, request), probe))


def thumbnail_jpeg(path: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """One key frame from about a third of the way in, scaled and encoded as JPEG."""
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            video.codec_context.skip_frame = "NONKEY"  # decode key frames only: cheap
            if container.duration:
                container.seek(container.duration // 3)
            frame = next(container.decode(video), None)
            if frame is None:
                return None
            return _encode_jpeg(frame, min(width, frame.width))
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration):
        return None


def _encode_jpeg(frame: Any, width: int) -> bytes:
    height = max(2, round(frame.height * width / frame.width / 2) * 2)
    width -= width % 2
    small = frame.reformat(width=width, height=height, format="yuvj420p")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    codec.time_base = fractions.Fraction(1, 25)
    return b"".join(bytes(p) for p in [*codec.encode(small), *codec.encode(None)])
