"""Job identity: a request's key must never change for the same request (ledgers hold it)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from veobatch import jobs
from veobatch.jobs import canonical_json, request_key

BIG = "data:image/png;base64," + "QUJD" * 40_000  # 160 kB: past the size kept encoded

CASES: list[dict[str, Any]] = [
    {"model": "m", "prompt": 'p\u00e9"x', "image_url": BIG, "duration": 8, "seed": 1.5},
    {"model": "m", "image_urls": [BIG, "https://x/a.png", BIG], "generate_audio": False},
    {"model": "m", "z": {"b": [1, None, {"c": BIG}], "a": "\u00e9"}, "n": None},
    {"model": "m", "prompt": BIG + '\u2028"\\\n\U0001f600'},
    {"model": "m", "prompt": "small"},
]


@pytest.mark.parametrize("request_body", CASES)
def test_the_key_is_the_sha256_of_the_canonical_json(request_body: dict[str, Any]) -> None:
    # Big strings are hashed from a kept encoding; the bytes must be canonical_json's exactly,
    # or every ledger's done jobs would look changed and be paid for again.
    expected = hashlib.sha256(canonical_json(request_body).encode("utf-8")).hexdigest()
    assert request_key(request_body) == expected
    assert request_key(dict(request_body)) == expected  # again, from the kept encoding


def test_a_big_string_shared_by_many_requests_is_encoded_once() -> None:
    jobs._encoded_big.clear()
    for i in range(50):
        request_key({"model": "m", "prompt": f"p{i}", "image_url": BIG})
    assert list(jobs._encoded_big) == [BIG]


T2V = {"model": "google/veo-3.1-t2v", "prompt": "a fox"}


@pytest.mark.parametrize(
    "written",
    [
        {"provider": "auto"},  # the API's own default, written out
        {"provider": "AUTO"},
        {"resolution": "1080p", "duration": 8, "generate_audio": True},
        {"auto_fix": True, "enhance_prompt": True},
    ],
)
def test_a_request_with_its_defaults_written_out_asks_for_the_same_video(
    written: dict[str, Any],
) -> None:
    # A manifest that writes out a default must not make every done job "changed" (paid again).
    spelled = {**T2V, **written}
    assert request_key(spelled) != request_key(T2V)  # the key stays the request's own
    assert jobs.video_key(spelled) == jobs.video_key(T2V) == request_key(T2V)
    assert jobs.Job("a", spelled).vkey == jobs.Job("a", T2V).vkey


def test_the_provider_is_the_same_video_in_any_case() -> None:
    lower, upper = {**T2V, "provider": "google"}, {**T2V, "provider": "Google"}
    assert jobs.video_key(lower) == jobs.video_key(upper) == request_key(lower)


@pytest.mark.parametrize(
    "written",
    [
        {"provider": "google"},  # not the default: another route
        {"provider": "fal"},
        {"resolution": "720p"},
        {"resolution": "1080P"},  # resolution's case is not the API's to ignore
        {"duration": 6},
        {"duration": "8"},  # not the default's type: never guessed the same
        {"duration": 8.0},
        {"generate_audio": False},
        {"generate_audio": 1},
        {"aspect_ratio": "16:9"},  # no default published: the model may pick from the image
        {"seed": 1},
        {"prompt": "A fox"},  # the prompt's case is the video's
    ],
)
def test_only_defaults_and_case_the_api_ignores_are_set_aside(written: dict[str, Any]) -> None:
    assert jobs.video_key({**T2V, **written}) != jobs.video_key(T2V)


def test_a_model_the_catalogue_does_not_know_is_keyed_as_written() -> None:
    odd = {"model": "google/veo-9", "prompt": "a fox", "provider": "AUTO"}
    assert jobs.video_key(odd) == request_key(odd)


def test_the_video_key_is_made_of_the_identity_local_images_hashed() -> None:
    identity = {**T2V, "model": "google/veo-3.1-i2v", "image_url": "sha256:ab", "provider": "auto"}
    body = {**identity, "image_url": "data:image/png;base64,QUJD"}
    job = jobs.Job("a", body, identity=identity)
    assert job.vkey == request_key({k: v for k, v in identity.items() if k != "provider"})


def test_a_matrix_id_is_known_under_its_fields_in_any_other_order() -> None:
    # A YAML mapping has no order: the same combination under another order of its matrix's
    # fields is the same job, and the id that order gave it is told apart from any other.
    combo = jobs.MatrixId("teaser", ("4", "16x9", "fast"))
    assert combo.reordered_base("teaser-16x9-4-fast") == "teaser-16x9-4-fast"
    assert combo.reordered_base("teaser-fast-16x9-4") == "teaser-fast-16x9-4"
    for other in ("teaser-4-16x9-fast", "teaser-16x9-8-fast", "teaser-16x9-4", "hero-16x9-4-fast"):
        assert combo.reordered_base(other) is None  # its own, another combination, another job
    take = jobs.MatrixId("kite", ("a-b", "a"), take=2)  # suffixes may hold a dash
    assert take.reordered_base("kite-a-a-b-2") == "kite-a-a-b"
    assert take.reordered_base("kite-a-a-b") is None and take.reordered_base("kite-a-a-b-1") is None
    # An id too long for a file name keeps its start and a hash of the whole.
    long = jobs.MatrixId("x" * 200, ("y" * 24, "z" * 24), take=1)
    fitted = jobs.fit_id("-".join(("x" * 200, "z" * 24, "y" * 24, "1")))
    assert len(fitted) == jobs.MADE_ID_MAX_LEN
    assert long.reordered_base(fitted) == "-".join(("x" * 200, "z" * 24, "y" * 24))
    other_take = jobs.fit_id("-".join(("x" * 200, "z" * 24, "y" * 24, "2")))
    assert len(other_take) == jobs.MADE_ID_MAX_LEN and long.reordered_base(other_take) is None
