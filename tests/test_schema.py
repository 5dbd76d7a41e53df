"""The editor schema's models must name exactly the keys the manifest validator accepts."""

from __future__ import annotations

import re

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from veobatch.errors import ManifestError
from veobatch.manifest import JOB_KEYS, SETTING_KEYS, TOP_KEYS, parse_manifest
from veobatch.schema import (
    JobModel,
    ManifestModel,
    SettingsModel,
    any_case_pattern,
    manifest_schema,
)

T2V = "google/veo-3.1-t2v"
R2V = "google/veo-3.1-reference-to-video"


def _keys(model: type[BaseModel]) -> set[str]:
    """The keys a model accepts as written: each field's alias when it has one."""
    return {info.alias or name for name, info in model.model_fields.items()}


@pytest.mark.parametrize(
    ("model", "keys"),
    [(ManifestModel, TOP_KEYS), (SettingsModel, SETTING_KEYS), (JobModel, JOB_KEYS)],
    ids=["top", "settings", "job"],
)
def test_schema_models_name_the_validators_keys(
    model: type[BaseModel], keys: tuple[str, ...]
) -> None:
    assert _keys(model) == set(keys)
    assert len(keys) == len(set(keys))


def _job_is_valid(job: dict[str, object]) -> bool:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    return validator.is_valid({"version": 1, "jobs": [job]})


@pytest.mark.parametrize("provider", ["auto", "fal", "google", "FAL", "Google", "aUtO", "GOOGLE"])
@pytest.mark.parametrize("model", [T2V, R2V, None])
def test_schema_accepts_provider_in_any_case_like_the_validator(
    provider: str, model: str | None
) -> None:
    job: dict[str, object] = {"prompt": "p", "provider": provider}
    if model == R2V:
        job["image_urls"] = ["https://x/a.png"]
    if model is not None:
        job["model"] = model
        parse_manifest(f"version: 1\njobs:\n  - {job}\n".replace("'", '"'))  # no error
    assert _job_is_valid(job)
    assert ManifestModel.model_validate({"version": 1, "jobs": [job]})


@pytest.mark.parametrize("provider", ["", "fa", "falx", " fal", "fal.ai", "googl", "auto|fal", 1])
def test_schema_rejects_other_providers(provider: object) -> None:
    assert not _job_is_valid({"model": T2V, "prompt": "p", "provider": provider})


def test_any_case_pattern_is_portable_regex() -> None:
    pattern = any_case_pattern(["auto", "fal", "google"])
    assert pattern == "^([aA][uU][tT][oO]|[fF][aA][lL]|[gG][oO][oO][gG][lL][eE])$"
    assert "(?" not in pattern  # inline flags are not ECMA-262
    odd = any_case_pattern(["a.b", "x-1"])
    assert re.fullmatch(odd, "A.b") and not re.fullmatch(odd, "aXb") and re.fullmatch(odd, "X-1")


JOB = f"  - model: {T2V}\n    prompt: a cat\n"


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (f"version: 1\njobs:\n{JOB}", True),
        (f"version: 1\nsettings:\ndefaults:\njobs_from:\njobs:\n{JOB}", True),  # all unset
        (f"version: 1\nsettings:\n  prices:\n  notify_url:\njobs:\n{JOB}", True),
        (f"version: 1\njobs_from: []\njobs:\n{JOB}", True),
        ("version: 1\njobs: []\n", False),  # no job anywhere
        ("version: 1\njobs_from: []\n", False),
        ("version: 1\njobs_from:\n", False),  # unset, and no jobs either
        ("version: 1\njobs_from: jobs.txt\n", False),  # only .csv and .jsonl are read
        (f"version: 1\njobs:\n{JOB}    matrix: {{}}\n", False),
        (f"version: 1\njobs:\n{JOB}    matrix: {{duration: []}}\n", False),
        (f"version: 1\njobs:\n{JOB}    matrix: {{duration: [4, 6], exclude: }}\n", True),
        (f"version: 1\njobs:\n  - model: {T2V}\n    prompt: ' '\n", False),
        (f"version: 1\nsettings:\n  prices: {{{T2V}: -1}}\njobs:\n{JOB}", False),
        (f"version: 1\nsettings:\n  prices: {{{T2V}: 0}}\njobs:\n{JOB}", True),
        (f"version: 1\njobs:\n{JOB}    id: Con\n", False),  # a Windows device name
        (f"version: 1\njobs:\n{JOB}    id: nul.take\n", False),
        (f"version: 1\njobs:\n{JOB}    id: console\n", True),
        (f"version: 1\nx-base: &b {{seed: 1}}\njobs:\n{JOB}", True),  # a place for anchors
        (f"version: 1\nbase: &b {{seed: 1}}\njobs:\n{JOB}", False),
    ],
)
def test_the_schema_and_the_validator_agree(text: str, valid: bool) -> None:
    # An editor's red squiggle must mean the same as `veobatch plan`'s refusal.
    in_schema = jsonschema.Draft202012Validator(manifest_schema()).is_valid(yaml.safe_load(text))
    try:
        parse_manifest(text)
        by_validator = True
    except ManifestError:
        by_validator = False
    assert (in_schema, by_validator) == (valid, valid)
