"""Checks of manifest values, and the reporting that turns them into located problems.

Split from :mod:`veobatch.manifest` to keep each module readable: these are the pure rules
(what a field, an image reference, a model name or an id must look like, and how to say what
is wrong in terms a user recognises), while the manifest module walks the document.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import date
from difflib import get_close_matches
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from .catalogue import ALL_FIELDS, CASE_INSENSITIVE, MODELS, FieldSpec, ModelSpec
from .errors import Problem
from .images import ImageStore, is_local_reference, read_picture
from .yamlpos import Path as KeyPath
from .yamlpos import Pos, SourceMap

ID_MAX_LEN = 100
MAX_VARIANTS = 100
_ID_CHAR = re.compile(r"[A-Za-z0-9._-]")

# No size limit is published; users report inline images failing above a few MB.
DATA_URI_WARN_BYTES = 7_000_000
DATA_URI_MAX_BYTES = 20_000_000
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,", re.IGNORECASE)
IMAGE_EXPECTED = "an https:// image URL, a data:image/...;base64,... URI or a local image file"

# Free text, where a '#' or a line that reads like a field may well have been meant as text.
FREE_TEXT = frozenset({"prompt", "negative_prompt"})
_FIELD_WITHOUT_COLON = re.compile(r"\s*([A-Za-z_]+)(?:\s*=\s*|\s+)([^\s=]+)\s*$")


def _reads_as_field(name: str, word: str) -> bool:
    """Is ``name word`` a field and a value some model takes for it ('duration 4'), not prose
    that happens to start with a field's name ('model walking', 'seed drifts')? Free text and
    images take any word, so only typed and listed fields count."""
    if name == "variants":
        return word.isdigit()
    if name == "model":
        return word.lower().startswith(("google/", "veo-"))
    value: Any = int(word) if re.fullmatch(r"-?[0-9]+", word) else _BOOLEAN.get(word, word)
    specs = (m.fields[name] for m in MODELS.values() if name in m.fields)
    return any(
        (spec.enum is not None or spec.type in ("integer", "boolean"))
        and scalar_problem(spec, value, word) is None
        for spec in specs
    )


_BOOLEAN = {"true": True, "false": False}


# Names people reach for that difflib alone would match to the wrong model.
_MODEL_SYNONYMS = (("text-to-video", "t2v"), ("image-to-video", "i2v"))


def show(value: Any) -> str:
    """A value as the user would recognise it, kept short (data: URIs can be megabytes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and len(value) > 60:
        return repr(value[:50] + "…")
    return repr(value)


def describe(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {show(value)}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {show(value)}"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "binary data" if isinstance(value, bytes) else f"a {type(value).__name__}"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def quote_hint(value: Any, plain: str | None) -> str:
    """Explain YAML's reading of an unquoted scalar that was meant as text (16:9, no, 1.0)."""
    if isinstance(value, str) or not plain:
        return ""
    kind = "a boolean" if isinstance(value, bool) else "a date" if isinstance(value, date) else ""
    kind = kind or ("a number" if isinstance(value, int | float) else "")
    if not kind:
        return ""
    return f' (YAML reads the unquoted {plain} as {kind}; write "{plain}" in quotes)'


# Numbers every reader (YAML 1.1, YAML 1.2, a CSV cell) reads alike.
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_NUMBER = re.compile(
    rf"{_PLAIN_INT.pattern}|[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_NOT_OCTAL = re.compile(r"[-+]?0[0-9_]*[89][0-9_]*")  # YAML 1.1 leaves these as text
_OCTAL_0O = re.compile(r"[-+]?0o[0-7_]+")  # YAML 1.2's octal; text to YAML 1.1
# An exponent YAML 1.1 reads only after a '.' and with a sign: 1e3 and 1.0e3 are text to it.
_EXPONENT = re.compile(r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))[eE]([-+]?)([0-9]+)")


def unquote_hint(kind: str, value: Any, plain: str | None) -> str:
    """Advise removing quotes only from a value that had them (``plain`` is unquoted text)."""
    if not isinstance(value, str) or plain is not None:
        return ""
    looks_right = {
        "integer": _PLAIN_INT.fullmatch(value.strip()) is not None,
        "boolean": value.strip().lower() in ("true", "false"),
    }
    return " (remove the quotes)" if looks_right.get(kind) else ""


def number_reading(value: Any, plain: str | None) -> str | None:
    """How YAML 1.1 read an unquoted number not written in plain decimal, and what to write.

    YAML 1.1 reads 010 as 8 (octal), 1:30 as 90 (base 60) and 1_000 as 1000, where YAML 1.2
    and a CSV cell read 010 as 10: a number is sent only as the user plainly wrote it.
    """
    if plain is None or _PLAIN_NUMBER.fullmatch(plain):
        return None
    if isinstance(value, str):
        return _unread_number(plain)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    digits = plain.lstrip("+-")
    if ":" in plain:
        form = "base-60 (sexagesimal) number"
    elif digits[:2] in ("0x", "0b"):
        form = "hexadecimal number" if digits[1] == "x" else "binary number"
    elif digits[:1] == "0" and is_int(value):
        decimal = int(plain.replace("_", ""), 10)
        advice = f"write {decimal} without the leading zero"
        if decimal != value:
            advice += f", or {value} if you meant octal"
        return f"YAML 1.1 reads {plain} as the octal number {value}; {advice}"
    elif "_" in plain:
        return f"YAML 1.1 reads {plain} as {value!r}, ignoring its underscores; write {value!r}"
    else:
        return None
    return f"YAML 1.1 reads {plain} as the {form} {value!r}; write {value!r}"


def misread(value: Any, plain: str | None) -> str | None:
    """``plain (how YAML 1.1 read it)``, for an error's "got ...", when it misread a number."""
    reading = number_reading(value, plain)
    return None if reading is None else f"{plain} ({reading})"


def _unread_number(plain: str) -> str | None:
    """Numbers YAML 1.1 leaves as text though they look like numbers: 08, 09, 0o17, 1e3."""
    if _NOT_OCTAL.fullmatch(plain):
        decimal = int(plain.replace("_", ""), 10)
        return (
            f"YAML 1.1 reads {plain} as the string {plain!r}: a leading zero means octal, "
            f"and 8 and 9 are not octal digits; write {decimal} without the leading zero"
        )
    if _OCTAL_0O.fullmatch(plain):
        number = int(plain.replace("_", ""), 0)
        return f"YAML 1.1 reads {plain} as the string {plain!r}; write {number}"
    if (exponent := _EXPONENT.fullmatch(plain)) is not None:
        mantissa, sign, power = exponent.groups()
        spelled = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign or '+'}{power}"
        short = _decimal(float(plain))
        advice = f" ({spelled}); write {short}" if short else f"; write {spelled}"
        return (
            f"YAML 1.1 reads {plain} as the string {plain!r}: it reads an exponent only after "
            f"a '.' and with a sign{advice}"
        )
    return None


def _decimal(number: float) -> str | None:
    """``number`` in plain decimal (1000, 0.001), if that is short."""
    if not math.isfinite(number) or "e" in repr(number):
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    match = get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _one_of(options: tuple[Any, ...]) -> str:
    shown = ", ".join(show(o) for o in options)
    return shown if len(options) == 1 else f"one of {shown}"


# --- checking values -----------------------------------------------------------------------


def _expected(spec: FieldSpec) -> str:
    """What a field takes; the type comes first for non-strings so '8' vs 8 is obvious."""
    kind = {"integer": "an integer", "boolean": "true or false"}.get(spec.type, "a string")
    if spec.enum is None:
        return kind
    options = _one_of(spec.enum) + (" (any case)" if spec.name in CASE_INSENSITIVE else "")
    return options if spec.type == "string" else f"{kind} ({options})"


def _in_enum(spec: FieldSpec, value: Any) -> bool:
    assert spec.enum is not None
    if spec.name in CASE_INSENSITIVE and isinstance(value, str):
        return value.lower() in {str(o).lower() for o in spec.enum}
    return any(value == o and type(value) is type(o) for o in spec.enum)


def _type_hint(spec: FieldSpec, value: Any, plain: str | None) -> str:
    """Advice for a value of the wrong type; quoting is only advised when it would help."""
    if spec.type != "string":
        return unquote_hint(spec.type, value, plain)
    options = [str(o) for o in spec.enum or ()]
    if options and plain and plain not in options:
        return suggest(plain, options)
    return quote_hint(value, plain)


def cut_text_problem(
    name: str, value: str, comment: str | None, folded: tuple[tuple[int, str], ...]
) -> str | None:
    """An unquoted text that YAML read other than it reads: cut at a ' #' (the rest is a
    comment), or one that swallowed a field whose ':' is missing. Either way the request
    would differ from what was written, and be paid for."""
    if comment is not None:
        end = value if len(value) <= 40 else "…" + value[-39:]
        return (
            f"YAML reads {show(comment)} as a comment, so the {name} sent would end at "
            f"{end!r}; quote the whole {name} to keep the text after '#', or put the comment "
            "on a line of its own"
        )
    for line, text in folded:
        m = _FIELD_WITHOUT_COLON.match(text)
        if m is not None and _reads_as_field(m.group(1), m.group(2)):
            return (
                f"line {line} ({text.strip()!r}) reads like the field '{m.group(1)}' missing "
                f"its ':', and YAML made it part of the {name}; write "
                f"'{m.group(1)}: {m.group(2)}' on a line of its own (or quote the {name})"
            )
    return None


def anchor_problem(name: str, value: Any, anchor: str) -> str:
    """A text starting with '&word ': YAML takes the word for an anchor, and no alias uses it."""
    start = str(value) if len(str(value)) <= 40 else str(value)[:39] + "…"
    return (
        f"YAML reads {anchor!r} as an anchor (no alias uses it), not as text, so the {name} "
        f"sent would start at {start!r}; quote the whole {name} to keep {anchor!r}"
    )


def scalar_problem(spec: FieldSpec, value: Any, plain: str | None) -> str | None:
    """What is wrong with a string, integer or boolean field value, if anything."""
    got = misread(value, plain) if spec.type == "integer" else None
    if got is not None:
        return f"expected {_expected(spec)}, got {got}"
    right_type = {
        "integer": is_int(value),
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
    }[spec.type]
    if not right_type:
        return f"expected {_expected(spec)}, got {describe(value)}{_type_hint(spec, value, plain)}"
    if spec.type == "boolean" and plain is not None and plain.lower() not in ("true", "false"):
        word = show(value)
        return f"expected true or false, got {plain} (YAML 1.1 reads it as {word}; write {word})"
    if spec.enum is not None and not _in_enum(spec, value):
        options = [str(o) for o in spec.enum]
        suggestion = suggest(value, options) if isinstance(value, str) else ""
        expected = _expected(spec) if spec.type == "string" else _one_of(spec.enum)
        return f"expected {expected}, got {show(value)}{suggestion}"
    if spec.name == "prompt" and not value.strip():
        return "the prompt is empty"
    return None


def image_problem(value: str) -> tuple[str | None, str | None]:
    """(error, warning) for one image reference."""
    if value[:5].lower() == "data:":
        return _data_uri_problem(value)
    if (i := next((i for i, c in enumerate(value) if c.isspace() or ord(c) < 32), -1)) >= 0:
        c = value[i]
        shown = "a space" if c == " " else f"U+{ord(c):04X}"
        return (
            f"the URL has {shown} at character {i + 1}, which a URL cannot carry as it is; "
            f"percent-encode it as {_encoded(c)}"
        ), None
    try:
        parts = urlsplit(value)
    except ValueError:  # brackets in the host that hold no IPv6 address
        return (
            f"the URL {show(value)} has an invalid host: [...] may only hold an IPv6 address",
            None,
        )
    if parts.scheme.lower() not in ("http", "https"):
        return f"expected {IMAGE_EXPECTED}, got {show(value)}", None
    try:
        host, _ = parts.hostname, parts.port
    except ValueError:
        return f"the URL {show(value)} has an invalid port", None
    if not host:
        return f"the URL {show(value)} has no host", None
    bad = uri_problem(value, parts)
    if bad is not None:
        return bad, None
    if parts.scheme.lower() == "http":
        return None, "plain http image URL: the API may refuse plain http; use https if you can"
    return None, None


# RFC 3986: unreserved, gen-delims and sub-delims; '%' only as %XX; '[' and ']' only around
# an IPv6 host. The published schemas say "format": "uri", so the API may refuse anything else.
_URI_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})|[^\w.~:/?#\[\]@!$&'()*+,;=%-]", re.ASCII)
_BRACKET = re.compile(r"[\[\]]")
# [user[:password]@](reg-name | [IPv6 or IPvFuture])[:port], of characters already checked
_USER = r"[\w.~%:!$&'()*+,;=-]*@"
_HOST = r"[\w.~%!$&'()*+,;=-]*|\[[\w.~:%!$&'()*+,;=-]+\]"
_AUTHORITY = re.compile(rf"(?:{_USER})?(?:{_HOST})(?::[0-9]*)?", re.ASCII)


def uri_problem(value: str, parts: SplitResult) -> str | None:
    """Why an http(s) URL is not an RFC 3986 URI, said at its first offending character."""
    host_end = len(parts.scheme) + 3 + len(parts.netloc)  # scheme "://" host part
    first_hash = value.find("#")
    second_hash = value.find("#", first_hash + 1) if first_hash >= 0 else -1
    found = (_URI_BAD.search(value), _BRACKET.search(value, host_end))
    spots = [m.start() for m in found if m] + ([second_hash] if second_hash >= 0 else [])
    if spots:
        return _uri_char_problem(value, min(spots), parts, host_end)
    if not _AUTHORITY.fullmatch(parts.netloc):
        return (
            f"the URL's host part {parts.netloc!r} is not user@host:port; "
            "percent-encode an '@' in a user name as %40"
        )
    return None


def _uri_char_problem(value: str, i: int, parts: SplitResult, host_end: int) -> str:
    c, at = value[i], f"at character {i + 1}"
    if c == "%":
        return (
            f"the URL has a '%' {at} that is not followed by two hex digits; "
            "percent-encode a literal % as %25"
        )
    if c == "#":
        return (
            f"the URL has a second '#' {at}: only the first starts the fragment; "
            "percent-encode this one as %23"
        )
    if c in "[]":
        return (
            f"the URL has {c!r} {at}, outside a [...] IPv6 host; percent-encode it as {_encoded(c)}"
        )
    shown = f"'{c}'" if c.isprintable() else f"U+{ord(c):04X}"
    if i < host_end and ord(c) > 127:
        return (
            f"the URL's host has {shown} {at}, which a URL cannot carry; write the host "
            f"in its ASCII (xn--) form, {_ascii_host(parts)}"
        )
    return (
        f"the URL has {shown} {at}, which a URL cannot carry as it is; "
        f"percent-encode it as {_encoded(c)}"
    )


def _encoded(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


def _ascii_host(parts: SplitResult) -> str:
    try:
        return (parts.hostname or "").encode("idna").decode("ascii")
    except UnicodeError:
        return "as the site gives it"


def _data_uri_problem(value: str) -> tuple[str | None, str | None]:
    if not value.startswith("data:"):  # records and the API's examples know only this spelling
        return f"write the scheme of a data: URI in lower case, got {show(value[:20])}", None
    head = _DATA_URI.match(value)
    if head is None:
        return (
            f"a data: URI must look like data:image/<type>;base64,<data>, got {show(value)}",
            None,
        )
    size_mb = len(value) / 1_000_000
    if len(value) > DATA_URI_MAX_BYTES:
        limit = DATA_URI_MAX_BYTES // 1_000_000
        return (
            f"the inline image is {size_mb:.1f} MB, above the {limit} MB limit: "
            "inline images above a few MB are reported to fail; host it and use an https URL",
            None,
        )
    try:  # strictly: only the base64 alphabet, padded; decoded once, however large
        data = base64.b64decode(value[head.end() :], validate=True)
    except ValueError:  # binascii.Error, or text that is not ASCII
        data = b""
    if not data:
        if any(c.isspace() for c in value[head.end() :]):
            return (
                "the data: URI's base64 has spaces or line breaks in it (a folded or block "
                "YAML string adds them): write it as one unbroken line",
                None,
            )
        return "the data: URI does not carry valid base64 data", None
    # Judged as a local file would be: JPEG, PNG or WebP, sane pixel counts.
    picture, error, warning = read_picture(data, "the inline image")
    if picture is None:
        return error, None
    declared = head[1].lower()
    if declared == "image/jpg":  # a common misspelling that browsers and servers accept
        declared = "image/jpeg"
    if declared != picture.mime:
        message = f"the data: URI says {head[1]}, but its bytes are {picture.mime}"
        return f"{message}; write data:{picture.mime};base64,...", None
    if len(value) > DATA_URI_WARN_BYTES:
        return None, (
            f"the inline image is {size_mb:.1f} MB: inline images above a few MB are reported "
            "to fail; consider hosting it and using an https URL"
        )
    return None, warning


def likely_model(value: Any) -> str | None:
    """The catalogue model an unknown name most likely meant, if one is close."""
    if not isinstance(value, str):
        return None
    probe = value
    for long, short in _MODEL_SYNONYMS:
        probe = probe.replace(long, short)
    match = get_close_matches(probe, list(MODELS), n=1, cutoff=0.6)
    return match[0] if match else None


def model_problem(value: Any) -> str | None:
    """Unknown models get the nearest catalogue name, or the whole (short) catalogue."""
    if not isinstance(value, str):
        return f"expected a model name such as 'google/veo-3.1-t2v', got {describe(value)}"
    if value in MODELS:
        return None
    likely = likely_model(value)
    suggestion = f"; did you mean {likely!r}?" if likely else ""
    if not suggestion:
        suggestion = "; expected one of " + ", ".join(repr(m) for m in MODELS)
    return f"unknown model {value!r}{suggestion}"


def not_accepted(model: ModelSpec, name: str) -> str:
    """A real request field, but not this model's: say which models take it, or what this takes."""
    message = f"{model.name} does not accept {name!r}"
    suggestion = suggest(name, list(model.fields))
    if suggestion:
        return message + suggestion
    others = [m.name for m in MODELS.values() if name in m.fields]
    if len(others) <= 2:
        return message + "; only " + " and ".join(others) + " do"
    return message + "; it takes " + ", ".join(model.fields)


def id_problem(value: Any, plain: str | None) -> str | None:
    """Ids name output files, so only a safe, portable file name is accepted."""
    if not isinstance(value, str):
        hint = quote_hint(value, plain)
        return (
            f"expected an id made of letters, digits, '.', '_' or '-', got {describe(value)}{hint}"
        )
    if not value:
        return "the id is empty"
    if len(value) > ID_MAX_LEN:
        return f"the id is {len(value)} characters long; at most {ID_MAX_LEN} are allowed"
    bad = next((c for c in value if not _ID_CHAR.fullmatch(c)), None)
    if bad is not None:
        return (
            f"the id {show(value)} contains {bad!r}; use only letters, digits, '.', '_' "
            "and '-' (ids name the output files)"
        )
    if value.startswith("."):
        return f"the id {show(value)} must not start with '.' (ids name the output files)"
    if _WINDOWS_DEVICE.fullmatch(stem := value.split(".", 1)[0]):
        return (
            f"the id {show(value)} starts with {stem!r}, a device name on Windows: its video"
            " could not be written to a Windows or SMB share; choose another id"
        )
    return None


# CON.mp4, nul.x.mp4...: names Windows keeps for devices, whatever their case and extension.
WINDOWS_DEVICES = (
    "con",
    "prn",
    "aux",
    "nul",
    *(f"{p}{n}" for p in ("com", "lpt") for n in range(10)),
)
_WINDOWS_DEVICE = re.compile("|".join(WINDOWS_DEVICES), re.IGNORECASE)


def int_in_range(
    report: Report, value: Any, at: KeyPath, low: int, high: int, expected: str
) -> int | None:
    """An integer from ``low`` to ``high``, or a reported "expected {expected}, got ..."."""
    plain = report.source.plain.get(at)
    got = misread(value, plain)
    if got is None and is_int(value) and low <= value <= high:
        return int(value)
    if got is None:
        got = show(value) if is_int(value) else describe(value)
        got += unquote_hint("integer", value, plain)
    report.error(at, f"expected {expected}, got {got}")
    return None


def variants_value(report: Report, value: Any, at: KeyPath) -> int | None:
    expected = f"a number of takes from 1 to {MAX_VARIANTS}"
    return int_in_range(report, value, at, 1, MAX_VARIANTS, expected)


# --- collecting problems -------------------------------------------------------------------

At = Literal["value", "key", "item"]


class Report:
    """Collects errors and warnings, turning value paths into file positions and job labels."""

    def __init__(
        self,
        file: str,
        source: SourceMap,
        labels: dict[int, str],
        *,
        images: ImageStore,
    ) -> None:
        self.file = file
        self.source = source
        self.labels = labels
        self.images = images
        self._warned_images: set[str] = set()
        self._inline: dict[str, tuple[str | None, str | None]] = {}  # data: URI -> verdict
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        # Beside each list, for the duplicate test: a list scan made 50,000 problems quadratic.
        self._recorded: dict[int, set[Problem]] = {id(self.errors): set(), id(self.warnings): set()}

    def error(
        self, path: KeyPath, message: str, *, at: At = "value", pos: Pos | None = None
    ) -> None:
        self._add(self.errors, path, message, at, pos)

    def warn(
        self, path: KeyPath, message: str, *, at: At = "value", pos: Pos | None = None
    ) -> None:
        self._add(self.warnings, path, message, at, pos)

    def add_errors(self, problems: list[Problem]) -> None:
        """Problems already located (a table's own: unreadable lines, bad headers)."""
        for problem in problems:
            self._record(self.errors, problem)

    def unknown(self, path: KeyPath, what: str, choices: tuple[str, ...], tail: str) -> None:
        """An unknown key, reported at the key with the closest valid name when one is close."""
        name = path[-1]
        suggestion = suggest(str(name), choices) or tail
        self.error(path, f"unknown {what} {show(name)}{suggestion}", at="key")

    def _add(
        self, bucket: list[Problem], path: KeyPath, message: str, at: At, pos: Pos | None
    ) -> None:
        where = pos or {
            "value": self.source.value,
            "key": self.source.key,
            "item": self.source.item,
        }[at](path)
        job, field = None, ".".join(str(p) for p in path) or None
        if len(path) >= 2 and path[0] == "jobs" and isinstance(path[1], int):
            job = self.labels.get(path[1], f"#{path[1] + 1}")
            field = ".".join(str(p) for p in path[2:]) or None
        self._record(bucket, Problem(self.file, message, where.line, where.column, job, field))

    def _record(self, bucket: list[Problem], problem: Problem) -> None:
        seen = self._recorded[id(bucket)]
        if problem not in seen:
            seen.add(problem)
            bucket.append(problem)

    def field(self, spec: FieldSpec, value: Any, path: KeyPath, context: str = "") -> bool:
        """Check one request field value; report what is wrong; True when it is fine."""
        if path in self.source.bad:
            return False
        if spec.type == "image_list":
            return self._image_list(value, path, context)
        if spec.type == "image":
            return self._image(value, path, context)
        message = scalar_problem(spec, value, self.source.plain.get(path))
        if message is None and spec.name in FREE_TEXT:
            comment, folded = self.source.comments.get(path), self.source.folded.get(path, ())
            message = cut_text_problem(spec.name, value, comment, folded)
            anchor = self.source.unused_anchors.get(path)
            if message is None and anchor is not None:
                message = anchor_problem(spec.name, value, anchor)
        if message is not None:
            self.error(path, message + context)
        return message is None

    def _image(self, value: Any, path: KeyPath, context: str) -> bool:
        if path in self.source.bad:
            return False
        if not isinstance(value, str):
            self.error(path, f"expected {IMAGE_EXPECTED}, got {describe(value)}{context}")
            return False
        if value.strip() and is_local_reference(value):
            return self._local_image(value, path)
        if value[:5].lower() == "data:":
            return self._inline_image(value, path, context)
        error, warning = image_problem(value)
        if error is not None:
            self.error(path, error + context)
        if warning is not None:
            self.warn(path, warning)
        return error is None

    def _inline_image(self, value: str, path: KeyPath, context: str) -> bool:
        """A data: URI, decoded and judged once however many jobs share it."""
        verdict = self._inline.get(value)
        if verdict is None:
            verdict = self._inline[value] = _data_uri_problem(value)
        return self._judged(value, path, *verdict, context)

    def _local_image(self, value: str, path: KeyPath) -> bool:
        check = self.images.check(value)
        return self._judged(value, path, check.error, check.warning)

    def _judged(
        self, value: str, path: KeyPath, error: str | None, warning: str | None, context: str = ""
    ) -> bool:
        """Report a cached image verdict: its error at every use, its warning once per image."""
        if error is not None:
            self.error(path, error + context)
        if warning is not None and value not in self._warned_images:
            self._warned_images.add(value)
            self.warn(path, warning)
        return error is None

    def _image_list(self, value: Any, path: KeyPath, context: str) -> bool:
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else describe(value)
            hint = " (write it as a list: [url, ...])" if isinstance(value, str) else ""
            self.error(path, f"expected a non-empty list of image URLs, got {got}{hint}{context}")
            return False
        results = [self._image(item, (*path, i), context) for i, item in enumerate(value)]
        return all(results)


# --- defaults ------------------------------------------------------------------------------


class Defaults:
    """The manifest's defaults, checked once each, whatever the number of jobs using them."""

    def __init__(self, raw: Any, report: Report) -> None:
        self.report = report
        self.values: dict[str, Any] = {}
        self.model: ModelSpec | None = None
        self.model_broken = False  # a model default exists but is invalid (already reported)
        self.variants: int | None = None
        self.used: set[str] = set()
        self.accepted_by_a_job: set[str] = set()
        self._verdicts: dict[tuple[str, FieldSpec], bool] = {}
        if raw is None:
            return
        if not isinstance(raw, dict):
            report.error(
                ("defaults",), f"expected a mapping of request fields, got {describe(raw)}"
            )
            return
        for name, value in raw.items():
            self._add(name, value)

    def _add(self, name: Any, value: Any) -> None:
        path: KeyPath = ("defaults", name)
        if name == "id":
            self.report.error(
                path, "'id' cannot be a default: every job's id must be unique", at="key"
            )
        elif name == "variants":
            self.variants = variants_value(self.report, value, path)
        elif name == "matrix":
            self.report.error(path, "'matrix' cannot be a default: set it on a job", at="key")
        elif name not in ALL_FIELDS and name != "model":
            tail = "; defaults take 'model', 'variants' and the API's request fields"
            choices = ("model", "variants", *sorted(ALL_FIELDS))
            self.report.unknown(path, "default", choices, tail)
        elif name == "model":
            problem = model_problem(value)
            if problem is not None:
                self.report.error(path, problem)
            self.model = MODELS.get(value) if problem is None else None
            self.model_broken = problem is not None
            self.values[name] = value
        else:
            self.values[name] = value

    def take(self, model: ModelSpec, job: dict[Any, Any]) -> tuple[dict[str, Any], bool]:
        """The defaults a job of ``model`` takes, and whether they are all valid for it."""
        taken: dict[str, Any] = {}
        ok = True
        for name, value in self.values.items():
            if name == "model" or name not in model.fields:
                continue
            self.accepted_by_a_job.add(name)
            if name in job:
                continue
            self.used.add(name)
            ok = self._valid_for(name, model) and ok
            taken[name] = value
        return taken, ok

    def _valid_for(self, name: str, model: ModelSpec) -> bool:
        spec = model.fields[name]
        verdict = self._verdicts.get((name, spec))
        if verdict is None:
            uniform = len({m.fields[name] for m in MODELS.values() if name in m.fields}) == 1
            context = "" if uniform else f" (for {model.name} jobs)"
            verdict = self.report.field(spec, self.values[name], ("defaults", name), context)
            self._verdicts[(name, spec)] = verdict
        return verdict

    def warn_unused(self) -> None:
        for name in self.values:
            if name in self.used:
                continue
            if name == "model":
                reason = "every job sets its own model"
            elif name in self.accepted_by_a_job:
                reason = f"every job whose model accepts {name!r} sets it itself"
            else:
                reason = f"no job's model accepts {name!r}"
            self.report.warn(("defaults", name), f"this default is never used: {reason}", at="key")
            self._check_unused(name)

    def _check_unused(self, name: str) -> None:
        """An unused default is still checked, when one spec of it serves every model."""
        specs = {m.fields[name] for m in MODELS.values() if name in m.fields}
        if len(specs) == 1:
            self.report.field(specs.pop(), self.values[name], ("defaults", name))
