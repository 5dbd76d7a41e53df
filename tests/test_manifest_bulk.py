"""Bulk manifests: local images, variants, matrices, spreadsheets, prices and cost limits."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image
from test_catalogue import EMBEDDED, SHARED, request_schemas

from veobatch.errors import ManifestError, Problem
from veobatch.images import Inliner, LocalImage
from veobatch.jobs import request_key
from veobatch.jobview import compact_request
from veobatch.manifest import load_manifest, parse_manifest, slug, variant_seed
from veobatch.scheduler import category, plan_jobs

T2V = "google/veo-3.1-t2v"
I2V = "google/veo-3.1-i2v"
R2V = "google/veo-3.1-reference-to-video"


def png(size: tuple[int, int] = (1280, 720), colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write(tmp: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    return err.value.problems


def located(p: Problem) -> tuple[str, int | None, str | None, str | None]:
    return (Path(p.file).name, p.line, p.job, p.field)


# --- local images --------------------------------------------------------------------------


async def test_local_images_are_checked_once_encoded_when_sent_and_keyed_by_content(
    tmp_path: Path,
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ref.png").write_bytes(png())
    jobs = "\n".join(f"  - {{id: j{i}, prompt: p{i}}}" for i in range(200))
    m = load_manifest(
        write(
            tmp_path,
            f"version: 1\ndefaults:\n  model: {I2V}\n  image_url: img/ref.png\njobs:\n{jobs}\n",
        )
    )
    held = [j.request["image_url"] for j in m.jobs]
    assert isinstance(held[0], LocalImage) and held[0].path == tmp_path / "img" / "ref.png"
    assert len({id(u) for u in held}) == 1  # one image shared by every job, never its bytes
    inliner = Inliner()
    body = await inliner.body(m.jobs[7].request)
    uri = body["image_url"]
    assert uri.startswith("data:image/png;base64,") and body["prompt"] == "p7"
    assert base64.b64decode(uri.split(",", 1)[1]) == png()
    assert m.jobs[0].identity is not None
    assert m.jobs[0].identity["image_url"] == "sha256:" + hashlib.sha256(png()).hexdigest()
    # Records and keys read as they did when the request held the encoded string.
    as_sent = {**m.jobs[0].request, "image_url": uri}
    assert compact_request(m.jobs[0].request) == compact_request(as_sent)
    assert "KiB)" in compact_request(m.jobs[0].request)["image_url"]
    assert m.jobs[0].key == request_key(m.jobs[0].identity)


def test_a_tiny_local_image_is_held_as_its_data_uri_as_records_copy_it_whole(
    tmp_path: Path,
) -> None:
    (tmp_path / "dot.png").write_bytes(png((1, 1)))
    m = load_manifest(
        write(tmp_path, f"version: 1\njobs:\n  - {{model: {I2V}, prompt: p, image_url: dot.png}}\n")
    )
    uri = "data:image/png;base64," + base64.b64encode(png((1, 1))).decode("ascii")
    assert m.jobs[0].request["image_url"] == uri
    assert compact_request(m.jobs[0].request)["image_url"] == uri


def test_the_key_follows_image_content_not_its_path(tmp_path: Path) -> None:
    text = f"version: 1\njobs:\n  - {{id: a, model: {I2V}, prompt: p, image_url: IMG}}\n"
    (tmp_path / "one.png").write_bytes(png())
    (tmp_path / "two.png").write_bytes(png())  # same bytes, other name
    (tmp_path / "three.png").write_bytes(png(colour=(9, 9, 9)))
    keys = [
        load_manifest(write(tmp_path, text.replace("IMG", name))).jobs[0].key
        for name in ("one.png", "two.png", "three.png")
    ]
    assert keys[0] == keys[1] != keys[2]


def test_image_list_mixes_urls_and_files(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    m = load_manifest(
        write(
            tmp_path,
            f"version: 1\njobs:\n  - model: {R2V}\n    prompt: p\n"
            "    image_urls: [https://x.example/a.png, a.png]\n",
        )
    )
    urls = m.jobs[0].request["image_urls"]
    assert urls[0] == "https://x.example/a.png" and isinstance(urls[1], LocalImage)


def test_image_problems_point_at_the_field_and_small_images_warn_once(tmp_path: Path) -> None:
    (tmp_path / "small.png").write_bytes(png((320, 240)))
    (tmp_path / "notes.txt").write_text("not an image")
    text = (
        f"version: 1\njobs:\n"
        f"  - {{id: a, model: {I2V}, prompt: p, image_url: small.png}}\n"
        f"  - {{id: b, model: {I2V}, prompt: p, image_url: small.png}}\n"
    )
    m = load_manifest(write(tmp_path, text))
    assert len(m.warnings) == 1 and "320x240, smaller than 720p" in m.warnings[0].message
    bad = text + f"  - {{id: c, model: {I2V}, prompt: p, image_url: notes.txt}}\n"
    [p] = problems(write(tmp_path, bad))
    assert located(p) == ("m.yaml", 5, "'c'", "image_url")
    assert "is not an image: its bytes look like text" in p.message


# --- variants ------------------------------------------------------------------------------


def test_variants_make_numbered_takes_with_their_own_stable_seeds(tmp_path: Path) -> None:
    text = f"version: 1\njobs:\n  - {{id: hero, model: {T2V}, prompt: p, variants: 3}}\n"
    m = load_manifest(write(tmp_path, text))
    assert [j.id for j in m.jobs] == ["hero-1", "hero-2", "hero-3"]
    seeds = [j.request["seed"] for j in m.jobs]
    assert seeds == [variant_seed("hero", n) for n in (1, 2, 3)] and len(set(seeds)) == 3
    again = load_manifest(write(tmp_path, text))
    assert [j.key for j in again.jobs] == [j.key for j in m.jobs]  # stable across runs


def test_a_written_seed_is_the_first_take_and_the_others_count_up(tmp_path: Path) -> None:
    text = f"version: 1\njobs:\n  - {{id: s, model: {T2V}, prompt: p, seed: 41, variants: 3}}\n"
    assert [j.request["seed"] for j in load_manifest(write(tmp_path, text)).jobs] == [41, 42, 43]


@pytest.mark.parametrize(
    ("seed", "sent"),
    [
        (-1, [-1, 0, 1]),
        (-5, [-5, -4, -3]),
        (0, [0, 1, 2]),
        (2147483647, [2147483647, 2147483648, 2147483649]),  # the schema sets no maximum
        (2**40, [2**40, 2**40 + 1, 2**40 + 2]),
    ],
)
def test_a_written_seed_is_sent_unchanged_for_take_one(
    tmp_path: Path, seed: int, sent: list[int]
) -> None:
    text = f"version: 1\njobs:\n  - {{id: s, model: {T2V}, prompt: p, seed: {seed}, variants: 3}}\n"
    assert [j.request["seed"] for j in load_manifest(write(tmp_path, text)).jobs] == sent


def test_the_published_seed_has_no_range_to_wrap_in() -> None:
    """Takes count up from a written seed without wrapping because no range is published."""
    schemas = [*request_schemas(EMBEDDED).values(), *request_schemas(SHARED).values()]
    seeds = [s["properties"]["seed"] for s in schemas if "seed" in s["properties"]]
    assert seeds and all(s["type"] == "integer" for s in seeds)
    bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format")
    assert not [b for s in seeds for b in bounds if b in s]


def test_variants_of_a_model_without_seeds_and_from_defaults(tmp_path: Path) -> None:
    text = (
        f"version: 1\ndefaults: {{variants: 2}}\njobs:\n"
        f"  - {{id: r, model: {R2V}, prompt: p, image_urls: [https://x.example/a.png]}}\n"
        f"  - {{id: one, model: {T2V}, prompt: p, variants: 1}}\n"
    )
    m = load_manifest(write(tmp_path, text))
    assert [j.id for j in m.jobs] == ["r-1", "r-2", "one"]
    assert "seed" not in m.jobs[0].request and m.jobs[0].request == m.jobs[1].request
    assert "seed" not in m.jobs[2].request


@pytest.mark.parametrize("value", ["0", "101", '"3"', "2.5"])
def test_bad_variants_are_located(tmp_path: Path, value: str) -> None:
    text = f"version: 1\njobs:\n  - id: a\n    model: {T2V}\n    prompt: p\n    variants: {value}\n"
    [p] = problems(write(tmp_path, text))
    assert located(p) == ("m.yaml", 6, "'a'", "variants")
    assert "expected a number of takes from 1 to 100" in p.message


# --- matrix --------------------------------------------------------------------------------


def test_matrix_expands_every_combination_with_stable_suffixes(tmp_path: Path) -> None:
    text = (
        f"version: 1\njobs:\n  - id: shot\n    model: {T2V}\n    prompt: p\n"
        '    matrix:\n      aspect_ratio: ["16:9", "9:16"]\n      duration: [4, 8]\n'
        '      exclude:\n        - {aspect_ratio: "9:16", duration: 4}\n'
    )
    m = load_manifest(write(tmp_path, text))
    assert [j.id for j in m.jobs] == ["shot-16x9-4", "shot-16x9-8", "shot-9x16-8"]
    assert m.jobs[2].request["aspect_ratio"] == "9:16" and m.jobs[2].request["duration"] == 8


def test_exclude_entries_must_name_a_value_of_the_matrix_exactly(tmp_path: Path) -> None:
    text = (
        f"version: 1\njobs:\n  - id: t\n    model: {T2V}\n    prompt: p\n    matrix:\n"
        '      aspect_ratio: ["16:9", "9:16"]\n      duration: [4, 8]\n'
        "      generate_audio: [true, false]\n      exclude:\n"
        '        - {aspect_ratio: "9:16", duration: "4"}\n'
        '        - {aspect_ratio: "4:3"}\n'
        "        - {generate_audio: 1}\n"
    )
    found = problems(write(tmp_path, text))
    assert [(p.line, p.field, p.message) for p in found] == [
        (
            11,
            "matrix.exclude.0.duration",
            "'4' (str) is not one of the matrix's 'duration' values (4, 8), "
            "so this entry would leave out nothing",
        ),
        (
            12,
            "matrix.exclude.1.aspect_ratio",
            "'4:3' (str) is not one of the matrix's 'aspect_ratio' values ('16:9', '9:16'), "
            "so this entry would leave out nothing",
        ),
        (
            13,
            "matrix.exclude.2.generate_audio",
            "1 (int) is not one of the matrix's 'generate_audio' values (true, false), "
            "so this entry would leave out nothing",
        ),
    ]


def test_matrix_values_that_alter_alike_get_distinct_ids(tmp_path: Path) -> None:
    values = (
        '["a/b", "a-b", "a b", "a_b", "a:b", "axb", "Dog runs", "dog runs", "Cat", "cat", "16:9"]'
    )
    text = f"version: 1\njobs:\n  - id: t\n    model: {T2V}\n    matrix:\n      prompt: {values}\n"
    ids = [j.id for j in load_manifest(write(tmp_path, text)).jobs]
    assert ids == [
        "t-" + slug("a/b", hashed=True),
        "t-a-b",  # needed no alteration: the id it always had
        "t-" + slug("a b", hashed=True),
        "t-a_b",
        "t-" + slug("a:b", hashed=True),
        "t-axb",
        "t-" + slug("Dog runs", hashed=True),
        "t-" + slug("dog runs", hashed=True),
        "t-" + slug("Cat", hashed=True),  # alike ignoring case, neither altered: both hashed
        "t-" + slug("cat", hashed=True),
        "t-16x9",  # altered, but alike to no other value: unchanged
    ]
    assert ids[0].startswith("t-a-b-") and len(ids[0]) == len("t-a-b-") + 6
    assert len({i.lower() for i in ids}) == len(ids)


def long_id_job(extra: str) -> str:
    """A 100-character id and eleven one-value matrix fields: over 236 characters made."""
    return (
        f"version: 1\njobs:\n  - id: {'a' * 100}\n{extra}    matrix:\n"
        f"      model: [{T2V}]\n"
        "      prompt: ['A very long prompt about a lighthouse at dusk']\n"
        "      negative_prompt: ['blurry, low quality, watermark, text']\n"
        "      seed: [123456789012345678901234567890]\n      aspect_ratio: ['16:9']\n"
        "      resolution: [720p]\n      duration: [4]\n      generate_audio: [false]\n"
        "      enhance_prompt: [false]\n      auto_fix: [false]\n      provider: [google]\n"
    )


def test_ids_made_longer_than_the_limit_are_shortened_with_a_hash(tmp_path: Path) -> None:
    # A run then failed with "File name too long" once it had sent other jobs.
    text = long_id_job("    variants: 2\n")
    ids = [j.id for j in load_manifest(write(tmp_path, text)).jobs]
    assert [len(i) for i in ids] == [236, 236]
    assert ids[0] != ids[1]
    assert all(i.startswith("a" * 100 + "-") for i in ids)
    assert ids == [j.id for j in load_manifest(write(tmp_path, text)).jobs]  # stable
    short = "version: 1\njobs:\n  - {id: s, variants: 2, prompt: p, model: " + T2V + "}\n"
    assert [j.id for j in load_manifest(write(tmp_path, short)).jobs] == ["s-1", "s-2"]
    [long] = problems(write(tmp_path, short.replace("id: s", "id: " + "b" * 101)))
    assert long.message == "the id is 101 characters long; at most 100 are allowed"


def test_a_single_take_is_shortened_like_several(tmp_path: Path) -> None:
    # Without variants the id is the job's own: it must fit a file name all the same.
    text = long_id_job("")
    [job] = load_manifest(write(tmp_path, text)).jobs
    assert len(job.id) == 236 and job.id.startswith("a" * 100 + "-")


def test_matrix_over_models_and_with_variants(tmp_path: Path) -> None:
    text = (
        "version: 1\njobs:\n  - id: cmp\n    prompt: p\n    variants: 2\n"
        f"    matrix: {{model: [{T2V}, {T2V}-fast]}}\n"
    )
    ids = [j.id for j in load_manifest(write(tmp_path, text)).jobs]
    assert ids == [
        "cmp-google-veo-3.1-t2v-1",
        "cmp-google-veo-3.1-t2v-2",
        "cmp-google-veo-3.1-t2v-fast-1",
        "cmp-google-veo-3.1-t2v-fast-2",
    ]


def test_slug_is_readable_and_unambiguous() -> None:
    assert slug("16:9") == "16x9" and slug(8) == "8" and slug(True) == "true"
    long = slug("a very long prompt about a cat on a windowsill at dawn")
    assert len(long) <= 31 and long.startswith("a_very_long_prompt")
    assert slug("café") != slug("caf")  # altered text gets a hash


def test_matrix_values_are_checked_where_they_are_written(tmp_path: Path) -> None:
    text = (
        f"version: 1\njobs:\n  - id: shot\n    model: {T2V}\n    prompt: p\n"
        "    matrix:\n      duration: [4, 5]\n      colour: [red]\n"
    )
    found = sorted(problems(write(tmp_path, text)), key=lambda p: p.line or 0)
    assert [located(p) for p in found] == [
        ("m.yaml", 7, "'shot'", "matrix.duration.1"),
        ("m.yaml", 8, "'shot'", "matrix.colour"),
    ]
    assert "got 5" in found[0].message and "unknown matrix field 'colour'" in found[1].message


def test_matrix_field_also_set_on_the_job_is_an_error(tmp_path: Path) -> None:
    text = (
        f"version: 1\njobs:\n  - id: s\n    model: {T2V}\n    prompt: p\n    duration: 4\n"
        "    matrix: {duration: [4, 8]}\n"
    )
    [p] = problems(write(tmp_path, text))
    assert "'duration' is set both in the job and in its matrix" in p.message


def test_matrix_ids_that_collide_are_reported(tmp_path: Path) -> None:
    matrix = '{prompt: ["a-b", "a"], negative_prompt: ["c", "b-c"]}'  # two fields' suffixes
    text = f"version: 1\njobs:\n  - {{id: s, model: {T2V}, matrix: {matrix}}}\n"
    [p] = problems(write(tmp_path, text))
    assert "make the id 's-a-b-c' twice" in p.message


# --- one request, twice --------------------------------------------------------------------

PAID_TWICE = "so one video would be made and paid for twice"
SPACE_2 = "write seeds at least 2 apart (take n sends the job's seed plus n - 1)"


def test_takes_of_different_jobs_must_not_send_the_same_request(tmp_path: Path) -> None:
    """Seeds 1 and 2, two takes each: both jobs would send seed 2, one video paid twice."""
    job = f"  - model: {T2V}\n    prompt: a red kite\n    seed: SEED\n    variants: 2\n"
    text = "version: 1\njobs:\n" + job.replace("SEED", "1") + job.replace("SEED", "2")
    [p] = problems(write(tmp_path, text))
    first, second = (
        f"t2v-{request_key({'model': T2V, 'prompt': 'a red kite', 'seed': s})[:10]}" for s in (1, 2)
    )
    assert (located(p), p.column) == (("m.yaml", 7, "#2", None), 3)
    assert p.message == (
        f"'{second}-1' is the same request as '{first}-2' of job #1 (line 3): same model, "
        f"fields and seed 2, {PAID_TWICE}; {SPACE_2}"
    )
    spaced = load_manifest(write(tmp_path, text.replace("seed: 2", "seed: 3")))
    assert [j.request["seed"] for j in spaced.jobs] == [1, 2, 3, 4]


def test_a_matrix_of_seeds_with_variants_must_not_repeat_a_request(tmp_path: Path) -> None:
    text = (
        f"version: 1\njobs:\n  - id: a\n    model: {T2V}\n    prompt: x\n    variants: 2\n"
        "    matrix:\n      seed: [1, 2]\n"
    )
    [p] = problems(write(tmp_path, text))
    assert (located(p), p.column) == (("m.yaml", 3, "'a'", None), 3)
    assert p.message == (
        "'a-1-2' and 'a-2-1', both made by this job, are the same request: same model, fields "
        f"and seed 2, {PAID_TWICE}; {SPACE_2}"
    )
    spaced = load_manifest(write(tmp_path, text.replace("[1, 2]", "[1, 3]")))
    assert [j.request["seed"] for j in spaced.jobs] == [1, 2, 3, 4]


def test_a_take_repeating_another_jobs_request_is_refused_whatever_the_ids(tmp_path: Path) -> None:
    text = (
        f"version: 1\ndefaults: {{model: {T2V}, prompt: p}}\njobs:\n"
        "  - {id: a, seed: 1, variants: 2}\n  - {id: b, seed: 2}\n"
    )
    [p] = problems(write(tmp_path, text))
    assert located(p) == ("m.yaml", 5, "'b'", None)
    assert p.message == (
        f"'b' is the same request as 'a-2' of job 'a' (line 4): same model, fields and seed 2, "
        f"{PAID_TWICE}; {SPACE_2}"
    )
    # A table's row that repeats a take whose seed was derived from its id.
    seed = variant_seed("hero", 2)
    (tmp_path / "p.csv").write_text(f"id,prompt,seed\nbest,p,{seed}\n")
    text = (
        f"version: 1\ndefaults: {{model: {T2V}}}\njobs_from: p.csv\n"
        "jobs:\n  - {id: hero, prompt: p, variants: 3}\n"
    )
    [p] = problems(write(tmp_path, text))
    assert located(p) == ("p.csv", 2, "'best'", None)
    assert p.message == (
        f"'best' is the same request as 'hero-2' of the job at {tmp_path / 'm.yaml'}:5: same "
        f"model, fields and seed {seed}, {PAID_TWICE}; give one of them another seed, or "
        "remove one"
    )


def test_repeated_requests_that_are_not_refused(tmp_path: Path) -> None:
    """Takes of one job without a seed field repeat its request on purpose; so do two jobs
    given their own ids."""
    r2v = f"model: {R2V}, prompt: p, image_urls: [https://x.example/a.png]"
    text = (
        f"version: 1\njobs:\n  - {{id: r, {r2v}, variants: 3}}\n"
        f"  - {{id: one, {r2v}}}\n  - {{id: two, model: {T2V}, prompt: p}}\n"
        f"  - {{id: three, model: {T2V}, prompt: p}}\n"
    )
    jobs = load_manifest(write(tmp_path, text)).jobs
    assert len({j.key for j in jobs}) == 2 and len(jobs) == 6


def test_jobs_without_ids_repeating_a_request_by_their_takes(tmp_path: Path) -> None:
    r2v = f"model: {R2V}, prompt: p, image_urls: [https://x.example/a.png]"
    text = f"version: 1\njobs:\n  - {{{r2v}, variants: 2}}\n  - {{{r2v}}}\n"
    [p] = problems(write(tmp_path, text))
    assert located(p) == ("m.yaml", 4, "#2", None)
    assert p.message == (
        "this job is identical to job #1 (line 3): same model and request; remove one, or "
        "give them ids if you really want both"
    )


# --- jobs_from -----------------------------------------------------------------------------


def test_jobs_from_csv_mixes_with_inline_jobs_and_takes_defaults(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(png())
    (tmp_path / "prompts.csv").write_text(
        "id,prompt,duration,image_url,# note\ncat,a cat,4,ref.png,x\ndog,a dog,,ref.png,\n"
    )
    text = (
        f"version: 1\ndefaults: {{model: {I2V}, resolution: 720p}}\njobs_from: prompts.csv\n"
        f"jobs:\n  - {{id: hero, model: {T2V}, prompt: hero}}\n"
    )
    m = load_manifest(write(tmp_path, text))
    assert [j.id for j in m.jobs] == ["hero", "cat", "dog"]
    cat, dog = m.jobs[1], m.jobs[2]
    assert cat.request["duration"] == 4 and "duration" not in dog.request
    assert cat.request["resolution"] == "720p" and isinstance(cat.request["image_url"], LocalImage)
    assert cat.source is not None and cat.source.endswith("prompts.csv") and cat.line == 2


def test_jobs_from_jsonl_and_a_list_of_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(f'{{"id": "x", "model": "{T2V}", "prompt": "x"}}\n')
    (tmp_path / "b.csv").write_text(f"id,model,prompt,variants\ny,{T2V},y,2\n")
    text = "version: 1\njobs_from: [a.jsonl, b.csv]\n"
    assert [j.id for j in load_manifest(write(tmp_path, text)).jobs] == ["x", "y-1", "y-2"]


def test_problems_in_a_table_point_at_its_file_line_and_cell(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,prompt,duration,colour\na,x,4,red\nb,y,five,\n")
    text = f"version: 1\ndefaults: {{model: {T2V}}}\njobs_from: p.csv\n"
    found = problems(write(tmp_path, text))
    assert [(located(p), p.column) for p in found] == [
        (("p.csv", 1, "'a'", "colour"), 20),
        (("p.csv", 3, "'b'", "duration"), 5),
    ]
    assert "unknown field 'colour'" in found[0].message
    assert "got the string 'five'" in found[1].message


def test_an_unknown_column_is_reported_once_not_once_per_row(tmp_path: Path) -> None:
    # 10,000 rows once made 10,000 copies of one header problem in the cron mail.
    rows = "".join(f"j{i},p{i},red\n" for i in range(50))
    (tmp_path / "p.csv").write_text("id,prompt,colour\n" + rows)
    text = f"version: 1\ndefaults: {{model: {T2V}}}\njobs_from: p.csv\n"
    [p] = problems(write(tmp_path, text))
    assert located(p)[:2] == ("p.csv", 1) and "unknown field 'colour'" in p.message


def test_a_field_a_rows_model_does_not_accept_is_located_at_its_cell(tmp_path: Path) -> None:
    (tmp_path / "mf.csv").write_text(
        f"id,model,prompt,image_url\na,{T2V},a,\nb,{T2V},b,https://e.com/x.png\n"
    )
    [p] = problems(write(tmp_path, "version: 1\njobs_from: mf.csv\n"))
    assert (located(p), p.column) == (("mf.csv", 3, "'b'", "image_url"), 24)
    assert p.message.startswith(f"{T2V} does not accept 'image_url'; it takes prompt,")


def test_image_urls_are_checked_as_uris_wherever_written(tmp_path: Path) -> None:
    flf = "google/veo-3.1-first-last-image-to-video"
    (tmp_path / "p.csv").write_text(
        "id,model,prompt,image_url,image_urls\n"
        f"c1,{I2V},p,https://e.com/a|b.png,\nc2,{R2V},p,,https://e.com/ok.png|https://e.com/%zz\n"
    )
    (tmp_path / "p.jsonl").write_text(
        f'{{"id": "j", "model": "{I2V}", "prompt": "p", "image_url": "https://e.com/{{id}}.png"}}\n'
    )
    text = (
        f"version: 1\ndefaults:\n  image_url: https://e.com/ü.png\njobs_from: [p.csv, p.jsonl]\n"
        f"jobs:\n  - {{id: d, model: {I2V}, prompt: p}}\n"
        f"  - {{id: f, model: {flf}, prompt: p, image_url: 'https://e.com/a.png',\n"
        "      last_image_url: 'https://e.com/a^b.png'}\n"
        f"  - {{id: r, model: {R2V}, prompt: p, image_urls: ['https://e.com/a#b#c']}}\n"
    )
    found = problems(write(tmp_path, text))
    assert [(located(p), p.column, p.message.split(" at ")[0]) for p in found] == [
        (("m.yaml", 3, None, "defaults.image_url"), 14, "the URL has 'ü'"),
        (("m.yaml", 8, "'f'", "last_image_url"), 23, "the URL has '^'"),
        (("m.yaml", 9, "'r'", "image_urls.0"), 79, "the URL has a second '#'"),
        (("p.csv", 2, "'c1'", "image_url"), 25, "the URL has '|'"),
        (("p.csv", 3, "'c2'", "image_urls.1"), 41, "the URL has a '%'"),
        (("p.jsonl", 1, "'j'", "image_url"), 59, "the URL has '{'"),
    ]


def test_duplicate_ids_across_the_manifest_and_a_table(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,prompt\nhero,x\n")
    text = (
        f"version: 1\ndefaults: {{model: {T2V}}}\njobs_from: p.csv\n"
        "jobs:\n  - {id: hero, prompt: y}\n"
    )
    [p] = problems(write(tmp_path, text))
    assert located(p) == ("p.csv", 2, "'hero'", "id")
    assert "duplicate id 'hero'" in p.message and "m.yaml:5" in p.message


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("missing.csv", "cannot read 'missing.csv'"),
        ("notes.txt", "neither a .csv nor a .jsonl file"),
        ("5", "expected a .csv or .jsonl file name"),
        ("empty.csv", "'empty.csv' has no rows"),
        # Not Python's codec message: where the byte is, and what to do.
        ("latin1.csv", "'latin1.csv' is not UTF-8 text (byte 0xe9 at line 2, column 4); save"),
        ("utf16.csv", "'utf16.csv' is not UTF-8 text (byte 0xff at line 1, column 1); save"),
    ],
)
def test_jobs_from_problems(tmp_path: Path, value: str, words: str) -> None:
    (tmp_path / "empty.csv").write_text("id,prompt\n")
    (tmp_path / "latin1.csv").write_bytes("id,prompt\ncaf\u00e9,p\n".encode("latin-1"))
    (tmp_path / "utf16.csv").write_bytes("id,prompt\na,p\n".encode("utf-16"))
    [p] = problems(write(tmp_path, f"version: 1\njobs_from: {value}\n"))
    assert located(p)[:2] == ("m.yaml", 2) and words in p.message


# --- settings: prices and cost limit -------------------------------------------------------


def test_prices_and_cost_limit_settings(tmp_path: Path) -> None:
    text = (
        f"version: 1\nsettings:\n  max_cost_usd: 25\n  prices: {{{T2V}: 0.35}}\n"
        f"jobs:\n  - {{model: {T2V}, prompt: p}}\n"
    )
    s = load_manifest(write(tmp_path, text)).settings
    assert s.max_cost_usd == 25.0 and dict(s.prices) == {T2V: 0.35}


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("max_cost_usd: -1", "settings.max_cost_usd", "expected an amount in US dollars"),
        ("max_cost_usd: lots", "settings.max_cost_usd", "got the string 'lots'"),
        ("prices: {google/veo-3.1-t2x: 0.4}", "settings.prices.google/veo-3.1-t2x", "did you mean"),
        (f"prices: {{{T2V}: cheap}}", f"settings.prices.{T2V}", "USD per second"),
    ],
)
def test_bad_cost_settings(tmp_path: Path, line: str, field: str, words: str) -> None:
    text = f"version: 1\nsettings:\n  {line}\njobs:\n  - {{model: {T2V}, prompt: p}}\n"
    [p] = problems(write(tmp_path, text))
    assert (p.line, p.field) == (3, field) and words in p.message


# --- change detection ----------------------------------------------------------------------


def test_plan_categories(tmp_path: Path) -> None:
    from veobatch.ledger import ErrorInfo, JobState

    text = "version: 1\njobs:\n" + "".join(
        f"  - {{id: {i}, model: {T2V}, prompt: p}}\n" for i in "abcdef"
    )
    m = load_manifest(write(tmp_path, text))
    key = m.jobs[0].key
    states = {
        "b": JobState("b", "done", key="0" * 64, file="b.mp4"),
        "c": JobState("c", "done", key=key, file="c.mp4", bytes=0),
        "d": JobState("d", "submitted", key=key, generation_id="g"),
        "e": JobState("e", "failed", key=key, error=ErrorInfo("generation_error", "x")),
    }
    (tmp_path / "c.mp4").write_bytes(b"")
    c_stat = (tmp_path / "c.mp4").stat()
    states["c"].mtime_ns = c_stat.st_mtime_ns
    plans = plan_jobs(m.jobs, states, tmp_path)
    assert [category(p) for p in plans] == [
        "new",
        "changed",
        "unchanged",
        "resumable",
        "failed",
        "new",
    ]


# --- scale and odd text in tables ----------------------------------------------------------


def test_recording_a_problem_does_not_scan_the_ones_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50,000 jobs with one error each took minutes: each new problem was compared with all
    the earlier ones. Count the comparisons rather than time them."""
    n = 2000
    compared = 0
    real_eq = Problem.__eq__

    def counting_eq(self: Problem, other: object) -> bool:
        nonlocal compared
        compared += 1
        return real_eq(self, other)

    monkeypatch.setattr(Problem, "__eq__", counting_eq)
    jobs = "".join(
        f"  - {{id: j{i}, prompt: p{i}, duration: 5, image_url: 'http://a.example/{i}.png'}}\n"
        for i in range(n)
    )
    found = problems(write(tmp_path, f"version: 1\ndefaults: {{model: {I2V}}}\njobs:\n{jobs}"))
    assert len(found) == n
    assert compared < n  # was about n * n / 2 (for the errors, and again for the warnings)


def test_jsonl_surrogates_and_line_separators(tmp_path: Path) -> None:
    rows = [
        '{"id": "a", "prompt": "cat \\ud83d\\ude00"}',
        '{"id": "b", "prompt": "line\u2028separator"}',
        '{"id": "c", "prompt": "x \\udc80"}',
        '{"id": "d", "prompt": "ok", "duration": 5}',
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = f"version: 1\ndefaults: {{model: {T2V}}}\njobs_from: p.jsonl\n"
    found = problems(write(tmp_path, text))
    assert [located(p) for p in found] == [
        ("p.jsonl", 3, "'c'", "prompt"),
        ("p.jsonl", 4, "'d'", "duration"),
    ]
    assert "\\udc80 is half of a UTF-16 surrogate pair" in found[0].message
    (tmp_path / "p.jsonl").write_text("\n".join(rows[:2]) + "\n", encoding="utf-8")
    jobs = load_manifest(tmp_path / "m.yaml").jobs
    assert [j.request["prompt"] for j in jobs] == ["cat \U0001f600", "line\u2028separator"]


def test_a_csv_json_list_with_an_unpaired_surrogate(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        'id,prompt,image_urls\nr,a,"[""https://x/\\ud800.png""]"\n', encoding="utf-8"
    )
    text = f"version: 1\ndefaults: {{model: {R2V}}}\njobs_from: p.csv\n"
    (problem,) = problems(write(tmp_path, text))
    assert located(problem) == ("p.csv", 2, "'r'", "image_urls")
    assert "surrogate" in problem.message


def test_jobs_that_differ_only_in_a_default_written_out_or_in_case_are_one_video(
    tmp_path: Path,
) -> None:
    # The API ignores provider's case, and a default written out asks what it would do
    # anyway: two id-less jobs like these were one video, paid for twice.
    job = "  - model: google/veo-3.1-t2v\n    prompt: hi\n    seed: 1\n"
    pairs = [
        ("    provider: google\n", "    provider: GOOGLE\n"),
        ("", "    resolution: 1080p\n"),
        ("", "    generate_audio: true\n"),
        ("    duration: 8\n", ""),
    ]
    for one, two in pairs:
        text = f"version: 1\njobs:\n{job}{one}{job}{two}"
        with pytest.raises(ManifestError) as err:
            parse_manifest(text, path=tmp_path / "m.yaml")
        assert "identical" in str(err.value), (one, two)
    # A value other than the default is another video; a key is as it always was.
    text = f"version: 1\njobs:\n{job}{job}    resolution: 720p\n"
    first, second = parse_manifest(text, path=tmp_path / "m.yaml").jobs
    assert first.key == request_key(first.request) and first.key != second.key
