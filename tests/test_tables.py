"""Spreadsheets of jobs: rows, typed cells, and the line and column of every cell."""

from __future__ import annotations

from veobatch.catalogue import MODELS
from veobatch.tables import FIELD_TYPES, convert_cell, read_table


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
