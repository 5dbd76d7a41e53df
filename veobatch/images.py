"""Local image files named in a manifest: checked by their bytes and inlined as data: URIs.

The API takes an https URL or a ``data:<mime>;base64,`` URI. Bulk manifests reuse a few
reference images across hundreds of jobs, so each file is read, checked and encoded once per
run (:class:`ImageStore`), and every job shares the one encoded string. A job's identity uses
the file's content hash, never the megabytes of base64, so keys stay cheap to compute.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# The base64 form is 4/3 of the file. No limit is published; users report inline images
# failing above a few MB, so warn above ~7 MB of URI and refuse above 20 MB (see manifest_checks).
MAX_FILE_BYTES = 15_000_000
WARN_FILE_BYTES = 5_000_000
MIN_SHORT_SIDE = 720  # "Should be 720p or higher resolution" (the API's schema)
MAX_PIXELS = 100_000_000

# What the API is documented to take; anything else gets a clear error before anything is sent.
# MPO is what Pillow calls a JPEG with more pictures appended (phone photos with a depth or
# gain map): a JPEG to anything that reads its first picture.
MIME_BY_FORMAT = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
}
_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an office document)"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
)


def is_local_reference(value: str) -> bool:
    """A value that is neither a URL nor a data: URI names a file."""
    # The prefix first: a 4 MB data: URI must not be scanned for "://" once per job.
    return value[:5].lower() != "data:" and "://" not in value


@dataclass(frozen=True)
class LocalImage:
    """One checked file, encoded once."""

    path: Path
    data_uri: str
    sha256: str
    mime: str
    width: int
    height: int
    size: int

    @property
    def identity(self) -> str:
        """What stands for the image in a job's key: its content, not where it lives."""
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class ImageCheck:
    image: LocalImage | None
    error: str | None = None
    warning: str | None = None


def _what_is_it(head: bytes) -> str:
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a recognised image"
    return "text, not an image"


@dataclass(frozen=True)
class Picture:
    """What an image's bytes turned out to be."""

    mime: str
    width: int
    height: int


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def read_picture(data: bytes, shown: str) -> tuple[Picture | None, str | None, str | None]:
    """Pure: judge an image's bytes: (what it is, error, warning); ``shown`` names it."""
    problem = size_problem(len(data), shown)
    if problem is not None:
        return None, problem, None
    try:
        with warnings.catch_warnings():
            # Pillow's own pixel limit trips before MAX_PIXELS; verify() decodes no pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format or "", img.size
                if width * height <= MAX_PIXELS:
                    _check_complete(img)
    except Image.DecompressionBombError as exc:  # twice Pillow's limit, above MAX_PIXELS
        found = _BOMB_PIXELS.search(str(exc))
        count = f"{int(found[1]):,} pixels" if found else "so many pixels"
        return None, f"{shown} has {count}, too many pixels for an input image", None
    except UnidentifiedImageError:
        return None, f"{shown} is not an image: its bytes look like {_what_is_it(data[:16])}", None
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"{shown} is a damaged or truncated image ({exc})", None
    mime = MIME_BY_FORMAT.get(fmt)
    if mime is None:
        taken = ", ".join(f for f in MIME_BY_FORMAT if f != "MPO")
        return None, f"{shown} is a {fmt or 'unknown'} image; the API takes {taken}", None
    if width * height > MAX_PIXELS:
        return None, f"{shown} is {width}x{height}, too many pixels for an input image", None
    return Picture(mime, width, height), None, _warning(shown, width, height, len(data))


def _check_complete(img: Image.Image) -> None:
    """Raise OSError for damaged or cut-off data, which the API would be paid to fail on."""
    if img.format not in ("JPEG", "MPO", "WEBP"):
        img.verify()  # a PNG's every chunk and checksum, up to IEND, without decoding pixels
        return
    # verify() checks nothing in a JPEG or WebP, so decode: a JPEG at 1/8 scale, which still
    # reads every byte up to the end marker; the pixels go when ``img`` is closed.
    if img.format != "WEBP":
        img.draft(img.mode, (img.width // 8, img.height // 8))
    img.load()


def _warning(shown: str, width: int, height: int, size: int) -> str | None:
    if min(width, height) < MIN_SHORT_SIDE:
        return (
            f"{shown} is {width}x{height}, smaller than 720p: the API asks for 720p or larger "
            "input images, and small ones give softer videos"
        )
    if size > WARN_FILE_BYTES:
        return (
            f"{shown} is {size / 1e6:.1f} MB ({size * 4 / 3e6:.1f} MB inline): inline images "
            "above a few MB are reported to fail; consider a smaller file or an https URL"
        )
    return None


def inspect_image(data: bytes, shown: str) -> ImageCheck:
    """Pure: judge a file's bytes; ``shown`` is how messages name it."""
    picture, error, warning = read_picture(data, shown)
    if picture is None:
        return ImageCheck(None, error)
    encoded = base64.b64encode(data).decode("ascii")
    image = LocalImage(
        path=Path(shown),
        data_uri=f"data:{picture.mime};base64,{encoded}",
        sha256=hashlib.sha256(data).hexdigest(),
        mime=picture.mime,
        width=picture.width,
        height=picture.height,
        size=len(data),
    )
    return ImageCheck(image, None, warning)


def size_problem(size: int, shown: str) -> str | None:
    if size == 0:
        return f"the image file {shown} is empty"
    if size > MAX_FILE_BYTES:
        return (
            f"the image file {shown} is {size / 1e6:.1f} MB, above the "
            f"{MAX_FILE_BYTES // 1_000_000} MB limit for inline images (inline images above a "
            "few MB are reported to fail); shrink it or host it and use an https URL"
        )
    return None


class ImageStore:
    """Reads each referenced file once per run, however many jobs name it."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._checked: dict[str, ImageCheck] = {}

    def __len__(self) -> int:
        return sum(1 for c in self._checked.values() if c.image is not None)

    def check(self, reference: str) -> ImageCheck:
        found = self._checked.get(reference)
        if found is None:
            found = self._checked[reference] = self._load(reference)
        return found

    def _load(self, reference: str) -> ImageCheck:
        path = Path(os.path.expanduser(reference))
        full = path if path.is_absolute() else self.base_dir / path
        # Kept short: a data: URI that lost its prefix is megabytes of "file name".
        shown = repr(reference if len(reference) <= 60 else reference[:50] + "…")
        if not reference.strip():
            return ImageCheck(None, "the image reference is empty")
        try:
            if not full.is_file():
                what = "a folder, not a file" if full.is_dir() else "no such file"
                return ImageCheck(
                    None,
                    f"image file {shown}: {what} (looked for {os.path.abspath(full)}; local "
                    "paths are relative to the manifest's folder; URLs must start with https://)",
                )
            problem = size_problem(full.stat().st_size, shown)
            if problem is not None:  # refused before reading a huge file into memory
                return ImageCheck(None, problem)
            data = full.read_bytes()
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # not meant as a file at all
                return ImageCheck(
                    None,
                    f"{shown} is not an https:// URL, a data:image/...;base64,... URI or the "
                    "name of an image file",
                )
            return ImageCheck(None, f"cannot read image file {shown}: {exc.strerror or exc}")
        check = inspect_image(data, shown)
        if check.image is None:
            return check
        return replace(check, image=replace(check.image, path=full))
