"""Spreadsheets of jobs: rows, typed cells, and the line and column of every cell."""

from __future__ import annotations

import pytest

from veobatch.catalogue import MODELS
from veobatch.manifest_checks import DATA_URI_MAX_BYTES
from veobatch.tables import FIELD_TYPES, convert_cell, read_table
from veobatch.yamlpos import Pos


def test_field_types_are_the_same_in_every_model() -> None:
    for m in MODELS.values():
        for name, spec in m.fields.items():
            assert FIELD_TYPES[name] == spec.type


def test_csv_rows_become_typed_jobs_with_cell_positions() -> None:
    text = (
        "id,prompt,duration,generate_audio,image_urls,# notes\n"
        'a,"a cat, sitting",4,no,x.png|y.png,keep\n'
        "\n"
        "b,a dog,,yes,,\n"
    )
    table = read_table(text, "p.csv")
    assert table.problems == []
    assert table.rows == [
        {
            "id": "a",
            "prompt": "a cat, sitting",
            "duration": 4,
            "generate_audio": False,
            "image_urls": ["x.png", "y.png"],
        },
        {"id": "b", "prompt": "a dog", "generate_audio": True},
    ]
    pos = table.source.values
    assert (pos[("jobs", 0, "prompt")].line, pos[("jobs", 0, "prompt")].column) == (2, 3)
    assert (pos[("jobs", 0, "duration")].line, pos[("jobs", 0, "duration")].column) == (2, 20)
    assert pos[("jobs", 1, "prompt")].line == 4  # blank lines are skipped, lines still count
    assert table.source.keys[("jobs", 0, "duration")].line == 1


def test_cells_that_do_not_convert_stay_text_for_the_validator() -> None:
    assert convert_cell("duration", "eight") == "eight"
    assert convert_cell("generate_audio", "maybe") == "maybe"
    assert convert_cell("image_urls", '["a.png", "b.png"]') == ["a.png", "b.png"]
    assert convert_cell("image_urls", "[broken") == "[broken"
    assert convert_cell("variants", " 3 ") == 3
    assert convert_cell("prompt", "  spaced  ") == "  spaced  "


def test_csv_header_problems() -> None:
    assert read_table("", "p.csv").problems[0].message.startswith("the file is empty")
    dup = read_table("prompt,prompt\na,b\n", "p.csv").problems
    assert [(p.line, p.column) for p in dup] == [(1, 8)]
    assert "appears twice" in dup[0].message
    unnamed = read_table("prompt,,model\n", "p.csv").problems
    assert "column 2 has no name" in unnamed[0].message


def test_a_row_with_more_cells_than_columns_points_at_the_extra_cell() -> None:
    table = read_table("id,prompt\na,b,c\n", "p.csv")
    [problem] = table.problems
    assert (problem.line, problem.column, problem.job) == (2, 5, "row 1")
    assert "3 cells but the header names 2 columns" in problem.message


def test_jsonl_rows_keep_types_and_positions() -> None:
    text = (
        '{"id": "a", "prompt": "x", "duration": 6}\n\n{"prompt": "y", "matrix": {"seed": [1, 2]}}\n'
    )
    table = read_table(text, "p.jsonl")
    assert table.problems == []
    assert table.rows[0] == {"id": "a", "prompt": "x", "duration": 6}
    assert table.rows[1]["matrix"] == {"seed": [1, 2]}
    duration = table.source.values[("jobs", 0, "duration")]
    assert (duration.line, duration.column) == (1, 28)
    assert table.source.items[("jobs", 1)].line == 3


def test_jsonl_syntax_errors_and_non_objects_are_located() -> None:
    table = read_table('{"prompt": "x",}\n[1, 2]\n', "p.jsonl")
    assert [(p.line, p.column) for p in table.problems] == [(1, 16), (2, 1)]
    assert table.problems[0].message.startswith("not valid JSON")
    assert "expected a JSON object per line" in table.problems[1].message


def test_an_unclosed_quote_is_refused_at_the_record_not_swallowed_into_a_cell() -> None:
    text = 'id,prompt,duration\nfox,"A fox trots,4\nowl,An owl,4\nbarn,A barn,6\n'
    table = read_table(text, "p.csv")
    [problem] = table.problems
    assert (problem.line, problem.column) == (2, None)
    assert problem.message.startswith(
        "not a readable CSV file: unexpected end of data"
        " (the record starting here runs to line 4: is a quote not closed"
    )
    assert table.rows == []


def test_text_after_a_closing_quote_is_refused_with_its_line() -> None:
    table = read_table('id,prompt\na,b\nc,"quoted"tail\n', "p.csv")
    [problem] = table.problems
    assert problem.line == 3
    assert problem.message.startswith("not a readable CSV file: ',' expected after '\"'")
    header = read_table('"id"x,prompt\n', "p.csv").problems
    assert [(p.line, p.message[:25]) for p in header] == [(1, "not a readable CSV file: ")]


def test_integer_cells_must_be_plain_ascii_decimals() -> None:
    assert convert_cell("seed", "1_000") == "1_000"
    assert convert_cell("duration", "٨") == "٨"
    assert convert_cell("duration", "８") == "８"
    assert convert_cell("seed", " -12 ") == -12
    assert convert_cell("variants", "+3") == 3


def test_a_cell_as_long_as_a_data_uri_is_read_and_a_longer_one_is_located() -> None:
    big = "x" * 200_000
    table = read_table(f"id,prompt\na,{big}\n", "p.csv")
    assert table.problems == []
    assert table.rows == [{"id": "a", "prompt": big}]
    huge = "x" * (DATA_URI_MAX_BYTES + 2048)
    [problem] = read_table(f"id,prompt\na,b\nc,{huge}\n", "p.csv").problems
    assert problem.line == 3
    assert problem.message.startswith("not a readable CSV file: field larger than field limit")


def test_jsonl_duplicate_keys_are_refused_at_the_second_one() -> None:
    text = '{"id": "a", "prompt": "x"}\n{"id":"b","duration":4,"duration":8}\n'
    table = read_table(text, "p.jsonl")
    [problem] = table.problems
    assert (problem.line, problem.column) == (2, 24)
    assert problem.message == "duplicate key 'duration'; keep only one"
    assert table.rows == [{"id": "a", "prompt": "x"}]
    nested = read_table('{"matrix": {"seed": [1], "seed": [2]}}\n', "p.jsonl").problems
    assert [p.message for p in nested] == ["duplicate key 'seed'; keep only one"]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_every_line_end_excel_writes_reads_alike(end: str) -> None:
    # "\r" alone: Excel's "CSV (Macintosh)"; csv refused it as a newline in an unquoted field.
    text = end.join(["id,prompt", "owl,hi", 'cat,"two', 'lines"', "dog,a,b", ""])
    table = read_table(text, "p.csv")
    assert [r["id"] for r in table.rows] == ["owl", "cat", "dog"]
    assert table.rows[1]["prompt"] == f"two{end}lines"
    (extra,) = table.problems
    assert (extra.line, extra.column) == (5, 7) and "3 cells" in extra.message


def test_a_jsonl_field_is_located_at_its_key_not_at_a_value_that_reads_the_same() -> None:
    line = '{"prompt": "duration", "model": "m", "dur\\u0061tion": 5, "seed": {"seed": 1}}'
    table = read_table(line + "\n", "p.jsonl")
    keys = {path[-1]: pos.column for path, pos in table.source.keys.items()}
    assert keys["duration"] == line.index('"dur\\u0061tion"') + 1  # escaped: still found
    assert keys["seed"] == line.index('"seed"') + 1  # the top-level key, not the nested one
    assert keys["prompt"] == 2


def test_a_cell_after_a_quoted_multi_line_cell_is_located_on_its_own_line() -> None:
    text = 'id,prompt,duration\nowl,"two\nlines, here",5,extra\n'
    table = read_table(text, "p.csv")
    positions = {path[-1]: pos for path, pos in table.source.values.items() if len(path) == 3}
    assert positions["id"] == Pos(2, 1) and positions["prompt"] == Pos(2, 5)
    assert positions["duration"] == Pos(3, 14)  # after the cell's second line, not 2:1
    (extra,) = table.problems
    assert (extra.line, extra.column) == (3, 16)


def test_a_row_with_fewer_cells_than_columns_is_refused() -> None:
    # "A fox,9:16" under "prompt,negative_prompt,aspect_ratio": the ratio would be sent as
    # the negative prompt, and a landscape video made where a vertical one was meant.
    table = read_table("id,prompt,negative_prompt,aspect_ratio\nshort,A fox,9:16\n", "p.csv")
    [problem] = table.problems
    assert (problem.line, problem.column, problem.job) == (2, 13, "row 1")
    assert "3 cells but the header names 4 columns (none for 'aspect_ratio')" in problem.message
    # Comment columns may be left out; empty cells are how a field is left unset.
    assert not read_table("id,prompt,#note\na,b\n", "p.csv").problems
    assert not read_table("id,prompt,seed\na,b,\n", "p.csv").problems


def test_a_file_separated_by_semicolons_or_tabs_says_so() -> None:
    for sep, word in ((";", "';'"), ("\t", "tabs")):
        table = read_table(f"id{sep}prompt\na{sep}b\n", "p.csv")
        [problem] = table.problems
        assert problem.line == 1
        assert f"seems to separate its cells with {word}" in problem.message
