"""The editor schema's models must name exactly the keys the manifest validator accepts."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from veobatch.manifest import JOB_KEYS, SETTING_KEYS, TOP_KEYS
from veobatch.schema import JobModel, ManifestModel, SettingsModel


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
