"""The simulator's pure core as tables: request validation, generation timing, the usage log,
and which file a request gets. No I/O, no clock: every time is passed in."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import pytest

from veobatch.simulator import Generation, SimConfig, SimStats
from veobatch.simulator.logs import (
    LogQuery,
    LogRow,
    LogStatus,
    QueryInvalid,
    SlidingWindow,
    iso_utc_ms,
    log_page,
    parse_log_query,
)
from veobatch.simulator.state import (
    ODD_SHAPES,
    OddShape,
    draw_duration_s,
    fetch_body,
    lognormal_params,
    odd_fetch_body,
)
from veobatch.simulator.validation import (
    BODY_INVALID,
    BodyInvalid,
    VideoRequest,
    is_uri,
    load_model_schemas,
    validate_body,
)
from veobatch.simulator.video import spec_for

SCHEMAS = load_model_schemas()
IMG = "https://example.com/frame.png"
T2V = "google/veo-3.1-t2v"
I2V = "google/veo-3.1-i2v"
REF = "google/veo-3.1-reference-to-video"

# The smallest valid body of each model, beside its published required fields.
MODELS: dict[str, tuple[dict[str, Any], set[str]]] = {
    T2V: ({"prompt": "p"}, {"prompt"}),
    "google/veo-3.1-t2v-fast": ({"prompt": "p"}, {"prompt"}),
    I2V: ({"prompt": "p", "image_url": IMG}, {"prompt", "image_url"}),
    "google/veo-3.1-i2v-fast": ({"prompt": "p", "image_url": IMG}, {"prompt", "image_url"}),
    "google/veo-3.1-first-last-image-to-video": (
        {"prompt": "p", "image_url": IMG, "last_image_url": IMG},
        {"prompt", "image_url", "last_image_url"},
    ),
    "google/veo-3.1-first-last-image-to-video-fast": (
        {"prompt": "p", "image_url": IMG, "last_image_url": IMG},
        {"prompt", "image_url", "last_image_url"},
    ),
    REF: ({"prompt": "p", "image_urls": [IMG]}, {"prompt", "image_urls"}),
}


def body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, **MODELS[model][0], **fields}


def issues_of(request: Any) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(BodyInvalid) as info:
        validate_body(request, SCHEMAS)
    return [(issue.path, issue.message) for issue in info.value.issues]


def schema_doc(name: str) -> dict[str, Any]:
    folder = resources.files("veobatch.simulator").joinpath("schemas")
    doc: dict[str, Any] = json.loads(folder.joinpath(name).read_text(encoding="utf-8"))
    return doc


# -- validation ------------------------------------------------------------------------------


def test_all_seven_models_load_from_the_embedded_schemas() -> None:
    assert set(SCHEMAS) == set(MODELS)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_required_fields_match_the_schema(model: str) -> None:
    assert SCHEMAS[model].required == {"model", *MODELS[model][1]}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_minimal_body_is_valid(model: str) -> None:
    assert validate_body(body(model), SCHEMAS).model == model


@pytest.mark.parametrize(
    ("model", "field"), [(m, f) for m in sorted(MODELS) for f in sorted(MODELS[m][1])]
)
def test_missing_required_field_is_reported(model: str, field: str) -> None:
    request = body(model)
    del request[field]
    [(path, message)] = issues_of(request)
    assert path == (field,) and message.startswith("Required.")


@pytest.mark.parametrize(
    ("model", "field", "value", "path", "message"),
    [
        (T2V, "duration", "8", ("duration",), "Expected integer, received string"),
        (T2V, "duration", True, ("duration",), "Expected integer, received boolean"),
        (T2V, "duration", 8.0, ("duration",), "Expected integer, received float"),
        (T2V, "seed", "7", ("seed",), "Expected integer, received string"),
        (T2V, "prompt", 5, ("prompt",), "Expected string, received integer"),
        (T2V, "negative_prompt", ["x"], ("negative_prompt",), "Expected string, received array"),
        (T2V, "resolution", 720, ("resolution",), "Expected string, received integer"),
        (T2V, "generate_audio", "true", ("generate_audio",), "Expected boolean, received string"),
        (I2V, "image_url", None, ("image_url",), "Expected string, received null"),
        (REF, "image_urls", IMG, ("image_urls",), "Expected array, received string"),
        (REF, "image_urls", {"0": IMG}, ("image_urls",), "Expected array, received object"),
        (REF, "image_urls", [IMG, 5], ("image_urls", 1), "Expected string, received integer"),
    ],
)
def test_wrong_type_is_reported(
    model: str, field: str, value: Any, path: tuple[str | int, ...], message: str
) -> None:
    assert issues_of(body(model, **{field: value})) == [(path, message)]


@pytest.mark.parametrize(
    ("model", "field", "value", "expected"),
    [
        (T2V, "duration", 5, "4 | 6 | 8, received 5"),
        (T2V, "resolution", "4k", "'720p' | '1080p', received '4k'"),
        (T2V, "aspect_ratio", "4:3", "'16:9' | '9:16', received '4:3'"),
        (REF, "duration", 4, "Expected 8, received 4"),
        (T2V, "provider", "azure", "'auto' | 'google' | 'fal', received 'azure'"),
    ],
)
def test_value_outside_enum_is_reported(model: str, field: str, value: Any, expected: str) -> None:
    [(path, message)] = issues_of(body(model, **{field: value}))
    assert path == (field,)
    assert message.startswith("Invalid enum value. Expected ") and message.endswith(expected)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("https://example.com/a.png", True),
        ("http://example.com/a.png", True),
        ("data:image/png;base64,xx", True),
        ("frame.png", False),
        ("/images/frame.png", False),
        ("ftp://example.com/a.png", False),
        ("data:image/png;base64", False),
        ("https://", False),
        ("http://[::1", False),
    ],
)
def test_uri_check(value: str, ok: bool) -> None:
    assert is_uri(value) is ok


@pytest.mark.parametrize("url", ["frame.png", "ftp://example.com/a.png", "data:image/png"])
def test_bad_image_url_is_reported(url: str) -> None:
    [(path, message)] = issues_of(body(I2V, image_url=url))
    assert path == ("image_url",) and message.startswith("Invalid url.")


def test_bad_url_inside_image_urls_is_reported_by_index() -> None:
    [(path, message)] = issues_of(body(REF, image_urls=[IMG, "ftp://x/y.png"]))
    assert path == ("image_urls", 1) and message.startswith("Invalid url.")


@pytest.mark.parametrize(
    ("model", "key"), [(T2V, "aspect"), (T2V, "image_url"), (I2V, "seed"), (REF, "aspect_ratio")]
)
def test_unknown_field_is_rejected(model: str, key: str) -> None:
    [(path, message)] = issues_of(body(model, **{key: "16:9"}))
    assert path == (key,) and message.startswith("Unrecognized key.")


@pytest.mark.parametrize("provider", ["auto", "google", "fal", "GOOGLE", "Fal", "AuTo"])
def test_provider_is_case_insensitive(provider: str) -> None:
    made = validate_body(body(T2V, provider=provider), SCHEMAS)
    assert made.model == T2V and made.duration_s == 8  # accepted, with the schema's defaults


@pytest.mark.parametrize("provider", ["googel", "fal.ai", " auto", ""])
def test_other_providers_are_rejected(provider: str) -> None:
    [(path, _)] = issues_of(body(T2V, provider=provider))
    assert path == ("provider",)


@pytest.mark.parametrize("prompt", ["", " ", "\n\t "])
def test_blank_prompt_is_rejected(prompt: str) -> None:
    [(path, message)] = issues_of(body(T2V, prompt=prompt))
    assert path == ("prompt",) and message.startswith("Expected a non-empty string")


def test_every_problem_is_reported_at_once_in_schema_order() -> None:
    request = {"model": T2V, "prompt": " ", "duration": 5, "resolution": "4k", "colour": "red"}
    paths = [path for path, _ in issues_of(request)]
    assert paths == [("prompt",), ("duration",), ("resolution",), ("colour",)]


def test_missing_field_and_wrong_type_are_reported_together() -> None:
    paths = [path for path, _ in issues_of({"model": I2V, "prompt": 3})]
    assert paths == [("prompt",), ("image_url",)]


@pytest.mark.parametrize(
    ("request_body", "message", "issue"),
    [
        ({"prompt": "p"}, BODY_INVALID, "Required. Expected 'google/"),
        ({"model": 5, "prompt": "p"}, BODY_INVALID, "Expected string, received integer"),
        ({"model": None, "prompt": "p"}, BODY_INVALID, "Expected string, received null"),
        ({"model": "google/veo-2", "prompt": "p"}, BODY_INVALID, "Invalid enum value."),
    ],
)
def test_bad_model_is_reported(request_body: dict[str, Any], message: str, issue: str) -> None:
    with pytest.raises(BodyInvalid) as info:
        validate_body(request_body, SCHEMAS)
    assert info.value.message == message
    [only] = info.value.issues
    assert only.path == ("model",) and only.message.startswith(issue)


def test_unknown_model_names_every_supported_model_and_what_it_received() -> None:
    [(path, message)] = issues_of({"model": "google/veo-2", "prompt": "p"})
    assert path == ("model",)
    expected = " | ".join(f"'{m}'" for m in SCHEMAS)
    assert message == f"Invalid enum value. Expected {expected}, received 'google/veo-2'"
    assert all(m in message for m in MODELS)


@pytest.mark.parametrize("request_body", [[], "text", None, 3])
def test_body_must_be_an_object(request_body: Any) -> None:
    [(path, message)] = issues_of(request_body)
    assert path == () and message.startswith("Expected object")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_defaults_fill_a_minimal_request(model: str) -> None:
    assert validate_body(body(model), SCHEMAS) == VideoRequest(model, 8, "1080p", "16:9", True)


def test_default_duration_is_an_int_although_the_schema_says_the_string_8() -> None:
    assert type(validate_body(body(T2V), SCHEMAS).duration_s) is int


def test_explicit_values_override_defaults() -> None:
    fields = {"duration": 4, "resolution": "720p", "aspect_ratio": "9:16", "generate_audio": False}
    assert validate_body(body(T2V, **fields), SCHEMAS) == VideoRequest(
        T2V, 4, "720p", "9:16", False
    )


# -- state -----------------------------------------------------------------------------------


def make_gen(
    gen_id: str = "g1", created_at: float = 100.0, duration_s: float = 10.0, queued_s: float = 2.0
) -> Generation:
    request = VideoRequest(T2V, 8, "1080p", "16:9", True)
    return Generation(
        id=gen_id,
        model=T2V,
        body={"model": T2V, "prompt": "p"},
        request=request,
        api_key_sha="k",
        created_at=created_at,
        created_wall_s=0.0,
        duration_s=duration_s,
        queued_s=queued_s,
        client_request_id=None,
        file_token="tok",
        file_name="f.mp4",
        usd=3.2,
        credits=6_400_000,
    )


def test_duration_draws_are_reproducible_by_seed() -> None:
    def draws(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [draw_duration_s(rng, 3.0, 0.3) for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_duration_draws_have_the_configured_mean_and_spread() -> None:
    rng = random.Random(0)
    values = [draw_duration_s(rng, 3.0, 0.3) for _ in range(20_000)]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert abs(mean - 3.0) < 0.05 * 3.0
    assert abs(sd / mean - 0.3) < 0.03
    assert min(values) > 0


def test_lognormal_params_give_the_mean() -> None:
    mu, sigma = lognormal_params(3.0, 0.3)
    assert math.exp(mu + sigma * sigma / 2) == pytest.approx(3.0)


@pytest.mark.parametrize(("mean", "spread"), [(3.0, 0.0), (0.0, 0.3), (0.0, 0.0)])
def test_no_spread_or_zero_mean_gives_exactly_the_mean(mean: float, spread: float) -> None:
    assert draw_duration_s(random.Random(1), mean, spread) == mean


@pytest.mark.parametrize(
    ("now", "status"),
    [
        (100.0, "queued"),
        (101.999, "queued"),
        (102.0, "generating"),
        (109.999, "generating"),
        (110.0, "completed"),
        (1e9, "completed"),
    ],
)
def test_status_walks_queued_generating_completed(now: float, status: str) -> None:
    assert make_gen(created_at=100.0, duration_s=10.0, queued_s=2.0).status_at(now) == status


def assert_matches_fetch_schema(answer: dict[str, Any]) -> None:
    doc = schema_doc("fetch-video.json")
    dto = doc["components"]["schemas"]["Video.v2.PollVideoResponseDTO"]
    assert set(dto["required"]) <= set(answer) <= set(dto["properties"])
    assert answer["status"] in dto["properties"]["status"]["enum"]


@pytest.mark.parametrize(("now", "status"), [(100.0, "queued"), (105.0, "generating")])
def test_fetch_body_while_running_has_no_video(now: float, status: str) -> None:
    answer = fetch_body(make_gen(), now, "http://cdn/x.mp4", 8)
    assert_matches_fetch_schema(answer)
    assert answer == {"id": "g1", "status": status, "video": None, "error": None, "meta": None}


def test_fetch_body_when_completed_has_url_duration_and_usage() -> None:
    answer = fetch_body(make_gen(), 110.0, "http://cdn/x.mp4", 8)
    assert_matches_fetch_schema(answer)
    assert answer["status"] == "completed" and answer["error"] is None
    assert answer["video"] == {"url": "http://cdn/x.mp4", "duration": 8}
    assert answer["meta"]["usage"]["tokens_used"] == 6_400_000


@pytest.mark.parametrize(
    ("now", "fails", "charge"),
    [
        (100.0, False, (0.0, 0)),  # queued: nothing recorded yet
        (109.999, False, (0.0, 0)),
        (110.0, False, (3.2, 6_400_000)),  # charged on completion
        (105.0, True, (0.0, 0)),
        (110.0, True, (0.0, 0)),  # an error is never billed
        (1e9, True, (0.0, 0)),
    ],
)
def test_charge_is_recorded_on_completion_and_never_for_an_error(
    now: float, fails: bool, charge: tuple[float, int]
) -> None:
    gen = make_gen()
    gen.fails = fails
    assert gen.charge_at(now) == charge


@pytest.mark.parametrize(
    ("shape", "status", "video"),
    [
        ("waiting", "waiting", None),
        ("active", "active", None),
        ("processing", "processing", None),
        ("completed_no_video", "completed", None),
        ("completed_no_url", "completed", {"duration": 8}),
    ],
)
def test_odd_fetch_body_is_never_done(shape: OddShape, status: str, video: Any) -> None:
    answer = odd_fetch_body(make_gen(), shape, 8)
    assert answer == {"id": "g1", "status": status, "video": video, "error": None, "meta": None}
    assert not (answer["video"] or {}).get("url")


def test_odd_shapes_cover_each_still_running_case_the_contract_names() -> None:
    statuses = {odd_fetch_body(make_gen(), s, 8)["status"] for s in ODD_SHAPES}
    assert {"waiting", "active", "completed"} <= statuses
    assert statuses - {"waiting", "active", "completed"}  # and one nobody documents


def test_stats_summary_is_empty_before_any_poll() -> None:
    summary = SimStats().summary()
    assert summary["polls"] == 0 and summary["generations_detected"] == 0
    assert summary["mean_polls_per_completed"] is None
    assert summary["mean_detection_lag_s"] is None and summary["max_detection_lag_s"] is None


def test_stats_summary_counts_polls_per_completed_generation_and_lag() -> None:
    stats = SimStats()
    fast, slow, never = make_gen("a"), make_gen("b", duration_s=20.0), make_gen("c", 1e6)
    for now in (105.0, 111.0, 130.0):  # detected at 111: lag 1 (completes at 110)
        stats.record_poll(fast, now)
    stats.record_poll(slow, 123.0)  # detected at once: lag 3 (completes at 120)
    stats.record_poll(never, 130.0)
    summary = stats.summary()
    assert summary["polls"] == 5 and summary["generations_detected"] == 2
    assert summary["mean_polls_per_completed"] == 2.0  # (3 + 1) / 2; "c" never completed
    assert summary["mean_detection_lag_s"] == 2.0 and summary["max_detection_lag_s"] == 3.0
    assert fast.detected_at == 111.0 and fast.polls == 3


# -- logs ------------------------------------------------------------------------------------

NOW = datetime(2026, 7, 28, 12, tzinfo=UTC).timestamp()
DAY = 86_400.0


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("params", "since", "until"),
    [
        ([], None, None),
        ([("period", "24h")], NOW - DAY, None),
        ([("period", "7d")], NOW - 7 * DAY, None),
        ([("period", "36h")], NOW - 1.5 * DAY, None),
        (
            [("start", "2026-07-01T00:00:00Z"), ("end", "2026-07-28T00:00:00Z")],
            ts("2026-07-01T00:00:00"),
            ts("2026-07-28T00:00:00"),
        ),
        (  # without an offset: UTC
            [("start", "2026-07-01T00:00:00"), ("end", "2026-07-01T00:00:00")],
            ts("2026-07-01T00:00:00"),
            ts("2026-07-01T00:00:00"),
        ),
        (  # exactly 92 days
            [("start", "2026-01-01T00:00:00Z"), ("end", "2026-04-03T00:00:00Z")],
            ts("2026-01-01T00:00:00"),
            ts("2026-04-03T00:00:00"),
        ),
    ],
)
def test_log_query_window(
    params: list[tuple[str, str]], since: float | None, until: float | None
) -> None:
    query = parse_log_query(params, NOW)
    assert (query.since_s, query.until_s) == (since, until)


def test_log_query_defaults_and_filters() -> None:
    assert parse_log_query([], NOW) == LogQuery(limit=50, offset=0)
    params = [("model", T2V), ("model", I2V), ("status", "failed"), ("limit", "100")]
    query = parse_log_query([*params, ("offset", "7")], NOW)
    assert query.models == frozenset({T2V, I2V}) and query.statuses == frozenset({"failed"})
    assert (query.limit, query.offset) == (100, 7)


@pytest.mark.parametrize(
    "params",
    [
        [("period", "24h"), ("start", "2026-07-01T00:00:00Z"), ("end", "2026-07-02T00:00:00Z")],
        [("period", "24h"), ("start", "2026-07-01T00:00:00Z")],
        [("period", "24h"), ("end", "2026-07-01T00:00:00Z")],
        [("start", "2026-07-01T00:00:00Z")],
        [("start", "2026-07-02T00:00:00Z"), ("end", "2026-07-01T00:00:00Z")],
        [("start", "2026-01-01T00:00:00Z"), ("end", "2026-04-03T00:00:01Z")],
        [("start", "yesterday"), ("end", "2026-07-01T00:00:00Z")],
        [("period", "24")],
        [("period", "0h")],
        [("period", "1w")],
        [("status", "done")],
        [("status", "succeeded,failed")],
        [("limit", "0")],
        [("limit", "101")],
        [("limit", "ten")],
        [("offset", "-1")],
        [("model", f"m{i}") for i in range(51)],
    ],
)
def test_log_query_rejects(params: list[tuple[str, str]]) -> None:
    with pytest.raises(QueryInvalid):
        parse_log_query(params, NOW)


def row(n: int, created: float, model: str = T2V, status: LogStatus = "succeeded") -> LogRow:
    return LogRow("k", created, status, model, 0.0, 0, f"req-{n}", f"inf-{n}", None)


ROWS = [
    row(0, NOW - 3 * DAY),
    row(1, NOW - 10, I2V),
    row(2, NOW - 20, REF, "failed"),
    row(3, NOW - 10),  # ties with row 1: later first
    row(4, NOW - 40 * DAY, I2V, "failed"),
]


def request_ids(page: dict[str, Any]) -> list[str]:
    return [r["request_id"] for r in page["data"]]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], ["req-3", "req-1", "req-2", "req-0", "req-4"]),
        ([("model", I2V)], ["req-1", "req-4"]),
        ([("model", I2V), ("model", REF)], ["req-1", "req-2", "req-4"]),
        ([("model", f"{T2V},{I2V}")], []),
        ([("status", "failed")], ["req-2", "req-4"]),
        (
            [("status", "failed"), ("status", "succeeded")],
            ["req-3", "req-1", "req-2", "req-0", "req-4"],
        ),
        ([("period", "24h")], ["req-3", "req-1", "req-2"]),
        ([("period", "7d"), ("status", "succeeded")], ["req-3", "req-1", "req-0"]),
    ],
)
def test_log_page_newest_first_and_filtered(
    params: list[tuple[str, str]], expected: list[str]
) -> None:
    assert request_ids(log_page(ROWS, parse_log_query(params, NOW))) == expected


@pytest.mark.parametrize(
    ("limit", "offset", "expected", "has_more"),
    [
        (2, 0, ["req-3", "req-1"], True),
        (2, 2, ["req-2", "req-0"], True),
        (2, 4, ["req-4"], False),
        (5, 0, ["req-3", "req-1", "req-2", "req-0", "req-4"], False),
        (2, 9, [], False),
    ],
)
def test_log_page_pagination(limit: int, offset: int, expected: list[str], has_more: bool) -> None:
    page = log_page(ROWS, LogQuery(limit=limit, offset=offset))
    assert request_ids(page) == expected
    assert page["pagination"] == {
        "limit": limit,
        "offset": offset,
        "total": 5,
        "has_more": has_more,
    }


def test_log_row_json_has_every_required_field() -> None:
    doc = schema_doc("logs-v2.json")
    answer = doc["paths"]["/v2/logs"]["get"]["responses"]["200"]["content"]["application/json"]
    required = answer["schema"]["properties"]["data"]["items"]["required"]
    data = LogRow("k", ts("2026-07-02T03:04:05.250"), "failed", T2V, 0.0, 0, "r", "i", "c")
    assert set(data.to_json()) == set(required)
    assert data.to_json()["created"] == "2026-07-02T03:04:05.250Z"
    assert data.to_json()["cost"] == {"usd": 0.0, "credits": 0}


@pytest.mark.parametrize(
    ("wall", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (ts("2026-07-02T03:04:05.999"), "2026-07-02T03:04:05.999Z"),
    ],
)
def test_iso_utc_ms(wall: float, text: str) -> None:
    assert iso_utc_ms(wall) == text


def test_log_model_filter_accepts_a_bare_alias() -> None:
    query = parse_log_query([("model", "veo-3.1-i2v")], NOW)
    assert request_ids(log_page(ROWS, query)) == ["req-1", "req-4"]


# -- which file a request gets ---------------------------------------------------------------

FAITHFUL = SimConfig()
TINY = SimConfig(video_mode="tiny")


@pytest.mark.parametrize(
    ("fields", "config", "size", "seconds", "fps"),
    [
        ({"resolution": "720p"}, FAITHFUL, (1280, 720), 8, 24),
        ({"resolution": "720p", "aspect_ratio": "9:16"}, FAITHFUL, (720, 1280), 8, 24),
        ({}, FAITHFUL, (1920, 1080), 8, 24),
        ({"aspect_ratio": "9:16", "duration": 4}, FAITHFUL, (1080, 1920), 4, 24),
        ({"duration": 6}, SimConfig(video_fps=30), (1920, 1080), 6, 30),
        ({}, TINY, (160, 90), 1, 8),
        ({"aspect_ratio": "9:16", "resolution": "720p"}, TINY, (90, 160), 1, 8),
    ],
)
def test_spec_for(
    fields: dict[str, Any], config: SimConfig, size: tuple[int, int], seconds: int, fps: int
) -> None:
    spec = spec_for(validate_body(body(T2V, **fields), SCHEMAS), config)
    assert ((spec.width, spec.height), spec.duration_s, spec.fps) == (size, seconds, fps)


@pytest.mark.parametrize(("audio", "suffix"), [(True, "_a.mp4"), (False, "_s.mp4")])
def test_spec_keeps_the_audio_choice(audio: bool, suffix: str) -> None:
    spec = spec_for(validate_body(body(T2V, generate_audio=audio), SCHEMAS), TINY)
    assert spec.audio is audio and spec.file_name == f"160x90_1s_8fps{suffix}"


# -- the logs' rate limit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calls", "admitted"),
    [
        # (key, now) of each call, and what admit() answers: None or the seconds to wait
        ([("a", 0.0)] * 3, [None, None, None]),
        ([("a", 0.0)] * 4, [None, None, None, 1.0]),
        ([("a", 0.0), ("a", 0.5), ("a", 0.6), ("a", 0.7)], [None, None, None, 0.3]),
        ([("a", 0.0)] * 3 + [("a", 1.0)], [None, None, None, None]),  # the first slid out
        ([("a", 0.0)] * 3 + [("b", 0.0)], [None, None, None, None]),  # per key
        # refused calls are not counted: waiting as told is enough
        ([("a", 0.0)] * 3 + [("a", 0.9), ("a", 1.0)], [None, None, None, 0.1, None]),
    ],
)
def test_sliding_window(calls: list[tuple[str, float]], admitted: list[float | None]) -> None:
    window = SlidingWindow(3, 1.0)
    answers = [window.admit(key, now) for key, now in calls]
    assert answers == [pytest.approx(a) if a is not None else None for a in admitted]


def test_a_zero_limit_admits_everything() -> None:
    window = SlidingWindow(0, 1.0)
    assert all(window.admit("a", 0.0) is None for _ in range(1000))


def test_logs_rate_limit_defaults_to_the_documented_200_per_60_s() -> None:
    config = SimConfig()
    assert (config.logs_rate_limit, config.logs_rate_window_s) == (200, 60.0)
