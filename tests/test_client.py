"""The API client: pure parsing tables, then the aiohttp shell against aioresponses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import CallbackResult, aioresponses

from veobatch.client import (
    MAX_BODY_BYTES,
    HttpApiClient,
    describe_error_body,
    error_from_response,
    parse_created,
    parse_generation,
    parse_retry_after,
)
from veobatch.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NoAnswerError,
    NotFoundError,
    NotSentError,
    ProtocolError,
    RateLimitedError,
    RedirectedError,
    ServerError,
)
from veobatch.outage import failure_cause
from veobatch.settings import Secret

BASE = "https://api.example.test"
URL = BASE + "/v2/video/generations"
KEY = "canary-key-123"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("2.5", 2.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # now is 07:28:00
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("nan", None),
        ("inf", 900.0),  # capped: a wrong header must not park a job for hours
        ("86400", 900.0),
        ("Wed, 21 Oct 2035 07:28:00 GMT", 900.0),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # 2015-10-21T07:28:00Z
    assert parse_retry_after(value, now) == expected


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (400, {}, BadRequestError),
        (422, {}, BadRequestError),
        (401, {}, AuthError),
        (403, {}, AuthError),
        (404, {}, NotFoundError),
        (429, {"Retry-After": "3"}, RateLimitedError),
        (500, {}, ServerError),
        (503, {}, ServerError),
        (503, {"Retry-After": "3"}, ServerError),
        (504, {}, ServerError),
        (408, {}, NoAnswerError),  # the server gave up waiting: the outcome is unknown
        (308, {"Location": "https://elsewhere.test/v2"}, RedirectedError),
        (302, {}, RedirectedError),
    ],
)
def test_error_mapping(status: int, headers: dict[str, str], kind: type) -> None:
    err = error_from_response(status, '{"message": "nope"}', headers)
    assert isinstance(err, kind)
    assert str(status) in err.message
    if isinstance(err, RedirectedError):
        assert isinstance(err, AuthError)  # stops the run: nothing else would work either
        assert "AIMLAPI_BASE_URL" in err.message
        assert headers.get("Location", "redirects;") in err.message
        return
    assert "nope" in err.message
    assert err.retry_after_s == (3.0 if "Retry-After" in headers else None)


def test_validation_details_are_kept() -> None:
    body = json.dumps(
        {
            "message": "Body validation error",
            "statusCode": 400,
            "meta": [{"path": ["duration"], "message": "Expected 4 | 6 | 8, received 5"}],
        }
    )
    assert describe_error_body(body) == (
        "Body validation error - duration: Expected 4 | 6 | 8, received 5"
    )
    assert describe_error_body("<html>Bad   Gateway</html>") == "<html>Bad Gateway</html>"


def test_parse_created() -> None:
    c = parse_created('{"id": "u:google/veo-3.1-t2v", "status": "queued"}', {})
    assert (c.generation_id, c.status, c.usd_spent) == ("u:google/veo-3.1-t2v", "queued", None)
    c = parse_created("{}", {"x-inference-id": "g", "x-aimlapi-usd-spent": "0.5"})
    assert (c.generation_id, c.usd_spent) == ("g", 0.5)
    with pytest.raises(ProtocolError):
        parse_created('{"status": "queued"}', {})
    with pytest.raises(ProtocolError):
        parse_created("not json", {})
    # The generation exists: an unreadable body does not lose the id its header gives.
    assert parse_created("<html>OK</html>", {"x-inference-id": "g"}).generation_id == "g"


@pytest.mark.parametrize(
    ("body", "completed", "failed", "url"),
    [
        ({"id": "g", "status": "queued"}, False, False, None),
        ({"id": "g", "status": "generating", "video": None}, False, False, None),
        ({"id": "g", "status": "waiting"}, False, False, None),
        ({"id": "g", "status": "something-new"}, False, False, None),
        (
            {"id": "g", "status": "completed", "video": {"url": "https://c/x.mp4"}},
            True,
            False,
            "https://c/x.mp4",
        ),
        ({"id": "g", "status": "completed", "video": None}, False, False, None),  # no URL yet
        (
            {"id": "g", "status": "COMPLETED", "video": {"url": "https://c/y"}},
            True,
            False,
            "https://c/y",
        ),
        (
            {"id": "g", "status": "error", "error": {"name": "Safety", "message": "blocked"}},
            False,
            True,
            None,
        ),
    ],
)
def test_parse_generation(
    body: dict[str, object], completed: bool, failed: bool, url: str | None
) -> None:
    g = parse_generation(json.dumps(body), "g")
    assert (g.completed, g.failed, g.video_url) == (completed, failed, url)


def test_parse_generation_error_shapes() -> None:
    g = parse_generation('{"status": "error", "error": {"name": "N", "message": "M"}}', "g")
    assert (g.error_name, g.error_message) == ("N", "M")
    g = parse_generation('{"status": "error", "error": "plain text"}', "g")
    assert (g.error_name, g.error_message) == (None, "plain text")
    g = parse_generation('{"status": "completed", "video": {"url": "u", "duration": 8}}', "g")
    assert g.duration_s == 8.0


@pytest.mark.parametrize("duration", ["1" + "0" * 400, "-" + "9" * 500, "NaN", "Infinity", "true"])
def test_a_duration_no_float_can_hold_is_taken_as_absent(duration: str) -> None:
    # float(10**400) raises OverflowError: one such answer stopped the whole run.
    for where in ('"video": {"url": "u", "duration": %s}', '"duration": %s'):
        body = '{"id": "g", "status": "completed", %s}' % (where % duration)
        g = parse_generation(body, "g")
        assert (g.video_url, g.duration_s) == ("u" if "video" in where else None, None)
        assert parse_created(body, {}).generation_id == "g"


@pytest.fixture
async def client() -> AsyncIterator[HttpApiClient]:
    async with aiohttp.ClientSession() as session:
        yield HttpApiClient(session, BASE, Secret(KEY), timeout_s=5)


async def test_create_sends_key_body_and_request_id(client: HttpApiClient) -> None:
    seen: dict[str, object] = {}

    def answer(url: object, **kwargs: object) -> CallbackResult:
        seen.update(kwargs)
        return CallbackResult(status=200, payload={"id": "g1", "status": "queued"})

    with aioresponses() as m:
        m.post(URL, callback=answer)
        created = await client.create({"model": "m", "prompt": "p"}, client_request_id="vb:a:1:x")
    assert created.generation_id == "g1"
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["X-Client-Request-Id"] == "vb:a:1:x"
    assert json.loads(seen["data"]) == {"model": "m", "prompt": "p"}  # type: ignore[arg-type]
    assert seen["allow_redirects"] is False


async def test_a_json_answer_with_a_byte_order_mark_is_read(client: HttpApiClient) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"id": "g1", "status": "generating"}).encode()
    with aioresponses() as m:
        m.get(URL + "?generation_id=g1", body=body, content_type="application/json")
        gen = await client.fetch("g1")
    assert gen.status == "generating"


async def test_fetch_passes_generation_id(client: HttpApiClient) -> None:
    with aioresponses() as m:
        m.get(URL + "?generation_id=g1", payload={"id": "g1", "status": "generating"})
        g = await client.fetch("g1")
    assert g.status == "generating" and not g.completed


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequestError),
        (401, AuthError),
        (403, AuthError),
        (429, RateLimitedError),
        (500, ServerError),
        (502, ServerError),
    ],
)
async def test_http_errors_are_translated(client: HttpApiClient, status: int, kind: type) -> None:
    with aioresponses() as m:
        m.post(URL, status=status, payload={"message": "x"}, headers={"Retry-After": "1"})
        with pytest.raises(kind):
            await client.create({"model": "m"}, client_request_id="c")


async def test_connection_refused_is_not_sent(client: HttpApiClient) -> None:
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("api.example.test", 443, True, None, None, None, None)
    with aioresponses() as m:
        m.post(URL, exception=aiohttp.ClientConnectorError(key, OSError(111, "refused")))
        with pytest.raises(NotSentError):
            await client.create({"model": "m"}, client_request_id="c")


@pytest.mark.parametrize(
    "exc",
    [aiohttp.ServerDisconnectedError(), TimeoutError(), aiohttp.ClientPayloadError("cut")],
)
async def test_lost_answers_are_no_answer(client: HttpApiClient, exc: Exception) -> None:
    with aioresponses() as m:
        m.post(URL, exception=exc)
        with pytest.raises(NoAnswerError) as lost:
            await client.create({"model": "m"}, client_request_id="c")
    if isinstance(exc, TimeoutError):
        assert lost.value.message == (
            "POST /v2/video/generations: no answer: TimeoutError, none within the 5s timeout"
        )


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (401, {"message": f"Incorrect API key provided: {KEY}"}, {}),
        (400, {"message": "Body validation error", "meta": [{"message": f"key={KEY[:9]}"}]}, {}),
        (302, {}, {"Location": f"https://login.example/?token={KEY}"}),
        (502, "<html>upstream said Bearer " + KEY + "</html>", {}),
    ],
)
async def test_a_key_the_api_echoes_back_is_scrubbed_from_errors(
    client: HttpApiClient, status: int, body: Any, headers: dict[str, str]
) -> None:
    # Errors are logged and recorded in the ledger, results and webhook: never the key.
    text = body if isinstance(body, str) else json.dumps(body)
    with aioresponses() as m:
        m.post(URL, status=status, body=text, headers=headers)
        with pytest.raises(ApiError) as info:
            await client.create({"model": "m"}, client_request_id="c")
    shown = f"{info.value} {info.value.args}"
    assert KEY[:8] not in shown and KEY[-8:] not in shown and "***" in shown


async def test_a_key_echoed_in_a_generation_error_is_scrubbed(client: HttpApiClient) -> None:
    body = {"id": "g1", "status": "error", "error": {"name": "Auth", "message": f"bad {KEY}"}}
    with aioresponses() as m:
        m.get(URL + "?generation_id=g1", payload=body)
        gen = await client.fetch("g1")
    assert gen.failed and gen.error_message == "bad ***"


async def test_a_piece_of_the_key_in_an_error_is_scrubbed_but_not_from_a_video_url(
    client: HttpApiClient,
) -> None:
    # 8 of its characters in a row, in an error's words, go too (the README's promise); the
    # rest of a 2xx answer keeps them: a signed URL may hold 8 of them by chance.
    piece = KEY[3:13]
    failed = {"id": "g1", "status": "error", "error": {"name": f"N{piece}", "message": f"m{piece}"}}
    done = {"id": "g2", "status": "completed", "video": {"url": f"https://cdn.test/{piece}.mp4"}}
    created = {"id": "g3", "status": "error", "error": {"message": f"no: {piece}"}}
    with aioresponses() as m:
        m.get(URL + "?generation_id=g1", payload=failed)
        m.get(URL + "?generation_id=g2", payload=done)
        m.post(URL, payload=created)
        gen, ok = await client.fetch("g1"), await client.fetch("g2")
        made = await client.create({"model": "m"}, client_request_id="c")
    assert piece not in f"{gen.error_name} {gen.error_message}" and "***" in gen.error_message
    assert ok.video_url == f"https://cdn.test/{piece}.mp4"
    assert made.failed and made.error_message is not None and piece not in made.error_message


def test_a_create_answered_with_an_error_says_why() -> None:
    body = {"id": "g1", "status": "error", "error": {"name": "Policy", "message": "blocked"}}
    made = parse_created(json.dumps(body), {})
    assert made.failed and (made.error_name, made.error_message) == ("Policy", "blocked")
    queued = parse_created('{"id": "g2"}', {})
    assert queued.status == "queued" and not queued.failed and queued.error_message is None


async def test_a_short_test_key_leaves_answers_as_they_are() -> None:
    # A key "tp" was scrubbed out of every "http" of a successful answer: the video URL became
    # "ht***://..." and every paid generation failed as url_rejected.
    body = {"id": "g1", "status": "completed", "video": {"url": "http://cdn.test/tp/v.mp4"}}
    async with aiohttp.ClientSession() as session:
        short = HttpApiClient(session, BASE, Secret("tp"), timeout_s=5)
        with aioresponses() as m:
            m.get(URL + "?generation_id=g1", payload=body)
            gen = await short.fetch("g1")
    assert gen.video_url == "http://cdn.test/tp/v.mp4"


async def test_a_base_url_aiohttp_cannot_use_is_not_sent() -> None:
    # Nothing left: the job may be submitted again without any risk of paying twice.
    async with aiohttp.ClientSession() as session:
        bad = HttpApiClient(session, "http://127.0.0.1:187500", Secret(KEY), timeout_s=5)
        with pytest.raises(NotSentError):
            await bad.create({"model": "m"}, client_request_id="c")


async def test_errors_never_carry_the_key(client: HttpApiClient) -> None:
    with aioresponses() as m:
        m.post(URL, exception=aiohttp.ServerDisconnectedError())
        with pytest.raises(NoAnswerError) as info:
            await client.create({"model": "m"}, client_request_id="c")
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_secret_hides_itself() -> None:
    s = Secret(KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in f"{s}"
    assert s.reveal() == KEY


# An answer in several packets, over real loopback HTTP: aioresponses hands the body over whole.


async def _send_in_pieces(request: web.Request, status: int, body: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    third = max(1, len(body) // 3)
    for start in range(0, len(body), third):
        await resp.write(body[start : start + third])
        await asyncio.sleep(0.02)  # each piece its own packet
    await resp.write_eof()
    return resp


@pytest.fixture
async def pieces_server() -> AsyncIterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    """A server whose answers per path are set by the test, always sent in three pieces."""
    answers: dict[str, tuple[int, bytes]] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        status, body = answers[request.path]
        return await _send_in_pieces(request, status, body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), answers


async def test_answers_in_several_packets_are_read_whole(
    pieces_server: tuple[str, dict[str, tuple[int, bytes]]],
) -> None:
    base, answers = pieces_server
    rows = [
        {"client_request_id": f"vb:j{i}:1:abc", "inference_id": f"g{i}", "status": "succeeded"}
        for i in range(100)
    ]
    answers["/v2/video/generations"] = (200, json.dumps({"id": "g1", "status": "queued"}).encode())
    answers["/v2/logs"] = (200, json.dumps({"data": rows, "pagination": {}}).encode())
    async with aiohttp.ClientSession() as session:
        api = HttpApiClient(session, base, Secret(KEY), timeout_s=5)
        created = await api.create({"model": "m"}, client_request_id="vb:j:1:abc")
        assert created.generation_id == "g1"
        answers["/v2/video/generations"] = (
            200,
            json.dumps({"id": "g1", "status": "completed", "video": {"url": "u"}}).encode(),
        )
        assert (await api.fetch("g1")).completed
        now = datetime.now(UTC)
        page = await api.logs(start=now, end=now, models=["m"], offset=0, limit=100)
        assert [e.inference_id for e in page.entries] == [f"g{i}" for i in range(100)]


async def test_an_oversized_answer_is_refused_but_an_error_still_reads(
    pieces_server: tuple[str, dict[str, tuple[int, bytes]]],
) -> None:
    base, answers = pieces_server
    huge = b'{"id": "g1", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    answers["/v2/video/generations"] = (200, huge)
    async with aiohttp.ClientSession() as session:
        api = HttpApiClient(session, base, Secret(KEY), timeout_s=5)
        with pytest.raises(ProtocolError, match="over"):
            await api.fetch("g1")
        answers["/v2/video/generations"] = (503, b"busy " * (MAX_BODY_BYTES // 4))
        with pytest.raises(ServerError, match="HTTP 503: busy"):
            await api.fetch("g1")


async def test_a_free_form_generation_error_keeps_its_text(client: HttpApiClient) -> None:
    # fetch-video.json gives `error` no schema: one without name or message lost its detail.
    body = {"id": "g1", "status": "error", "error": {"code": "E42", "detail": "blocked by safety"}}
    with aioresponses() as m:
        m.get(URL + "?generation_id=g1", payload=body)
        gen = await client.fetch("g1")
    assert gen.failed and gen.error_message == '{"code": "E42", "detail": "blocked by safety"}'


@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_a_create_whose_body_is_lost_keeps_the_id_its_header_gave(fault: str) -> None:
    # Status 200 and x-inference-id arrived, then the body was cut off or never came: the
    # generation exists and is paid for, so its id must not be thrown away (job "uncertain").
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"x-inference-id": "gen-1:m"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"id": "gen')
        if fault == "stall":
            await asyncio.sleep(5)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        base = str(server.make_url("")).rstrip("/")
        api = HttpApiClient(session, base, Secret(KEY), timeout_s=0.5)
        created = await api.create({"model": "m"}, client_request_id="vb:j:1:abc")
        assert created.generation_id == "gen-1:m"
        with pytest.raises(NoAnswerError):  # a poll whose answer is lost is simply asked again
            await api.fetch("gen-1:m")


async def test_a_hung_poll_is_cut_short_by_the_poll_timeout_a_create_is_not() -> None:
    # 64 poll workers each held for the 60 s request timeout by a poll that hung: a poll is a
    # small GET, safe to ask again, so it has a short timeout of its own. A create keeps the
    # long one: a POST cut short leaves its outcome unknown.
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.method == "GET":  # hangs until the test ends
            await release.wait()
        else:  # answered, slower than a poll may take
            await asyncio.sleep(0.6)
        return web.json_response({"id": "g1", "status": "queued"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        base = str(server.make_url("")).rstrip("/")
        api = HttpApiClient(session, base, Secret(KEY), timeout_s=60, poll_timeout_s=0.3)
        try:
            with anyio.fail_after(10):  # not the 60 s of the request timeout
                with pytest.raises(NoAnswerError) as hung:
                    await api.fetch("g1")
                # An API slower than the limit fails every job: the message names the knob.
                assert hung.value.message == (
                    "GET /v2/video/generations: no answer: TimeoutError, none within the 0.3s"
                    " timeout (--poll-timeout)"
                )
                # Counted in an outage under the cause it had before the limit was named.
                assert failure_cause(hung.value) == "no answer: TimeoutError"
                created = await api.create({"model": "m"}, client_request_id="vb:j:1:abc")
        finally:
            release.set()
    assert created.generation_id == "g1"


async def test_a_generation_id_header_never_carries_the_key_into_records() -> None:
    with aioresponses() as mocked:
        mocked.post(URL, status=200, body="<html>OK</html>", headers={"x-inference-id": f"g-{KEY}"})
        async with aiohttp.ClientSession() as session:
            api = HttpApiClient(session, BASE, Secret(KEY))
            created = await api.create({"model": "m"}, client_request_id="vb:j:1:abc")
    assert KEY not in created.generation_id and created.generation_id == "g-***"


def test_half_a_surrogate_pair_in_an_answer_becomes_a_replacement_character() -> None:
    # '"\ud83d"' alone is valid JSON and no valid UTF-8: recorded in the ledger, the error
    # message of one generation stopped every run at the same poll (UnicodeEncodeError).
    body = '{"id": "g", "status": "error", "error": {"name": "x", "message": "blocked \\ud83d"}}'
    failed = parse_generation(body, "g")
    assert failed.error_message == "blocked \ufffd"
    assert describe_error_body('{"message": "bad \\udc00 key"}') == "bad \ufffd key"
    pair = parse_generation(body.replace("\\ud83d", "\\ud83d\\ude00"), "g")
    assert pair.error_message == "blocked \U0001f600"  # a whole pair is one character
    # Undecodable header bytes arrive as surrogates (aiohttp's surrogateescape).
    created = parse_created("", {"x-inference-id": "gen-\udcff-1"})
    assert created.generation_id == "gen-\ufffd-1"
    moved = error_from_response(302, "", {"Location": "https://x/\udce9"})
    for text in (failed.error_message, created.generation_id, moved.message):
        text.encode("utf-8")  # each can be written to the ledger and results.json
