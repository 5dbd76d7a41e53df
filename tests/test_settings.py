"""Settings: precedence of the sources, the key's secrecy, base URL forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from veobatch.errors import ConfigError
from veobatch.jobs import ManifestSettings
from veobatch.settings import (
    DEFAULT_BASE_URL,
    RunSettings,
    Secret,
    resolve_settings,
    sends_key_in_clear,
)


def test_defaults_without_anything() -> None:
    s = resolve_settings(Path("o"), env={})
    assert s.api_key is None and s.base_url == DEFAULT_BASE_URL and s.concurrency == 4


def test_precedence_cli_over_manifest_over_env() -> None:
    env = {"AIMLAPI_KEY": " k ", "AIMLAPI_BASE_URL": "http://127.0.0.1:9/"}
    s = resolve_settings(Path("o"), ManifestSettings(concurrency=7, job_timeout_s=60), {}, env)
    assert s.concurrency == 7 and s.job_timeout_s == 60 and s.base_url == "http://127.0.0.1:9"
    assert s.api_key is not None and s.api_key.reveal() == "k"
    s = resolve_settings(Path("o"), ManifestSettings(concurrency=7), {"concurrency": 2}, env)
    assert s.concurrency == 2
    assert s.abandon_after_s == 48 * 3600  # a stuck generation is polled again for two days
    s = resolve_settings(Path("o"), ManifestSettings(abandon_after_s=3600), {}, env)
    assert s.abandon_after_s == 3600


@pytest.mark.parametrize(
    "url",
    [
        "https://api.aimlapi.com",
        "https://api.aimlapi.com/",
        "https://api.aimlapi.com/v2",
        "https://api.aimlapi.com/v2/",
    ],
)
def test_base_url_forms(url: str) -> None:
    assert resolve_settings(Path("o"), env={"AIMLAPI_BASE_URL": url}).base_url == (
        "https://api.aimlapi.com"
    )


def test_key_is_not_in_the_settings_repr() -> None:
    s = resolve_settings(Path("o"), env={"AIMLAPI_KEY": "canary-123"})
    assert "canary-123" not in repr(s) and "canary-123" not in str(s)


@pytest.mark.parametrize(
    "kw",
    [
        {"concurrency": 0},
        {"download_concurrency": 0},
        {"job_timeout_s": 0},
        {"base_url": "ftp://x"},
        # NaN fails every comparison: "x < 0" would let it through and disable the limit.
        {"max_cost_usd": float("nan")},
        {"job_timeout_s": float("nan")},
        {"abandon_after_s": 0},
        {"request_timeout_s": float("nan")},
        {"poll_timeout_s": 0},
        {"poll_timeout_s": float("nan")},
        {"connect_timeout_s": float("nan")},
        {"logs_grace_s": float("nan")},
        {"backoff_max_s": float("nan")},
        {"lookup_interval_s": float("nan")},
        {"prices": {"google/veo-3.1-t2v": float("nan")}},
    ],
)
def test_invalid_settings(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RunSettings(out_dir=Path("o"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:187500", "is not a valid URL (Port out of range"),  # a port typo
        ("https://", "needs a host name"),
        ("https://api.aimlapi.com:0", "a port from 1 to 65535"),
        ("ftp://api.aimlapi.com", "must start with https://"),
        ("https://user:hunter2@api.aimlapi.com", "must not hold a user name or password"),
        ("https://api.aimlapi.com?v=2", "must not hold a query string"),
    ],
)
def test_a_base_url_nothing_could_be_sent_to_is_refused_up_front(url: str, said: str) -> None:
    # Refused before the lock: a POST to it would fail in a way that leaves each job uncertain.
    with pytest.raises(ConfigError) as info:
        resolve_settings(Path("o"), env={"AIMLAPI_BASE_URL": url})
    assert said in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://mock-api:8080", "http://[::1]:9"])
def test_local_and_mock_base_urls_are_accepted(url: str) -> None:
    assert resolve_settings(Path("o"), env={"AIMLAPI_BASE_URL": url}).base_url == url


@pytest.mark.parametrize("key", ["sk-abc\rdef", "sk-abc\ndef", "sk-abc def", "sk-\x00abc"])
def test_a_key_with_a_line_break_or_control_character_is_refused(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_settings(Path("o"), env={"AIMLAPI_KEY": key})
    assert "AIMLAPI_KEY holds a space, line break or control character" in str(info.value)
    assert "abc" not in str(info.value)


def test_scrub_removes_the_key_and_runs_of_it() -> None:
    key = Secret("sk-SECRET-abc123456789")
    assert key.scrub("bad key sk-SECRET-abc123456789!") == "bad key ***!"
    assert key.scrub("bad key sk-SECRET-abc1...") == "bad key sk-SECRET-abc1..."
    cut = key.scrub("bad key sk-SECRET-abc1...", fragments=True)
    assert "SECRET" not in cut and cut.startswith("bad key ") and cut.endswith("...")
    assert key.scrub("sk-SEC", fragments=True) == "sk-SEC"  # under 8 in a row: not the key


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (  # the two variables swapped
            {"AIMLAPI_BASE_URL": "sk-SECRETKEY12345", "AIMLAPI_KEY": "sk-SECRETKEY12345"},
            "are AIMLAPI_KEY and AIMLAPI_BASE_URL swapped?",
        ),
        ({"AIMLAPI_BASE_URL": "https://api.aimlapi.com/?api_key=sk-SECRETKEY12345"}, "query"),
        ({"AIMLAPI_BASE_URL": "https://u:SECRET/KEY@api.aimlapi.com"}, "not a valid URL"),
        ({"AIMLAPI_BASE_URL": "https://u:SECRETKEY@api.aimlapi.com"}, "user name or password"),
    ],
)
def test_a_refused_base_url_that_may_hold_a_secret_is_not_echoed(
    env: dict[str, str], said: str
) -> None:
    # The line goes to stderr, the cron mail and the --notify webhook.
    with pytest.raises(ConfigError) as info:
        resolve_settings(Path("o"), env=env)
    assert said in str(info.value) and "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "clear"),
    [
        ("https://api.aimlapi.com", False),
        ("http://127.0.0.1:8750", False),
        ("http://127.3.2.1:8750", False),
        ("http://[::1]:8750", False),
        ("http://localhost:8750", False),
        ("http://api.localhost", False),
        ("http://api.aimlapi.com", True),  # one letter off https: the key in clear text
        ("http://192.0.2.2:8080", True),
        ("http://mock-api:8080", True),
    ],
)
def test_plain_http_off_this_machine_is_told_apart(url: str, clear: bool) -> None:
    assert sends_key_in_clear(url) is clear


@pytest.mark.parametrize("before", ["", "B", "Be", "Bearer "])
def test_the_key_is_scrubbed_from_error_texts_in_base64_too(before: str) -> None:
    # A proxy may echo the Authorization header encoded; at any of base64's 3 alignments.
    import base64

    key = "sk-canary-0123456789abcdef"
    secret = Secret(key)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        echoed = encode(f"{before}{key} and more".encode()).decode()
        scrubbed = secret.scrub(f"denied: {echoed}", fragments=True)
        # The key's own stretch of the encoding is gone (base64 is 4/3 its length).
        assert "***" in scrubbed
        assert len(f"denied: {echoed}") - len(scrubbed) + 3 >= len(key)
    assert secret.scrub("https://cdn.example/v.mp4?sig=abc123", fragments=True).endswith("abc123")
