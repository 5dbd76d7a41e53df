"""Local image files: judged by their bytes, encoded once, identified by content."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
from PIL import Image

from veobatch import images
from veobatch.images import (
    ImageChangedError,
    ImageStore,
    Inliner,
    LocalImage,
    encode_for_sending,
    inspect_image,
    is_local_reference,
)
from veobatch.jobview import MAX_INLINE_CHARS, compact_request


def picture(fmt: str, size: tuple[int, int] = (1280, 720)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_accepted_formats_are_sent_as_data_uris(tmp_path: Path, fmt: str, mime: str) -> None:
    data = picture(fmt)
    (tmp_path / "a").write_bytes(data)
    check = ImageStore(tmp_path).check("a")
    assert check.error is None and check.warning is None
    assert check.image is not None
    assert (check.image.width, check.image.height, check.image.mime) == (1280, 720, mime)
    uri = encode_for_sending(check.image)
    head, payload = uri.split(",", 1)
    assert head == check.image.uri_head == f"data:{mime};base64"
    assert base64.b64decode(payload) == data
    assert len(uri) == check.image.uri_chars and check.image.inline is None


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
    real = os.fdopen

    class Unread:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def __enter__(self) -> Unread:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, size: int = -1) -> bytes:
            pytest.fail("read a huge file")

    monkeypatch.setattr(images.os, "fdopen", lambda fd, mode: Unread(real(fd, mode)))
    check = ImageStore(tmp_path).check("big.png")
    assert check.error is not None and "15.0 MB, above the 15 MB limit" in check.error


def test_the_store_reads_each_file_once_and_resolves_from_its_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(picture("PNG"))
    reads: list[Path] = []
    real = images.read_regular_file

    def counting(path: Path, limit: int) -> bytes:
        reads.append(path)
        return real(path, limit)

    monkeypatch.setattr(images, "read_regular_file", counting)
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
    ("make", "kind"),
    [
        (lambda tmp: os.mkfifo(tmp / "pipe.png") or tmp / "pipe.png", "but a FIFO"),
        (lambda tmp: Path("/dev/null"), "but a character device"),
        (lambda tmp: Path("/proc/self/environ"), "its size reads as 0 bytes, yet it holds data"),
    ],
    ids=["fifo", "dev-null", "proc"],
)
def test_special_files_are_not_regular_files_not_missing_or_empty(
    tmp_path: Path, make: Callable[[Path], Path], kind: str
) -> None:
    path = make(tmp_path)
    error = ImageStore(tmp_path).check(str(path)).error
    assert error is not None and "not a regular file" in error and kind in error
    assert "no such file" not in error and "is empty" not in error


def checked(tmp: Path, name: str, data: bytes) -> LocalImage:
    (tmp / name).write_bytes(data)
    image = ImageStore(tmp).check(name).image
    assert image is not None
    return image


async def test_the_inliner_sends_the_bytes_checked_reading_a_shared_image_once(
    tmp_path: Path,
) -> None:
    one = checked(tmp_path, "one.png", picture("PNG"))
    two = checked(tmp_path, "two.jpg", picture("JPEG"))
    inliner = Inliner()
    request = {"model": "m", "prompt": "p", "image_url": one, "image_urls": ["https://x/a", two]}
    body = await inliner.body(request)
    assert body["image_url"] == "data:image/png;base64," + base64.b64encode(picture("PNG")).decode(
        "ascii"
    )
    assert body["image_urls"][0] == "https://x/a"
    assert base64.b64decode(body["image_urls"][1].split(",", 1)[1]) == picture("JPEG")
    assert (body["model"], body["prompt"]) == ("m", "p") and request["image_url"] is one
    for _ in range(20):
        assert (await inliner.body({"image_url": one}))["image_url"] == body["image_url"]
    assert inliner.reads == 2
    plain = {"model": "m", "prompt": "p"}
    assert await inliner.body(plain) is plain


async def test_the_inliner_keeps_only_a_few_encoded_images(tmp_path: Path) -> None:
    shots = [checked(tmp_path, f"{i}.png", picture("PNG", (720 + i, 720))) for i in range(4)]
    inliner = Inliner(keep=2)
    for image in [*shots, shots[3], shots[2], shots[0]]:
        await inliner.uri(image)
    assert inliner.reads == 5  # 3 and 2 were kept; 0 was not any more
    by_chars = Inliner(keep_chars=shots[0].uri_chars * 3 // 2)
    for image in [shots[0], shots[1], shots[1], shots[0]]:
        await by_chars.uri(image)
    assert by_chars.reads == 3  # room for one


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.write_bytes(picture("PNG", (900, 900))), "changed since the manifest"),
        (lambda p: p.write_bytes(bytes(reversed(p.read_bytes()))), "same size, other content"),
        (lambda p: p.write_bytes(p.read_bytes() + b"x"), "it is now {grown} bytes, not {n}"),
        (lambda p: p.write_bytes(p.read_bytes()[:9]), "it is now 9 bytes, not {n}"),
        (lambda p: p.unlink(), "was removed or renamed since the manifest was checked"),
        (lambda p: p.unlink() or os.mkfifo(p), "(it is now not a regular file but a FIFO)"),
        (lambda p: p.unlink() or p.mkdir(), "(it is now a folder, not a file)"),
        (lambda p: p.unlink() or p.symlink_to(p), "cannot be read (Too many levels of symbolic"),
    ],
    ids=["other", "same-size", "grown", "shrunk", "gone", "fifo", "folder", "unreadable"],
)
async def test_an_image_changed_since_it_was_checked_is_not_sent(
    tmp_path: Path, change: Callable[[Path], object], words: str
) -> None:
    image = checked(tmp_path, "a.png", picture("PNG"))
    words = words.format(n=f"{image.size:,}", grown=f"{image.size + 1:,}")
    change(tmp_path / "a.png")
    inliner = Inliner()
    with pytest.raises(ImageChangedError) as err:
        await inliner.body({"image_url": image})
    message = str(err.value)
    assert message.startswith(f"the image file {tmp_path / 'a.png'} ") and words in message
    assert message.endswith(": not sent; a rerun checks it again and submits it")
    assert inliner.reads == 0


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "image/webp"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 100, 133, 134, 135, 1000, 1001, 1002, 500_000])
def test_a_local_image_is_recorded_as_its_data_uri_was(size: int, mime: str) -> None:
    uri = images.data_uri(mime, os.urandom(size))
    image = LocalImage(Path("x"), "0" * 64, mime, 1, 1, size)
    assert image.uri_chars == len(uri)
    if len(uri) > MAX_INLINE_CHARS:  # a shorter one is the URI itself (LocalImage.inline)
        assert compact_request({"image_url": image}) == compact_request({"image_url": uri})


def test_a_tiny_image_is_kept_as_its_data_uri_since_records_copy_it_whole(
    tmp_path: Path,
) -> None:
    tiny = picture("PNG", (1, 1))
    image = checked(tmp_path, "tiny.png", tiny)
    assert image.uri_chars <= MAX_INLINE_CHARS
    assert image.inline == images.data_uri("image/png", tiny)
    assert checked(tmp_path, "big.png", picture("PNG")).inline is None


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
