"""The manifest loader: every rule, good and bad, with the exact place each problem points at."""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import beside_or_skip
from PIL import Image

from veobatch import manifest_checks
from veobatch.catalogue import MODELS
from veobatch.errors import ManifestError, Problem
from veobatch.jobs import ManifestSettings, request_key
from veobatch.manifest import load_manifest, parse_manifest
from veobatch.yamlpos import Pos, compose

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO.parent / "shared" / "seeds"  # beside the repository, as CI has it

T2V = "google/veo-3.1-t2v"
T2V_FAST = "google/veo-3.1-t2v-fast"
I2V = "google/veo-3.1-i2v"
FLF = "google/veo-3.1-first-last-image-to-video"
R2V = "google/veo-3.1-reference-to-video"
IMG = "https://a.example/1.png"
IMG2 = "https://a.example/2.png"


def data_uri(fmt: str = "PNG", mime: str = "image/png", size: tuple[int, int] = (1280, 720)) -> str:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (9, 9, 9))
    if fmt == "MPO":  # a JPEG with a second picture appended, as phones write them
        img.save(buf, format=fmt, save_all=True, append_images=[img])
    else:
        img.save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


PNG_URI = data_uri()


def doc(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def job_doc(*fields: str) -> str:
    """version on line 1, jobs on line 2, the job's fields from line 3 (dash at column 3)."""
    return doc("version: 1", "jobs:", "  - " + fields[0], *("    " + f for f in fields[1:]))


def t2v(*extra: str) -> str:
    return job_doc(f"model: {T2V}", "prompt: a cat", *extra)  # extra fields start on line 5


def i2v(image: str, *extra: str) -> str:
    return job_doc(f"model: {I2V}", "prompt: a cat", f"image_url: {image}", *extra)


def r2v(*extra: str) -> str:
    return job_doc(f"model: {R2V}", "prompt: a cat", *extra)


def settings(line: str) -> str:
    return doc(
        "version: 1", "settings:", "  " + line, "jobs:", f"  - model: {T2V}", "    prompt: a"
    )


def defaults(line: str) -> str:
    return doc(
        "version: 1", "defaults:", "  " + line, "jobs:", f"  - model: {T2V}", "    prompt: a"
    )


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, file="m.yaml")
    return caught.value.problems


def where(p: Problem) -> tuple[int | None, int | None, str | None, str | None]:
    return (p.line, p.column, p.job, p.field)


# (text, line, column, job, field, parts of the message); each text has exactly one problem.
BAD = [
    # --- YAML itself
    pytest.param(
        t2v("seed: [1"), 6, 1, None, None, ("invalid YAML", "flow sequence"), id="syntax-error"
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "prompt: a: b"),
        4,
        14,
        None,
        "prompt",
        ("invalid YAML: mapping values are not allowed here", "must be quoted"),
        id="syntax-error-colon",
    ),
    pytest.param(
        doc("version: 1", "jobs: *nowhere"),
        2,
        7,
        None,
        "jobs",
        ("found undefined alias 'nowhere'",),
        id="undefined-alias",
    ),
    pytest.param(
        "version: 1\x07\n", 1, 11, None, "version", ("U+0007 is not allowed",), id="control-char"
    ),
    pytest.param(
        t2v() + "---\nversion: 1\n",
        5,
        1,
        None,
        None,
        ("expected a single document", "found another document"),
        id="two-documents",
    ),
    pytest.param(
        t2v("prompt: a dog"),
        5,
        5,
        "#1",
        "prompt",
        ("duplicate key 'prompt' (first at line 4)",),
        id="duplicate-key",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "prompt: !foo a cat"),
        4,
        13,
        "#1",
        "prompt",
        ("unsupported YAML tag '!foo'",),
        id="unknown-tag",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "prompt: !!python/name:os.system x"),
        4,
        13,
        "#1",
        "prompt",
        ("unsupported YAML tag 'tag:yaml.org,2002:python/name:os.system'",),
        id="python-tag",
    ),
    # --- top level
    pytest.param(doc("# nothing here"), 1, 1, None, None, ("the manifest is empty",), id="empty"),
    pytest.param(
        doc("- a", "- b"),
        1,
        1,
        None,
        None,
        ("expected a mapping with 'version' and 'jobs' at the top, got a list",),
        id="top-level-list",
    ),
    pytest.param(
        t2v() + "setings: {}\n",
        5,
        1,
        None,
        "setings",
        ("unknown top-level key 'setings'; did you mean 'settings'?",),
        id="unknown-top-key",
    ),
    pytest.param(
        t2v() + "colour: red\n",
        5,
        1,
        None,
        "colour",
        ("unknown top-level key 'colour'; expected 'version', 'settings', 'defaults', 'jobs'",),
        id="unknown-top-key-no-suggestion",
    ),
    pytest.param(
        doc("jobs:", f"  - model: {T2V}", "    prompt: a"),
        1,
        1,
        None,
        "version",
        ("missing 'version: 1'",),
        id="version-missing",
    ),
    pytest.param(
        t2v().replace("version: 1", 'version: "1"'),
        1,
        10,
        None,
        "version",
        ("expected the integer 1, got the string '1' (remove the quotes)",),
        id="version-string",
    ),
    pytest.param(
        t2v().replace("version: 1", "version: 2"),
        1,
        10,
        None,
        "version",
        ("unsupported manifest version 2; this veobatch reads version 1",),
        id="version-2",
    ),
    pytest.param(doc("version: 1"), 1, 1, None, "jobs", ("missing 'jobs'",), id="jobs-missing"),
    pytest.param(
        doc("version: 1", "jobs: []"),
        2,
        7,
        None,
        "jobs",
        ("expected a non-empty list of jobs, got an empty list",),
        id="jobs-empty",
    ),
    pytest.param(
        doc("version: 1", "jobs:", "  a: 1"),
        3,
        3,
        None,
        "jobs",
        ("expected a non-empty list of jobs, got a mapping",),
        id="jobs-mapping",
    ),
    pytest.param(
        doc("version: 1", "jobs:", "  - just text"),
        3,
        3,
        "#1",
        None,
        ("expected a job (a mapping of request fields), got the string 'just text'",),
        id="job-not-mapping",
    ),
    # --- settings
    pytest.param(
        settings("concurrency: 0"),
        3,
        16,
        None,
        "settings.concurrency",
        ("expected an integer from 1 to 10000, got 0",),
        id="concurrency-zero",
    ),
    pytest.param(
        settings("concurrency: 10001"),
        3,
        16,
        None,
        "settings.concurrency",
        ("expected an integer from 1 to 10000, got 10001",),
        id="concurrency-too-big",
    ),
    pytest.param(
        settings("concurrency: true"),
        3,
        16,
        None,
        "settings.concurrency",
        ("got the boolean true",),
        id="concurrency-bool",
    ),
    pytest.param(
        settings('concurrency: "4"'),
        3,
        16,
        None,
        "settings.concurrency",
        ("got the string '4' (remove the quotes)",),
        id="concurrency-string",
    ),
    pytest.param(
        settings("concurrency: 2.5"),
        3,
        16,
        None,
        "settings.concurrency",
        ("got the number 2.5",),
        id="concurrency-float",
    ),
    pytest.param(
        settings("download_concurrency: 65"),
        3,
        25,
        None,
        "settings.download_concurrency",
        ("expected an integer from 1 to 64, got 65",),
        id="download-concurrency-too-big",
    ),
    pytest.param(
        settings("job_timeout_s: 0"),
        3,
        18,
        None,
        "settings.job_timeout_s",
        ("expected a number of seconds greater than 0, got 0",),
        id="timeout-zero",
    ),
    pytest.param(
        settings("abandon_after_s: 0"),
        3,
        20,
        None,
        "settings.abandon_after_s",
        ("expected a number of seconds greater than 0, got 0",),
        id="abandon-after-zero",
    ),
    pytest.param(
        settings("job_timeout_s: .inf"),
        3,
        18,
        None,
        "settings.job_timeout_s",
        ("greater than 0, got inf",),
        id="timeout-inf",
    ),
    pytest.param(
        settings('job_timeout_s: "30"'),
        3,
        18,
        None,
        "settings.job_timeout_s",
        ("got the string '30'",),
        id="timeout-string",
    ),
    pytest.param(
        settings("concurency: 3"),
        3,
        3,
        None,
        "settings.concurency",
        ("unknown setting 'concurency'; did you mean 'concurrency'?",),
        id="setting-unknown",
    ),
    pytest.param(
        t2v().replace("jobs:", "settings: [1]\njobs:"),
        2,
        11,
        None,
        "settings",
        ("expected a mapping of run settings, got a list",),
        id="settings-list",
    ),
    # --- defaults
    pytest.param(
        defaults("id: shared"),
        3,
        3,
        None,
        "defaults.id",
        ("'id' cannot be a default",),
        id="default-id",
    ),
    pytest.param(
        defaults("resolutoin: 720p"),
        3,
        3,
        None,
        "defaults.resolutoin",
        ("unknown default 'resolutoin'; did you mean 'resolution'?",),
        id="default-unknown",
    ),
    pytest.param(
        defaults("resolution: 4k"),
        3,
        15,
        None,
        "defaults.resolution",
        ("expected one of '720p', '1080p', got '4k'",),
        id="default-bad-value",
    ),
    pytest.param(
        doc("version: 1", "defaults:", "  model: veo-3.1-t2v-fastt", "jobs:", "  - prompt: a"),
        3,
        10,
        None,
        "defaults.model",
        ("unknown model 'veo-3.1-t2v-fastt'; did you mean 'google/veo-3.1-t2v-fast'?",),
        id="default-model-unknown",
    ),
    pytest.param(
        t2v().replace("jobs:", "defaults: [720p]\njobs:"),
        2,
        11,
        None,
        "defaults",
        ("expected a mapping of request fields, got a list",),
        id="defaults-list",
    ),
    # --- the job's model and fields
    pytest.param(
        job_doc("prompt: a cat"),
        3,
        3,
        "#1",
        "model",
        ("missing 'model': set it in the job or in defaults",),
        id="model-missing",
    ),
    pytest.param(
        job_doc("model: google/veo-3.1-t2v-fastt", "prompt: a"),
        3,
        12,
        "#1",
        "model",
        ("unknown model 'google/veo-3.1-t2v-fastt'; did you mean 'google/veo-3.1-t2v-fast'?",),
        id="model-typo",
    ),
    pytest.param(
        job_doc("model: google/veo-3.1-text-to-video", "prompt: a"),
        3,
        12,
        "#1",
        "model",
        ("did you mean 'google/veo-3.1-t2v'?",),
        id="model-synonym",
    ),
    pytest.param(
        job_doc("model: sora-2", "prompt: a"),
        3,
        12,
        "#1",
        "model",
        ("unknown model 'sora-2'; expected one of 'google/veo-3.1-reference-to-video'",),
        id="model-foreign",
    ),
    pytest.param(
        job_doc("model: 3", "prompt: a"),
        3,
        12,
        "#1",
        "model",
        ("expected a model name such as 'google/veo-3.1-t2v', got the integer 3",),
        id="model-not-string",
    ),
    pytest.param(
        t2v("promt: a dog"),
        5,
        5,
        "#1",
        "promt",
        ("unknown field 'promt'; did you mean 'prompt'?",),
        id="field-typo",
    ),
    pytest.param(
        t2v("colour: red"),
        5,
        5,
        "#1",
        "colour",
        ("unknown field 'colour'; a job takes 'id', 'model' and the API's request fields",),
        id="field-unknown",
    ),
    pytest.param(
        r2v(f"image_urls: [{IMG}]", 'aspect_ratio: "16:9"'),
        6,
        5,
        "#1",
        "aspect_ratio",
        ("google/veo-3.1-reference-to-video does not accept 'aspect_ratio'",),
        id="field-not-accepted",
    ),
    pytest.param(
        r2v(f"image_urls: [{IMG}]", f"image_url: {IMG}"),
        6,
        5,
        "#1",
        "image_url",
        ("does not accept 'image_url'; did you mean 'image_urls'?",),
        id="field-not-accepted-suggestion",
    ),
    pytest.param(
        i2v(IMG, "seed: 3"),
        6,
        5,
        "#1",
        "seed",
        (
            "google/veo-3.1-i2v does not accept 'seed'; "
            "only google/veo-3.1-t2v and google/veo-3.1-t2v-fast do",
        ),
        id="field-t2v-only",
    ),
    pytest.param(
        job_doc(f"model: {I2V}", "prompt: a cat"),
        3,
        3,
        "#1",
        "image_url",
        ("google/veo-3.1-i2v requires 'image_url', which is missing",),
        id="required-missing",
    ),
    pytest.param(
        job_doc(f"model: {FLF}", "prompt: a cat", f"image_url: {IMG}"),
        3,
        3,
        "#1",
        "last_image_url",
        ("requires 'last_image_url'",),
        id="required-last-image",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "seed: 1"),
        3,
        3,
        "#1",
        "prompt",
        ("google/veo-3.1-t2v requires 'prompt', which is missing",),
        id="prompt-missing",
    ),
    # --- field values
    pytest.param(
        t2v('duration: "8"'),
        5,
        15,
        "#1",
        "duration",
        ("expected an integer (one of 4, 6, 8), got the string '8' (remove the quotes)",),
        id="duration-string",
    ),
    pytest.param(
        t2v("duration: 8.0"),
        5,
        15,
        "#1",
        "duration",
        ("got the number 8.0",),
        id="duration-float",
    ),
    pytest.param(
        t2v("duration: true"),
        5,
        15,
        "#1",
        "duration",
        ("got the boolean true",),
        id="duration-bool",
    ),
    pytest.param(
        t2v("duration: 5"),
        5,
        15,
        "#1",
        "duration",
        ("expected one of 4, 6, 8, got 5",),
        id="duration-enum",
    ),
    pytest.param(
        r2v(f"image_urls: [{IMG}]", "duration: 4"),
        6,
        15,
        "#1",
        "duration",
        ("expected 8, got 4",),
        id="duration-r2v",
    ),
    pytest.param(
        t2v('seed: "42"'),
        5,
        11,
        "#1",
        "seed",
        ("expected an integer, got the string '42' (remove the quotes)",),
        id="seed-string",
    ),
    pytest.param(
        t2v("seed: 1.5"),
        5,
        11,
        "#1",
        "seed",
        ("expected an integer, got the number 1.5",),
        id="seed-float",
    ),
    pytest.param(
        t2v('generate_audio: "true"'),
        5,
        21,
        "#1",
        "generate_audio",
        ("expected true or false, got the string 'true' (remove the quotes)",),
        id="bool-string",
    ),
    pytest.param(
        t2v("generate_audio: yes"),
        5,
        21,
        "#1",
        "generate_audio",
        ("expected true or false, got yes (YAML 1.1 reads it as true; write true)",),
        id="bool-yes",
    ),
    pytest.param(
        t2v("generate_audio: 1"),
        5,
        21,
        "#1",
        "generate_audio",
        ("expected true or false, got the integer 1",),
        id="bool-int",
    ),
    pytest.param(
        t2v("resolution: 4k"),
        5,
        17,
        "#1",
        "resolution",
        ("expected one of '720p', '1080p', got '4k'",),
        id="resolution-enum",
    ),
    pytest.param(
        t2v("resolution: 1080"),
        5,
        17,
        "#1",
        "resolution",
        ("got the integer 1080; did you mean '1080p'?",),
        id="resolution-number",
    ),
    pytest.param(
        t2v("aspect_ratio: 16:9"),
        5,
        19,
        "#1",
        "aspect_ratio",
        (
            "expected one of '16:9', '9:16', got the integer 969 "
            '(YAML reads the unquoted 16:9 as a number; write "16:9" in quotes)',
        ),
        id="aspect-unquoted",
    ),
    pytest.param(
        t2v('aspect_ratio: "4:3"'),
        5,
        19,
        "#1",
        "aspect_ratio",
        ("expected one of '16:9', '9:16', got '4:3'",),
        id="aspect-enum",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "prompt: 123"),
        4,
        13,
        "#1",
        "prompt",
        ("expected a string, got the integer 123 (YAML reads the unquoted 123 as a number",),
        id="prompt-number",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", 'prompt: "   "'),
        4,
        13,
        "#1",
        "prompt",
        ("the prompt is empty",),
        id="prompt-blank",
    ),
    pytest.param(
        job_doc(f"model: {T2V}", "prompt:", "seed: 1"),
        4,
        12,
        "#1",
        "prompt",
        ("expected a string, got nothing (an empty value)",),
        id="prompt-null",
    ),
    pytest.param(
        t2v("negative_prompt: no"),
        5,
        22,
        "#1",
        "negative_prompt",
        ('got the boolean false (YAML reads the unquoted no as a boolean; write "no" in quotes)',),
        id="string-norway",
    ),
    pytest.param(
        t2v("negative_prompt: 2024-01-31"),
        5,
        22,
        "#1",
        "negative_prompt",
        ("got the date 2024-01-31 (YAML reads the unquoted 2024-01-31 as a date",),
        id="string-date",
    ),
    pytest.param(
        t2v("provider: gogle"),
        5,
        15,
        "#1",
        "provider",
        ("expected one of 'auto', 'google', 'fal' (any case), got 'gogle'; did you mean",),
        id="provider-enum",
    ),
    pytest.param(
        t2v('enhance_prompt: "false"'),
        5,
        21,
        "#1",
        "enhance_prompt",
        ("got the string 'false' (remove the quotes)",),
        id="enhance-string",
    ),
    # --- images
    pytest.param(
        i2v("5"),
        5,
        16,
        "#1",
        "image_url",
        (
            "expected an https:// image URL, a data:image/...;base64,... URI or a local image "
            "file, got the integer 5",
        ),
        id="image-number",
    ),
    pytest.param(
        i2v("photo.jpg"),
        5,
        16,
        "#1",
        "image_url",
        ("image file 'photo.jpg': no such file", "relative to the manifest's folder"),
        id="image-local-file",
    ),
    pytest.param(
        i2v("ftp://a.example/x.png"),
        5,
        16,
        "#1",
        "image_url",
        ("expected an https:// image URL", "got 'ftp://a.example/x.png'"),
        id="image-ftp",
    ),
    pytest.param(i2v('"https://"'), 5, 16, "#1", "image_url", ("has no host",), id="image-no-host"),
    pytest.param(
        i2v('"https://a.example/my photo.png"'),
        5,
        16,
        "#1",
        "image_url",
        ("has a space at character 21", "percent-encode it as %20"),
        id="image-space",
    ),
    pytest.param(
        i2v('"https://a.example/x\\ty.png"'),
        5,
        16,
        "#1",
        "image_url",
        ("has U+0009 at character 20", "percent-encode it as %09"),
        id="image-tab",
    ),
    pytest.param(
        i2v("https://a.example:99999/x.png"),
        5,
        16,
        "#1",
        "image_url",
        ("has an invalid port",),
        id="image-port",
    ),
    pytest.param(
        i2v("data:text/plain;base64,aGk="),
        5,
        16,
        "#1",
        "image_url",
        ("a data: URI must look like data:image/<type>;base64,<data>",),
        id="data-uri-not-image",
    ),
    pytest.param(
        i2v("data:image/png;base64,***"),
        5,
        16,
        "#1",
        "image_url",
        ("does not carry valid base64 data",),
        id="data-uri-bad-base64",
    ),
    pytest.param(
        job_doc(f"model: {FLF}", "prompt: a", f"image_url: {IMG}", "last_image_url: []"),
        6,
        21,
        "#1",
        "last_image_url",
        ("got a list",),
        id="last-image-list",
    ),
    pytest.param(
        r2v("image_urls: []"),
        5,
        17,
        "#1",
        "image_urls",
        ("expected a non-empty list of image URLs, got an empty list",),
        id="image-list-empty",
    ),
    pytest.param(
        r2v(f"image_urls: {IMG}"),
        5,
        17,
        "#1",
        "image_urls",
        ("got the string 'https://a.example/1.png' (write it as a list",),
        id="image-list-string",
    ),
    pytest.param(
        r2v(f"image_urls: [{IMG}, 5]"),
        5,
        43,
        "#1",
        "image_urls.1",
        ("got the integer 5",),
        id="image-list-flow-item",
    ),
    pytest.param(
        r2v("image_urls:", f"  - {IMG}", "  - photo.jpg"),
        7,
        9,
        "#1",
        "image_urls.1",
        ("image file 'photo.jpg': no such file",),
        id="image-list-block-item",
    ),
    # --- ids
    pytest.param(
        t2v("id: ../x"),
        5,
        9,
        "#1",
        "id",
        ("the id '../x' contains '/'", "ids name the output files"),
        id="id-traversal",
    ),
    pytest.param(
        t2v("id: /abs"), 5, 9, "#1", "id", ("the id '/abs' contains '/'",), id="id-absolute"
    ),
    pytest.param(t2v('id: "a\\0b"'), 5, 9, "#1", "id", ("contains '\\x00'",), id="id-nul"),
    pytest.param(t2v('id: "a b"'), 5, 9, "#1", "id", ("contains ' '",), id="id-space"),
    pytest.param(
        t2v("id: " + "x" * 101),
        5,
        9,
        "#1",
        "id",
        ("the id is 101 characters long; at most 100 are allowed",),
        id="id-too-long",
    ),
    pytest.param(
        t2v("id: .hidden"),
        5,
        9,
        "#1",
        "id",
        ("the id '.hidden' must not start with '.'",),
        id="id-hidden",
    ),
    pytest.param(t2v('id: ".."'), 5, 9, "#1", "id", ("must not start with '.'",), id="id-dotdot"),
    pytest.param(t2v('id: "."'), 5, 9, "#1", "id", ("must not start with '.'",), id="id-dot"),
    pytest.param(
        t2v("id: 123"),
        5,
        9,
        "#1",
        "id",
        (
            "expected an id made of letters, digits, '.', '_' or '-', got the integer 123 "
            '(YAML reads the unquoted 123 as a number; write "123" in quotes)',
        ),
        id="id-number",
    ),
    pytest.param(t2v('id: ""'), 5, 9, "#1", "id", ("the id is empty",), id="id-empty"),
    pytest.param(t2v("id: [a]"), 5, 9, "#1", "id", ("got a list",), id="id-list"),
]


@pytest.mark.parametrize(("text", "line", "column", "job", "field", "parts"), BAD)
def test_bad_manifest_reports_one_located_problem(
    text: str,
    line: int,
    column: int,
    job: str | None,
    field: str | None,
    parts: tuple[str, ...],
) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert where(problem) == (line, column, job, field), problem
    for part in parts:
        assert part in problem.message, problem.message
    assert problem.file == "m.yaml"


GOOD_REQUESTS = [
    pytest.param(t2v(), {"model": T2V, "prompt": "a cat"}, id="t2v-minimal"),
    pytest.param(
        job_doc(
            f"model: {T2V_FAST}",
            "prompt: a cat",
            'aspect_ratio: "9:16"',
            "duration: 4",
            "resolution: 720p",
            "generate_audio: false",
            "seed: 42",
            "negative_prompt: dogs",
            "enhance_prompt: true",
            "auto_fix: false",
            "provider: auto",
        ),
        {
            "model": T2V_FAST,
            "prompt": "a cat",
            "aspect_ratio": "9:16",
            "duration": 4,
            "resolution": "720p",
            "generate_audio": False,
            "seed": 42,
            "negative_prompt": "dogs",
            "enhance_prompt": True,
            "auto_fix": False,
            "provider": "auto",
        },
        id="t2v-fast-every-field",
    ),
    pytest.param(
        t2v("provider: Google"),
        {"model": T2V, "prompt": "a cat", "provider": "Google"},
        id="provider-any-case-sent-as-written",
    ),
    pytest.param(
        t2v("generate_audio: True"),
        {"model": T2V, "prompt": "a cat", "generate_audio": True},
        id="bool-capitalised",
    ),
    pytest.param(
        i2v(PNG_URI),
        {"model": I2V, "prompt": "a cat", "image_url": PNG_URI},
        id="data-uri",
    ),
    pytest.param(
        job_doc(
            f"model: {FLF}-fast",
            "prompt: a cat",
            f"image_url: {IMG}",
            f"last_image_url: {IMG2}",
            "duration: 6",
        ),
        {
            "model": f"{FLF}-fast",
            "prompt": "a cat",
            "image_url": IMG,
            "last_image_url": IMG2,
            "duration": 6,
        },
        id="first-last-fast",
    ),
    pytest.param(
        r2v(f"image_urls: [{IMG}, {IMG2}]", "duration: 8", "id: r"),
        {"model": R2V, "prompt": "a cat", "image_urls": [IMG, IMG2], "duration": 8},
        id="r2v-without-id-in-body",
    ),
]


@pytest.mark.parametrize(("text", "request_body"), GOOD_REQUESTS)
def test_good_job_becomes_the_exact_request(text: str, request_body: dict[str, Any]) -> None:
    manifest = parse_manifest(text)
    assert [dict(j.request) for j in manifest.jobs] == [request_body]
    assert list(manifest.jobs[0].request)[:2] == ["model", "prompt"]
    assert manifest.warnings == ()


@pytest.mark.parametrize("value", ["8.0", "true", "1e3"])
def test_quoting_is_only_advised_for_text_fields(value: str) -> None:
    (problem,) = problems_of(t2v(f"duration: {value}"))
    assert "quotes" not in problem.message


# --- numbers YAML 1.1 reads otherwise ------------------------------------------------------

OCTAL_83 = "YAML 1.1 reads 0123 as the octal number 83; write 123 without the leading zero"
NOT_OCTAL_08 = (
    "YAML 1.1 reads 08 as the string '08': a leading zero means octal, and 8 and 9 are not "
    "octal digits; write 8 without the leading zero"
)

# (text, line, column, field, the whole message): a number written other than in plain decimal
# is refused, never sent as the number YAML 1.1 makes of it.
ODD_NUMBERS = [
    pytest.param(
        t2v("seed: 0123"),
        5,
        11,
        "seed",
        f"expected an integer, got 0123 ({OCTAL_83}, or 83 if you meant octal)",
        id="seed-octal",
    ),
    pytest.param(
        t2v("duration: 010"),
        5,
        15,
        "duration",
        "expected an integer (one of 4, 6, 8), got 010 (YAML 1.1 reads 010 as the octal "
        "number 8; write 10 without the leading zero, or 8 if you meant octal)",
        id="duration-octal",
    ),
    pytest.param(
        t2v("duration: 06"),
        5,
        15,
        "duration",
        "expected an integer (one of 4, 6, 8), got 06 (YAML 1.1 reads 06 as the octal number "
        "6; write 6 without the leading zero)",
        id="duration-leading-zero",
    ),
    pytest.param(
        t2v("seed: -0_12"),
        5,
        11,
        "seed",
        "expected an integer, got -0_12 (YAML 1.1 reads -0_12 as the octal number -10; "
        "write -12 without the leading zero, or -10 if you meant octal)",
        id="seed-negative-octal",
    ),
    pytest.param(
        t2v("seed: 0x1F"),
        5,
        11,
        "seed",
        "expected an integer, got 0x1F (YAML 1.1 reads 0x1F as the hexadecimal number 31; "
        "write 31)",
        id="seed-hex",
    ),
    pytest.param(
        t2v("seed: 0b101"),
        5,
        11,
        "seed",
        "expected an integer, got 0b101 (YAML 1.1 reads 0b101 as the binary number 5; write 5)",
        id="seed-binary",
    ),
    pytest.param(
        t2v("seed: 0o17"),
        5,
        11,
        "seed",
        "expected an integer, got 0o17 (YAML 1.1 reads 0o17 as the string '0o17'; write 15)",
        id="seed-0o",
    ),
    pytest.param(
        t2v("seed: 1:30"),
        5,
        11,
        "seed",
        "expected an integer, got 1:30 (YAML 1.1 reads 1:30 as the base-60 (sexagesimal) "
        "number 90; write 90)",
        id="seed-sexagesimal",
    ),
    pytest.param(
        t2v("seed: 1:00:00"),
        5,
        11,
        "seed",
        "expected an integer, got 1:00:00 (YAML 1.1 reads 1:00:00 as the base-60 "
        "(sexagesimal) number 3600; write 3600)",
        id="seed-sexagesimal-hours",
    ),
    pytest.param(
        t2v("seed: 1_000"),
        5,
        11,
        "seed",
        "expected an integer, got 1_000 (YAML 1.1 reads 1_000 as 1000, ignoring its "
        "underscores; write 1000)",
        id="seed-underscores",
    ),
    pytest.param(
        t2v("duration: 08"),
        5,
        15,
        "duration",
        f"expected an integer (one of 4, 6, 8), got 08 ({NOT_OCTAL_08})",
        id="duration-08-not-quoted",
    ),
    pytest.param(
        t2v("seed: 09"),
        5,
        11,
        "seed",
        "expected an integer, got 09 (YAML 1.1 reads 09 as the string '09': a leading zero "
        "means octal, and 8 and 9 are not octal digits; write 9 without the leading zero)",
        id="seed-09-not-quoted",
    ),
    pytest.param(
        t2v('duration: "08"'),
        5,
        15,
        "duration",
        "expected an integer (one of 4, 6, 8), got the string '08'",
        id="duration-08-quoted-no-unquote-hint",
    ),
    pytest.param(
        t2v("variants: 08"),
        5,
        15,
        "variants",
        f"expected a number of takes from 1 to 100, got 08 ({NOT_OCTAL_08})",
        id="variants-08",
    ),
    pytest.param(
        t2v("variants: 010"),
        5,
        15,
        "variants",
        "expected a number of takes from 1 to 100, got 010 (YAML 1.1 reads 010 as the octal "
        "number 8; write 10 without the leading zero, or 8 if you meant octal)",
        id="variants-octal",
    ),
    pytest.param(
        t2v("matrix: {seed: [1, 0123]}"),
        5,
        24,
        "matrix.seed.1",
        f"expected an integer, got 0123 ({OCTAL_83}, or 83 if you meant octal)",
        id="matrix-octal",
    ),
    pytest.param(
        t2v("matrix: {duration: [4, 8], exclude: [{duration: 010}]}"),
        5,
        53,
        "matrix.exclude.0.duration",
        "expected a plain number, got 010 (YAML 1.1 reads 010 as the octal number 8; write 10 "
        "without the leading zero, or 8 if you meant octal)",
        id="matrix-exclude-octal",  # would have left out duration 8
    ),
    pytest.param(
        defaults("seed: 0123"),
        3,
        9,
        "defaults.seed",
        f"expected an integer, got 0123 ({OCTAL_83}, or 83 if you meant octal)",
        id="default-octal",
    ),
    pytest.param(
        t2v().replace("version: 1", "version: 01"),
        1,
        10,
        "version",
        "expected the integer 1, got 01 (YAML 1.1 reads 01 as the octal number 1; write 1 "
        "without the leading zero)",
        id="version-leading-zero",
    ),
    pytest.param(
        t2v().replace("version: 1", "version: 08"),
        1,
        10,
        "version",
        f"expected the integer 1, got 08 ({NOT_OCTAL_08})",
        id="version-08",
    ),
    pytest.param(
        settings("concurrency: 010"),
        3,
        16,
        "settings.concurrency",
        "expected an integer from 1 to 10000, got 010 (YAML 1.1 reads 010 as the octal number "
        "8; write 10 without the leading zero, or 8 if you meant octal)",
        id="concurrency-octal",
    ),
    pytest.param(
        settings("concurrency: 08"),
        3,
        16,
        "settings.concurrency",
        f"expected an integer from 1 to 10000, got 08 ({NOT_OCTAL_08})",
        id="concurrency-08",
    ),
    pytest.param(
        settings("job_timeout_s: 1:00:00"),
        3,
        18,
        "settings.job_timeout_s",
        "expected a number of seconds greater than 0, got 1:00:00 (YAML 1.1 reads 1:00:00 as "
        "the base-60 (sexagesimal) number 3600; write 3600)",
        id="timeout-sexagesimal",
    ),
    pytest.param(
        settings("max_cost_usd: 1_000.5"),
        3,
        17,
        "settings.max_cost_usd",
        "expected an amount in US dollars, 0 or more (e.g. 250), got 1_000.5 (YAML 1.1 reads "
        "1_000.5 as 1000.5, ignoring its underscores; write 1000.5)",
        id="cost-underscores",
    ),
    pytest.param(
        settings(f"prices: {{{T2V}: 1:30.5}}"),
        3,
        32,
        f"settings.prices.{T2V}",
        "expected a price in USD per second of video (e.g. 0.40), got 1:30.5 (YAML 1.1 reads "
        "1:30.5 as the base-60 (sexagesimal) number 90.5; write 90.5)",
        id="price-sexagesimal-float",
    ),
    pytest.param(
        settings("max_cost_usd: 1e3"),
        3,
        17,
        "settings.max_cost_usd",
        "expected an amount in US dollars, 0 or more (e.g. 250), got 1e3 (YAML 1.1 reads 1e3 "
        "as the string '1e3': it reads an exponent only after a '.' and with a sign "
        "(1.0e+3); write 1000)",
        id="budget-exponent-without-dot",
    ),
    pytest.param(
        t2v("duration: 8e0"),
        5,
        15,
        "duration",
        "expected an integer (one of 4, 6, 8), got 8e0 (YAML 1.1 reads 8e0 as the string "
        "'8e0': it reads an exponent only after a '.' and with a sign (8.0e+0); write 8)",
        id="duration-exponent",
    ),
    pytest.param(
        settings(f"prices: {{{T2V}: 4e-1}}"),
        3,
        32,
        f"settings.prices.{T2V}",
        "expected a price in USD per second of video (e.g. 0.40), got 4e-1 (YAML 1.1 reads "
        "4e-1 as the string '4e-1': it reads an exponent only after a '.' and with a sign "
        "(4.0e-1); write 0.4)",
        id="price-exponent-without-dot",
    ),
    pytest.param(
        settings("max_cost_usd: 1.5E12"),
        3,
        17,
        "settings.max_cost_usd",
        "expected an amount in US dollars, 0 or more (e.g. 250), got 1.5E12 (YAML 1.1 reads "
        "1.5E12 as the string '1.5E12': it reads an exponent only after a '.' and with a sign "
        "(1.5e+12); write 1500000000000)",
        id="budget-exponent-without-sign",
    ),
    pytest.param(
        settings("max_cost_usd: 1e30"),
        3,
        17,
        "settings.max_cost_usd",
        "expected an amount in US dollars, 0 or more (e.g. 250), got 1e30 (YAML 1.1 reads 1e30 "
        "as the string '1e30': it reads an exponent only after a '.' and with a sign; write "
        "1.0e+30)",
        id="budget-exponent-too-long-in-decimal",
    ),
]


@pytest.mark.parametrize(("text", "line", "column", "field", "message"), ODD_NUMBERS)
def test_numbers_yaml_11_reads_otherwise_are_refused_not_sent(
    text: str, line: int, column: int, field: str | None, message: str
) -> None:
    (problem,) = problems_of(text)  # refused: no manifest, so no request
    assert (problem.line, problem.column, problem.field) == (line, column, field)
    assert problem.message == message


def test_plain_decimal_numbers_are_sent_as_written() -> None:
    text = job_doc(f"model: {T2V}", "prompt: a", "seed: -0", "duration: +8").replace(
        "jobs:",
        "settings:\n  job_timeout_s: 90.5\n  abandon_after_s: 86400\n  max_cost_usd: 010.50\n"
        f"  prices: {{{T2V}: .4, {T2V_FAST}: 1.5e-1}}\njobs:",
    )
    manifest = parse_manifest(text)
    assert dict(manifest.jobs[0].request) == {"model": T2V, "prompt": "a", "seed": 0, "duration": 8}
    assert manifest.settings.job_timeout_s == 90.5 and manifest.settings.max_cost_usd == 10.5
    assert manifest.settings.abandon_after_s == 86400
    assert dict(manifest.settings.prices) == {T2V: 0.4, T2V_FAST: 0.15}


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    text = doc(
        "version: 1",  # 1
        "settings:",  # 2
        "  concurrency: 0",  # 3
        "defaults:",  # 4
        "  resolution: 4k",  # 5
        "jobs:",  # 6
        "  - id: a",  # 7
        f"    model: {R2V}",  # 8
        "    prompt: x",  # 9
        '    aspect_ratio: "16:9"',  # 10
        "  - model: google/veo-3.1-t2v-fastt",  # 11
        "    prompt: y",  # 12
        f"  - model: {T2V}",  # 13
        "    prompt: z",  # 14
        '    duration: "8"',  # 15
        "extra: 1",  # 16
    )
    problems = problems_of(text)
    assert [(p.line, p.job, p.field) for p in problems] == [
        (3, None, "settings.concurrency"),
        (5, None, "defaults.resolution"),
        (7, "'a'", "image_urls"),
        (10, "'a'", "aspect_ratio"),
        (11, "#2", "model"),
        (15, "#3", "duration"),
        (16, None, "extra"),
    ]
    error = ManifestError(problems)
    assert str(error).startswith("7 problems in manifest:\n  m.yaml:3:16: ")


def test_problem_prints_file_line_column_job_field_and_message() -> None:
    (problem,) = problems_of(t2v('duration: "8"', "id: clip"))
    assert str(problem) == (
        "m.yaml:5:15: job 'clip': field 'duration': "
        "expected an integer (one of 4, 6, 8), got the string '8' (remove the quotes)"
    )


def test_job_line_is_the_dash_and_index_is_zero_based() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        "  # a comment before the first job",
        "  - model: google/veo-3.1-t2v",
        "    prompt: a",
        "  -",
        "    # the dash stands alone",
        "    model: google/veo-3.1-t2v",
        "    prompt: b",
    )
    manifest = parse_manifest(text)
    assert [(j.index, j.line) for j in manifest.jobs] == [(0, 4), (1, 6)]


def test_missing_field_points_at_the_dash_even_when_alone_on_its_line() -> None:
    (problem,) = problems_of(
        doc("version: 1", "jobs:", "  -", f"    model: {I2V}", "    prompt: a")
    )
    assert where(problem) == (3, 3, "#1", "image_url")


def test_flow_style_jobs_are_located_too() -> None:
    text = doc("version: 1", f"jobs: [{{model: {T2V}, prompt: a, duration: 5}}]")
    (problem,) = problems_of(text)
    assert where(problem) == (2, 57, "#1", "duration")
    assert (
        parse_manifest(doc("version: 1", f"jobs: [{{model: {T2V}, prompt: a}}]")).jobs[0].line == 2
    )


# --- ids -----------------------------------------------------------------------------------


def test_duplicate_ids_name_both_lines() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - model: {T2V}",
        "    prompt: a",
        "    id: same",
        f"  - model: {T2V}",
        "    prompt: b",
        "    id: same",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (8, 9, "'same'", "id")
    assert problem.message == "duplicate id 'same' (lines 5 and 8)"


def test_ids_differing_only_in_case_collide() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - {{id: Ballerina, model: {T2V}, prompt: a}}",
        f"  - {{id: ballerina, model: {T2V}, prompt: b}}",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (4, 10, "'ballerina'", "id")
    assert "clashes with 'Ballerina' (lines 3 and 4)" in problem.message
    assert "letter case" in problem.message


def test_identical_jobs_without_ids_collide() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - {{model: {T2V}, prompt: same}}",
        f"  - {{model: {T2V}, prompt: b}}",
        f"  - {{prompt: same, model: {T2V}}}",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (5, 3, "#3", None)
    assert "identical to job #1 (line 3)" in problem.message


def test_derived_id_is_short_model_plus_request_hash() -> None:
    manifest = parse_manifest(job_doc(f"model: {T2V_FAST}", "prompt: a cat", "seed: 7"))
    job = manifest.jobs[0]
    key = request_key({"model": T2V_FAST, "prompt": "a cat", "seed": 7})
    assert job.id == f"t2v-fast-{key[:10]}"
    assert re.fullmatch(r"t2v-fast-[0-9a-f]{10}", job.id)


def test_derived_id_is_stable_across_layout_and_differs_with_content() -> None:
    block = parse_manifest(job_doc(f"model: {R2V}", "prompt: a cat", f"image_urls: [{IMG}]"))
    flow = parse_manifest(
        doc("version: 1", "jobs:", "", f"- {{image_urls: ['{IMG}'], prompt: a cat, model: {R2V}}}")
    )
    other = parse_manifest(job_doc(f"model: {R2V}", "prompt: a dog", f"image_urls: [{IMG}]"))
    assert block.jobs[0].id == flow.jobs[0].id
    assert block.jobs[0].id.startswith("reference-to-video-")
    assert other.jobs[0].id != block.jobs[0].id


def test_derived_id_includes_applied_defaults() -> None:
    plain = parse_manifest(t2v()).jobs[0]
    defaulted = parse_manifest(t2v().replace("jobs:", "defaults: {resolution: 720p}\njobs:"))
    assert defaulted.jobs[0].request["resolution"] == "720p"
    assert defaulted.jobs[0].id != plain.id


def test_valid_ids_are_kept() -> None:
    manifest = parse_manifest(t2v("id: My_clip-2.v1"))
    assert manifest.jobs[0].id == "My_clip-2.v1"
    assert manifest.job("My_clip-2.v1") is manifest.jobs[0]


# --- defaults ------------------------------------------------------------------------------


def test_defaults_apply_only_to_models_that_accept_them_and_never_override() -> None:
    text = doc(
        "version: 1",
        "defaults:",
        "  seed: 7",
        '  aspect_ratio: "9:16"',
        "  resolution: 720p",
        "jobs:",
        f"  - {{id: t, model: {T2V}, prompt: a}}",
        f"  - {{id: i, model: {I2V}, prompt: a, image_url: '{IMG}', resolution: 1080p}}",
        f"  - {{id: r, model: {R2V}, prompt: a, image_urls: ['{IMG}']}}",
    )
    jobs = {j.id: dict(j.request) for j in parse_manifest(text).jobs}
    assert jobs["t"] == {
        "model": T2V,
        "prompt": "a",
        "seed": 7,
        "aspect_ratio": "9:16",
        "resolution": "720p",
    }
    assert jobs["i"] == {
        "model": I2V,
        "prompt": "a",
        "image_url": IMG,
        "resolution": "1080p",
        "aspect_ratio": "9:16",
    }
    assert jobs["r"] == {"model": R2V, "prompt": "a", "image_urls": [IMG], "resolution": "720p"}


def test_default_model_is_used_when_a_job_has_none() -> None:
    text = doc(
        "version: 1",
        f"defaults: {{model: {T2V_FAST}, seed: 4}}",
        "jobs:",
        "  - prompt: a",
        f"  - {{model: {R2V}, prompt: b, image_urls: ['{IMG}']}}",
    )
    first, second = parse_manifest(text).jobs
    assert dict(first.request) == {"model": T2V_FAST, "prompt": "a", "seed": 4}
    assert first.id.startswith("t2v-fast-")
    assert dict(second.request) == {"model": R2V, "prompt": "b", "image_urls": [IMG]}


def test_a_bad_default_is_reported_once_at_the_defaults_line() -> None:
    text = doc(
        "version: 1",
        "defaults:",
        "  resolution: 4k",
        "jobs:",
        *(f"  - {{model: {T2V}, prompt: p{i}}}" for i in range(3)),
    )
    assert [where(p) for p in problems_of(text)] == [(3, 15, None, "defaults.resolution")]


def test_a_default_invalid_for_one_model_names_that_model() -> None:
    text = doc(
        "version: 1",
        "defaults: {duration: 4}",
        "jobs:",
        f"  - {{model: {T2V}, prompt: a}}",
        f"  - {{model: {R2V}, prompt: b, image_urls: ['{IMG}']}}",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (2, 22, None, "defaults.duration")
    assert problem.message == "expected 8, got 4 (for google/veo-3.1-reference-to-video jobs)"
    assert (
        parse_manifest(text.replace(f"  - {{model: {R2V}", "  # ")).jobs[0].request["duration"] == 4
    )


def test_unused_defaults_warn_and_are_still_checked() -> None:
    unused = defaults("image_url: https://a.example/x.png")
    manifest = parse_manifest(unused)
    assert [(where(w), w.message) for w in manifest.warnings] == [
        (
            (3, 3, None, "defaults.image_url"),
            "this default is never used: no job's model accepts 'image_url'",
        )
    ]
    overridden = parse_manifest(t2v("seed: 1").replace("jobs:", "defaults: {seed: 2}\njobs:"))
    assert "every job whose model accepts 'seed' sets it itself" in overridden.warnings[0].message
    (problem,) = problems_of(defaults('seed: "x"'))
    assert where(problem) == (3, 9, None, "defaults.seed")


# --- warnings ------------------------------------------------------------------------------


def test_plain_http_image_is_a_warning() -> None:
    manifest = parse_manifest(i2v("http://a.example/1.png"))
    (warning,) = manifest.warnings
    assert where(warning) == (5, 16, "#1", "image_url")
    assert "the API may refuse plain http" in warning.message
    assert manifest.jobs[0].request["image_url"] == "http://a.example/1.png"


def test_data_uri_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert manifest_checks.DATA_URI_WARN_BYTES == 7_000_000
    assert manifest_checks.DATA_URI_MAX_BYTES == 20_000_000
    monkeypatch.setattr(manifest_checks, "DATA_URI_WARN_BYTES", len(PNG_URI) - 1)
    monkeypatch.setattr(manifest_checks, "DATA_URI_MAX_BYTES", len(PNG_URI) + 1)
    (warning,) = parse_manifest(i2v(PNG_URI)).warnings
    assert "inline images above a few MB are reported to fail" in warning.message
    monkeypatch.setattr(manifest_checks, "DATA_URI_MAX_BYTES", len(PNG_URI) - 1)
    (problem,) = problems_of(i2v(PNG_URI))
    assert where(problem) == (5, 16, "#1", "image_url")
    assert "above the 0 MB limit" in problem.message


# --- image URLs ----------------------------------------------------------------------------


# The published schemas give image URLs "format": "uri" (RFC 3986): an API enforcing it would
# answer 400 mid-batch, so each is refused before anything is sent, at its first bad character.
BAD_URLS = [
    pytest.param(
        "https://e.com/ü.png",
        "the URL has 'ü' at character 15, which a URL cannot carry as it is; "
        "percent-encode it as %C3%BC",
        id="non-ascii",
    ),
    pytest.param(
        "https://e.com/{id}.png",
        "the URL has '{' at character 15, which a URL cannot carry as it is; "
        "percent-encode it as %7B",
        id="brace",
    ),
    pytest.param(
        "https://e.com/a|b.png",
        "the URL has '|' at character 16, which a URL cannot carry as it is; "
        "percent-encode it as %7C",
        id="pipe",
    ),
    pytest.param(
        "https://e.com/a^b.png",
        "the URL has '^' at character 16, which a URL cannot carry as it is; "
        "percent-encode it as %5E",
        id="caret",
    ),
    pytest.param(
        "https://e.com/a\\b.png",
        "the URL has '\\' at character 16, which a URL cannot carry as it is; "
        "percent-encode it as %5C",
        id="backslash",
    ),
    pytest.param(
        'https://e.com/a"b.png',
        "the URL has '\"' at character 16, which a URL cannot carry as it is; "
        "percent-encode it as %22",
        id="double-quote",
    ),
    pytest.param(
        "https://e.com/a\x7fb.png",
        "the URL has U+007F at character 16, which a URL cannot carry as it is; "
        "percent-encode it as %7F",
        id="delete",
    ),
    pytest.param(
        "https://e.com/%zz.png",
        "the URL has a '%' at character 15 that is not followed by two hex digits; "
        "percent-encode a literal % as %25",
        id="bad-percent",
    ),
    pytest.param(
        "https://e.com/a#b#c",
        "the URL has a second '#' at character 18: only the first starts the fragment; "
        "percent-encode this one as %23",
        id="two-hashes",
    ),
    pytest.param(
        "https://e.com/a[1].png",
        "the URL has '[' at character 16, outside a [...] IPv6 host; percent-encode it as %5B",
        id="bracket-in-path",
    ),
    pytest.param(
        "https://bücher.example/a.png",
        "the URL's host has 'ü' at character 10, which a URL cannot carry; write the host in "
        "its ASCII (xn--) form, xn--bcher-kva.example",
        id="non-ascii-host",
    ),
    pytest.param(
        "https://a@b@e.com/x.png",
        "the URL's host part 'a@b@e.com' is not user@host:port; percent-encode an '@' in a "
        "user name as %40",
        id="two-at-signs",
    ),
    pytest.param(
        "https://[x/a.png",
        "the URL 'https://[x/a.png' has an invalid host: [...] may only hold an IPv6 address",
        id="unclosed-bracket",  # was an uncaught ValueError from urlsplit
    ),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_image_urls_that_are_not_uris_are_refused_before_sending(url: str, message: str) -> None:
    (problem,) = problems_of(i2v(json.dumps(url)))  # a YAML double-quoted string
    assert where(problem) == (5, 16, "#1", "image_url")
    assert problem.message == message


@pytest.mark.parametrize(
    "url",
    [
        "https://e.com/a%20b%C3%BC.png?x=1&y=(2);z=$'*+,!@:/?#frag/?:@",
        "https://[::1]:8443/a.png",
        "https://u:p%40w@e.com/~a_b-c.png",
        "HTTPS://E.COM/A.PNG#",
    ],
)
def test_image_urls_that_are_uris_are_sent_as_written(url: str) -> None:
    manifest = parse_manifest(i2v(json.dumps(url)))
    assert manifest.jobs[0].request["image_url"] == url
    assert manifest.warnings == ()


# --- settings ------------------------------------------------------------------------------


def test_settings_map_to_manifest_settings() -> None:
    text = t2v().replace(
        "jobs:",
        "settings:\n  concurrency: 4\n  job_timeout_s: 1800\n  download_concurrency: 2\njobs:",
    )
    assert parse_manifest(text).settings == ManifestSettings(4, 1800.0, 2)
    assert isinstance(parse_manifest(text).settings.job_timeout_s, float)
    assert parse_manifest(t2v()).settings == ManifestSettings()


# --- YAML features -------------------------------------------------------------------------


def test_anchors_and_merge_keys_work_and_jobs_do_not_share_values() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - &base {{id: one, model: {R2V}, prompt: a, image_urls: ['{IMG}']}}",
        "  - <<: *base",
        "    id: two",
        "    prompt: b",
    )
    one, two = parse_manifest(text).jobs
    assert dict(two.request) == {"model": R2V, "prompt": "b", "image_urls": [IMG]}
    one.request["image_urls"].append("x")
    assert two.request["image_urls"] == [IMG]


def bomb(prefix: str = "") -> list[str]:
    """Nine anchors, each ten aliases of the one before: 10**9 values from 400 characters."""
    lines = [f"{prefix}a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        alias = f"*a{i - 1}" if i > 1 else "*a"
        lines.append(f"{prefix}a{i}: &a{i} [" + ", ".join([alias] * 10) + "]")
    return lines


def test_alias_bombs_are_refused_as_a_limit_before_anything_is_built() -> None:
    (problem,) = problems_of(doc(*bomb()))
    assert where(problem) == (9, 1, None, "a8.0")
    assert problem.message == (
        "this alias expands to 111,111,111 values, and the manifest's aliases to "
        "1,234,567,900, past the limit of 100,000 for a manifest of this size (2 per "
        "character, at least 100,000): its anchor holds aliases to anchors that hold "
        "aliases, each repeating the next (a 'billion laughs'); write the values out instead"
    )


def test_an_alias_bomb_in_a_job_names_the_job_and_its_field() -> None:
    text = doc(
        "version: 1",
        *bomb("x-"),
        "jobs:",
        "  - id: boom",
        f"    model: {R2V}",
        "    prompt: a",
        "    image_urls: *a8",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (15, 5, "'boom'", "image_urls")
    assert problem.message.startswith("this alias expands to 1,111,111,111 values")


def test_a_large_manifest_does_not_let_a_bomb_through() -> None:
    padding = "# " + "x" * 1_000_000  # raises the limit to 2 values a character
    (problem,) = problems_of(doc(padding, *bomb()))
    assert where(problem)[:2] == (10, 1)
    assert "past the limit of 2,001,004 " in problem.message
    assert "billion laughs" in problem.message


def test_an_anchor_repeated_past_the_limit_says_to_split_the_manifest() -> None:
    text = doc(
        "version: 1",
        "x-big: &big [" + ", ".join(["0"] * 1000) + "]",
        "x-many: [" + ", ".join(["*big"] * 1000) + "]",
        "jobs: []",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (3, 1, None, "x-many.0")
    assert problem.message == (
        "the aliases of this manifest expand it to 1,002,005 values, past the limit of "
        "100,000 for a manifest of this size (2 per character, at least 100,000); each alias "
        "repeats all its anchor's values (here, 1,001): split the manifest, or put fewer "
        "values in the anchors"
    )


def test_many_jobs_merging_one_anchor_are_not_an_alias_bomb() -> None:
    """The README's pattern, 10,000 jobs each merging an anchor of eight fields that merges
    three more: 150,000 values, built from 350,000 characters."""
    text = doc(
        "version: 1",
        "x-look: &look {aspect_ratio: '16:9', resolution: 720p, generate_audio: false}",
        "x-base: &base",
        "  <<: *look",
        f"  model: {T2V_FAST}",
        "  duration: 4",
        "  enhance_prompt: false",
        "  auto_fix: false",
        "  provider: google",
        "  negative_prompt: blurry, low quality",
        "  seed: 7",
        "jobs:",
        *(f"  - {{<<: *base, prompt: shot {i}}}" for i in range(10_000)),
    )
    jobs = parse_manifest(text).jobs
    assert len(jobs) == 10_000
    assert jobs[-1].request["prompt"] == "shot 9999"
    assert jobs[-1].request["aspect_ratio"] == "16:9"
    assert jobs[-1].request["negative_prompt"] == "blurry, low quality"


@pytest.mark.parametrize(
    ("text", "line", "column", "job", "field"),
    [
        (doc("version: 1", "x-a: &a [1, *a]", "jobs: []"), 2, 1, None, "x-a.1"),
        (
            doc("version: 1", "jobs:", "  - id: loop", "    matrix: &m {seed: [1, *m]}"),
            4,
            17,
            "'loop'",
            "matrix.seed.1",
        ),
    ],
    ids=["top-level", "in-a-job"],
)
def test_an_alias_to_a_value_that_holds_it_is_refused(
    text: str, line: int, column: int, job: str | None, field: str
) -> None:
    (problem,) = problems_of(text)
    assert where(problem) == (line, column, job, field)
    assert problem.message == (
        "this alias refers to a value that holds it, which would repeat without end; "
        "refer to another anchor"
    )


def test_source_map_finds_positions_by_path() -> None:
    source = compose(doc("jobs:", "  - a: 1", "  -", "    duration: 8")).source
    assert source.value(("jobs", 1, "duration")) == Pos(4, 15)
    assert source.key(("jobs", 1, "duration")) == Pos(4, 5)
    assert source.item(("jobs", 1)) == Pos(3, 3)
    assert source.value(("jobs", 1, "missing")) == Pos(4, 5)


# --- files ---------------------------------------------------------------------------------


def test_load_manifest_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as caught:
        load_manifest(missing)
    (problem,) = caught.value.problems
    assert problem.file == str(missing)
    assert problem.line is None
    assert "cannot read the manifest" in problem.message
    with pytest.raises(ManifestError):
        load_manifest(tmp_path)


def test_load_manifest_reports_non_utf8_with_position(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\njobs:\n  - prompt: caf\xe9\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(str(path))
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.column) == (str(path), 3, 16)
    assert "not UTF-8" in problem.message


def test_load_manifest_accepts_a_bom_and_keeps_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + t2v().encode())
    manifest = load_manifest(path)
    assert manifest.path == path
    assert len(manifest.jobs) == 1


def test_parse_manifest_path_defaults_to_file() -> None:
    assert parse_manifest(t2v(), file="x.yaml").path == Path("x.yaml")
    assert parse_manifest(t2v(), path=Path("/a/b.yaml")).path == Path("/a/b.yaml")


# --- the shipped manifests -----------------------------------------------------------------

SEED_REQUESTS = {
    "ballerina": {
        "model": "google/veo-3.1-reference-to-video",
        "prompt": (
            "A graceful ballerina dancing outside a circus tent on green grass, with colorful "
            "wildflowers swaying around her as she twirls and poses in the meadow."
        ),
        "image_urls": [
            "https://storage.googleapis.com/falserverless/example_inputs/veo31-r2v-input-1.png",
            "https://storage.googleapis.com/falserverless/example_inputs/veo31-r2v-input-2.png",
            "https://storage.googleapis.com/falserverless/example_inputs/veo31-r2v-input-3.png",
        ],
    },
    "hello-world": {
        "model": "google/veo-3.1-first-last-image-to-video",
        "prompt": (
            "A woman looks into the camera, breathes in, then exclaims energetically, "
            "'Hello world!'"
        ),
        "image_url": (
            "https://storage.googleapis.com/falserverless/example_inputs/veo31-flf2v-input-1.jpeg"
        ),
        "last_image_url": (
            "https://storage.googleapis.com/falserverless/example_inputs/veo31-flf2v-input-2.jpeg"
        ),
    },
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a manifest must never reach out, whatever its URLs."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the manifest loader touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_example_manifest_is_the_two_seed_requests() -> None:
    manifest = load_manifest(REPO / "jobs" / "example.yaml")
    assert manifest.warnings == ()
    assert {j.id: dict(j.request) for j in manifest.jobs} == SEED_REQUESTS


def _seed_request(page: Path) -> dict[str, Any]:
    """The ``data = {...}`` body of the Python example in one of the API's doc pages."""
    match = re.search(r"^    data = (\{.*?^    \})", page.read_text(), re.MULTILINE | re.DOTALL)
    assert match is not None
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, dict)
    return value


def test_seed_requests_match_the_api_documentation() -> None:
    beside_or_skip(SEEDS, "the API's doc pages")
    documented = {
        "ballerina": _seed_request(SEEDS / "veo-3.1-reference-to-video.md"),
        "hello-world": _seed_request(SEEDS / "veo-3.1-first-last-image-to-video.md"),
    }
    assert documented == SEED_REQUESTS


@pytest.mark.usefixtures("no_network")
def test_demo_manifest_loads_cleanly() -> None:
    manifest = load_manifest(REPO / "jobs" / "demo.yaml")
    assert manifest.warnings == ()
    assert manifest.settings == ManifestSettings(concurrency=3)
    assert 5 <= len(manifest.jobs) <= 6
    models = {j.model for j in manifest.jobs}
    assert {T2V, T2V_FAST, R2V} <= models
    assert any("i2v" in m for m in models) and any("first-last" in m for m in models)
    for job in manifest.jobs:
        assert job.request["resolution"] in ("720p", "1080p")
        accepts_4 = 4 in (MODELS[job.model].fields["duration"].enum or ())
        assert job.duration_s == (4 if accepts_4 else 8)
    fast = next(j for j in manifest.jobs if j.model == T2V_FAST)
    assert {"seed", "negative_prompt"} <= set(fast.request)


# --- text the parser reads differently from an editor -------------------------------------


def test_surrogate_pair_escapes_become_the_character() -> None:
    text = job_doc(f"model: {T2V}", 'prompt: "A cat \\ud83d\\ude00 smiles"', "id: cat")
    (job,) = parse_manifest(text).jobs
    assert job.request["prompt"] == "A cat \U0001f600 smiles"
    assert len(job.key) == 64  # hashing used to fail on the two lone halves


@pytest.mark.parametrize(
    ("fields", "line", "column", "field"),
    [
        ((f"model: {T2V}", 'prompt: "a \\udc80 b"'), 4, 13, "prompt"),
        ((f"model: {T2V}", 'prompt: "a \\ud83d b"', "id: x"), 4, 13, "prompt"),
        ((f"model: {T2V}", "prompt: a", 'id: "x\\ud800"'), 5, 9, "id"),
        ((f"model: {T2V}", "prompt: a", '"seed\\udc00": 1'), 5, 5, "seed\ufffd"),
    ],
    ids=["prompt-no-id", "prompt-with-id", "id", "key"],
)
def test_an_unpaired_surrogate_is_one_located_problem(
    fields: tuple[str, ...], line: int, column: int, field: str
) -> None:
    (problem,) = problems_of(job_doc(*fields))
    assert (problem.line, problem.column, problem.field) == (line, column, field)
    assert "half of a UTF-16 surrogate pair" in problem.message
    str(problem).encode("utf-8")  # printable as it stands


@pytest.mark.parametrize("odd", ["\u2028", "\u2029", "\x85"])
def test_a_pasted_line_separator_is_sent_as_written_and_moves_no_line(odd: str) -> None:
    # YAML 1.1 breaks lines there: the quoted prompt lost it to a space, and the plain one
    # ended in a syntax error blamed on the next field.
    text = job_doc(f"model: {T2V}", f'prompt: "first{odd}second"', "duration: 5")
    (problem,) = problems_of(text)
    assert where(problem) == (5, 15, "#1", "duration")
    for written in (f'"first{odd}second"', f"first{odd}second"):
        (job,) = parse_manifest(job_doc(f"model: {T2V}", f"prompt: {written}", "id: c")).jobs
        assert job.request["prompt"] == f"first{odd}second" and job.id == "c"


# --- zero jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("version: 1\njobs_from: []\n", 2, "there is no 'jobs' list"),
        ("version: 1\njobs: []\njobs_from: []\n", 3, "'jobs' is empty"),
    ],
)
def test_a_manifest_without_any_job_is_an_error(text: str, line: int, words: str) -> None:
    (problem,) = problems_of(text)
    assert (problem.file, problem.line, problem.field) == ("m.yaml", line, "jobs_from")
    assert "the manifest has no jobs" in problem.message and words in problem.message


# --- duplicate ids beside other problems ---------------------------------------------------


def test_duplicate_ids_are_reported_with_the_jobs_other_problems() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - {{id: a, model: {T2V}, prompt: hi, duration: 5}}",
        f"  - {{id: a, model: {T2V}, prompt: hi2}}",
        f"  - {{id: b, model: {T2V}, prompt: hi, bogus: 1}}",
        "  - {id: b, model: nope, prompt: hi}",
        f"  - {{id: m, model: {T2V}, prompt: hi, matrix: {{duration: [4, 5]}}}}",
        f"  - {{id: m-4, model: {T2V}, prompt: hi, variants: 2, seed: x}}",
        f"  - {{id: m-4-2, model: {T2V}, prompt: hi}}",
    )
    found = {(p.line, p.message.split(" (")[0]) for p in problems_of(text)}
    assert {
        (4, "duplicate id 'a'"),
        (6, "duplicate id 'b'"),
        (9, "duplicate id 'm-4-2'"),
    } <= found
    assert (3, "expected one of 4, 6, 8, got 5") in found


def test_a_job_repeated_by_an_alias_is_located_at_the_alias() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        "  - &j",
        "    id: c",
        f"    model: {T2V}",
        "    prompt: hi",
        "  - *j",
    )
    (problem,) = problems_of(text)
    assert where(problem) == (7, 3, "'c'", "id")
    assert problem.message == "duplicate id 'c' (lines 4 and 7)"


# --- data: URIs are images too -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        (
            "data:image/png;base64,aGVsbG8=",
            "the inline image is not an image: its bytes look like text",
        ),
        (
            data_uri("GIF", "image/gif"),
            "the inline image is a GIF image; the API takes JPEG, PNG, WEBP",
        ),
        ("data:image/svg+xml;base64,PHN2Zy8+", "the inline image is not an image"),
        (data_uri("JPEG", "image/png"), "says image/png, but its bytes are image/jpeg"),
        (data_uri("PNG", "image/jpg"), "says image/jpg, but its bytes are image/png"),
        ("data:image/png;base64,AA=A", "does not carry valid base64 data"),
        ("data:image/png;base64,", "does not carry valid base64 data"),
        ("data:image/png;base64,iVBO Rw0K", "spaces or line breaks"),
        # Accepted, then refused by the simulator and copied whole into every record (the
        # records shorten only "data:" URIs).
        ("DATA:image/png;base64,AA==", "write the scheme of a data: URI in lower case"),
    ],
    ids=["text", "gif", "svg", "mismatch", "jpg-alias", "padding", "empty", "wrapped", "upper"],
)
def test_data_uris_are_judged_by_their_bytes(uri: str, words: str) -> None:
    (problem,) = problems_of(i2v(f"'{uri}'"))
    assert where(problem) == (5, 16, "#1", "image_url")
    assert words in problem.message


def test_a_data_uri_without_its_prefix_is_named_briefly() -> None:
    # It reads as a file name: the message once held all 6 MB of it, and "File name too long".
    (problem,) = problems_of(i2v("'image/png;base64," + "A" * 5000 + "'"))
    assert where(problem) == (5, 16, "#1", "image_url")
    assert problem.message.startswith("'image/png;base64,AAAA")
    assert (
        "is not an https:// URL, a data:image/...;base64,... URI or the name of an image file"
        in (problem.message)
    )
    assert len(problem.message) < 200


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("JPEG", "image/jpg"), ("MPO", "image/jpeg")],
    ids=["jpeg", "webp", "jpg-spelling", "mpo-is-a-jpeg"],
)
def test_data_uris_of_the_apis_formats_are_sent_as_written(fmt: str, mime: str) -> None:
    uri = data_uri(fmt, mime.upper())
    (job,) = parse_manifest(i2v(uri)).jobs
    assert job.request["image_url"] == uri


def test_a_data_uri_is_decoded_once_and_warned_about_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = data_uri(size=(320, 180))
    decoded: list[int] = []
    real = base64.b64decode

    def counting(data: str, validate: bool = False) -> bytes:
        decoded.append(len(data))
        return real(data, validate=validate)

    monkeypatch.setattr(manifest_checks.base64, "b64decode", counting)
    text = doc(
        "version: 1",
        f"defaults: {{model: {I2V}}}",
        "jobs:",
        f"  - {{prompt: a, image_url: &img '{small}'}}",
        "  - {prompt: b, image_url: *img}",
        f"  - {{prompt: c, image_url: '{small}'}}",
    )
    manifest = parse_manifest(text)
    assert len(manifest.jobs) == 3 and len(decoded) == 1
    (warning,) = manifest.warnings
    assert "the inline image is 320x180, smaller than 720p" in warning.message


def test_thousands_of_problems_show_the_first_fifty_then_where_the_rest_are(
    tmp_path: Path,
) -> None:
    jobs = "".join(
        f"  - model: google/veo-3.1-t2v\n    prompt: p{i}\n    duration: 5\n" for i in range(3000)
    )
    jobs += "  - model: google/veo-3.1-t2v\n    prompt: ''\n"
    m = tmp_path / "m.yaml"
    m.write_text("version: 1\njobs:\n" + jobs)
    with pytest.raises(ManifestError) as err:
        load_manifest(m)
    assert len(err.value.problems) == 3001  # all kept for whoever reads them
    lines = str(err.value).splitlines()
    assert lines[0] == "3,001 problems in manifest:" and len(lines) == 52
    assert lines[1].startswith(f"  {m}:5:15: job #1: field 'duration': expected one of 4, 6, 8")
    assert lines[-1] == "  ... and 2,951 more (2,950 in 'duration', 1 in 'prompt')"


@pytest.mark.parametrize(
    ("written", "words"),
    [
        ("yes", "got yes (YAML 1.1 reads it as true; write true)"),
        ("off", "got off (YAML 1.1 reads it as false; write false)"),
        ("~", "got nothing (an empty value)"),
        ('"true"', "got the string 'true'"),
    ],
)
def test_a_setting_refuses_the_yes_and_no_a_job_field_refuses(written: str, words: str) -> None:
    text = doc(
        "version: 1",
        "settings:",
        f"  retry_failed: {written}",
        "jobs:",
        f"  - model: {T2V}",
        "    prompt: a",
    )
    (problem,) = problems_of(text)
    assert (problem.line, problem.field) == (3, "settings.retry_failed")
    assert problem.message == f"expected true or false, {words}"
    for ok in ("true", "True", "FALSE"):
        settings = parse_manifest(text.replace(written, ok, 1)).settings
        assert settings.retry_failed is (ok.lower() == "true")


@pytest.mark.parametrize("written", ["con", "NUL", "Com1", "lpt9.take", "aux."])
def test_a_windows_device_name_is_no_id(written: str) -> None:
    (problem,) = problems_of(t2v(f"id: {written}"))
    assert problem.field == "id" and "a device name on Windows" in problem.message
    for fine in ("console", "aux-1", "nul_take", "a.con"):
        assert parse_manifest(t2v(f"id: {fine}")).jobs[0].id == fine


# --- text YAML reads other than it was written ------------------------------------------


def test_a_comment_after_an_unquoted_prompt_is_refused_not_cut_off() -> None:
    # "model #42" is a hashtag to the writer and a comment to YAML: the prompt sent would
    # stop at "model", and be paid for.
    text = t2v("negative_prompt: blurry, logos #no-watermarks").replace(
        "prompt: a cat", "prompt: Sneaker model #42 on a table"
    )
    first, second = problems_of(text)
    assert where(first) == (4, 13, "#1", "prompt")
    assert "YAML reads '#42 on a table' as a comment" in first.message
    assert "would end at 'Sneaker model'" in first.message
    assert where(second) == (5, 22, "#1", "negative_prompt")
    # Quoted, the '#' is text; a comment after a quoted value or a one-word field is fine.
    ok = parse_manifest(
        t2v("seed: 3  # a comment").replace("prompt: a cat", 'prompt: "model #42"  # v2')
    )
    assert ok.jobs[0].request["prompt"] == "model #42"


def test_a_prompt_starting_with_an_unused_anchor_is_refused_not_cut() -> None:
    # '&hero a cat' is text to the writer and an anchor named 'hero' to YAML: the prompt sent
    # would be 'a cat', and be paid for.
    text = t2v("seed: 3").replace("prompt: a cat", "prompt: &hero a cat on a table")
    (problem,) = problems_of(text)
    assert where(problem) == (4, 13, "#1", "prompt")
    assert "YAML reads '&hero' as an anchor (no alias uses it)" in problem.message
    assert "would start at 'a cat on a table'" in problem.message
    # An anchor some alias uses is YAML meant as YAML; quoted, '&' is text.
    shared = job_doc(f"model: {T2V}", "prompt: &p a dog") + f"  - model: {T2V}\n    prompt: *p\n"
    shared += "    seed: 2\n"
    assert [j.request["prompt"] for j in parse_manifest(shared).jobs] == ["a dog", "a dog"]
    # Text that merely contains '*hero' is no alias of it.
    lookalike = t2v("negative_prompt: no *hero* poses, *heroic").replace(
        "prompt: a cat", "prompt: &hero a cat"
    )
    assert "as an anchor" in problems_of(lookalike)[0].message
    quoted = t2v("seed: 3").replace("prompt: a cat", 'prompt: "&hero a cat"')
    assert parse_manifest(quoted).jobs[0].request["prompt"] == "&hero a cat"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "prompt",
            "! big bang",
            "YAML reads the '!' as a tag, not as text, so the prompt would start at 'big bang'; "
            "quote the whole prompt to keep the '!'",
        ),
        (
            "negative_prompt",
            "&n ! blur",
            "YAML reads the '!' as a tag, not as text, so the negative_prompt would start at "
            "'blur'; quote the whole negative_prompt to keep the '!'",
        ),
        (
            "id",
            "! x",
            "YAML reads the '!' as a tag, not as text, so the id would start at 'x'; quote the "
            "whole id to keep the '!'",
        ),
        (
            "prompt",
            "!wow a cat",
            "unsupported YAML tag '!wow' (YAML reads a value that starts with '!' as a tag; "
            "quote the whole prompt to keep it as text)",
        ),
        (
            "prompt",
            "!Boom",
            "unsupported YAML tag '!Boom' (YAML reads a value that starts with '!' as a tag; "
            "quote the whole prompt to keep it as text)",
        ),
        ("seed", "!foo 8", "unsupported YAML tag '!foo'"),  # quoting would not make it a seed
    ],
)
def test_a_value_starting_with_a_non_standard_tag_is_refused_not_cut(
    field: str, value: str, message: str
) -> None:
    # '! big bang' is YAML's non-specific tag before the text 'big bang': the '!' was dropped.
    text = job_doc(f"model: {T2V}", "prompt: a cat", f"{field}: {value}")
    if field == "prompt":
        text = job_doc(f"model: {T2V}", f"prompt: {value}")
    (problem,) = problems_of(text)
    assert (problem.field, problem.message) == (field, message)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_bare_equals_sign_is_refused_with_how_to_quote_it(field: str) -> None:
    # YAML 1.1 resolves a lone '=' to its "value" tag: the message named only that tag.
    text = job_doc(f"model: {T2V}", "prompt: a cat", f"{field}: =")
    if field == "prompt":
        text = job_doc(f"model: {T2V}", "prompt: =")
    (problem,) = problems_of(text)
    assert (problem.field, problem.message) == (
        field,
        f"YAML 1.1 reads a bare '=' as a special key, not as text; quote it (\"=\") to send "
        f"'=' as the {field}",
    )
    quoted = job_doc(f"model: {T2V}", 'prompt: "="')
    assert parse_manifest(quoted).jobs[0].request["prompt"] == "="


def test_standard_tags_and_quoted_bangs_are_still_text() -> None:
    text = job_doc(f"model: {T2V}", 'prompt: "! big bang"', "negative_prompt: !!str 8")
    (job,) = parse_manifest(text).jobs
    assert job.request["prompt"] == "! big bang"
    assert job.request["negative_prompt"] == "8"


def test_a_field_missing_its_colon_inside_a_prompt_is_refused() -> None:
    # Indented under a multi-line prompt, "duration 4" becomes prompt text and 8 s is billed.
    text = job_doc(f"model: {T2V}", "prompt: A cat walks", "  on the beach.", "  duration 4")
    (problem,) = problems_of(text)
    assert where(problem) == (4, 13, "#1", "prompt")
    assert "line 6 ('duration 4') reads like the field 'duration' missing its ':'" in (
        problem.message
    )
    # Prose that merely starts with a field's name is not mistaken for one.
    for first, rest in (
        ("A shiny red", "model of a car"),
        ("A runway show with a", "model walking"),  # two words: only the value tells
        ("Dandelion clocks burst as each", "seed drifts"),
        ("blurry, low", "resolution artifacts"),
        ("The", "duration matters"),
    ):
        prose = job_doc(f"model: {T2V}", f"prompt: {first}", f"  {rest}")
        assert parse_manifest(prose).jobs[0].request["prompt"] == f"{first} {rest}"
    for line in ("resolution 720p", "seed=42", "aspect_ratio 9:16", "generate_audio false"):
        text = job_doc(f"model: {T2V}", "prompt: A cat", f"  {line}")
        assert "missing its ':'" in problems_of(text)[0].message, line


def test_top_level_x_keys_hold_anchors_and_are_skipped() -> None:
    text = doc(
        "version: 1",
        f"x-common: &common {{model: {T2V_FAST}, duration: 4}}",
        "jobs:",
        "  - <<: *common",
        "    prompt: a cat",
    )
    (job,) = parse_manifest(text).jobs
    assert job.request == {"model": T2V_FAST, "prompt": "a cat", "duration": 4}
    (problem,) = problems_of(text.replace("x-common", "common"))
    assert "unknown top-level key 'common'" in problem.message


def test_a_model_name_missing_its_prefix_still_has_its_fields_checked() -> None:
    # One round of fixes, not two: the fields are checked as for the model it most likely means.
    text = job_doc("model: veo-3.1-t2v", "prompt: a cat", "duration: 5", "seeed: 3")
    model, duration, seeed = problems_of(text)
    assert "did you mean 'google/veo-3.1-t2v'?" in model.message
    assert (duration.field, seeed.field) == ("duration", "seeed")


def test_a_refused_matrix_still_has_its_values_checked() -> None:
    bad_exclude = job_doc(
        f"model: {T2V}",
        "prompt: a cat",
        "matrix:",
        '  duration: [4, "8", 5]',
        "  exclude: [{resolution: 720p}]",
    )
    problems = problems_of(bad_exclude)
    assert [p.field for p in problems] == [
        "matrix.duration.1",
        "matrix.duration.2",
        "matrix.exclude.0.resolution",
    ]
    too_big = job_doc(
        f"model: {T2V}",
        "prompt: a cat",
        "matrix:",
        f"  seed: [{', '.join(map(str, range(1001)))}]",
        "  duration: [5]",
    )
    fields = {p.field for p in problems_of(too_big)}
    assert fields == {"matrix", "matrix.duration.0"}


def test_two_jobs_with_their_own_ids_and_the_same_seed_are_warned_of() -> None:
    text = doc(
        "version: 1",
        "jobs:",
        f"  - {{id: a, model: {T2V}, prompt: x, seed: 5}}",
        f"  - {{id: b, model: {T2V}, prompt: x, seed: 5}}",
        f"  - {{id: c, model: {T2V}, prompt: x}}",
        f"  - {{id: d, model: {T2V}, prompt: x}}",
    )
    manifest = parse_manifest(text)
    (warning,) = manifest.warnings
    assert (warning.line, warning.job) == (4, "'b'")
    assert "same request and seed as job 'a' (line 3)" in warning.message


def test_a_table_listed_twice_is_one_problem_not_one_per_row(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(f"id,model,prompt\na,{T2V},x\nb,{T2V},y\n")
    (tmp_path / "m.yaml").write_text("version: 1\njobs_from: [t.csv, ./t.csv]\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "m.yaml")
    (problem,) = caught.value.problems
    assert (problem.line, problem.field) == (2, "jobs_from.1")
    assert "'./t.csv' is the file already listed as 't.csv'" in problem.message


def test_duplicate_ids_say_which_file_each_is_in_and_which_was_made() -> None:
    made = doc(
        "version: 1",
        "jobs:",
        f"  - {{id: hero, model: {T2V}, prompt: a, variants: 2}}",
        f"  - {{id: hero-1, model: {T2V}, prompt: b}}",
    )
    (problem,) = problems_of(made)
    assert "(lines 3 and 4; 'hero-1' is made from the id 'hero' by its variants" in (
        problem.message
    )
