"""Checks a create request against the model's published JSON schema (pure, no I/O).

The schemas are the API's own OpenAPI files, shipped as package data and read here, not the
client's hand-written ``veobatch.catalogue``: two independent readings of the same documents, so a
mistake in one shows up as a disagreement with the other.

Deliberately stricter than the schemas in three places, each a mistake a client should not make:

- a field the model's schema does not list is rejected (the schemas do not forbid extra keys, but
  a misspelt ``aspect_ratio`` silently ignored would cost real money);
- ``provider`` must be ``auto``, ``google`` or ``fal`` in any letter case (the schema says only
  "string"; the values come from its description);
- ``prompt`` must not be empty or only white space.

Every problem is reported at once, each with the API's Expected/Received wording.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from .config import DEFAULT_DURATION_S

BODY_INVALID = "Body validation error"
# Case-insensitive value sets the schemas give only in prose.
_PROSE_ENUMS: dict[str, tuple[str, ...]] = {"provider": ("auto", "google", "fal")}
_NON_EMPTY = frozenset({"prompt"})


@dataclass(frozen=True)
class FieldSchema:
    """One property of a model's request schema, reduced to what is checked."""

    name: str
    type: str
    enum: tuple[Any, ...] | None = None
    format: str | None = None
    item_type: str | None = None
    item_format: str | None = None
    default: Any = None


@dataclass(frozen=True)
class ModelSchema:
    """A model's request: its fields in published order, and which are required."""

    name: str
    fields: Mapping[str, FieldSchema]
    required: frozenset[str]


@dataclass(frozen=True)
class Issue:
    """One problem with a request body, located by its JSON path."""

    path: tuple[str | int, ...]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "message": self.message}


@dataclass(frozen=True)
class VideoRequest:
    """What a valid request asks for, with the schema defaults filled in."""

    model: str
    duration_s: int
    resolution: str
    aspect_ratio: str
    generate_audio: bool


class BodyInvalid(Exception):
    """The request cannot be accepted; ``issues`` says why, all problems at once."""

    def __init__(self, message: str, issues: list[Issue]) -> None:
        super().__init__(message)
        self.message = message
        self.issues = issues


def parse_model_schema(doc: Mapping[str, Any]) -> ModelSchema:
    """Read the request schema of ``POST /v2/video/generations`` out of one OpenAPI file."""
    post = doc["paths"]["/v2/video/generations"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    fields: dict[str, FieldSchema] = {}
    for name, prop in schema["properties"].items():
        items = prop.get("items", {})
        enum = prop.get("enum")
        fields[name] = FieldSchema(
            name=name,
            type=prop.get("type", "string"),
            enum=tuple(enum) if enum is not None else None,
            format=prop.get("format"),
            item_type=items.get("type"),
            item_format=items.get("format"),
            default=prop.get("default"),
        )
    model_enum = fields["model"].enum or (schema.get("title"),)
    return ModelSchema(str(model_enum[0]), fields, frozenset(schema.get("required", ())))


@functools.cache
def load_model_schemas() -> Mapping[str, ModelSchema]:
    """The Veo 3.1 request schemas embedded in the package, by model name."""
    folder = resources.files("veobatch.simulator").joinpath("schemas")
    models: dict[str, ModelSchema] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("veo-") and entry.name.endswith(".json"):
            model = parse_model_schema(json.loads(entry.read_text(encoding="utf-8")))
            models[model.name] = model
    return models


def describe(value: Any) -> str:
    """The JSON type of ``value`` as the error messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def _choices(values: tuple[Any, ...]) -> str:
    return " | ".join(_show(v) for v in values)


def is_uri(value: str) -> bool:
    """An absolute http(s) URL with a host, or a ``data:`` URI with its comma."""
    if value.startswith("data:"):
        return "," in value
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _type_matches(expected: str, value: Any) -> bool:
    if expected == "integer":
        return type(value) is int
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "array":
        return isinstance(value, list)
    if expected == "object":
        return isinstance(value, dict)
    return isinstance(value, str)


def _check_scalar(
    path: tuple[str | int, ...], type_: str, fmt: str | None, value: Any
) -> list[Issue]:
    if not _type_matches(type_, value):
        return [Issue(path, f"Expected {type_}, received {describe(value)}")]
    if fmt == "uri" and not is_uri(value):
        expected = "an absolute http(s) URL or a data: URI"
        return [Issue(path, f"Invalid url. Expected {expected}, received {_show(value)}")]
    return []


def _check_value(spec: FieldSchema, value: Any) -> list[Issue]:
    path: tuple[str | int, ...] = (spec.name,)
    if spec.type == "array":
        if not isinstance(value, list):
            return [Issue(path, f"Expected array, received {describe(value)}")]
        item_type = spec.item_type or "string"
        return [
            issue
            for index, item in enumerate(value)
            for issue in _check_scalar((spec.name, index), item_type, spec.item_format, item)
        ]
    issues = _check_scalar(path, spec.type, spec.format, value)
    if issues:
        return issues
    return _check_constraints(spec, value)


def _check_constraints(spec: FieldSchema, value: Any) -> list[Issue]:
    path: tuple[str | int, ...] = (spec.name,)
    if spec.enum is not None and value not in spec.enum:
        expected = _choices(spec.enum)
        return [Issue(path, f"Invalid enum value. Expected {expected}, received {_show(value)}")]
    prose = _PROSE_ENUMS.get(spec.name)
    if prose is not None and value.lower() not in prose:
        expected = _choices(prose)
        return [Issue(path, f"Invalid enum value. Expected {expected}, received {_show(value)}")]
    if spec.name in _NON_EMPTY and not value.strip():
        return [Issue(path, f"Expected a non-empty string, received {_show(value)}")]
    return []


def _pick_model(body: Mapping[str, Any], schemas: Mapping[str, ModelSchema]) -> ModelSchema:
    expected = _choices(tuple(schemas))
    if "model" not in body:
        raise BodyInvalid(BODY_INVALID, [Issue(("model",), f"Required. Expected {expected}")])
    model = body["model"]
    if not isinstance(model, str):
        issue = Issue(("model",), f"Expected string, received {describe(model)}")
        raise BodyInvalid(BODY_INVALID, [issue])
    if model not in schemas:
        issue = Issue(
            ("model",), f"Invalid enum value. Expected {expected}, received {_show(model)}"
        )
        raise BodyInvalid(BODY_INVALID, [issue])
    return schemas[model]


def find_issues(schema: ModelSchema, body: Mapping[str, Any]) -> list[Issue]:
    """Every problem of ``body`` for ``schema``: schema order first, then unknown keys."""
    issues: list[Issue] = []
    for name, spec in schema.fields.items():
        if name == "model":
            continue
        if name in body:
            issues.extend(_check_value(spec, body[name]))
        elif name in schema.required:
            issues.append(Issue((name,), f"Required. Expected {spec.type}, received undefined"))
    known = _choices(tuple(schema.fields))
    issues.extend(
        Issue((key,), f"Unrecognized key. Expected one of {known}, received {_show(key)}")
        for key in body
        if key not in schema.fields
    )
    return issues


def _default(schema: ModelSchema, name: str, fallback: Any) -> Any:
    spec = schema.fields.get(name)
    if spec is None or spec.default is None:
        return fallback
    # The schemas publish the duration default as the string "8" on an integer field.
    if spec.type == "integer" and isinstance(spec.default, str) and spec.default.isdigit():
        return int(spec.default)
    return spec.default


def validate_body(body: Any, schemas: Mapping[str, ModelSchema]) -> VideoRequest:
    """The request ``body`` asks for, or :class:`BodyInvalid` listing everything wrong."""
    if not isinstance(body, dict):
        issue = Issue((), f"Expected object, received {describe(body)}")
        raise BodyInvalid(BODY_INVALID, [issue])
    schema = _pick_model(body, schemas)
    issues = find_issues(schema, body)
    if issues:
        raise BodyInvalid(BODY_INVALID, issues)
    return VideoRequest(
        model=schema.name,
        duration_s=body.get("duration", _default(schema, "duration", DEFAULT_DURATION_S)),
        resolution=body.get("resolution", _default(schema, "resolution", "1080p")),
        aspect_ratio=body.get("aspect_ratio", "16:9"),
        generate_audio=body.get("generate_audio", _default(schema, "generate_audio", True)),
    )
