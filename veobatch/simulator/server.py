"""The simulator's HTTP shell: an API listener and a separate CDN listener, over aiohttp.

Everything it decides comes from the pure modules beside it (validation, state, logs, video);
this file only maps requests to them. The CDN is a second listener on its own port so that a
client sending the API key to "another host" is visible (``stats.cdn_auth_headers_seen``).

With ``SimConfig.state_dir`` set, generations and failed requests are journaled there and
reloaded on start, so a client that restarts (``veobatch run --simulate`` after a crash) finds its
generations, and the same usage-log rows, again. The CDN's port is noted there too and taken
again on start, so the video URLs handed out before the restart still lead to their videos.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import math
import random
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from aiohttp import web

from .config import SimConfig, price
from .faults import Dice
from .logs import LogRow, QueryInvalid, SlidingWindow, log_page, parse_log_query
from .state import (
    FINISHED,
    ODD_SHAPES,
    Generation,
    SimStats,
    draw_duration_s,
    fetch_body,
    odd_fetch_body,
)
from .validation import (
    BODY_INVALID,
    BodyInvalid,
    Issue,
    VideoRequest,
    load_model_schemas,
    validate_body,
)
from .video import VideoCache, spec_for

log = logging.getLogger(__name__)

CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GENERATIONS = "/v2/video/generations"
JOURNAL = "generations.jsonl"
FAILED_JOURNAL = "failed_requests.jsonl"  # usage-log rows of requests that created nothing
CDN_PORT = "cdn_port.json"  # the port the handed-out video URLs name


def error_body(path: str, status: int, message: str, meta: Any = None) -> dict[str, Any]:
    """The API's error shape: message, path, requestId, statusCode, timestamp (+ details)."""
    body: dict[str, Any] = {
        "message": message,
        "path": path,
        "requestId": str(uuid.uuid4()),
        "statusCode": status,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    if meta is not None:
        body["meta"] = meta
    return body


def _error(request: web.Request, status: int, message: str, meta: Any = None) -> web.Response:
    return web.json_response(error_body(request.path, status, message, meta), status=status)


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Simulator:
    """The simulated API; ``async with Simulator(config) as sim:`` then use ``sim.base_url``."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.host = host
        self._ports = (port, cdn_port)
        # Journaled generations must keep their timing across processes: wall time then.
        self._clock = clock or (time.time if self.config.state_dir else time.monotonic)
        self._rng = random.Random(self.config.seed)
        self._schemas = load_model_schemas()
        self.stats = SimStats()
        self.generations: dict[str, Generation] = {}
        self._by_file: dict[str, Generation] = {}
        self._log_rows: list[LogRow] = []
        self._running: dict[str, list[float]] = {}  # per key: completion times, a heap
        self._created: Counter[str] = Counter()  # per key digest: generations created
        self._logs_window = SlidingWindow(
            self.config.logs_rate_limit, self.config.logs_rate_window_s
        )
        self._dice = Dice(self.config.faults)
        self._runners: list[web.AppRunner] = []
        self._stopping: anyio.Event | None = None  # set by stop(): stalled answers go then
        self._tmp: Path | None = None
        self._cache: VideoCache | None = None
        self._cdn_port = 0
        self._cdn_port_noted = False
        self.base_url = ""
        self.cdn_url = ""

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._stopping = anyio.Event()
        self._tmp = Path(tempfile.mkdtemp(prefix="veobatch-sim-"))
        self._cache = VideoCache(self._tmp)
        self._load_journal()
        api = web.Application(client_max_size=64 << 20)
        api.router.add_post(GENERATIONS, self._create)
        api.router.add_get(GENERATIONS, self._fetch)
        api.router.add_get("/v2/logs", self._logs)
        api.router.add_get("/_sim/stats", self._stats)
        api.router.add_get("/_sim/generations", self._timeline)
        cdn = web.Application()
        cdn.router.add_get("/files/{token}/{name}", self._file)
        if self.config.blob_dir is not None:
            cdn.router.add_static("/blobs/", self.config.blob_dir)
        api_port = await self._listen(api, self._ports[0])
        self._cdn_port = await self._listen_cdn(cdn)
        self.base_url = f"http://{self.host}:{api_port}"
        self.cdn_url = f"http://{self.host}:{self._cdn_port}"

    async def _listen(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runners.append(runner)
        return int(runner.addresses[0][1])

    async def _listen_cdn(self, cdn: web.Application) -> int:
        """The port asked for, else the one an earlier process's video URLs name: a client
        resuming after a crash holds such URLs. Any free port when that one is taken."""
        noted = self._noted_cdn_port() if not self._ports[1] else None
        if noted is not None:
            try:
                port = await self._listen(cdn, noted)
            except OSError as exc:
                # Not a warning: a run locked out of the directory meets this too, harmlessly.
                log.info("video port %d is taken (%s): URLs handed out before fail", noted, exc)
            else:
                self._cdn_port_noted = True
                return port
        return await self._listen(cdn, self._ports[1])

    def _noted_cdn_port(self) -> int | None:
        folder = self.config.state_dir
        try:
            port = json.loads((folder / CDN_PORT).read_text()) if folder else None
        except (OSError, ValueError):  # none yet, or torn by a kill: any port will do
            return None
        return port if isinstance(port, int) and 0 < port < 65536 else None

    def _note_cdn_port(self) -> None:
        """Noted when the first URL is handed out, not on start: a process that never hands
        one out (a second run locked out of the directory) must not replace the port that
        the URLs in the client's ledger name."""
        if self._cdn_port_noted or self.config.state_dir is None:
            return
        self._cdn_port_noted = True
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        (self.config.state_dir / CDN_PORT).write_text(json.dumps(self._cdn_port), encoding="utf-8")

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        try:
            for runner in self._runners:
                await runner.cleanup()
        finally:  # a stop signal cancels the cleanup: the video cache goes all the same
            self._runners.clear()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    # -- the API listener ------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> str | None:
        token = bearer(request.headers)
        keys = self.config.api_keys
        if token is None or (keys is not None and token not in keys):
            self.stats.unauthorized += 1
            return None
        return token

    async def _create(self, request: web.Request) -> web.Response:
        key = self._authorize(request)
        if key is None:
            self.stats.creates_unauthorized += 1
            return _error(request, 401, "Unauthorized: a valid Bearer key is required")
        crid = request.headers.get("X-Client-Request-Id")
        crid = crid if crid and CLIENT_REQUEST_ID.fullmatch(crid) else None
        if request.content_type != "application/json":  # a JSON API parses nothing else
            received = request.content_type or "none"
            issues = [Issue((), f"Expected Content-Type application/json, received {received}")]
            return self._reject(request, key, crid, None, BodyInvalid(BODY_INVALID, issues))
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
            issues = [Issue((), "Expected a JSON object, received invalid JSON")]
            return self._reject(request, key, crid, body, BodyInvalid(BODY_INVALID, issues))
        try:
            video = self._validate(body)
        except BodyInvalid as exc:
            return self._reject(request, key, crid, body, exc)
        refused = self._refuse_before_create(request, key, crid, video.model)
        if refused is not None:
            return refused
        gen = self._new_generation(body, video, key, crid)
        f = self.config.faults
        if self._dice.roll(f.create_5xx_after):
            return self._server_error(request)
        if self._dice.roll(f.create_drop_after):
            return _drop(request)
        # Async video is charged when it completes: the create answer reports nothing spent.
        headers = {"x-inference-id": gen.id, "x-aimlapi-credits-used": "0"}
        headers["x-aimlapi-usd-spent"] = "0"
        if crid:
            headers["x-client-request-id"] = crid
        return web.json_response({"id": gen.id, "status": "queued"}, headers=headers)

    def _refuse_before_create(
        self, request: web.Request, key: str, crid: str | None, model: str
    ) -> web.Response | None:
        """Faults that strike before anything is created: nothing is billed."""
        f = self.config.faults
        if f.credits_for and self._created[_digest(key)] >= f.credits_for:
            self.stats.out_of_credits += 1
            self._log_failed(key, crid, model)
            return _error(request, 403, "Insufficient credits: top up your balance to continue")
        wait_s = f.retry_after_s
        refusal: tuple[str, float | None] | None = None
        if self._dice.roll(f.create_429):
            refusal = ("Too many requests", wait_s)
        elif self._dice.roll(f.create_429_bare):
            refusal = ("Too many requests", None)
        elif f.max_concurrent and self._in_flight(key) >= f.max_concurrent:
            refusal = ("Concurrency limit reached", wait_s)
        if refusal is not None:
            self._log_failed(key, crid, model)  # the logs have a row for every request
            return self._too_many(request, refusal[0], retry_after_s=refusal[1])
        if self._dice.roll(f.create_5xx_before):
            self._log_failed(key, crid, model)
            return self._server_error(request)
        if self._dice.roll(f.create_drop_before):
            return _drop(request)
        return None

    def _server_error(self, request: web.Request) -> web.Response:
        """One of the 5xx answers the API documents, 504 its gateway's "Generation timeout"."""
        status = self._dice.choice((500, 502, 503, 504))
        message = "Generation timeout" if status == 504 else "Internal server error"
        return _error(request, status, message)

    def _too_many(
        self, request: web.Request, message: str, *, retry_after_s: float | None
    ) -> web.Response:
        self.stats.rate_limited += 1
        response = _error(request, 429, message)
        if retry_after_s is not None:
            # RFC 9110 allows only whole seconds (or a date); a client must not see fractions.
            response.headers["Retry-After"] = str(math.ceil(retry_after_s))
        return response

    def _in_flight(self, key: str) -> int:
        """Generations of this key not yet finished, from a heap of completion times."""
        heap = self._running.setdefault(key, [])
        now = self._clock()
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        return len(heap)

    def _validate(self, body: Any) -> VideoRequest:
        return validate_body(body, self._schemas)

    def _reject(
        self, request: web.Request, key: str, crid: str | None, body: Any, exc: BodyInvalid
    ) -> web.Response:
        self.stats.creates_rejected += 1
        model = body.get("model") if isinstance(body, dict) else None
        self._log_failed(key, crid, model if isinstance(model, str) else "unknown")
        return _error(request, 400, exc.message, [i.to_json() for i in exc.issues])

    def _log_failed(self, key: str, crid: str | None, model: str) -> None:
        row = LogRow(
            _digest(key),
            time.time(),
            "failed",
            model,
            0.0,
            0,
            str(uuid.uuid4()),
            str(uuid.uuid4()),
            crid,
        )
        self._log_rows.append(row)
        self._append(FAILED_JOURNAL, asdict(row))

    def _new_generation(
        self, body: dict[str, Any], video: VideoRequest, key: str, crid: str | None
    ) -> Generation:
        duration = draw_duration_s(
            self._rng, self.config.gen_time_mean_s, self.config.gen_time_spread
        )
        file_id = str(uuid.uuid4())
        usd, credits = price(video.model, video.duration_s)
        gen = Generation(
            id=f"{file_id}:{video.model}",
            model=video.model,
            body=body,
            request=video,
            api_key_sha=_digest(key),
            created_at=self._clock(),
            created_wall_s=time.time(),
            duration_s=duration,
            queued_s=duration * self.config.queued_fraction,
            client_request_id=crid,
            file_token=secrets.token_urlsafe(12),
            file_name=f"{file_id}.mp4",
            usd=usd,
            credits=credits,
            request_id=str(uuid.uuid4()),
        )
        gen.fails = self._dice.roll(self.config.faults.generation_error)
        self._add(gen)
        heapq.heappush(self._running.setdefault(key, []), gen.completes_at)
        self._journal(gen)
        self.stats.creates_ok += 1
        self._log_created(gen)
        return gen

    def _log_created(self, gen: Generation) -> None:
        """The usage-log row of a request that created ``gen`` (keys are kept as digests).

        Its cost is filled in when the log is read (:meth:`_billed`): nothing is charged yet.
        logs-v2.json has only ``succeeded``/``failed``, the outcome of the *request*; what the
        row of a generation that later ends in error says is not documented. The request did
        succeed (it handed out a generation id), and a client reconciling from the logs reads
        ``failed`` as "nothing was created, submit again", so the row stays ``succeeded``, at
        cost 0 (an error is "not billed")."""
        row = LogRow(
            gen.api_key_sha,
            gen.created_wall_s,
            "succeeded",
            gen.model,
            0.0,
            0,
            gen.request_id,
            gen.id,
            gen.client_request_id,
        )
        self._log_rows.append(row)

    def _billed(self, row: LogRow, now: float) -> LogRow:
        """``row`` with the charge recorded by ``now``: its generation's, once completed."""
        gen = self.generations.get(row.inference_id) if row.status == "succeeded" else None
        if gen is None:
            return row
        usd, credits = gen.charge_at(now)
        return replace(row, usd=usd, credits=credits)

    def _add(self, gen: Generation) -> None:
        self.generations[gen.id] = gen
        self._by_file[gen.file_name] = gen
        self._created[gen.api_key_sha] += 1

    async def _fetch(self, request: web.Request) -> web.Response:
        key = self._authorize(request)
        if key is None:
            return _error(request, 401, "Unauthorized: a valid Bearer key is required")
        gen_id = request.query.get("generation_id")
        if not gen_id:
            meta = [Issue(("generation_id",), "Required").to_json()]
            return _error(request, 400, "Query validation error", meta)
        gen = self.generations.get(gen_id)
        if gen is None or gen.api_key_sha != _digest(key):  # another account's is not yours
            return _error(request, 404, f"Generation {gen_id} not found")
        f = self.config.faults
        if self._dice.roll(f.poll_stall):
            self.stats.stalled_polls += 1
            await self._stall(f.stall_s)
            if request.transport is None:  # the client gave up waiting: it sees no answer
                return web.Response(status=504)
        if self._dice.roll(f.poll_5xx):
            return self._server_error(request)
        if self._dice.roll(f.poll_429):
            return self._too_many(request, "Too many requests", retry_after_s=f.retry_after_s)
        now = self._clock()
        self.stats.record_poll(gen, now)
        return self._fetch_reply(gen, now)

    async def _stall(self, seconds: float) -> None:
        """Hold an answer back as a hung server does, but never past the simulator's stop."""
        assert self._stopping is not None
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    def _fetch_reply(self, gen: Generation, now: float) -> web.Response:
        seconds = spec_for(gen.request, self.config).duration_s
        status = gen.status_at(now)
        # Only while it runs: the real completion, with its URL, must still come later.
        if status not in FINISHED and self._dice.roll(self.config.faults.odd_statuses):
            self.stats.odd_statuses += 1
            shape = self._dice.choice(ODD_SHAPES)
            return web.json_response(odd_fetch_body(gen, shape, seconds))
        url = self._video_url(gen) if status == "completed" else ""  # read only when completed
        body = fetch_body(gen, now, url, seconds)
        headers = {}
        if status == "completed":  # the charge, once there is one
            headers = {
                "x-aimlapi-usd-spent": f"{gen.usd:g}",
                "x-aimlapi-credits-used": str(gen.credits),
            }
        return web.json_response(body, headers=headers)

    def _video_url(self, gen: Generation) -> str:
        self._note_cdn_port()
        url = f"{self.cdn_url}/files/{gen.file_token}/{gen.file_name}"
        ttl = self.config.faults.url_ttl_s
        if not ttl:
            return url
        expires = int((time.time() + ttl) * 1000)
        return f"{url}?exp={expires}&sig={_sign(gen.file_token, expires)}"

    async def _logs(self, request: web.Request) -> web.Response:
        key = self._authorize(request)
        if key is None:
            return _error(request, 401, "Unauthorized: a valid Bearer key is required")
        owner, now = _digest(key), self._clock()
        wait_s = self._logs_window.admit(owner, now)
        if wait_s is not None:
            limit, window_s = self.config.logs_rate_limit, self.config.logs_rate_window_s
            message = f"Too many requests: at most {limit} per {window_s:g} s"
            return self._too_many(request, message, retry_after_s=max(1, math.ceil(wait_s)))
        self.stats.logs_requests += 1
        try:
            query = parse_log_query(list(request.query.items()), time.time())
        except QueryInvalid as exc:
            return _error(request, 400, exc.message)
        visible_until = time.time() - self.config.faults.logs_delay_s
        rows = [
            self._billed(r, now)
            for r in self._log_rows
            if r.api_key == owner and r.created_wall_s <= visible_until
        ]
        return web.json_response(log_page(rows, query))

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.summary())

    async def _timeline(self, request: web.Request) -> web.Response:
        """Every generation's true timing, in creation order: what a benchmark measures against."""
        rows = [
            {
                "created_at": g.created_at,
                "duration_s": g.duration_s,
                "detected_at": g.detected_at,
                "downloaded_at": g.downloaded_at,
                "polls": g.polls,
                "model": g.model,
            }
            for g in self.generations.values()
        ]
        return web.json_response({"clock": self._clock(), "generations": rows})

    # -- the CDN listener ------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.stats.cdn_requests += 1
        if "Authorization" in request.headers:
            self.stats.cdn_auth_headers_seen += 1
        gen = self._by_file.get(request.match_info["name"])
        if (
            gen is None
            or not secrets.compare_digest(
                gen.file_token.encode(), request.match_info["token"].encode()
            )
            or gen.status_at(self._clock()) != "completed"
        ):
            return web.Response(status=404, text="Not Found")
        if not _url_valid(gen.file_token, request.query):
            self.stats.expired_urls += 1
            return web.Response(status=403, text="Request has expired")
        assert self._cache is not None
        path = await self._cache.path_for(spec_for(gen.request, self.config))
        if self._dice.roll(self.config.faults.truncate_download):
            self.stats.truncated_downloads += 1
            return await _truncated(request, path)
        self.stats.downloads += 1
        if gen.downloaded_at is None:
            gen.downloaded_at = self._clock()
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})

    # -- the journal -----------------------------------------------------------------------

    def _journal(self, gen: Generation) -> None:
        row = {
            "id": gen.id,
            "body": gen.body,
            "api_key_sha": gen.api_key_sha,
            "created_at": gen.created_at,
            "created_wall_s": gen.created_wall_s,
            "duration_s": gen.duration_s,
            "queued_s": gen.queued_s,
            "client_request_id": gen.client_request_id,
            "file_token": gen.file_token,
            "file_name": gen.file_name,
            "fails": gen.fails,
            "request_id": gen.request_id,
        }
        self._append(JOURNAL, row)

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        folder = self.config.state_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _load_journal(self) -> None:
        self._replay(JOURNAL, self._load_generation)
        self._replay(FAILED_JOURNAL, lambda row: self._log_rows.append(LogRow(**row)))
        # Two files, one log: back in the order the requests were made.
        self._log_rows.sort(key=lambda r: r.created_wall_s)

    def _replay(self, name: str, load: Callable[[Any], None]) -> None:
        """Feed each journaled row to ``load``, skipping a torn last line from a killed process;
        the file is rewritten without it, so the next append starts on a line of its own."""
        folder = self.config.state_dir
        path = folder / name if folder else None
        if path is None or not path.exists():
            return
        good: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                load(json.loads(line))
            except (ValueError, KeyError, TypeError, BodyInvalid):
                continue
            good.append(line)
        path.write_text("".join(line + "\n" for line in good), encoding="utf-8")

    def _load_generation(self, row: Any) -> None:
        video = self._validate(row["body"])
        usd, credits = price(video.model, video.duration_s)
        gen = Generation(
            id=row["id"],
            model=video.model,
            body=row["body"],
            request=video,
            api_key_sha=row["api_key_sha"],
            created_at=row["created_at"],
            created_wall_s=row["created_wall_s"],
            duration_s=row["duration_s"],
            queued_s=row["queued_s"],
            client_request_id=row["client_request_id"],
            file_token=row["file_token"],
            file_name=row["file_name"],
            usd=usd,
            credits=credits,
            fails=bool(row.get("fails", False)),
            request_id=row.get("request_id") or str(uuid.uuid4()),  # older journals lack it
        )
        self._add(gen)
        self._log_created(gen)


def _drop(request: web.Request) -> web.Response:
    """Close the connection without an answer; the client sees it dropped."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=500)  # never delivered


async def _truncated(request: web.Request, path: Path) -> web.StreamResponse:
    """Promise the whole file, send half of it, then cut the connection."""
    data = await anyio.Path(path).read_bytes()
    response = web.StreamResponse(
        headers={"Content-Type": "video/mp4", "Content-Length": str(len(data))}
    )
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    await response.drain()
    if request.transport is not None:
        request.transport.abort()
    return response


def _sign(token: str, expires_ms: int) -> str:
    return hmac.new(token.encode(), str(expires_ms).encode(), hashlib.sha256).hexdigest()[:32]


def _url_valid(token: str, query: Mapping[str, str]) -> bool:
    """Unsigned URLs never expire; signed ones must carry a valid, unexpired signature."""
    if "exp" not in query:
        return True
    try:
        expires = int(query["exp"])
    except ValueError:
        return False
    fresh = expires / 1000 > time.time()
    return fresh and hmac.compare_digest(_sign(token, expires), query.get("sig", ""))


def _digest(key: str) -> str:
    """The journal never holds a key, only a digest of it."""
    return hashlib.sha256(key.encode()).hexdigest()


async def serve(config: SimConfig, host: str, port: int, cdn_port: int = 0) -> None:
    """Serve until cancelled (``veobatch simulate``)."""
    async with Simulator(config, host=host, port=port, cdn_port=cdn_port) as sim:
        # The ports it got (--port 0 asks for any free one): what a client is to be given.
        log.info("simulator API on %s, videos on %s", sim.base_url, sim.cdn_url)
        log.info("simulator: AIMLAPI_BASE_URL=%s", sim.base_url)
        await anyio.sleep_forever()
