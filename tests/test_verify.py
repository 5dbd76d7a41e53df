"""Video verification: the expected video of a request, the probe of a real file, the flags."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import pytest

from veobatch.jobview import (
    Expected,
    compact_request,
    expected_video,
    list_price_usd,
    parse_duration_s,
)
from veobatch.simulator.video import VideoSpec, encode_test_card
from veobatch.verify import (
    Probe,
    _probe_with_av,
    compare,
    probe_mp4,
    probe_video,
    thumbnail_jpeg,
    verify_file,
)

T2V = "google/veo-3.1-t2v"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(8, 8.0), (4.0, 4.0), ("6", 6.0), ("8s", 8.0), (" 4 s ", 4.0), (True, None), ("x", None)],
)
def test_duration_spellings(value: object, seconds: float | None) -> None:
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize(
    ("model", "request_fields", "expected"),
    [
        # The catalogue's defaults; no aspect ratio is documented as the default, so a video
        # of either orientation is as requested.
        (T2V, {}, Expected(8.0, 1920, 1080, True, any_orientation=True)),
        (T2V, {"duration": 4, "resolution": "720p"}, Expected(4.0, 1280, 720, True, True)),
        (T2V, {"aspect_ratio": "9:16", "resolution": "720p"}, Expected(8.0, 720, 1280, True)),
        (T2V, {"aspect_ratio": "16:9"}, Expected(8.0, 1920, 1080, True)),
        (T2V, {"duration": "6s", "generate_audio": False}, Expected(6.0, 1920, 1080, False, True)),
        ("google/veo-3.1-reference-to-video", {}, Expected(8.0, 1920, 1080, True, True)),
        (T2V, {"resolution": "4k"}, Expected(8.0, None, None, True, True)),
    ],
)
def test_expected_video(model: str, request_fields: dict[str, object], expected: Expected) -> None:
    assert expected_video(model, request_fields) == expected


FULL_HD = Expected(8.0, 1920, 1080, True)


@pytest.mark.parametrize(
    ("probe", "flags"),
    [
        (Probe(8.0, 1920, 1080, True, "h264"), []),
        (Probe(8.4, 1920, 1080, True), []),  # within the tolerance
        (Probe(4.0, 1920, 1080, True), ["duration: 4.0 s, requested 8 s"]),
        (Probe(8.0, 1280, 720, True), ["resolution: 1280×720, requested 1920×1080"]),
        (Probe(8.0, 1920, 1080, False), ["audio: no audio track"]),
        (Probe(None, 1920, 1080, True), ["duration: unknown"]),
        (Probe(error="Invalid data"), ["unreadable: Invalid data"]),
    ],
)
def test_compare(probe: Probe, flags: list[str]) -> None:
    assert compare(FULL_HD, probe) == flags


def test_with_no_aspect_ratio_asked_either_orientation_is_as_requested() -> None:
    # An image-to-video job with a portrait first frame and no aspect_ratio: a portrait video.
    free = expected_video("google/veo-3.1-i2v", {"resolution": "720p", "duration": 8})
    assert compare(free, Probe(8.0, 720, 1280, True)) == []
    assert compare(free, Probe(8.0, 1280, 720, True)) == []
    assert compare(free, Probe(8.0, 1920, 1080, True)) == [
        "resolution: 1920×1080, requested 1280×720"
    ]
    landscape = expected_video("google/veo-3.1-i2v", {"resolution": "720p", "aspect_ratio": "16:9"})
    assert compare(landscape, Probe(8.0, 720, 1280, True)) == [
        "resolution: 720×1280, requested 1280×720"
    ]


def test_audio_present_but_not_requested_is_flagged() -> None:
    silent = Expected(4.0, 1280, 720, False)
    assert compare(silent, Probe(4.0, 1280, 720, True)) == ["audio: audio not requested"]


def test_probe_round_trips_through_json() -> None:
    p = Probe(4.0, 720, 1280, False, "h264")
    assert Probe.from_json(p.to_json()) == p
    assert Probe.from_json({"error": "x", "future_field": 1}) == Probe(error="x")
    assert Probe.from_json(None) is None
    assert p.describe() == "4.0 s · 720×1280 · no audio · h264"


def test_compact_request_summarises_inline_images() -> None:
    big = "data:image/png;base64," + "A" * 5000
    req = {"model": T2V, "prompt": "p", "image_url": big, "image_urls": [big, "https://x/y.png"]}
    out = compact_request(req)
    assert "model" not in out and out["prompt"] == "p"
    assert out["image_url"] == "data:image/png;base64,… (4 KiB)"
    assert out["image_urls"][1] == "https://x/y.png"


def test_list_price() -> None:
    assert list_price_usd("google/veo-3.1-t2v-fast", {"duration": 4}) == pytest.approx(0.6)
    assert list_price_usd(T2V, {}) == pytest.approx(3.2)
    assert list_price_usd("nope", {}) == 0.0


@pytest.fixture(scope="module")
def portrait_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    encode_test_card(VideoSpec(180, 320, 2, 8, audio=True), path)
    return path


def test_probe_of_a_real_file(portrait_clip: Path) -> None:
    p = probe_video(portrait_clip)
    assert (p.width, p.height, p.audio, p.codec, p.error) == (180, 320, True, "h264", None)
    assert p.duration_s is not None and abs(p.duration_s - 2.0) < 0.1


def test_verify_file_flags_what_differs(portrait_clip: Path) -> None:
    ok = {"duration": "2s", "aspect_ratio": "9:16", "resolution": "720p"}
    checked = verify_file(portrait_clip, T2V, ok)
    assert checked.flags == ["resolution: 180×320, requested 720×1280"]
    assert checked.record_fields()["video"]["width"] == 180


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 500)
    assert probe_video(bad).error is not None
    assert str(tmp_path) not in (probe_video(bad).error or "")  # no paths in the ledger
    assert probe_video(tmp_path / "gone.mp4").error is not None
    assert thumbnail_jpeg(bad) is None


def test_thumbnail_is_a_jpeg(portrait_clip: Path) -> None:
    data = thumbnail_jpeg(portrait_clip, width=90)
    assert data is not None and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def test_the_cheap_thumbnail_is_the_picture_a_plain_decode_gives(tmp_path: Path) -> None:
    # The thumbnail skips the frames the stream probe used to decode on opening, and decoder
    # threads: the same key frame, scaled and encoded the same, byte for byte.
    from veobatch.verify import _encode_jpeg

    clip = tmp_path / "clip.mp4"
    encode_test_card(VideoSpec(640, 360, 3, 24, audio=True), clip)  # 72 frames, probed 7
    with av.open(str(clip)) as container:
        video = container.streams.video[0]
        video.codec_context.skip_frame = "NONKEY"
        assert container.duration is not None
        container.seek(container.duration // 3)
        frame = next(container.decode(video))
        plain = _encode_jpeg(frame, 240)
    assert thumbnail_jpeg(clip) == plain
    assert (plain[:2], plain[-2:]) == (b"\xff\xd8", b"\xff\xd9")


# -- the box reader ---------------------------------------------------------------------


def _box(kind: bytes, payload: bytes, *, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _synthetic_moov(*, version: int, width: int, height: int, audio: bool) -> bytes:
    """A moov box with version-1 (64-bit) times where asked: the encoders here write v0."""
    if version == 1:
        mvhd = bytes([1, 0, 0, 0]) + bytes(16) + struct.pack(">IQ", 1000, 6500) + bytes(80)
        tkhd_head = bytes([1, 0, 0, 0]) + bytes(32)
    else:
        mvhd = bytes(4) + bytes(8) + struct.pack(">II", 600, 3900) + bytes(80)
        tkhd_head = bytes(4) + bytes(20)
    tkhd = tkhd_head + bytes(16) + bytes(36) + struct.pack(">II", width << 16, height << 16)

    def trak(handler: bytes, entry: bytes) -> bytes:
        stsd = bytes(4) + struct.pack(">I", 1) + entry
        stbl = _box(b"stbl", _box(b"stsd", stsd))
        mdia = _box(b"hdlr", bytes(8) + handler + bytes(12)) + _box(b"minf", stbl)
        return _box(b"trak", _box(b"tkhd", tkhd) + _box(b"mdia", mdia))

    visual = b"hvc1" + bytes(8) + bytes(16) + struct.pack(">HH", width, height) + bytes(50)
    traks = trak(b"vide", _box(b"hvc1", visual[4:]))
    if audio:
        traks += trak(b"soun", _box(b"mp4a", bytes(28)))
    return _box(b"moov", _box(b"mvhd", mvhd) + traks, large=version == 1)


@pytest.mark.parametrize("version", [0, 1])
def test_box_reader_reads_both_box_versions(version: int) -> None:
    data = _box(b"ftyp", b"isom" + bytes(4)) + _synthetic_moov(
        version=version, width=1920, height=1080, audio=version == 0
    )
    data += _box(b"mdat", bytes(100))
    p = probe_mp4(data)
    assert (p.duration_s, p.width, p.height, p.codec) == (6.5, 1920, 1080, "hevc")
    assert p.audio is (version == 0)


@pytest.mark.parametrize(
    "spec",
    [
        VideoSpec(160, 90, 1, 8, audio=True),
        VideoSpec(1280, 720, 4, 2, audio=False),
        VideoSpec(720, 1280, 3, 2, audio=True),
    ],
)
def test_box_reader_agrees_with_ffmpeg(spec: VideoSpec, tmp_path: Path) -> None:
    path = tmp_path / spec.file_name
    encode_test_card(spec, path)
    ours = probe_video(path)
    assert ours == probe_mp4(path.read_bytes()) == _probe_with_av(path)
    assert (ours.width, ours.height, ours.audio) == (spec.width, spec.height, spec.audio)


def late_moov(clip: Path, late: Path) -> Path:
    """``clip`` remuxed without faststart: its moov box after the media data."""
    with av.open(str(clip)) as src, av.open(str(late), "w", format="mp4") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return late


def test_box_reader_finds_a_moov_after_the_media_data(portrait_clip: Path, tmp_path: Path) -> None:
    """Without faststart the moov box comes last: it is found by seeking past the mdat."""
    late = late_moov(portrait_clip, tmp_path / "late.mp4")
    data = late.read_bytes()
    assert data.index(b"mdat") < data.index(b"moov")
    p = probe_video(late)
    assert (p.width, p.height, p.audio, p.error) == (180, 320, False, None)
    assert p.duration_s is not None and abs(p.duration_s - 2.0) < 0.2


def test_what_the_box_reader_cannot_follow_goes_to_ffmpeg(tmp_path: Path) -> None:
    overrun = _box(b"ftyp", b"isom" + bytes(4)) + struct.pack(">I4s", 10_000, b"moov")
    with pytest.raises(ValueError):
        probe_mp4(overrun)
    no_video = _box(b"ftyp", b"isom") + _box(b"moov", _box(b"mvhd", bytes(100)))
    with pytest.raises(ValueError):
        probe_mp4(no_video)
    path = tmp_path / "odd.mp4"
    path.write_bytes(overrun)
    assert probe_video(path).error  # FFmpeg could not read it either: an error, not a raise


def test_a_file_cut_inside_its_late_moov_is_unreadable_not_a_crash(
    portrait_clip: Path, tmp_path: Path
) -> None:
    # A CDN that sent a cut file with a matching Content-Length: FFmpeg found a video stream
    # with no codec context, and AttributeError ended the whole run with a traceback.
    data = late_moov(portrait_clip, tmp_path / "late.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    for end in range(data.index(b"moov") - 4, len(data), 13):
        cut.write_bytes(data[:end])
        probe = probe_video(cut)
        assert probe.error is not None or probe.width == 180
        thumbnail_jpeg(cut)  # a picture or None, never a raise
