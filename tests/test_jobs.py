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
