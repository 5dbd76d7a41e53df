"""Settings: precedence of the sources, the key's secrecy, base URL forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from veobatch.errors import ConfigError
from veobatch.jobs import ManifestSettings
from veobatch.settings import DEFAULT_BASE_URL, RunSettings, resolve_settings


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
        {"request_timeout_s": float("nan")},
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
