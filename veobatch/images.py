"""Local image files named in a manifest: checked by their bytes, sent as data: URIs.

The API takes an https URL or a ``data:<mime>;base64,`` URI. A manifest's files are read and
checked once each when it is loaded (:class:`ImageStore`), however many jobs name them, and
only what was found is kept (:class:`LocalImage`: path, content hash, type, size), never the
bytes: 20,000 stills of half a megabyte would otherwise be 13 GB of base64 held for the run.
A job's identity uses the content hash. The data: URI is built when the job's create is sent
(:class:`Inliner`), from the file read again and held to the hash it was checked with.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import io
import os
import re
import stat
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .fsutil import Offload, to_thread
from .jobview import MAX_INLINE_CHARS, Inlined

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
class LocalImage(Inlined):
    """One checked file: what it holds, not its bytes (those are read again to be sent).

    A job's request holds it where the data: URI goes; :class:`Inliner` makes the URI."""

    path: Path
    sha256: str
    mime: str
    width: int
    height: int
    size: int
    # The data: URI itself when a compact record would copy it whole (a file of at most 132
    # bytes): the job then sends the bytes it was checked with, and records read as before.
    inline: str | None = None

    @property
    def identity(self) -> str:
        """What stands for the image in a job's key: its content, not where it lives."""
        return f"sha256:{self.sha256}"

    @property
    def uri_head(self) -> str:
        """Its data: URI up to the comma."""
        return f"data:{self.mime};base64"

    @property
    def uri_chars(self) -> int:
        """The length of its data: URI, known without encoding it."""
        return len(self.uri_head) + 1 + 4 * ((self.size + 2) // 3)


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


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
    image = LocalImage(
        path=Path(shown),
        sha256=hashlib.sha256(data).hexdigest(),
        mime=picture.mime,
        width=picture.width,
        height=picture.height,
        size=len(data),
    )
    if image.uri_chars <= MAX_INLINE_CHARS:
        image = replace(image, inline=data_uri(image.mime, data))
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


class FileProblem(Exception):
    """A file not read as an image file: ``what`` it is instead (a folder, a named pipe)."""

    def __init__(self, what: str, *, folder: bool = False, size: int | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.folder = folder
        self.size = size  # too big to read: its size


_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, or :class:`FileProblem` (or OSError).

    Judged by what was opened, not by a look at the name first: opened without blocking (a
    named pipe would wait for a writer for ever, /dev/null reads as empty, a /proc file says
    it holds 0 bytes), and not read at all when it is bigger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileProblem("a folder, not a file", folder=True)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _SPECIAL if test(st.st_mode)), "a special file")
            raise FileProblem(f"not a regular file but {kind}")
        if st.st_size > limit:
            raise FileProblem(f"{st.st_size:,} bytes", size=st.st_size)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:  # takes the descriptor over: closed with it
        data = f.read(st.st_size + 1)
    if st.st_size == 0 and data:
        raise FileProblem(
            "not a regular file: its size reads as 0 bytes, yet it holds data (a /proc or /sys"
            " file?)"
        )
    if len(data) > st.st_size:
        raise FileProblem("a file being written: it grew while it was read")
    return data


class ImageChangedError(Exception):
    """A checked image file no longer holds what was checked: the job is not sent."""


def encode_for_sending(image: LocalImage) -> str:
    """Blocking: the data: URI of ``image``'s file, read again and held to the hash it was
    checked with; :class:`ImageChangedError` when it changed or went since."""
    shown = str(image.path)
    rerun = "not sent; a rerun checks it again and submits it"
    changed = f"the image file {shown} changed since the manifest was checked"
    try:
        data = read_regular_file(image.path, image.size)
    except FileNotFoundError:
        raise ImageChangedError(
            f"the image file {shown} was removed or renamed since the manifest was checked: {rerun}"
        ) from None
    except FileProblem as exc:
        now = f"{exc.size:,} bytes, not {image.size:,}" if exc.size is not None else exc.what
        raise ImageChangedError(f"{changed} (it is now {now}): {rerun}") from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ImageChangedError(f"the image file {shown} cannot be read ({why}): {rerun}") from None
    if len(data) != image.size:
        raise ImageChangedError(
            f"{changed} (it is now {len(data):,} bytes, not {image.size:,}): {rerun}"
        )
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise ImageChangedError(f"{changed} (same size, other content): {rerun}")
    return data_uri(image.mime, data)


KEEP_URIS = 4  # encoded images kept for the next create that sends one of them
KEEP_URI_CHARS = 32_000_000


class Inliner:
    """Makes a create's body from a job's request: each local image read again, held to the
    hash it was checked with and encoded, in a worker thread, as the create is sent.

    The memory images take is then what the creates in flight are sending, plus the few
    encoded images kept here so that one image shared by many jobs is read once, not once
    per create; never every image of the manifest."""

    def __init__(
        self,
        offload: Offload = to_thread,
        *,
        keep: int = KEEP_URIS,
        keep_chars: int = KEEP_URI_CHARS,
    ) -> None:
        self._offload = offload
        self._keep, self._keep_chars = keep, keep_chars
        self._kept: OrderedDict[tuple[Path, str], str] = OrderedDict()
        self._kept_chars = 0
        self.reads = 0  # files read, for tests and the curious

    async def body(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """``request`` with data: URIs for its local images (itself when it has none);
        raises :class:`ImageChangedError`."""
        if not any(_holds_image(v) for v in request.values()):
            return request
        body: dict[str, Any] = {}
        for name, value in request.items():
            if isinstance(value, LocalImage):
                value = await self.uri(value)
            elif _holds_image(value):
                value = [await self.uri(v) if isinstance(v, LocalImage) else v for v in value]
            body[name] = value
        return body

    async def uri(self, image: LocalImage) -> str:
        key = (image.path, image.sha256)
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
            return found
        uri = await self._offload(functools.partial(encode_for_sending, image))
        self.reads += 1
        if len(uri) <= self._keep_chars and key not in self._kept:
            self._kept[key] = uri
            self._kept_chars += len(uri)
            while len(self._kept) > self._keep or self._kept_chars > self._keep_chars:
                _, gone = self._kept.popitem(last=False)
                self._kept_chars -= len(gone)
        return uri


def _holds_image(value: Any) -> bool:
    if isinstance(value, list):
        return any(isinstance(v, LocalImage) for v in value)
    return isinstance(value, LocalImage)


class ImageStore:
    """Reads and checks each referenced file once per load, however many jobs name it; keeps
    what it found, not the bytes."""

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
        where = (
            f"(looked for {os.path.abspath(full)}; local paths are relative to the manifest's"
            " folder; URLs must start with https://)"
        )
        try:
            data = read_regular_file(full, MAX_FILE_BYTES)
        except FileProblem as exc:
            if exc.size is not None:  # refused before reading a huge file into memory
                return ImageCheck(None, size_problem(exc.size, shown))
            if exc.folder:
                return ImageCheck(None, f"image file {shown}: {exc.what} {where}")
            return ImageCheck(None, f"image file {shown}: {exc.what} ({os.path.abspath(full)})")
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # not meant as a file at all
                return ImageCheck(
                    None,
                    f"{shown} is not an https:// URL, a data:image/...;base64,... URI or the "
                    "name of an image file",
                )
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return ImageCheck(None, f"image file {shown}: no such file {where}")
            return ImageCheck(None, f"cannot read image file {shown}: {exc.strerror or exc}")
        check = inspect_image(data, shown)
        if check.image is None:
            return check
        return replace(check, image=replace(check.image, path=full))
