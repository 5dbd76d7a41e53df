"""The libyaml-backed composer must locate everything exactly as the pure-Python one does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from veobatch import yamlpos
from veobatch.yamlpos import (
    Pos,
    YamlSyntaxError,
    _compose_with,
    _FastLoader,
    _hide_odd_breaks,
    _Loader,
    compose,
)

ROOT = Path(__file__).resolve().parent.parent

DOCS = [
    (ROOT / "jobs" / "example.yaml").read_text(),
    (ROOT / "jobs" / "demo.yaml").read_text(),
    "version: 1\njobs:\n  # c\n  - model: m\n    prompt: a\n  -\n    # alone\n    model: m\n",
    "jobs:\n- a\n- - b\n  - c\n-   d  # comment\n- [e, f]\n- {g: 1}\n",
    "x: &anchor {a: 1}\ny: *anchor\nz: 'quoted'\nw: yes\nv: 16:9\nu: 2026-01-01\n",
    "jobs:\n  - id: a\n    image_urls:\n      - https://x/1.png\n      -   https://x/2.png\n",
    # Aliases as items: each is at its own dash, not at the anchor's.
    "a: &s\n  - 1\nb:\n  - &j {id: c}\n  - x\n  -   *j\n  - *s\n  - - *s\n    -\n      *j\n",
    "x: &k [1]\na:\n- *k\n-  # c\n  *k\n- b: *k\n",
    # Line breaks only YAML counts, and CR-only line ends.
    'a: "x\u2028y"\nb:\n  - "p\x85q"\n  - "r\u2029s"\n  - t\n',
    "a: 1\rb:\r  - x\r  - y\r",
    # An anchor no alias uses, on a plain, a quoted and a block scalar.
    "a: &x one two\nb: &y 'q'\nc: &z |\n  text\nd: &u used\ne: *u\n",
    # Tags: a lone '!' (dropped from the text), a local one, YAML's own.
    "a: ! big bang\nb: !wow great\nc: &q ! z\nd: !!str 8\ne: [! x, !y z]\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_fast_and_pure_python_composers_agree(text: str) -> None:
    if _FastLoader is _Loader.__mro__[1]:
        pytest.skip("libyaml is not available")
    text, back = _hide_odd_breaks(text)  # as compose() hands it over
    fast, pure = _compose_with(_FastLoader, text, back), _compose_with(_Loader, text, back)
    assert fast.data == pure.data
    assert fast.source.values == pure.source.values
    assert fast.source.keys == pure.source.keys
    assert fast.source.items == pure.source.items
    assert fast.source.plain == pure.source.plain
    assert fast.source.unused_anchors == pure.source.unused_anchors
    assert fast.issues == pure.issues


LOADERS = [_Loader, _FastLoader]


@pytest.mark.parametrize("odd", ["\u2028", "\u2029", "\x85"])
def test_odd_line_breaks_are_ordinary_characters_as_editors_read_them(odd: str) -> None:
    """YAML 1.1 also breaks lines at U+0085, U+2028 and U+2029; editors and YAML 1.2 do not."""
    text = f'a: "one{odd}two"\nb:\n  - x{odd}y\n  - {{c: 5}}\n# note{odd}d: 1\ne: |\n  p{odd}q\n'
    doc = compose(text)
    assert doc.data == {"a": f"one{odd}two", "b": [f"x{odd}y", {"c": 5}], "e": f"p{odd}q\n"}
    assert doc.source.values[("b", 1, "c")] == Pos(4, 9)
    assert doc.source.items[("b", 1)] == Pos(4, 3)
    assert doc.source.keys[("b",)] == Pos(2, 1)
    assert doc.source.keys[("e",)] == Pos(6, 1)


def test_a_stand_in_never_takes_the_place_of_an_escaped_character() -> None:
    # "\ue000" makes U+E000 without it being in the text: it must not be the stand-in that
    # the other value's U+2028 is restored from.
    doc = compose('a: "logo \\ue000 and \\U0000e001"\nb: "x\u2028y"\n')
    assert doc.data == {"a": "logo \ue000 and \ue001", "b": "x\u2028y"}


def test_syntax_errors_after_an_odd_line_break_name_the_editors_line() -> None:
    text = 'a: "x\u2028y"\nb: [1, 2\nc: 3\n'
    with pytest.raises(YamlSyntaxError) as err:
        compose(text)
    assert err.value.pos is not None and err.value.pos.line == 3
    assert "started at line 2" in err.value.message
    assert "\u2028" not in err.value.message and "\ue000" not in err.value.message


@pytest.mark.parametrize("loader", LOADERS)
def test_cr_only_line_ends_keep_their_lines(loader: type[_Loader]) -> None:
    doc = _compose_with(loader, "a: 1\rb:\r  - x\r  - {c: 5}\r")
    assert doc.source.values[("b", 1, "c")] == Pos(4, 9)
    assert doc.source.items[("b", 1)] == Pos(4, 3)


def test_surrogate_escapes_are_joined_and_unpaired_ones_reported() -> None:
    """JSON-style escapes of one character (libyaml refuses them; the pure parser takes them)."""
    text = (
        'a: "cat \\ud83d\\ude00 \\U0001F600"\n'
        'b: "x \\udc80 y"\n'
        'c: ["ok", "\\ud83d"]\n'
        '"k\\ud800": 1\n'
        '"\\ud83d\\ude00": 2\n'
    )
    doc = compose(text)
    assert doc.data["a"] == "cat \U0001f600 \U0001f600"
    assert doc.data["\U0001f600"] == 2
    assert [(i.path, i.pos) for i in doc.issues] == [
        (("b",), Pos(2, 4)),
        (("c", 1), Pos(3, 11)),
        (("k\ufffd",), Pos(4, 1)),
    ]
    assert all("\\ud" in i.message and "surrogate" in i.message for i in doc.issues)
    assert "\udc80" not in str(doc.data)  # nothing left that cannot be encoded
    str(doc.data).encode("utf-8")


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 30_000 + "]" * 30_000 + "\n",
        "a: " + "{b: " * 30_000 + "1" + "}" * 30_000 + "\n",
        "a:\n" + "- " * 30_000 + "x\n",
        "a:\r" + "- " * 30_000 + "x\r",
    ],
    ids=["flow-sequences", "flow-mappings", "block-sequences", "block-sequences-cr"],
)
def test_deep_nesting_is_a_clean_error_not_a_crash(text: str, tmp_path: Path) -> None:
    """libyaml's composer recursed until the process died (exit 139): run it apart."""
    (tmp_path / "deep.yaml").write_text(text, newline="")
    script = (
        "import sys; from veobatch.yamlpos import compose\n"
        "try:\n    compose(open(sys.argv[1], newline='').read())\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "deep.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("YamlSyntaxError") and "nested too deeply" in done.stdout


def test_ordinary_documents_never_pay_for_the_depth_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shallow documents, even with many lists, are settled without a second parse."""

    def no_event_pass(text: str, limit: int) -> bool:
        raise AssertionError("the event pass ran")

    monkeypatch.setattr(yamlpos, "_deeper_than", no_event_pass)
    jobs = "".join(f"  - id: j{i}\n    prompt: a - b - c ? d  e\n" for i in range(2000))
    compose("version: 1\njobs:\n" + jobs)
    compose("a:\n" + "  " * 100 + "- " * 100 + "x\n")


def test_many_shallow_lists_still_use_the_fast_parser() -> None:
    items = "".join(f"  - {{id: j{i}, image_urls: [a, b]}}\n" for i in range(2000))
    assert yamlpos._may_nest_deeper("jobs:\n" + items, yamlpos.MAX_C_DEPTH) is False
    assert yamlpos._may_nest_deeper("a: " + "[" * 1100 + "]" * 1100, yamlpos.MAX_C_DEPTH)


def test_two_merge_keys_in_one_mapping_are_refused() -> None:
    # Tools disagree on which wins; veobatch mixed both silently.
    text = "a: &a {x: 1}\nb: &b {x: 2, y: 3}\nc:\n  <<: *a\n  <<: *b\n"
    document = compose(text)
    (issue,) = document.issues
    assert issue.pos == Pos(5, 3)
    assert "a second merge key '<<' (the first at line 4)" in issue.message
    assert compose("a: &a {x: 1}\nb: &b {x: 2}\nc: {<<: [*a, *b]}\n").issues == ()


@pytest.mark.parametrize(
    ("line", "pos", "hint"),
    [
        ("prompt: *sparkles* everywhere", None, "starts with '*' must be quoted"),
        ("prompt: @brand", None, "starts with '@' must be quoted"),
        ("prompt: !Boom! big bang", None, "starts with '!' must be quoted"),
        ("prompt: !Boom!x bang", None, "starts with '!' must be quoted"),
        ("prompt: [Draft] a cat", None, "must be quoted whole"),
        ("\tseed: 3", None, "indent with spaces"),
        ("duration 4", Pos(3, 3), "a line with no ':' after its key"),
        ("   seed: 3", None, "indented deeper than the one before it"),
        ("prompt: a: b", None, "a value containing ': ' must be quoted"),
    ],
)
def test_syntax_errors_say_what_the_writer_most_likely_did(
    line: str, pos: Pos | None, hint: str
) -> None:
    text = f"- id: a\n  model: m\n  {line}\n  prompt: x\n"
    if line.startswith(("\t", "   ")):
        text = f"- id: a\n  model: m\n{line}\n  prompt: x\n"
    with pytest.raises(YamlSyntaxError) as caught:
        compose(text)
    assert hint in caught.value.message
    if pos is not None:
        assert caught.value.pos == pos


@pytest.mark.parametrize("loader", LOADERS)
def test_both_composers_refuse_an_alias_bomb_alike(loader: type[_Loader]) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i > 1 else "*a"] * 10) + "]")
    lines.append("b:\n  - c: *a6")
    with pytest.raises(YamlSyntaxError) as caught:
        _compose_with(loader, "\n".join(lines) + "\n")
    assert caught.value.pos == Pos(9, 5)
    assert caught.value.path == ("b", 0, "c")
    assert "this alias expands to 11,111,111 values" in caught.value.message
