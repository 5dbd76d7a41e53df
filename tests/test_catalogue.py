"""The hand-written model catalogue against the API's published request schemas.

The schemas live beside the repository (../shared/aimlapi) and, as copies, in the simulator's
package data; both are checked, so neither the client nor the simulator drifts from the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import beside_or_skip

from veobatch.catalogue import MODELS, PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "aimlapi"
EMBEDDED = ROOT / "veobatch" / "simulator" / "schemas"
TYPES = {"string": "string", "integer": "integer", "boolean": "boolean"}


def request_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(folder.glob("veo-3.1-*.json")):
        doc = json.loads(path.read_text())
        post = doc["paths"]["/v2/video/generations"]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        out[schema["properties"]["model"]["enum"][0]] = schema
    return out


@pytest.mark.parametrize("folder", [SHARED, EMBEDDED], ids=["shared", "embedded"])
def test_catalogue_matches_the_published_schemas(folder: Path) -> None:
    beside_or_skip(folder, "the published schemas")
    schemas = request_schemas(folder)
    assert set(schemas) == set(MODELS)
    for name, schema in schemas.items():
        spec = MODELS[name]
        props = {k: v for k, v in schema["properties"].items() if k != "model"}
        assert set(props) == set(spec.fields), name
        assert set(schema["required"]) - {"model"} == set(spec.required), name
        for field, prop in props.items():
            f = spec.fields[field]
            if prop["type"] == "array":
                assert f.type == "image_list" and prop["items"]["format"] == "uri"
            elif prop.get("format") == "uri":
                assert f.type == "image"
            else:
                assert f.type == TYPES[prop["type"]], (name, field)
            if "enum" in prop:
                assert f.enum == tuple(prop["enum"]), (name, field)
            elif field == "provider":
                assert f.enum == PROVIDERS  # given in the description only


def test_embedded_copies_equal_the_shared_files() -> None:
    beside_or_skip(SHARED, "the published schemas")
    for path in EMBEDDED.glob("*.json"):
        assert path.read_bytes() == (SHARED / path.name).read_bytes(), path.name
