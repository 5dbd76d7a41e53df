"""Real, playable MP4 test cards for the simulated CDN, made with PyAV.

Each file is H.264 (``yuv420p``) with colour bars over a bar that moves one step per frame, plus an
AAC sine tone when the request wants audio. The picture is built straight into the YUV planes, so
no imaging library (or numpy) is needed. Files are cached per variant in a directory the caller
owns, encoded in a worker thread, and concurrent first requests for one variant share one encoding.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import av

from .config import SimConfig
from .validation import VideoRequest

_SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
_TINY = (160, 90)
_TINY_FPS = 8
_TINY_DURATION_S = 1
_SAMPLE_RATE = 48_000
_TONE_HZ = 440.0
# 75 % colour bars as (Y, U, V): white, yellow, cyan, green, magenta, red, blue, black.
_BARS = (
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
)


@dataclass(frozen=True)
class VideoSpec:
    """One variant of the test card: everything that changes the encoded file."""

    width: int
    height: int
    duration_s: int
    fps: int
    audio: bool

    @property
    def file_name(self) -> str:
        sound = "a" if self.audio else "s"
        return f"{self.width}x{self.height}_{self.duration_s}s_{self.fps}fps_{sound}.mp4"


def spec_for(request: VideoRequest, config: SimConfig) -> VideoSpec:
    """The file a request gets: its resolution and orientation, or the tiny stand-in."""
    if config.video_mode == "tiny":
        width, height = _TINY
        duration_s, fps = _TINY_DURATION_S, _TINY_FPS
    else:
        width, height = _SIZES.get(request.resolution, _SIZES["1080p"])
        duration_s, fps = request.duration_s, config.video_fps
    if request.aspect_ratio == "9:16":
        width, height = height, width
    return VideoSpec(width, height, duration_s, fps, request.generate_audio)


def _bar_row(width: int, line_size: int, channel: int, divisor: int) -> bytes:
    """One row of one plane through the colour bars, padded to the plane's line size."""
    cells = -(-width // divisor)
    row = bytearray()
    for index, colour in enumerate(_BARS):
        end = cells * (index + 1) // len(_BARS)
        row.extend(bytes([colour[channel]]) * (end - len(row)))
    return bytes(row) + bytes(line_size - cells)


def _luma_plane(spec: VideoSpec, line_size: int, frame_index: int) -> bytes:
    """Bars on the top two thirds; below, a white bar moving along black."""
    top_h = spec.height * 2 // 3
    bar_w = max(2, spec.width // 16)
    x = (frame_index * max(1, spec.width // (spec.fps * 2))) % (spec.width - bar_w + 1)
    moving = bytes([16]) * x + bytes([235]) * bar_w + bytes([16]) * (spec.width - x - bar_w)
    moving += bytes(line_size - spec.width)
    return _bar_row(spec.width, line_size, 0, 1) * top_h + moving * (spec.height - top_h)


def _chroma_plane(spec: VideoSpec, line_size: int, channel: int) -> bytes:
    rows = (spec.height + 1) // 2
    top_h = rows * 2 // 3
    neutral = bytes([128]) * line_size
    return _bar_row(spec.width, line_size, channel, 2) * top_h + neutral * (rows - top_h)


def _video_frames(spec: VideoSpec) -> Any:
    """Yield the frames of the picture, newly allocated each time (the encoder may keep them)."""
    probe = av.VideoFrame(spec.width, spec.height, "yuv420p")
    u_plane = _chroma_plane(spec, probe.planes[1].line_size, 1)
    v_plane = _chroma_plane(spec, probe.planes[2].line_size, 2)
    for index in range(spec.duration_s * spec.fps):
        frame = av.VideoFrame(spec.width, spec.height, "yuv420p")
        frame.planes[0].update(_luma_plane(spec, frame.planes[0].line_size, index))
        frame.planes[1].update(u_plane)
        frame.planes[2].update(v_plane)
        frame.pts = index
        yield frame


def _audio_frames(duration_s: int, frame_size: int) -> Any:
    """Yield mono float frames of a quiet sine tone, exactly ``duration_s`` long."""
    total = duration_s * _SAMPLE_RATE
    step = 2 * math.pi * _TONE_HZ / _SAMPLE_RATE
    for start in range(0, total, frame_size):
        count = min(frame_size, total - start)
        samples = array("f", (0.2 * math.sin(step * n) for n in range(start, start + count)))
        frame = av.AudioFrame(format="fltp", layout="mono", samples=count)
        frame.planes[0].update(samples.tobytes().ljust(frame.planes[0].buffer_size, b"\0"))
        frame.sample_rate = _SAMPLE_RATE
        frame.pts = start
        yield frame


def encode_test_card(spec: VideoSpec, path: Path) -> None:
    """Write the test card for ``spec`` to ``path`` (blocking: run it in a worker thread)."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        video = container.add_stream("libx264", rate=spec.fps)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        video.options = {"preset": "ultrafast"}
        audio = (
            container.add_stream("aac", rate=_SAMPLE_RATE, layout="mono") if spec.audio else None
        )
        for frame in _video_frames(spec):
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            for chunk in _audio_frames(spec.duration_s, audio.codec_context.frame_size or 1024):
                container.mux(audio.encode(chunk))
            container.mux(audio.encode(None))


def _encode_file(spec: VideoSpec, path: Path) -> None:
    """Encode beside ``path``, then rename: a reader never sees a half-written file."""
    partial = path.with_suffix(".part")
    encode_test_card(spec, partial)
    partial.replace(path)


class VideoCache:
    """One encoded file per :class:`VideoSpec` in ``folder``; encodings run in worker threads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._locks: dict[VideoSpec, anyio.Lock] = {}
        self._done: dict[VideoSpec, Path] = {}

    @property
    def encodings(self) -> int:
        """How many files were actually encoded."""
        return len(self._done)

    async def path_for(self, spec: VideoSpec) -> Path:
        lock = self._locks.setdefault(spec, anyio.Lock())
        async with lock:  # a second request for the same variant waits for the first encoding
            if spec not in self._done:
                path = self.folder / spec.file_name
                await anyio.to_thread.run_sync(_encode_file, spec, path)
                self._done[spec] = path
        return self._done[spec]
