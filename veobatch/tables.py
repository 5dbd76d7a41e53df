"""Jobs kept in a spreadsheet: rows of a CSV or JSON Lines file become job mappings.

Pure: text in, rows out, with the line and column of every cell so the manifest validator
points at the exact cell to fix. Typing is by field: CSV cells are text, so the integer,
boolean and list fields of the catalogue are converted here; a cell that does not convert is
left as text for the validator to reject with its usual message. An empty cell means "not
set", so `defaults` apply. Columns whose name starts with '#' are notes and are ignored.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .catalogue import MODELS
from .errors import Problem
from .manifest_checks import DATA_URI_MAX_BYTES
from .yamlpos import (
    SURROGATE_ESCAPE,
    Issue,
    Pos,
    SourceMap,
    editor_lines,
    join_surrogates,
    surrogate_message,
)
from .yamlpos import Path as KeyPath

TABLE_SUFFIXES = (".csv", ".jsonl")
# A name's type is the same in every model that has it (checked by tests).
FIELD_TYPES: dict[str, str] = {
    name: spec.type for m in MODELS.values() for name, spec in m.fields.items()
}
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")
# int() also takes "1_000" and other scripts' digits ("٨"); a cell must read the same to a person.
_ASCII_INT = re.compile(r"[-+]?[0-9]+")
# A cell may hold a whole data: URI; the csv module's default limit (131,072) is far smaller.
# The limit is process-wide: raised once, here.
_CELL_MAX_CHARS = DATA_URI_MAX_BYTES + 1024
csv.field_size_limit(max(csv.field_size_limit(), _CELL_MAX_CHARS))


class _BadRecord(Exception):
    """A CSV record the reader refused, with the lines it spans."""

    def __init__(self, message: str, start: int, end: int) -> None:
        super().__init__(message)
        self.start, self.end = start, end


@dataclass
class Table:
    """Rows as job mappings, positioned as if they were ``jobs[i]`` of a document."""

    file: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    source: SourceMap = field(default_factory=SourceMap)
    problems: list[Problem] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # problems of a row's value, by path


def read_table(text: str, file: str) -> Table:
    if file.lower().endswith(".jsonl"):
        return _read_jsonl(text, file)
    return _read_csv(text, file)


def convert_cell(name: str, cell: str) -> Any:
    """A CSV cell as the field's type, or the text itself when it does not convert."""
    kind = FIELD_TYPES.get(name)
    text = cell.strip()
    if name in ("variants",) or kind == "integer":
        return int(text) if _ASCII_INT.fullmatch(text) else cell
    if kind == "boolean":
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else cell
    if kind == "image_list":
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return cell
            return items if isinstance(items, list) else cell
        return [part.strip() for part in text.split("|") if part.strip()]
    if kind == "image":
        return text
    return cell


def _cell_starts(lines: list[str], first: int) -> list[Pos]:
    """Where each cell of a CSV record starts (quotes respected), the record on ``lines``
    from line ``first``: a quoted cell may run over several lines."""
    starts, quoted = [Pos(first, 1)], False
    for offset, line in enumerate(lines):
        for i, c in enumerate(line):
            if c == '"':
                quoted = not quoted
            elif c == "," and not quoted:
                starts.append(Pos(first + offset, i + 2))
    return starts


def _records(text: str) -> Iterator[tuple[int, list[str], list[Pos]]]:
    """(first line, cells, where each cell starts) per CSV record."""
    lines = editor_lines(text)
    # strict: an unclosed quote would otherwise swallow every later row into one cell.
    # newline="": a record may end in \n, \r\n or a lone \r (old Mac Excel), as csv asks.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    previous_end = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _BadRecord(str(exc), previous_end + 1, reader.line_num) from exc
        start, end = previous_end + 1, reader.line_num
        previous_end = end
        yield start, cells, _cell_starts(lines[start - 1 : end], start)


def _read_csv(text: str, file: str) -> Table:
    table = Table(file)
    records = _records(text)
    try:
        header_line, header, header_starts = next(records)
    except StopIteration:
        table.problems.append(Problem(file, "the file is empty: it needs a header row of fields"))
        return table
    except _BadRecord as exc:
        table.problems.append(_bad_record_problem(file, exc))
        return table
    names = [h.strip() for h in header]
    if len(names) == 1 and (sep := next((s for s in ";\t|" if s in names[0]), None)):
        shown = {"\t": "tabs", ";": "';'", "|": "'|'"}[sep]
        message = (
            f"the header row is one column, {names[0]!r}: the file seems to separate its cells"
            f" with {shown}; veobatch reads CSV with commas (save it as comma-separated)"
        )
        table.problems.append(Problem(file, message, header_line, 1))
        return table
    for i, name in enumerate(names):
        at = header_starts[i] if i < len(header_starts) else Pos(header_line, 1)
        if not name:
            message = f"column {i + 1} has no name in the header row"
            table.problems.append(Problem(file, message, at.line, at.column))
        elif names.index(name) != i:
            message = f"column {name!r} appears twice in the header row"
            table.problems.append(Problem(file, message, at.line, at.column))
    if table.problems:
        return table
    try:
        for line, cells, starts in records:
            if not any(c.strip() for c in cells):
                continue  # blank lines and rows of empty cells
            _csv_row(table, names, header_line, header_starts, line, cells, starts)
    except _BadRecord as exc:
        table.problems.append(_bad_record_problem(file, exc))
    return table


def _bad_record_problem(file: str, exc: _BadRecord) -> Problem:
    """Located at the record's first line, where an unclosed quote usually starts."""
    message = f"not a readable CSV file: {exc}"
    if exc.end > exc.start:
        message += (
            f" (the record starting here runs to line {exc.end}: is a quote not closed,"
            ' or a cell\'s own quotes not doubled ("")?)'
        )
    elif "expected after" in str(exc):
        message += ' (a quoted cell must end at its closing quote; write quotes inside as "")'
    return Problem(file, message, exc.start)


def _csv_row(
    table: Table,
    names: list[str],
    header_line: int,
    header_starts: list[Pos],
    line: int,
    cells: list[str],
    starts: list[Pos],
) -> None:
    index = len(table.rows)
    path: KeyPath = ("jobs", index)
    table.source.items[path] = Pos(line, 1)
    table.source.values[path] = Pos(line, 1)
    if len(cells) > len(names):
        extra = starts[len(names)] if len(starts) > len(names) else Pos(line, 1)
        message = f"this row has {len(cells)} cells but the header names {len(names)} columns"
        table.problems.append(
            Problem(table.file, message, extra.line, extra.column, f"row {index + 1}")
        )
    missing = [n for n in names[len(cells) :] if n.strip() and not n.startswith("#")]
    if missing:
        # Is a trailing cell unset, or was a cell in the middle left out and the rest moved
        # left? Only the writer knows, and the second sends a value to the wrong field.
        at = starts[-1] if starts else Pos(line, 1)
        message = (
            f"this row has {len(cells)} cells but the header names {len(names)} columns (none"
            f" for {', '.join(map(repr, missing))}): a cell left out moves the ones after it"
            " to the wrong column; write an empty cell (,,) for a field that is not set"
        )
        table.problems.append(Problem(table.file, message, at.line, at.column, f"row {index + 1}"))
    row: dict[str, Any] = {}
    for i, name in enumerate(names):
        if name.startswith("#") or i >= len(cells) or not cells[i].strip():
            continue
        row[name] = convert_cell(name, cells[i])
        at = starts[i] if i < len(starts) else Pos(line, 1)
        table.source.values[(*path, name)] = at
        if isinstance(row[name], list) and SURROGATE_ESCAPE.search(cells[i]):  # a JSON array
            row[name] = _checked_text(table, path, name, row[name], at)
        key_at = header_starts[i] if i < len(header_starts) else Pos(header_line, 1)
        table.source.keys[(*path, name)] = key_at
    table.rows.append(row)


def _checked_text(table: Table, path: KeyPath, name: str, value: Any, pos: Pos) -> Any:
    """``value`` with surrogate pairs joined; an unpaired surrogate is reported at ``pos``."""
    clean, lone = _join_all(value)
    if lone is not None:
        table.issues.append(Issue((*path, name), pos, surrogate_message(lone)))
        table.source.bad.add((*path, name))
    return clean


def _join_all(value: Any) -> tuple[Any, int | None]:
    """JSON data with surrogate pairs joined in every string, and the first unpaired one."""
    if isinstance(value, str):
        return join_surrogates(value)
    if isinstance(value, list):
        items = [_join_all(v) for v in value]
        return [v for v, _ in items], next((c for _, c in items if c is not None), None)
    if isinstance(value, dict):
        entries = [(_join_all(k), _join_all(v)) for k, v in value.items()]
        lone = next((c for kc, vc in entries for _, c in (kc, vc) if c is not None), None)
        return {k: v for (k, _), (v, _) in entries}, lone
    return value, None


def _read_jsonl(text: str, file: str) -> Table:
    table = Table(file)
    for number, raw in enumerate(editor_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            message = f"not valid JSON: {exc.msg}"
            table.problems.append(Problem(table.file, message, number, exc.colno))
            continue
        except _DuplicateKey as exc:
            message = f"duplicate key {exc.key!r}; keep only one"
            column = _key_column(raw, exc.key, 2)  # the second spelling is the duplicate
            table.problems.append(Problem(table.file, message, number, column))
            continue
        if not isinstance(row, dict):
            message = f"expected a JSON object per line (one job), got {type(row).__name__}"
            table.problems.append(Problem(table.file, message, number, 1))
            continue
        if SURROGATE_ESCAPE.search(raw):
            row = _checked_row(table, number, raw, row)
        path: KeyPath = ("jobs", len(table.rows))
        table.source.items[path] = Pos(number, 1)
        table.source.values[path] = Pos(number, 1)
        for name, value in row.items():
            key_col = _key_column(raw, name)
            table.source.keys[(*path, name)] = Pos(number, key_col)
            table.source.values[(*path, name)] = Pos(number, key_col)
            if isinstance(value, list):
                for i in range(len(value)):
                    table.source.values[(*path, name, i)] = Pos(number, key_col)
        table.rows.append(row)
    return table


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; json.loads alone keeps the last of two equal keys, silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _key_column(raw: str, key: str, nth: int = 1) -> int:
    """1-based column of the object's key ``key`` (its ``nth`` spelling) in a line of valid
    JSON; 1 when it is not found. Keys only: a value holding the same text is not one."""
    columns = _key_columns(raw).get(key, [])
    return columns[nth - 1] if len(columns) >= nth else 1


@functools.lru_cache(maxsize=4)
def _key_columns(raw: str) -> dict[str, list[int]]:
    """Each top-level key of a line of valid JSON, with the columns it is spelled at."""
    found: dict[str, list[int]] = {}
    for column, name in _top_keys(raw):
        found.setdefault(name, []).append(column)
    return found


_STRUCTURE = re.compile(r'["{}\[\]]')


def _top_keys(raw: str) -> Iterator[tuple[int, str]]:
    """(1-based column, decoded name) of each key of the line's top-level object. Strings are
    skipped with str.find, so a 4 MB data: URI costs one search, not a loop per character."""
    depth, i = 0, 0
    while (m := _STRUCTURE.search(raw, i)) is not None:
        i, c = m.start(), m[0]
        if c != '"':
            depth += 1 if c in "{[" else -1
            i += 1
            continue
        end = raw.find('"', i + 1)
        while _escaped(raw, end):  # the string goes on past an escaped quote
            end = raw.find('"', end + 1)
        after = end + 1
        while after < len(raw) and raw[after] in " \t\r":
            after += 1
        if depth == 1 and after < len(raw) and raw[after] == ":":
            yield i + 1, json.loads(raw[i : end + 1])
        i = end + 1


def _escaped(raw: str, at: int) -> bool:
    """Is the character at ``at`` escaped: an odd run of backslashes before it?"""
    k = at - 1
    while raw[k] == "\\":
        k -= 1
    return (at - 1 - k) % 2 == 1


def _checked_row(table: Table, number: int, raw: str, row: dict[str, Any]) -> dict[str, Any]:
    """A JSON object whose text has a surrogate escape: pairs joined, an unpaired one reported."""
    path: KeyPath = ("jobs", len(table.rows))
    out: dict[str, Any] = {}
    for name, value in row.items():
        key, lone = join_surrogates(name)
        pos = Pos(number, _key_column(raw, name))
        if lone is not None:
            _checked_text(table, path, key, name, pos)  # reports the key
            continue
        out[key] = _checked_text(table, path, key, value, pos)
    return out
