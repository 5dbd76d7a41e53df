"""Log line formats for stderr off a terminal: plain greppable text, or one JSON object a line.

Log calls across veobatch follow one convention, ``"<event> key=value ...: detail"`` (for
example ``"failed job=j1 kind=timeout: not finished after 1800s"``). :func:`parse_message`
splits such a message back into its parts, so the JSON format gets structured fields without
any call site knowing about it. Pure core: :func:`parse_message`, :func:`json_record`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
TEXT_DATEFMT = "%Y-%m-%dT%H:%M:%S"
_KV = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S+)$")
_INT = re.compile(r"^-?\d+$")
_FLOAT = re.compile(r"^-?\d+\.\d+$")
MAX_EVENT_WORDS = 4


@dataclass(frozen=True)
class Parsed:
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def _value(text: str) -> Any:
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def _slug(words: list[str]) -> str:
    return re.sub(r"[^a-z0-9]+", "_", " ".join(words).lower()).strip("_") or "log"


def parse_message(message: str) -> Parsed:
    """``"<event words> k=v k=v: detail"`` into its parts; anything else becomes the detail."""
    words = message.split(" ")
    event: list[str] = []
    fields: dict[str, Any] = {}
    i = 0
    while i < len(words) and not _KV.match(words[i].rstrip(":")):
        word = words[i]
        i += 1
        if word.endswith(":"):  # "event: detail"
            event.append(word[:-1])
            return Parsed(_slug(event), fields, " ".join(words[i:]))
        event.append(word)
    if i == len(words) and len(event) > MAX_EVENT_WORDS:  # prose, not an event: keep it whole
        return Parsed(_slug(event[:2]), {}, message)
    while i < len(words) and (m := _KV.match(words[i].rstrip(":"))):
        fields[m.group(1)] = _value(m.group(2))
        ends = words[i].endswith(":")
        i += 1
        if ends:
            break
    return Parsed(_slug(event), fields, " ".join(words[i:]))


def json_record(record: logging.LogRecord) -> dict[str, Any]:
    """One log record as the JSON object written for it."""
    message = record.getMessage()
    parsed = parse_message(message)
    fields = dict(parsed.fields)
    doc: dict[str, Any] = {
        "ts": iso_time(record.created),
        "level": record.levelname.lower(),
        "event": parsed.event,
        "job": fields.pop("job", None),
        "fields": fields,
        "detail": parsed.detail,
        "message": message,
        "logger": record.name,
    }
    if record.exc_info and record.exc_info[0] is not None:
        doc["exc"] = logging.Formatter().formatException(record.exc_info)
    return doc


def iso_time(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def exit_record(line: str, now: float, code: int) -> str:
    """The JSON record of a line that says why a command ended early (--log-format json)."""
    record = {"ts": iso_time(now), "level": "error", "event": "exit", "exit_code": code}
    return json.dumps({**record, "message": line.strip()}, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """For log collectors: one JSON object per line (ts, level, event, job, fields, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(json_record(record), ensure_ascii=False, default=str)


# Control characters (line breaks, ESC) in a logged value: shown escaped, one line per event;
# so are the bidirectional overrides and isolates, which show a line's text in another order.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class TextFormatter(logging.Formatter):
    """Plain lines: values from the API (a generation id, an error message) are shown with
    their control characters escaped, so one cannot forge a line ("\\n... INFO done job=x") or
    colour a terminal; a traceback (-v) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): one line, no colours."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def formatter(kind: LogFormat) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    return TextFormatter(TEXT_FORMAT, TEXT_DATEFMT)
