"""Local image files: judged by their bytes, encoded once, identified by content."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from veobatch import images
from veobatch.images import ImageStore, inspect_image, is_local_reference


def picture(fmt: str, size: tuple[int, int] = (1280, 720)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_accepted_formats_become_data_uris(fmt: str, mime: str) -> None:
    data = picture(fmt)
    check = inspect_image(data, "'a'")
    assert check.error is None and check.warning is None
    assert check.image is not None
    assert (check.image.width, check.image.height, check.image.mime) == (1280, 720, mime)
    head, payload = check.image.data_uri.split(",", 1)
    assert head == f"data:{mime};base64"
    assert base64.b64decode(payload) == data


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"hello, this is a caption\n", "text, not an image"),
        (b"%PDF-1.7\n%\xe2\xe3", "a PDF document"),
        (b"\x00\x00\x00\x18ftypmp42" + bytes(40), "an MP4/MOV video"),
        (b"PK\x03\x04" + bytes(40), "a ZIP archive"),
    ],
)
def test_files_that_are_not_images_are_named_by_what_they_are(data: bytes, words: str) -> None:
    check = inspect_image(data, "'x.png'")
    assert check.image is None and check.error is not None
    assert "'x.png' is not an image" in check.error and words in check.error


def test_an_image_format_the_api_does_not_take_is_refused() -> None:
    check = inspect_image(picture("GIF"), "'x.gif'")
    assert check.error == "'x.gif' is a GIF image; the API takes JPEG, PNG, WEBP"


def test_a_truncated_png_is_reported_damaged() -> None:
    data = picture("PNG")
    check = inspect_image(data[: len(data) // 2], "'cut.png'")
    assert check.error is not None and "damaged or truncated" in check.error


def test_small_images_are_a_warning_not_an_error() -> None:
    check = inspect_image(picture("PNG", (640, 360)), "'small.png'")
    assert check.image is not None and check.error is None
    assert check.warning is not None and "640x360, smaller than 720p" in check.warning


def test_empty_and_oversized_files_are_refused_with_the_limit() -> None:
    assert inspect_image(b"", "'e.png'").error == "the image file 'e.png' is empty"
    problem = images.size_problem(images.MAX_FILE_BYTES + 1, "'big.png'")
    assert problem is not None and "above the 15 MB limit" in problem


def test_a_large_file_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(images.MAX_FILE_BYTES + 10)  # sparse: no real disk space needed
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a huge file"))
    check = ImageStore(tmp_path).check("big.png")
    assert check.error is not None and "15.0 MB, above the 15 MB limit" in check.error


def test_the_store_reads_each_file_once_and_resolves_from_its_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(picture("PNG"))
    reads: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    store = ImageStore(tmp_path)
    first = store.check("img/a.png")
    for _ in range(50):
        assert store.check("img/a.png") is first
    assert len(reads) == 1 and len(store) == 1
    assert first.image is not None and first.image.path == tmp_path / "img" / "a.png"
    assert first.image.identity.startswith("sha256:")


def test_missing_files_and_folders_say_where_they_were_looked_for(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    missing = store.check("nope.png").error
    assert missing is not None and "no such file" in missing and str(tmp_path) in missing
    (tmp_path / "dir.png").mkdir()
    folder = store.check("dir.png").error
    assert folder is not None and "a folder, not a file" in folder


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("img/a.png", True),
        ("/abs/a.png", True),
        ("https://x/a.png", False),
        ("data:image/png;base64,AA==", False),
        ("DATA:image/png;base64,AA==", False),
    ],
)
def test_what_counts_as_a_local_reference(value: str, local: bool) -> None:
    assert is_local_reference(value) is local


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid 1-bit PNG of any size, without the memory its pixels would take
    (verify() checks chunks and checksums, never the pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(bytes(16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("size", "error"),
    [
        ((10_000, 9_500), None),  # above Pillow's own warning limit, below MAX_PIXELS
        ((11_000, 10_000), "'big.png' is 11000x10000, too many pixels for an input image"),
        ((20_000, 10_000), "'big.png' has 200,000,000 pixels, too many pixels for an input image"),
    ],
)
def test_pixel_counts_are_judged_by_our_limit_not_pillows(
    size: tuple[int, int], error: str | None
) -> None:
    assert size[0] * size[1] > Image.MAX_IMAGE_PIXELS  # Pillow would call it a bomb
    check = inspect_image(png_header_only(*size), "'big.png'")
    assert check.error == error
    if error is None:
        assert check.image is not None and (check.image.width, check.image.height) == size


def noisy(fmt: str) -> bytes:
    """A picture whose compressed data is long enough to cut anywhere."""
    buf = io.BytesIO()
    Image.effect_noise((1280, 720), 60).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, -2])  # half the data; all but the JPEG end marker
def test_a_truncated_jpeg_or_webp_is_reported_damaged(fmt: str, keep: float) -> None:
    data = noisy(fmt)
    cut = data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)]
    check = inspect_image(cut, "'cut.img'")
    assert check.image is None
    assert check.error is not None
    assert check.error.startswith("'cut.img' is a damaged or truncated image (")
    whole = inspect_image(data, "'whole.img'")
    assert whole.error is None and whole.image is not None
