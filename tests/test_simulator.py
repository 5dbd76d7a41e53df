"""The simulator's shell over real loopback HTTP, with a fake clock (no test sleeps): auth, the
create/fetch/logs routes, the CDN listener, the test-card encoder and the generation journal."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from multidict import CIMultiDictProxy

from veobatch.simulator import SimConfig, Simulator
from veobatch.simulator.video import VideoCache, VideoSpec, encode_test_card

KEY = "sim-key-1f2e3d"
OTHER = "sim-key-other"
T2V = "google/veo-3.1-t2v"
GOOD = {"model": T2V, "prompt": "a lighthouse at dusk"}
BAD = {"model": T2V, "prompt": " ", "duration": 5}
GENERATIONS = "/v2/video/generations"
# Every generation takes exactly 10 s: queued for 2 s, generating for 8 s.
CONFIG = SimConfig(
    api_keys=frozenset({KEY, OTHER}),
    gen_time_mean_s=10.0,
    gen_time_spread=0.0,
    queued_fraction=0.2,
    video_mode="tiny",
)
ERROR_KEYS = {"message", "path", "requestId", "statusCode", "timestamp"}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    json: Any
    raw: bytes
    headers: CIMultiDictProxy[str]


@dataclass
class Api:
    """A running simulator, its clock, and a client session to talk to it."""

    sim: Simulator
    clock: FakeClock
    http: aiohttp.ClientSession

    async def call(
        self, method: str, url: str, auth: str | None, headers: Mapping[str, str] = {}, **kw: Any
    ) -> Reply:
        sent = dict(headers) | ({"Authorization": auth} if auth is not None else {})
        async with self.http.request(method, url, headers=sent, **kw) as r:
            raw = await r.read()
            data = json.loads(raw) if r.content_type == "application/json" else None
            return Reply(r.status, data, raw, r.headers)

    async def create(self, request: Any = GOOD, key: str = KEY, crid: str | None = None) -> Reply:
        headers = {"X-Client-Request-Id": crid} if crid is not None else {}
        url = self.sim.base_url + GENERATIONS
        return await self.call("POST", url, f"Bearer {key}", headers, json=request)

    async def fetch(self, gen_id: str, key: str = KEY) -> Reply:
        url = self.sim.base_url + GENERATIONS
        return await self.call("GET", url, f"Bearer {key}", params={"generation_id": gen_id})

    async def logs(self, key: str = KEY, params: list[tuple[str, str]] | None = None) -> Reply:
        return await self.call(
            "GET", self.sim.base_url + "/v2/logs", f"Bearer {key}", params=params
        )

    async def completed_url(self) -> str:
        """Create a generation, let it finish, and return its video URL."""
        gen_id = (await self.create()).json["id"]
        self.clock.now += 10
        url: str = (await self.fetch(gen_id)).json["video"]["url"]
        return url


@asynccontextmanager
async def running(config: SimConfig, clock: FakeClock) -> AsyncIterator[Api]:
    async with Simulator(config, clock=clock) as sim, aiohttp.ClientSession() as http:
        yield Api(sim, clock, http)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with running(CONFIG, FakeClock()) as api:
        yield api


def assert_error_shape(reply: Reply, status: int, path: str) -> None:
    body = reply.json
    assert reply.status == status
    assert ERROR_KEYS <= set(body) and body["statusCode"] == status and body["path"] == path
    uuid.UUID(body["requestId"])
    assert body["timestamp"].endswith("Z")
    datetime.fromisoformat(body["timestamp"])


# -- auth ------------------------------------------------------------------------------------

ROUTES = [
    ("POST", GENERATIONS, {"json": GOOD}),
    ("GET", GENERATIONS, {"params": {"generation_id": "x"}}),
    ("GET", "/v2/logs", {}),
]
BAD_AUTH = [None, f"Basic {KEY}", "Bearer not-a-key", "Bearer ", KEY]


@pytest.mark.parametrize(("method", "path", "kw"), ROUTES)
@pytest.mark.parametrize("auth", BAD_AUTH)
async def test_unauthorized_request_gets_401(
    api: Api, method: str, path: str, kw: dict[str, Any], auth: str | None
) -> None:
    reply = await api.call(method, api.sim.base_url + path, auth, **kw)
    assert_error_shape(reply, 401, path)
    assert api.sim.stats.unauthorized == 1 and not api.sim.generations


async def test_unauthorized_post_is_counted_as_such(api: Api) -> None:
    await api.create(key="not-a-key")
    summary = api.sim.stats.summary()
    assert (summary["creates_unauthorized"], summary["creates_ok"]) == (1, 0)


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    reply = await api.call("POST", api.sim.base_url + GENERATIONS, f"bearer {KEY}", json=GOOD)
    assert reply.status == 200


# -- create ----------------------------------------------------------------------------------


async def test_invalid_json_is_a_body_validation_error(api: Api) -> None:
    headers = {"Content-Type": "application/json"}
    torn = b'{"model": "google/veo-3.1-t2v",'
    reply = await api.call(
        "POST", api.sim.base_url + GENERATIONS, f"Bearer {KEY}", headers, data=torn
    )
    assert_error_shape(reply, 400, GENERATIONS)
    assert reply.json["message"] == "Body validation error"
    [issue] = reply.json["meta"]
    assert issue["path"] == [] and "invalid JSON" in issue["message"]


async def test_a_body_not_sent_as_json_is_a_body_validation_error(api: Api) -> None:
    # The client must say what it sends: a JSON body under text/plain is not parsed as JSON.
    headers = {"Content-Type": "text/plain"}
    body = b'{"model": "google/veo-3.1-t2v", "prompt": "p"}'
    url = api.sim.base_url + GENERATIONS
    reply = await api.call("POST", url, f"Bearer {KEY}", headers, data=body)
    assert_error_shape(reply, 400, GENERATIONS)
    [issue] = reply.json["meta"]
    assert issue["message"] == "Expected Content-Type application/json, received text/plain"
    assert (api.sim.stats.creates_ok, api.sim.stats.creates_rejected) == (0, 1)


async def test_bad_body_lists_every_issue_in_meta(api: Api) -> None:
    reply = await api.create(BAD)
    assert_error_shape(reply, 400, GENERATIONS)
    assert reply.json["message"] == "Body validation error"
    assert [m["path"] for m in reply.json["meta"]] == [["prompt"], ["duration"]]
    assert all(set(m) == {"path", "message"} for m in reply.json["meta"])
    assert not api.sim.generations and api.sim.stats.creates_rejected == 1


async def test_unknown_model_is_a_body_validation_error_naming_the_models(api: Api) -> None:
    reply = await api.create({**GOOD, "model": "google/veo-2"})
    assert_error_shape(reply, 400, GENERATIONS)
    assert reply.json["message"] == "Body validation error"
    [issue] = reply.json["meta"]
    assert issue["path"] == ["model"]
    assert issue["message"].startswith("Invalid enum value. Expected 'google/veo-3.1-")
    assert issue["message"].endswith("received 'google/veo-2'") and f"'{T2V}'" in issue["message"]
    assert not api.sim.generations and api.sim.stats.creates_rejected == 1


async def test_good_post_answers_queued_with_the_inference_id(api: Api) -> None:
    reply = await api.create()
    assert reply.status == 200
    assert set(reply.json) == {"id", "status"} and reply.json["status"] == "queued"
    file_id, model = reply.json["id"].split(":", 1)
    assert uuid.UUID(file_id) and model == T2V
    assert reply.headers["x-inference-id"] == reply.json["id"]


@pytest.mark.parametrize(
    ("crid", "kept"),
    [
        ("vb:job-1:1:abc", True),
        ("A.b_c-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("a/b", False),
    ],
)
async def test_client_request_id_is_echoed_only_when_valid(api: Api, crid: str, kept: bool) -> None:
    reply = await api.create(crid=crid)
    assert reply.status == 200
    assert reply.headers.get("x-client-request-id") == (crid if kept else None)
    [gen] = api.sim.generations.values()
    assert gen.client_request_id == (crid if kept else None)


# -- fetch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"generation_id": ""}])
async def test_fetch_without_generation_id_is_400(api: Api, params: dict[str, str]) -> None:
    reply = await api.call("GET", api.sim.base_url + GENERATIONS, f"Bearer {KEY}", params=params)
    assert_error_shape(reply, 400, GENERATIONS)


async def test_fetch_of_unknown_id_is_404(api: Api) -> None:
    reply = await api.fetch(f"{uuid.uuid4()}:{T2V}")
    assert_error_shape(reply, 404, GENERATIONS)


async def test_another_accounts_generation_is_404(api: Api) -> None:
    # A client that polled with the wrong key must see it, as it would on the real API.
    gen_id = (await api.create()).json["id"]
    assert_error_shape(await api.fetch(gen_id, key=OTHER), 404, GENERATIONS)
    assert (await api.fetch(gen_id)).status == 200


async def test_generation_walks_queued_generating_completed(api: Api) -> None:
    gen_id = (await api.create()).json["id"]
    seen = []
    for step_s in (0.0, 1.9, 0.1, 7.9, 0.1, 5.0):
        api.clock.now += step_s
        reply = await api.fetch(gen_id)
        seen.append((reply.json["status"], reply.json["video"] is None))
    still_running = [("queued", True)] * 2 + [("generating", True)] * 2
    assert seen == [*still_running, ("completed", False), ("completed", False)]


async def test_completed_answer_points_at_the_cdn_listener(api: Api) -> None:
    gen_id = (await api.create()).json["id"]
    api.clock.now += 10
    answer = (await api.fetch(gen_id)).json
    assert answer["id"] == gen_id and answer["error"] is None
    assert answer["video"]["url"].startswith(api.sim.cdn_url + "/files/")
    assert api.sim.cdn_url.rsplit(":", 1)[1] != api.sim.base_url.rsplit(":", 1)[1]
    assert answer["video"]["duration"] == 1  # the tiny stand-in lasts 1 s
    assert answer["meta"]["usage"]["tokens_used"] == 6_400_000  # 8 s at $0.40


# -- the CDN ---------------------------------------------------------------------------------


async def test_cdn_serves_a_playable_mp4(api: Api) -> None:
    reply = await api.call("GET", await api.completed_url(), None)
    assert reply.status == 200 and reply.headers["Content-Type"] == "video/mp4"
    with av.open(io.BytesIO(reply.raw)) as container:
        assert container.streams.video[0].codec_context.width == 160
    assert api.sim.stats.downloads == 1


async def test_cdn_answers_a_range_with_206(api: Api) -> None:
    url = await api.completed_url()
    whole = (await api.call("GET", url, None)).raw
    part = await api.call("GET", url, None, headers={"Range": "bytes=10-"})
    assert part.status == 206 and part.raw == whole[10:]
    assert part.headers["Content-Range"] == f"bytes 10-{len(whole) - 1}/{len(whole)}"


def wrong_token(url: str) -> str:
    head, token, name = url.rsplit("/", 2)
    return f"{head}/{token[::-1]}x/{name}"


def wrong_name(url: str) -> str:
    return url.rsplit("/", 1)[0] + f"/{uuid.uuid4()}.mp4"


@pytest.mark.parametrize("mangle", [wrong_token, wrong_name])
async def test_cdn_answers_404_for_a_wrong_url(api: Api, mangle: Any) -> None:
    reply = await api.call("GET", mangle(await api.completed_url()), None)
    assert reply.status == 404 and api.sim.stats.downloads == 0


async def test_cdn_answers_404_before_completion(api: Api) -> None:
    url = await api.completed_url()
    gen = next(iter(api.sim.generations.values()))
    api.clock.now = gen.completes_at - 0.01
    assert (await api.call("GET", url, None)).status == 404


async def test_cdn_answers_404_for_a_non_ascii_token(api: Api) -> None:
    head, _, name = (await api.completed_url()).rsplit("/", 2)
    assert (await api.call("GET", f"{head}/%C3%A9/{name}", None)).status == 404


@pytest.mark.parametrize(("auth", "seen"), [(None, 0), (f"Bearer {KEY}", 1)])
async def test_cdn_counts_authorization_headers(api: Api, auth: str | None, seen: int) -> None:
    assert (await api.call("GET", await api.completed_url(), auth)).status == 200
    assert api.sim.stats.cdn_auth_headers_seen == seen and api.sim.stats.cdn_requests == 1


# -- the usage log ---------------------------------------------------------------------------


async def test_logs_list_one_row_per_post_newest_first(api: Api) -> None:
    first = (await api.create(crid="vb:job-1:1:abc")).json["id"]
    await api.create(BAD, crid="vb:job-2:1:def")
    third = (await api.create()).json["id"]
    page = (await api.logs()).json
    assert page["pagination"] == {"limit": 50, "offset": 0, "total": 3, "has_more": False}
    rows = page["data"]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    assert [rows[0]["inference_id"], rows[2]["inference_id"]] == [third, first]
    assert [r["client_request_id"] for r in rows] == [None, "vb:job-2:1:def", "vb:job-1:1:abc"]


async def test_failed_row_costs_nothing(api: Api) -> None:
    await api.create(BAD)
    [row] = (await api.logs()).json["data"]
    assert row["status"] == "failed" and row["model"] == T2V
    assert row["cost"] == {"usd": 0.0, "credits": 0}


async def test_succeeded_row_has_the_price_once_the_generation_completes(api: Api) -> None:
    await api.create({**GOOD, "model": "google/veo-3.1-t2v-fast", "duration": 4})
    [row] = (await api.logs()).json["data"]
    assert row["status"] == "succeeded" and row["origin"] == "api"
    assert row["cost"] == {"usd": 0.0, "credits": 0}  # charged after completion
    api.clock.now += 10
    [row] = (await api.logs()).json["data"]
    assert row["cost"] == {"usd": 0.6, "credits": 1_200_000}


async def test_logs_show_only_the_callers_own_rows(api: Api) -> None:
    await api.create()
    await api.create(BAD)
    other = (await api.logs(OTHER)).json
    assert other["data"] == [] and other["pagination"]["total"] == 0
    await api.create(key=OTHER)
    assert (await api.logs(OTHER)).json["pagination"]["total"] == 1
    assert (await api.logs()).json["pagination"]["total"] == 2


async def test_logs_filter_by_status_over_http(api: Api) -> None:
    await api.create()
    await api.create(BAD)
    page = (await api.logs(params=[("status", "failed"), ("period", "24h")])).json
    assert [r["status"] for r in page["data"]] == ["failed"]


@pytest.mark.parametrize(
    "params", [[("status", "succeeded,failed")], [("limit", "101")], [("period", "1w")]]
)
async def test_logs_bad_query_is_400(api: Api, params: list[tuple[str, str]]) -> None:
    assert_error_shape(await api.logs(params=params), 400, "/v2/logs")


async def test_sim_stats_needs_no_auth_and_counts_what_happened(api: Api) -> None:
    await api.create()
    await api.create(BAD)
    await api.create(key="nope")
    url = await api.completed_url()  # one more create, one poll
    await api.call("GET", url, None)
    await api.logs()
    stats = (await api.call("GET", api.sim.base_url + "/_sim/stats", None)).json
    expected = {"creates_ok": 2, "creates_rejected": 1, "creates_unauthorized": 1}
    assert {k: stats[k] for k in expected} == expected
    assert (stats["polls"], stats["downloads"], stats["logs_requests"]) == (1, 1, 1)
    assert stats["generations_detected"] == 1 and stats["mean_detection_lag_s"] == 0.0


# -- the test card ---------------------------------------------------------------------------


@pytest.mark.parametrize("audio", [True, False])
def test_tiny_test_card_plays_with_audio_iff_requested(tmp_path: Path, audio: bool) -> None:
    path = tmp_path / "card.mp4"
    encode_test_card(VideoSpec(160, 90, 1, 8, audio), path)
    with av.open(str(path)) as container:
        [video] = container.streams.video
        assert (video.codec_context.name, video.codec_context.width) == ("h264", 160)
        assert sum(1 for _ in container.decode(video)) == 8
        assert len(container.streams.audio) == (1 if audio else 0)


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_video_cache_encodes_each_variant_once(tmp_path: Path) -> None:
    cache = VideoCache(tmp_path)
    spec_a, spec_b = VideoSpec(160, 90, 1, 8, False), VideoSpec(90, 160, 1, 8, False)
    paths = await asyncio.gather(*(cache.path_for(s) for s in [spec_a] * 3 + [spec_b] * 2))
    assert cache.encodings == 2
    assert len(set(paths[:3])) == 1 and len(set(paths[3:])) == 1 and paths[0] != paths[3]
    assert file_names(tmp_path) == sorted({p.name for p in paths})


# -- the journal -----------------------------------------------------------------------------


def journaled(tmp_path: Path) -> SimConfig:
    return replace(CONFIG, state_dir=tmp_path / "state")


def journal(tmp_path: Path) -> Path:
    return tmp_path / "state" / "generations.jsonl"


async def test_restarted_simulator_finds_a_journaled_generation(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(journaled(tmp_path), clock) as first:
        gen_id = (await first.create()).json["id"]
        token = first.sim.generations[gen_id].file_token
    async with running(journaled(tmp_path), clock) as second:
        assert (await second.fetch(gen_id)).json["status"] == "queued"
        clock.now += 10
        url = (await second.fetch(gen_id)).json["video"]["url"]
        assert f"/files/{token}/" in url and url.startswith(second.sim.cdn_url)
        assert (await second.call("GET", url, None)).status == 200


async def test_torn_last_journal_line_is_skipped(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(journaled(tmp_path), clock) as first:
        kept = (await first.create()).json["id"]
        torn = (await first.create()).json["id"]
    journal(tmp_path).write_bytes(journal(tmp_path).read_bytes()[:-25])
    async with running(journaled(tmp_path), clock) as second:
        assert (await second.fetch(kept)).status == 200
        assert (await second.fetch(torn)).status == 404


async def test_generation_created_after_a_torn_line_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(journaled(tmp_path), clock) as first:
        await first.create()
    journal(tmp_path).write_bytes(journal(tmp_path).read_bytes()[:-25])
    async with running(journaled(tmp_path), clock) as second:
        gen_id = (await second.create()).json["id"]
    async with running(journaled(tmp_path), clock) as third:
        assert (await third.fetch(gen_id)).status == 200


async def test_journal_never_holds_the_api_key(tmp_path: Path) -> None:
    async with running(journaled(tmp_path), FakeClock()) as api:
        await api.create(crid="vb:job-1:1:abc")
    text = journal(tmp_path).read_text()
    assert KEY not in text
    assert hashlib.sha256(KEY.encode()).hexdigest() in text


async def test_a_restarted_simulator_serves_the_video_urls_handed_out_before(
    tmp_path: Path,
) -> None:
    # A client killed between a poll and its download resumes with the URL it was given.
    clock = FakeClock()
    async with running(journaled(tmp_path), clock) as first:
        url = await first.completed_url()
        cdn_url = first.sim.cdn_url
    async with running(journaled(tmp_path), clock) as second:
        assert second.sim.cdn_url == cdn_url
        got = await second.call("GET", url, None)
        assert got.status == 200 and got.raw[4:8] == b"ftyp"


async def test_a_restart_whose_video_port_is_taken_hands_out_urls_on_another(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    async with running(journaled(tmp_path), clock) as first:
        gen_id = (await first.create()).json["id"]
        clock.now += 10
        url = (await first.fetch(gen_id)).json["video"]["url"]
        async with running(journaled(tmp_path), clock) as idle:  # hands out no URL
            assert idle.sim.cdn_url != first.sim.cdn_url
        async with running(journaled(tmp_path), clock) as second:
            moved = second.sim.cdn_url
            assert moved != first.sim.cdn_url
            fresh = (await second.fetch(gen_id)).json["video"]["url"]
            assert fresh == url.replace(first.sim.cdn_url, moved)
            assert (await second.call("GET", fresh, None)).status == 200
    # The port the last URLs named is the one taken again; an idle process noted nothing.
    async with running(journaled(tmp_path), clock) as third:
        assert third.sim.cdn_url == moved
