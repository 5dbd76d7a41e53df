"""The manifest's JSON Schema, for editors: completion, hover text and checks while typing.

Generated with pydantic from the same catalogue the validator uses, so the two cannot drift;
the validator stays the authority (it knows lines, defaults and local files), the schema is
the editor's view of it. ``jobs/*.yaml`` point at the committed copy with a
``# yaml-language-server: $schema=...`` comment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from .catalogue import ALL_FIELDS, CASE_INSENSITIVE, MODELS, FieldSpec
from .manifest import MAX_MATRIX, SETTING_LIMITS, VERSION
from .manifest_checks import ID_MAX_LEN, MAX_VARIANTS, WINDOWS_DEVICES

ModelName = Literal[tuple(MODELS)]  # type: ignore[valid-type]


_REGEX_SYNTAX = frozenset("\\^$.|?*+()[]{}/")  # ECMA-262 SyntaxCharacter: escape these only


def any_case_pattern(values: Iterable[str | int]) -> str:
    """A regex matching any of ``values`` in any case, written without inline flags.

    ``(?i)`` is Python's, not ECMA-262's, and editors check schema patterns as ECMA-262.
    """

    def char(c: str) -> str:
        low, up = c.lower(), c.upper()
        if low != up and len(low) == len(up) == 1:
            return f"[{low}{up}]"
        return "\\" + c if c in _REGEX_SYNTAX else c

    return "^(" + "|".join("".join(map(char, str(v))) for v in values) + ")$"


def _field_type(spec: FieldSpec) -> Any:
    if spec.enum is not None and spec.name in CASE_INSENSITIVE:
        # The enum alone gives editors their completions; the pattern admits any case.
        any_case = Annotated[str, StringConstraints(pattern=any_case_pattern(spec.enum))]
        return Literal[spec.enum] | any_case
    if spec.enum is not None:
        return Literal[spec.enum]
    return {
        "string": str,
        "integer": int,
        "boolean": bool,
        "image": str,
        "image_list": list[str],
    }[spec.type]


def _union_spec(name: str) -> FieldSpec:
    """One schema per field name: the widest of the models' specs (enums merged)."""
    specs = [m.fields[name] for m in MODELS.values() if name in m.fields]
    widest = max(specs, key=lambda spec: len(spec.enum or ()))
    if widest.enum is None:
        return widest
    merged: list[str | int] = []
    for spec in specs:
        merged.extend(v for v in spec.enum or () if v not in merged)
    ordered = tuple(sorted(merged, key=str))
    return FieldSpec(name, widest.type, enum=ordered, description=widest.description)


def _opt(tp: Any, **kw: Any) -> tuple[Any, Any]:
    """A field that may be left out; the schema says its type, not "or null"."""
    return (tp, Field(None, **kw))


def _request_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(ALL_FIELDS):
        spec = _union_spec(name)
        extra: dict[str, Any] = {}
        if spec.type == "image":
            extra["description"] = (
                spec.description + " An https URL, a data: URI, or a local image file "
                "(relative to the manifest's folder)."
            )
        if spec.type == "image_list":
            extra["min_length"] = 1
        if name == "prompt":
            extra["min_length"] = 1
        if name in CASE_INSENSITIVE:
            extra["description"] = spec.description + " Any case."
        extra.setdefault("description", spec.description or None)
        out[name] = _opt(_field_type(spec), **extra)
    return out


_FORBID = ConfigDict(extra="forbid")

ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"
_ID = _opt(
    str,
    pattern=ID_PATTERN,
    max_length=ID_MAX_LEN,
    description="Names the output file <id>.mp4; derived from the request when left out.",
)
_VARIANTS = _opt(
    int,
    ge=1,
    le=MAX_VARIANTS,
    description="Make N takes <id>-1 ... <id>-N, each with its own stable seed where the "
    "model takes one.",
)
_MODEL = _opt(ModelName, description="The Veo 3.1 model (or set it in defaults).")

JobModel = create_model(
    "Job",
    __config__=_FORBID,
    id=_ID,
    model=_MODEL,
    variants=_VARIANTS,
    matrix=_opt(
        dict[str, list[Any]],
        description="One job per combination of these field values (GitHub Actions style); "
        "ids get the values as suffixes. 'exclude' lists combinations to leave out. "
        f"At most {MAX_MATRIX} combinations.",
    ),
    **_request_fields(),
)
DefaultsModel = create_model(
    "Defaults", __config__=_FORBID, model=_MODEL, variants=_VARIANTS, **_request_fields()
)


class SettingsModel(BaseModel):
    model_config = _FORBID

    concurrency: int | None = Field(
        None, ge=SETTING_LIMITS["concurrency"][0], le=SETTING_LIMITS["concurrency"][1]
    )
    job_timeout_s: float | None = Field(None, gt=0)
    abandon_after_s: float | None = Field(
        None,
        gt=0,
        description="Stop polling a generation not finished this long after submission"
        " (default 172800: 48 h); --retry-failed submits it again.",
    )
    download_concurrency: int | None = Field(
        None,
        ge=SETTING_LIMITS["download_concurrency"][0],
        le=SETTING_LIMITS["download_concurrency"][1],
    )
    resubmit_uncertain: bool | None = None
    retry_failed: bool | None = None
    max_cost_usd: float | None = Field(
        None, ge=0, description="Refuse to submit beyond this estimated spend per run (USD)."
    )
    prices: dict[ModelName, float] | None = Field(  # type: ignore[valid-type]
        None, description="USD per second of video, per model: overrides the built-in table."
    )
    notify_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="POST the run's JSON summary here when it ends (Slack-style webhooks).",
    )


class ManifestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", title="veobatch manifest")

    version: Literal[1] = Field(description=f"Always {VERSION}.")
    settings: SettingsModel | None = None
    defaults: DefaultsModel | None = None  # type: ignore[valid-type]
    jobs: list[JobModel] | None = Field(None, description="The videos to make.")  # type: ignore[valid-type]
    jobs_from: str | list[str] | None = Field(
        None,
        description="CSV or JSON Lines file(s) of jobs, one per row; columns are fields.",
    )


def _per_model_rules() -> list[dict[str, Any]]:
    """A job of a given model may only use that model's fields, with that model's values."""
    rules = []
    for model in MODELS.values():
        props: dict[str, Any] = {}
        for name in sorted(ALL_FIELDS):
            if name not in model.fields:
                props[name] = False
            elif name in CASE_INSENSITIVE and model.fields[name].enum is not None:
                props[name] = {"pattern": any_case_pattern(model.fields[name].enum or ())}
            elif model.fields[name].enum is not None:
                props[name] = {"enum": list(model.fields[name].enum or ())}
        rules.append(
            {
                "if": {"properties": {"model": {"const": model.name}}, "required": ["model"]},
                "then": {"properties": props},
            }
        )
    return rules


def _tidy(node: Any) -> Any:
    """Drop "or null", "default": null and titles: a key left out is how YAML says "unset"."""
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            node = {k: v for k, v in node.items() if k != "anyOf"}
            node.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        return {
            k: _tidy(v)
            for k, v in node.items()
            if not (k == "default" and v is None) and not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node


# An id is not a Windows device name (con, nul.x, ...) in any case, as the validator says. Only
# in the JSON: pydantic's regex engine has no look-ahead.
_NOT_DEVICE = "(?!(" + any_case_pattern(WINDOWS_DEVICES)[2:-2] + r")(\.|$))"
TABLE_PATTERN = any_case_pattern(["csv", "jsonl"]).replace("^(", r"\.(", 1)  # "\.(...)$"
NULLABLE = ("settings", "defaults", "jobs_from")  # "settings:" with all below commented out
NULLABLE_SETTINGS = ("prices", "notify_url")


def manifest_schema() -> dict[str, Any]:
    schema = _tidy(ManifestModel.model_json_schema(by_alias=True))
    schema["title"] = "veobatch manifest"
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    defs, props = schema["$defs"], schema["properties"]
    defs["Job"]["allOf"] = _per_model_rules()
    # The validator's rules the pydantic types cannot say: at least one job somewhere, table
    # files by their suffix, no empty matrix, a prompt that is not blank, no negative price.
    schema["anyOf"] = [
        {"required": ["jobs"], "properties": {"jobs": {"minItems": 1}}},
        # a file, or a non-empty list: "jobs_from:" with nothing after it names no file
        {
            "required": ["jobs_from"],
            "properties": {"jobs_from": {"type": ["string", "array"], "minItems": 1}},
        },
    ]
    schema["patternProperties"] = {"^x-": {}}  # skipped: a place for anchors
    table = {"type": "string", "pattern": TABLE_PATTERN}
    props["jobs_from"] = {
        "description": props["jobs_from"]["description"],
        "anyOf": [table, {"type": "array", "items": table}],
    }
    defs["Job"]["properties"]["matrix"].update(
        minProperties=1,
        properties={"exclude": _or_null({"type": "array", "items": {"type": "object"}})},
        additionalProperties={"type": "array", "minItems": 1},
    )
    for model in ("Job", "Defaults"):
        defs[model]["properties"]["prompt"]["pattern"] = r"\S"
    defs["Job"]["properties"]["id"]["pattern"] = "^" + _NOT_DEVICE + ID_PATTERN[1:]
    defs["SettingsModel"]["properties"]["prices"]["additionalProperties"]["minimum"] = 0
    for name in NULLABLE:
        props[name] = _or_null(props[name])
    for name in NULLABLE_SETTINGS:
        settings = defs["SettingsModel"]["properties"]
        settings[name] = _or_null(settings[name])
    return schema


def _or_null(node: dict[str, Any]) -> dict[str, Any]:
    """What the validator takes as "not set" too: a key written with nothing after it."""
    described = {k: v for k, v in node.items() if k == "description"}
    rest = {k: v for k, v in node.items() if k != "description"}
    options = rest["anyOf"] if list(rest) == ["anyOf"] else [rest]
    return {**described, "anyOf": [*options, {"type": "null"}]}


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2, ensure_ascii=False) + "\n"
