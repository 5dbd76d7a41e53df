"""Compose YAML into plain Python values while remembering where each one was written.

PyYAML's constructors drop positions and silently keep the last of two duplicate keys. The
manifest loader needs positions to point at the line a user must fix, and must refuse duplicates,
so values are built here from the composed node tree (safe tags only) with a map from each
value's path, like ``("jobs", 3, "duration")``, to its 1-based line and column.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from yaml.error import Mark
from yaml.events import CollectionEndEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import Reader
from yaml.tokens import BlockEntryToken

Path = tuple[Hashable, ...]

# Aliases may expand exponentially ("billion laughs": an anchor of ten aliases to an anchor of
# ten aliases...), or a large anchor may be aliased many times. The values a document expands
# to are counted on its composed nodes, before any is built, and refused past a budget that
# grows with its text: max(MIN_ALIAS_BUDGET, ALIAS_VALUES_PER_CHAR * characters). Written out,
# a value takes at least two characters ("x,"), so a manifest without aliases holds at most
# half a value per character. Ordinary reuse stays well under one: a job that merges a shared
# anchor ('- <<: *base' plus its own prompt, 30 characters or more) takes in at most the ~40
# values a job can hold (its dozen fields, an image list, a matrix), and the README's pattern
# (a 6-field base, an id and a prompt, ~85 characters a job) expands to 0.12 per character.
# Two per character leaves realistic reuse room to spare, while an expanded document stays
# within about four times what a manifest of the same size written out may hold.
MIN_ALIAS_BUDGET = 100_000
ALIAS_VALUES_PER_CHAR = 2
# libyaml's composer recurses in C without a limit: tens of thousands of nested '[' overflow
# the C stack and kill the process. Documents that could nest deeper than this are composed by
# the pure-Python parser, whose RecursionError becomes a clean "nested too deeply" error.
MAX_C_DEPTH = 1_000

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_VALUE_TAG = "tag:yaml.org,2002:value"
_SKIP = object()  # a mapping key that could not be used


class Pos(NamedTuple):
    """A 1-based line and column (a tuple: a manifest has two for every value it holds)."""

    line: int
    column: int


START = Pos(1, 1)

# YAML 1.1 also breaks lines at U+0085, U+2028 and U+2029; editors and YAML 1.2 do not.
_ODD_BREAKS = ("\x85", "\u2028", "\u2029")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # as editors (and YAML) count lines
_SURROGATE = re.compile("[\ud800-\udfff]")
# Only a \u or \U escape in a double-quoted scalar can make a surrogate: a document without
# one needs no scalar checked.
SURROGATE_ESCAPE = re.compile(r"\\(?:u|U0000)[dD][89a-fA-F]")


class _Lines:
    """The text a loader reads, and where each of its lines starts."""

    def __init__(self, text: str) -> None:
        self.text = text
        # A mark's own line and column are the editor's: the loader never sees U+0085, U+2028
        # or U+2029 (see _hide_odd_breaks), the only breaks YAML 1.1 and editors count apart.
        self.pos = _pos

    @functools.cached_property
    def starts(self) -> list[int]:
        """The offset at which each line starts."""
        pattern = _LINE_BREAK if "\r" in self.text else re.compile("\n")
        return [0, *(m.end() for m in pattern.finditer(self.text))]

    def line(self, n: int) -> str:
        """Line ``n`` (1-based, as :attr:`starts` counts them), without its line break."""
        starts = self.starts
        stop = starts[n] if n < len(starts) else len(self.text)
        return self.text[starts[n - 1] : stop].rstrip("\r\n")


def _pos(mark: Mark | None) -> Pos:
    return Pos(mark.line + 1, mark.column + 1) if mark is not None else START


def editor_lines(text: str) -> list[str]:
    """The lines of ``text`` as an editor numbers them (``str.splitlines`` also splits at
    U+2028 and friends)."""
    return _LINE_BREAK.split(text)


def join_surrogates(text: str) -> tuple[str, int | None]:
    """Join UTF-16 surrogate pairs (what JSON-style ``\\ud83d\\ude00`` escapes give) into their
    character; an unpaired one becomes U+FFFD and its code is returned, to be reported."""
    if not _SURROGATE.search(text):
        return text, None
    data = text.encode("utf-16-le", "surrogatepass")
    try:
        return data.decode("utf-16-le"), None
    except UnicodeDecodeError as exc:
        lone = int.from_bytes(data[exc.start : exc.start + 2], "little")
        return data.decode("utf-16-le", "replace"), lone


def surrogate_message(code: int) -> str:
    return (
        f"\\u{code:04x} is half of a UTF-16 surrogate pair, not a character; write the "
        "character itself, or escape both halves (e.g. \\ud83d\\ude00)"
    )


@dataclass(frozen=True)
class Issue:
    """Something wrong in the YAML structure itself (duplicate key, unsupported tag...)."""

    path: Path
    pos: Pos
    message: str


class YamlSyntaxError(Exception):
    """The text is not one YAML document, or not one that may be built: nothing is built."""

    def __init__(
        self,
        message: str,
        pos: Pos | None,
        path: Path = (),
        ids: dict[Path, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.path = path  # the value it is about, when known (an alias past the budget)
        # How the mappings on the way to ``path`` name themselves with an 'id' key (a job's id).
        self.ids = ids or {}


@dataclass
class SourceMap:
    """Where each value, mapping key and block-sequence dash of a document was written."""

    values: dict[Path, Pos] = field(default_factory=dict)
    keys: dict[Path, Pos] = field(default_factory=dict)
    items: dict[Path, Pos] = field(default_factory=dict)  # the "- " of a block sequence item
    plain: dict[Path, str] = field(default_factory=dict)  # source text of unquoted scalars
    # An unquoted value's comment on its own last line: '#' may have been meant as text.
    comments: dict[Path, str] = field(default_factory=dict)
    # The lines an unquoted value went on to (line, text): a key missing its ':' lands there.
    folded: dict[Path, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    # A scalar's anchor that no alias uses: '&' may have been meant as the start of its text.
    unused_anchors: dict[Path, str] = field(default_factory=dict)
    bad: set[Path] = field(default_factory=set)  # values already reported as issues

    def value(self, path: Path) -> Pos:
        """The value at ``path``, else its key, else the nearest enclosing value."""
        for end in range(len(path), -1, -1):
            hit = self.values.get(path[:end]) or self.keys.get(path[:end])
            if hit is not None:
                return hit
        return START

    def key(self, path: Path) -> Pos:
        return self.keys.get(path) or self.value(path)

    def item(self, path: Path) -> Pos:
        return self.items.get(path) or self.value(path)


@dataclass(frozen=True)
class Document:
    data: Any  # None for an empty document
    source: SourceMap
    issues: tuple[Issue, ...]
    empty: bool


NON_PRINTABLE = Reader.NON_PRINTABLE
_DASH_THEN_COMMENT = re.compile(r"^(\s*)-\s+#")
_ANCHOR = re.compile(r"&([^\s,\[\]{}]+)")


def _used_as_alias(name: str, text: str) -> bool:
    """Is there a '*name' alias, the whole name (not '*heroic' for 'hero')? Text that only
    looks like one inside a quoted value counts too: then nothing is refused."""
    return (
        re.search(rf"(?:^|[\s,\[{{:-])\*{re.escape(name)}(?=[\s,\]}}]|$)", text, re.M) is not None
    )


# YAML's non-specific tag: '! big bang' is the text 'big bang'.
_LONE_TAG = re.compile(r"(?:&[^\s,\[\]{}]+\s+)?!(?=\s)")


def _name(path: Path) -> str:
    """How a message names the value at ``path``: its key ('prompt'), else 'value' (an item)."""
    return path[-1] if path and isinstance(path[-1], str) else "value"


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:39] + "…"


_ALIAS_ITEM = re.compile(r"(?:\s|#[^\r\n]*)*(-)(?:\s|#[^\r\n]*)+\*[^\s,\[\]{}]+")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also remembers the dash of each block-sequence item.

    The composed node of an item starts at its content, which may sit on a later line than the
    dash; a job is "at" its dash.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines = _Lines(stream)
        self.dashes: dict[tuple[int, int], Mark] = {}  # (id(sequence node), index) -> mark

    def parse_block_sequence_entry(self) -> Any:
        return self._note_dash(super().parse_block_sequence_entry)

    def parse_indentless_sequence_entry(self) -> Any:
        return self._note_dash(super().parse_indentless_sequence_entry)

    def _note_dash(self, parse: Callable[[], Any]) -> Any:
        # PyYAML's stubs leave the parser's token API untyped.
        at_dash = self.check_token(BlockEntryToken)
        token = self.peek_token() if at_dash else None  # type: ignore[no-untyped-call]
        event = parse()
        if token is not None:
            event.dash_mark = token.start_mark
        return event

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        dash = getattr(self.peek_event(), "dash_mark", None)  # type: ignore[no-untyped-call]
        node = super().compose_node(parent, index)
        if dash is not None and parent is not None:
            self.dashes[(id(parent), index)] = dash
        return node

    def dash(self, node: SequenceNode, index: int) -> Mark | None:
        """The mark of the '-' before item ``index`` of ``node``, if it had one."""
        return self.dashes.get((id(node), index))


_CLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FastLoader(_CLoader):  # type: ignore[misc,valid-type]
    """libyaml's parser, about ten times faster on large manifests. It offers no hook for the
    dash of a sequence item, so those are found in the text: the '-' before each item."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines = _Lines(stream)
        self.dashes = _DashFinder(self.lines)
        self._ends: dict[int, int] = {}  # id(sequence node) -> where its last item asked ended

    def dash(self, node: SequenceNode, index: int) -> Mark | None:
        """The mark of the '-' before item ``index`` of ``node``, if it had one (asked in order)."""
        if node.flow_style is True:
            return None
        item = node.value[index]
        floor = self._ends.get(id(node), node.start_mark.index) if index else node.start_mark.index
        if item.start_mark.index >= floor:
            self._ends[id(node)] = item.end_mark.index
            return self.dashes.for_item(item)
        # An alias: its node is where the anchor was written, before this item.
        mark, self._ends[id(node)] = self.dashes.alias_after(floor)
        return mark


class _DashFinder:
    """Maps (sequence node, index) to the mark of the item's dash, read off the source."""

    def __init__(self, lines: _Lines) -> None:
        self._text = lines.text
        self._line_starts = lines.starts

    def for_item(self, item: Node) -> Mark | None:
        """The '-' before ``item``: on its line, or alone on an earlier line (comments between)."""
        text, starts = self._text, self._line_starts
        line = bisect.bisect_right(starts, item.start_mark.index) - 1
        prefix = text[starts[line] : item.start_mark.index]
        while True:
            stripped = prefix.rstrip()
            if stripped:
                if stripped.endswith("-") and (len(stripped) == 1 or stripped[-2] in " \t"):
                    return self._mark(line, len(stripped) - 1)
                lone = _DASH_THEN_COMMENT.match(prefix)
                return self._mark(line, len(lone.group(1))) if lone else None
            line -= 1
            if line < 0:
                return None
            prefix = text[starts[line] : starts[line + 1] - 1]
            if prefix.lstrip().startswith("#"):
                prefix = ""

    def alias_after(self, offset: int) -> tuple[Mark | None, int]:
        """The '-' of a ``- *name`` item starting at ``offset``, and where the item ends."""
        found = _ALIAS_ITEM.match(self._text, offset)
        if found is None:
            return None, offset
        line = bisect.bisect_right(self._line_starts, found.start(1)) - 1
        return self._mark(line, found.start(1) - self._line_starts[line]), found.end()

    def _mark(self, line: int, column: int) -> Mark:
        return Mark("<manifest>", self._line_starts[line] + column, line, column, "", 0)


def compose(text: str) -> Document:
    """Build plain values from one YAML document, with positions; raise on a syntax error."""
    text, back = _hide_odd_breaks(text)
    fast = _FastLoader is not yaml.SafeLoader and not NON_PRINTABLE.search(text)
    if fast and not _may_nest_deeper(text, MAX_C_DEPTH):
        try:
            return _compose_with(_FastLoader, text, back)
        except YamlSyntaxError:
            pass  # let the pure-Python parser word the error, as the tests and users expect
    return _compose_with(_Loader, text, back)


_ESCAPED_CODE = re.compile(r"\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})")


def _hide_odd_breaks(text: str) -> tuple[str, dict[int, str]]:
    """U+0085, U+2028 and U+2029 swapped for private-use characters the text does not hold.

    YAML 1.1's parsers break lines at them, which editors and YAML 1.2 do not: a prompt pasted
    with one folded it to a space inside quotes, or ended a plain prompt with an error blamed on
    the next field. Hidden, each is an ordinary character, as written; ``back`` restores it in
    every string the document yields.
    """
    odd = [c for c in _ODD_BREAKS if c in text]
    if not odd:
        return text, {}
    # Nor one a double-quoted escape makes ("\ue000"): that one must come out as written.
    escaped = {int(m[1] or m[2], 16) for m in _ESCAPED_CODE.finditer(text)}
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text and c not in escaped)
    stand_ins = dict(zip(odd, free, strict=False))
    return text.translate({ord(c): s for c, s in stand_ins.items()}), {
        ord(s): c for c, s in stand_ins.items()
    }


# Block collections nest only with a column each (two levels may share one: an indentless
# sequence), so only a line starting with this many indentation characters, indicators, anchors
# or tags may hold block nesting deeper than MAX_C_DEPTH.
_DEEP_BLOCK = re.compile(r"(?:[ \t?:-]|[&!][^ \t\r\n]*+)" + f"{{{MAX_C_DEPTH // 2}}}")
_DEEP_BLOCK_LINE = re.compile("[\r\n\x85\u2028\u2029]" + _DEEP_BLOCK.pattern)
_DEEP_BLOCK_LF = re.compile("\n" + _DEEP_BLOCK.pattern)  # a literal start is searched faster


def _may_nest_deeper(text: str, limit: int) -> bool:
    """Whether collections in ``text`` may nest more than ``limit`` levels deep.

    Two cheap bounds settle nearly every manifest: flow nesting needs a '[' or '{' per level,
    block nesting a column per level. Only past them are the parser's events counted.
    """
    flow = text.count("[") + text.count("{")
    only_lf = not any(br in text for br in ("\r", *_ODD_BREAKS))
    lines = _DEEP_BLOCK_LF if only_lf else _DEEP_BLOCK_LINE
    if flow <= limit // 2 and not _DEEP_BLOCK.match(text) and not lines.search(text):
        return False
    return _deeper_than(text, limit)


def _deeper_than(text: str, limit: int) -> bool:
    """Count nesting in libyaml's event stream (its parser, unlike its composer, is iterative)."""
    parser = _CLoader(text)
    depth = 0
    try:
        while parser.check_event():
            event = parser.get_event()
            if isinstance(event, CollectionStartEvent):
                depth += 1
                if depth > limit:
                    return True
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return True  # the pure-Python parser words syntax errors anyway
    finally:
        parser.dispose()
    return False


def _compose_with(
    loader_class: type[_Loader | _FastLoader], text: str, back: dict[int, str] | None = None
) -> Document:
    try:
        loader = loader_class(text)
    except yaml.reader.ReaderError as exc:
        raise YamlSyntaxError(_reader_message(exc), _offset_pos(text, exc.position)) from exc
    lines = loader.lines
    try:
        root = loader.get_single_node()
        if root is not None and "*" in text:  # no '*', no alias
            _check_expansion(root, alias_budget(len(text)), lines)
        builder = _Builder(loader, back)
        data = builder.build(root, ()) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlSyntaxError(_syntax_message(exc, lines), _syntax_pos(exc, lines)) from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", None) from exc
    except RecursionError as exc:
        raise YamlSyntaxError("invalid YAML: the document is nested too deeply", None) from exc
    finally:
        loader.dispose()
    issues = tuple(dict.fromkeys(builder.issues))
    return Document(data, builder.source, issues, empty=root is None)


def _syntax_message(exc: yaml.MarkedYAMLError, lines: _Lines) -> str:
    parts = []
    if exc.context:
        context = exc.context
        start, end = exc.context_mark, exc.problem_mark
        start_line = lines.pos(start).line
        if start is not None and (end is None or start_line != lines.pos(end).line):
            context += f" (started at line {start_line})"
        parts.append(context)
    if exc.problem:
        parts.append(exc.problem)
    return "invalid YAML: " + ", ".join(parts) + _syntax_hint(exc, lines)


# What a user most likely did, for the parser's messages that do not say it.
_TOKEN_START = re.compile(r"found character '(.+)' that cannot start any token")


def _syntax_hint(exc: yaml.MarkedYAMLError, lines: _Lines) -> str:
    problem, context = exc.problem or "", exc.context or ""
    if _no_colon(exc):
        return " (a line with no ':' after its key: write 'key: value')"
    if problem == "mapping values are not allowed here":
        if _indented_deeper(exc.problem_mark, lines):
            return " (this line is indented deeper than the one before it: line up the keys)"
        return " (a value containing ': ' must be quoted)"
    if (found := _TOKEN_START.search(problem)) is not None:
        char = found.group(1)
        if char == "\\t":
            return " (indent with spaces: YAML does not allow tabs there)"
        return f" (a value that starts with {char!r} must be quoted)"
    if "a tag" in context or problem.startswith("found undefined tag handle"):
        return " (a value that starts with '!' must be quoted)"
    if context in ("while scanning an alias", "while scanning an anchor"):
        sign = "*" if "alias" in context else "&"
        return f" (a value that starts with {sign!r} must be quoted)"
    if problem.startswith("expected <block end>, but found '<scalar>'"):
        return " (a value that starts with a quote, '[' or '{' must be quoted whole)"
    return ""


def _no_colon(exc: yaml.MarkedYAMLError) -> bool:
    return exc.context == "while scanning a simple key" and exc.context_mark is not None


def _indented_deeper(mark: Mark | None, lines: _Lines) -> bool:
    """Whether the line of ``mark`` starts deeper than the last non-blank line before it."""
    if mark is None:
        return False
    line = lines.pos(mark).line
    if not 2 <= line <= len(lines.starts):
        return False

    def indent(n: int) -> int | None:
        row = lines.line(n)
        body = row.lstrip(" ")
        return None if not body or body.startswith("#") else len(row) - len(body.lstrip("- "))

    here = indent(line)
    before = next((i for n in range(line - 1, 0, -1) if (i := indent(n)) is not None), None)
    return here is not None and before is not None and here > before


def _syntax_pos(exc: yaml.MarkedYAMLError, lines: _Lines) -> Pos | None:
    # A key without its ':' is found only at the next line: point at the key itself.
    mark = exc.context_mark if _no_colon(exc) else exc.problem_mark or exc.context_mark
    return lines.pos(mark) if mark is not None else None


def _reader_message(exc: yaml.reader.ReaderError) -> str:
    code = exc.character if isinstance(exc.character, int) else 0
    return f"invalid YAML: the character U+{code:04X} is not allowed in a YAML file"


def _offset_pos(text: str, offset: int) -> Pos:
    line_start = text.rfind("\n", 0, offset) + 1
    return Pos(text.count("\n", 0, offset) + 1, offset - line_start + 1)


def alias_budget(characters: int) -> int:
    """How many values a document of this many characters may expand to, aliases repeated."""
    return max(MIN_ALIAS_BUDGET, ALIAS_VALUES_PER_CHAR * characters)


def _built(node: Node) -> list[Node]:
    """The nodes :class:`_Builder` builds under ``node``: a mapping's values and the mappings
    it merges, a sequence's items."""
    if isinstance(node, SequenceNode):
        return node.value  # type: ignore[no-any-return]
    if not isinstance(node, MappingNode):
        return []
    return [n for _, _, n in _named(node)]


def _named(node: Node) -> list[tuple[Hashable, Mark | None, Node]]:
    """:func:`_built`, each with its key (or index) and the mark of that key."""
    if isinstance(node, SequenceNode):
        return [(index, None, item) for index, item in enumerate(node.value)]
    if not isinstance(node, MappingNode):
        return []
    named: list[tuple[Hashable, Mark | None, Node]] = []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            named.append((key.value if isinstance(key, ScalarNode) else "?", key.start_mark, value))
            continue
        sources = value.value if isinstance(value, SequenceNode) else [value]
        named += (("<<", key.start_mark, s) for s in sources if isinstance(s, MappingNode))
    return named


# A step down a document: from a collection, by a key (or index) written at a mark, to a value.
_Step = tuple[Node, Hashable, Mark | None, Node]


class _Expansion:
    """How many values each collection of a composed document expands to, aliases repeated,
    and how many places refer to it (more than one: an anchor that an alias repeats).

    Each node is counted once, without recursion: a bomb has few nodes and countless paths.
    An alias to a value that holds it (a cycle) stops the count: ``cycle`` is (the value the
    alias is in, the value it refers to).
    """

    def __init__(self, root: Node) -> None:
        sizes: dict[int, int] = {}
        refs: dict[int, int] = {}
        self.cycle: tuple[Node, Node] | None = None
        open_: set[int] = set()  # the values holding the one counted
        stack: list[tuple[Node, list[Node] | None]] = [(root, None)]
        while stack and self.cycle is None:
            node, children = stack.pop()
            if children is not None:
                open_.discard(id(node))
                sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            elif id(node) not in sizes:
                open_.add(id(node))
                children = _built(node)
                stack.append((node, children))
                for child in reversed(children):  # in the order written: the first cycle found
                    if isinstance(child, ScalarNode):
                        continue
                    if id(child) in open_:
                        self.cycle = (node, child)
                    refs[id(child)] = refs.get(id(child), 0) + 1
                    stack.append((child, None))
        self._sizes, self._refs = sizes, refs

    def size(self, node: Node) -> int:
        return self._sizes.get(id(node), 1)

    def largest_alias(self, root: Node) -> list[_Step]:
        """The way down the largest values to the first one an alias repeats."""
        steps: list[_Step] = []
        node = root
        while children := _named(node):
            key, key_mark, child = max(children, key=lambda c: self.size(c[2]))
            steps.append((node, key, key_mark, child))
            if self._refs.get(id(child), 0) > 1:
                break
            node = child
        return steps


def _way_to(root: Node, parent: Node, child: Node) -> list[_Step]:
    """The first way down from ``root`` (in the order written) to ``child`` in ``parent``."""
    back: dict[int, _Step | None] = {}  # how each node was first reached
    stack: list[tuple[Node, _Step | None]] = [(root, None)]
    while stack and id(parent) not in back:
        node, step = stack.pop()
        if id(node) not in back:
            back[id(node)] = step
            stack += ((c, (node, k, m, c)) for k, m, c in reversed(_named(node)))
    key, key_mark, _ = next(step for step in _named(parent) if step[2] is child)
    steps: list[_Step] = [(parent, key, key_mark, child)]
    while (up := back[id(steps[0][0])]) is not None:
        steps.insert(0, up)
    return steps


def _where(root: Node, steps: list[_Step]) -> tuple[Path, Mark, dict[Path, str]]:
    """The path of the last step's value, where to point at (the nearest key written, or the
    item itself unless the last step is an alias: that node is where its anchor was) and the
    'id' of each mapping on the way, which is how a job names itself."""
    path: Path = ()
    mark = root.start_mark
    ids: dict[Path, str] = {}
    for index, (node, key, key_mark, child) in enumerate(steps):
        named = next((v for k, _, v in _named(node) if k == "id"), None)
        if isinstance(named, ScalarNode):
            ids[path] = named.value
        path = (*path, key)
        last = index == len(steps) - 1
        mark = key_mark or (mark if last else child.start_mark)
    return path, mark, ids


def _check_expansion(root: Node, budget: int, lines: _Lines) -> None:
    """Refuse a document with an alias cycle, or whose aliases expand past ``budget`` values,
    before building any of it."""
    expansion = _Expansion(root)
    if expansion.cycle is not None:
        path, mark, ids = _where(root, _way_to(root, *expansion.cycle))
        message = (
            "this alias refers to a value that holds it, which would repeat without end; "
            "refer to another anchor"
        )
        raise YamlSyntaxError(message, lines.pos(mark), path, ids)
    total = expansion.size(root)
    if total <= budget:
        return
    steps = expansion.largest_alias(root)
    path, mark, ids = _where(root, steps)
    node = steps[-1][3] if steps else root
    # Ten times its own values or more: aliases inside an anchor, repeated by aliases again.
    multiplies = expansion.size(node) >= 10 * _distinct(node)
    message = _limit_message(total, budget, expansion.size(node), multiplies=multiplies)
    raise YamlSyntaxError(message, lines.pos(mark), path, ids)


def _distinct(node: Node) -> int:
    """How many nodes there are under ``node``, each counted once however often repeated."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        top = stack.pop()
        if id(top) not in seen:
            seen.add(id(top))
            stack += _built(top)
    return len(seen)


def _limit_message(total: int, budget: int, largest: int, *, multiplies: bool) -> str:
    """Say it is a limit, what the alias it names does, and what to do."""
    limit = (
        f"{budget:,} for a manifest of this size ({ALIAS_VALUES_PER_CHAR} per character, at "
        f"least {MIN_ALIAS_BUDGET:,})"
    )
    if multiplies:
        return (
            f"this alias expands to {largest:,} values, and the manifest's aliases to {total:,}, "
            f"past the limit of {limit}: its anchor holds aliases to anchors that hold aliases, "
            "each repeating the next (a 'billion laughs'); write the values out instead"
        )
    return (
        f"the aliases of this manifest expand it to {total:,} values, past the limit of {limit}; "
        f"each alias repeats all its anchor's values (here, {largest:,}): split the manifest, or "
        "put fewer values in the anchors"
    )


class _Builder:
    """Walks composed nodes into dicts, lists and scalars, recording positions on the way."""

    def __init__(self, loader: _Loader | _FastLoader, back: dict[int, str] | None = None) -> None:
        self.loader = loader
        self._pos = loader.lines.pos
        self._back = back or {}  # hidden line separators to restore (see _hide_odd_breaks)
        self._escapes = bool(self._back) or SURROGATE_ESCAPE.search(loader.lines.text) is not None
        self._comments = "#" in loader.lines.text  # else no value can be followed by one
        self.source = SourceMap()
        self.issues: list[Issue] = []

    def issue(self, path: Path, pos: Pos, message: str, *, bad: bool = True) -> None:
        """Record an issue; ``bad`` marks the value so later checks do not report it again."""
        self.issues.append(Issue(path, pos, message))
        if bad:
            self.source.bad.add(path)

    def build(self, node: Node, path: Path) -> Any:
        """The value of ``node``; an alias builds its anchor's value again (a copy of its own:
        jobs merging one anchor must not share a list), counted beforehand by _check_expansion
        so this never loops or runs away."""
        self.source.values.setdefault(path, self._pos(node.start_mark))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode):
            return self._sequence(node, path)
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        return None

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        text = self.loader.lines.text
        start = node.start_mark.index
        if text.startswith(("&", "!"), start):  # a node's mark is at its anchor or tag
            anchor = _ANCHOR.match(text, start)
            if anchor is not None and not _used_as_alias(anchor[1], text):
                self.source.unused_anchors.setdefault(path, anchor[0])
            if node.tag == _STR_TAG and node.value and _LONE_TAG.match(text, start):
                name = _name(path)
                message = (
                    f"YAML reads the '!' as a tag, not as text, so the {name} would start at "
                    f"{_short(node.value)!r}; quote the whole {name} to keep the '!'"
                )
                self.issue(path, self._pos(node.start_mark), message)
        if not node.style:  # libyaml says "" where the pure-Python parser says None
            self.source.plain.setdefault(path, node.value)
            if node.end_mark.line != node.start_mark.line:
                self._note_folded(node, path)
            if self._comments:
                self._note_comment(node.end_mark.index, path)
        if node.tag == _STR_TAG:  # most values: what the constructor would return, directly
            return self._text(node, path) if self._escapes else node.value
        if node.tag not in type(self.loader).yaml_constructors:
            message = f"unsupported YAML tag {node.tag!r}"
            if node.tag == _VALUE_TAG:  # a bare '=': YAML 1.1's "value key", not text
                message = (
                    f"YAML 1.1 reads a bare '=' as a special key, not as text; quote it "
                    f"(\"=\") to send '=' as the {_name(path)}"
                )
            elif node.tag.startswith("!") and self._reads_as_text(node):  # '!wow great' as text
                message += (
                    f" (YAML reads a value that starts with '!' as a tag; quote the whole "
                    f"{_name(path)} to keep it as text)"
                )
            self.issue(path, self._pos(node.start_mark), message)
            return self._text(node, path)
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            # A failed construction stays marked "in progress"; clear it for the next alias use.
            self.loader.recursive_objects.pop(node, None)
            reason = getattr(exc, "problem", None) or str(exc)
            message = f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {reason}"
            self.issue(path, self._pos(node.start_mark), message)
            return self._text(node, path)

    def _reads_as_text(self, node: ScalarNode) -> bool:
        """Would the scalar be text without its tag (not a number, a boolean...), or is the tag
        all there is ('prompt: !Boom')?"""
        if not node.value:
            return True
        return bool(self.loader.resolve(ScalarNode, node.value, (True, False)) == _STR_TAG)

    def _note_comment(self, end: int, path: Path) -> None:
        text = self.loader.lines.text
        stop = text.find("\n", end)
        rest = text[end : len(text) if stop < 0 else stop].strip(" \t\r")
        if rest.startswith("#"):
            self.source.comments.setdefault(path, rest)

    def _note_folded(self, node: ScalarNode, path: Path) -> None:
        lines = self.loader.lines
        first, last = lines.pos(node.start_mark).line, lines.pos(node.end_mark).line
        rows = tuple((n, lines.line(n)) for n in range(first + 1, min(last, len(lines.starts)) + 1))
        self.source.folded.setdefault(path, rows)

    def _text(self, node: ScalarNode, path: Path) -> str:
        """The scalar's text with surrogate pairs joined; an unpaired surrogate is reported."""
        text, lone = join_surrogates(node.value.translate(self._back))
        if lone is not None:
            self.issue(path, self._pos(node.start_mark), surrogate_message(lone))
        return text

    def _sequence(self, node: SequenceNode, path: Path) -> list[Any]:
        self._check_tag(node, _SEQ_TAG, path)
        result = []
        for index, child in enumerate(node.value):
            dash = self.loader.dash(node, index)
            if dash is not None:
                self.source.items.setdefault((*path, index), self._pos(dash))
            result.append(self.build(child, (*path, index)))
        return result

    def _mapping(self, node: MappingNode, path: Path) -> dict[Any, Any]:
        self._check_tag(node, _MAP_TAG, path)
        result: dict[Any, Any] = {}
        merges: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if merges:  # YAML tools disagree on which wins: say what is meant instead
                    first = self._pos(merges[0][0].start_mark).line
                    message = (
                        f"a second merge key '<<' (the first at line {first}); merge several"
                        " mappings with one: '<<: [*first, *second]' (the first listed wins)"
                    )
                    self.issue(path, self._pos(key_node.start_mark), message, bad=False)
                    continue
                merges.append((key_node, value_node))
                continue
            key = self._key(key_node, path)
            if key is _SKIP:
                continue
            sub = (*path, key)
            if key in result:
                first = self.source.keys[sub].line
                message = f"duplicate key {key!r} (first at line {first}); keep only one"
                self.issue(sub, self._pos(key_node.start_mark), message, bad=False)
                continue
            self.source.keys.setdefault(sub, self._pos(key_node.start_mark))
            result[key] = self.build(value_node, sub)
        for _, merge in merges:
            self._merge(merge, path, result)
        return result

    def _key(self, node: Node, path: Path) -> Any:
        if not isinstance(node, ScalarNode):
            self.issue(path, self._pos(node.start_mark), "a mapping key must be a plain value")
            return _SKIP
        if node.tag == _STR_TAG:
            if not self._escapes:
                return node.value
            key, lone = join_surrogates(node.value.translate(self._back))
            if lone is not None:
                message = f"this key is not usable: {surrogate_message(lone)}"
                self.issue((*path, key), self._pos(node.start_mark), message)
                return _SKIP
            return key
        try:
            key = self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError):
            key = node.value
        return key if isinstance(key, Hashable) else node.value

    def _merge(self, node: Node, path: Path, result: dict[Any, Any]) -> None:
        """Apply a ``<<`` merge: explicit keys win, then earlier merged mappings."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                message = "a merge key '<<' needs a mapping or a list of mappings"
                self.issue(path, self._pos(source.start_mark), message, bad=False)
                continue
            for key, value in self.build(source, path).items():
                result.setdefault(key, value)

    def _check_tag(self, node: Node, expected: str, path: Path) -> None:
        if node.tag != expected:
            self.issue(path, self._pos(node.start_mark), f"unsupported YAML tag {node.tag!r}")
