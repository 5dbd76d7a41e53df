"""The simulator's contract-level refusals and odd answers over real loopback HTTP, with a fake
clock: 403 out of credits, the usage logs' rate limit, what the logs bill, odd statuses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from test_simulator import (
    BAD,
    CONFIG,
    GENERATIONS,
    KEY,
    OTHER,
    Api,
    FakeClock,
    assert_error_shape,
    running,
)

from veobatch.simulator import Faults, SimConfig


def with_faults(config: SimConfig = CONFIG, **faults: Any) -> SimConfig:
    return replace(config, faults=Faults(**faults))


def test_the_new_faults_parse_from_the_command_line_form() -> None:
    faults = Faults.parse(["credits_for=3", "odd-statuses=0.3"])
    assert (faults.credits_for, faults.odd_statuses) == (3, 0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Faults.parse(["odd_statuses=2"])


# -- 403 out of credits ----------------------------------------------------------------------


async def test_creates_past_the_credits_are_403_and_create_nothing() -> None:
    async with running(with_faults(credits_for=2), FakeClock()) as api:
        for _ in range(2):
            assert (await api.create()).status == 200
        for _ in range(2):
            reply = await api.create()
            assert_error_shape(reply, 403, GENERATIONS)
            assert "credits" in reply.json["message"]
        assert len(api.sim.generations) == 2 and api.sim.stats.creates_ok == 2
        assert api.sim.stats.out_of_credits == 2
        assert (await api.create(key=OTHER)).status == 200  # credits are per key


async def test_out_of_credits_refuses_only_creates() -> None:
    async with running(with_faults(credits_for=1), FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        assert (await api.create(crid="vb:j2:1:x")).status == 403
        api.clock.now += 10
        assert (await api.fetch(gen_id)).json["video"]["url"]  # what was paid for still comes
        rows = (await api.logs()).json["data"]
        assert [(r["status"], r["client_request_id"]) for r in rows] == [
            ("failed", "vb:j2:1:x"),
            ("succeeded", None),
        ]
        assert rows[0]["cost"] == {"usd": 0.0, "credits": 0}


@pytest.mark.parametrize("fault", [{"create_429": 1.0}, {"create_429_bare": 1.0}])
async def test_a_create_refused_with_429_is_a_failed_row_in_the_logs(
    fault: dict[str, float],
) -> None:
    # The logs have "one row per request, failed ones included (cost 0)".
    async with running(with_faults(**fault), FakeClock()) as api:
        assert (await api.create(crid="vb:j1:1:x")).status == 429
        rows = (await api.logs()).json["data"]
        assert [(r["status"], r["client_request_id"]) for r in rows] == [("failed", "vb:j1:1:x")]
        assert rows[0]["cost"] == {"usd": 0.0, "credits": 0} and not api.sim.generations


async def test_a_fractional_retry_after_is_sent_as_whole_seconds() -> None:
    # RFC 9110's delay-seconds is an integer: a client must cope with what real servers send.
    async with running(with_faults(create_429=1.0, retry_after_s=0.2), FakeClock()) as api:
        assert (await api.create()).headers["Retry-After"] == "1"


@pytest.mark.parametrize("fault", ["create_5xx_before", "create_5xx_after", "poll_5xx"])
async def test_server_errors_include_the_documented_504_generation_timeout(fault: str) -> None:
    statuses: dict[int, str] = {}
    async with running(with_faults(**{fault: 1.0}), FakeClock()) as api:
        if fault == "poll_5xx":
            gen_id = (await api.create()).json["id"]
        for i in range(40):
            if fault == "poll_5xx":
                reply = await api.fetch(gen_id)
            else:
                reply = await api.create(crid=f"vb:j{i}:1:x")
            statuses[reply.status] = reply.json["message"]
    assert sorted(statuses) == [500, 502, 503, 504]
    assert statuses[504] == "Generation timeout"


async def test_credits_used_survive_a_restart_until_topped_up(tmp_path: Path) -> None:
    journaled = replace(with_faults(credits_for=1), state_dir=tmp_path / "state")
    clock = FakeClock()
    async with running(journaled, clock) as first:
        assert (await first.create()).status == 200
    async with running(journaled, clock) as second:
        assert (await second.create()).status == 403
    async with running(replace(journaled, faults=Faults()), clock) as topped_up:
        assert (await topped_up.create()).status == 200


# -- the usage logs' rate limit --------------------------------------------------------------

LIMITED = replace(CONFIG, logs_rate_limit=5, logs_rate_window_s=1.0)


async def test_logs_past_the_limit_are_429_with_retry_after() -> None:
    async with running(LIMITED, FakeClock()) as api:
        for _ in range(5):
            assert (await api.logs()).status == 200
            api.clock.now += 0.1
        reply = await api.logs()
        assert_error_shape(reply, 429, "/v2/logs")
        assert reply.headers["Retry-After"] == "1"  # whole seconds, rounded up from 0.5
        assert (await api.logs(OTHER)).status == 200  # the window is per key
        assert api.sim.stats.rate_limited == 1 and api.sim.stats.logs_requests == 6
        api.clock.now += 0.5  # the first call slides out of the window
        assert (await api.logs()).status == 200
        assert (await api.logs()).status == 429


async def test_retry_after_counts_the_seconds_until_a_call_slides_out() -> None:
    config = replace(CONFIG, logs_rate_limit=2, logs_rate_window_s=60.0)
    async with running(config, FakeClock()) as api:
        await api.logs()
        api.clock.now += 10
        await api.logs()
        api.clock.now += 10
        assert (await api.logs()).headers["Retry-After"] == "40"


async def test_the_logs_limit_touches_no_other_route() -> None:
    async with running(replace(LIMITED, logs_rate_limit=1), FakeClock()) as api:
        await api.logs()
        assert (await api.logs()).status == 429
        gen_id = (await api.create()).json["id"]
        assert (await api.fetch(gen_id)).status == 200


# -- what the usage logs bill ----------------------------------------------------------------


def costs_by_outcome(api: Api, rows: list[dict[str, Any]]) -> dict[str, set[float]]:
    """Each created generation's row cost, grouped by how the generation ended."""
    seen: dict[str, set[float]] = {}
    for row in rows:
        gen = api.sim.generations.get(row["inference_id"])
        if gen is not None:
            seen.setdefault("error" if gen.fails else "completed", set()).add(row["cost"]["usd"])
    return seen


async def test_a_generation_ending_in_error_is_logged_succeeded_at_no_cost() -> None:
    async with running(with_faults(generation_error=1.0), FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        api.clock.now += 10
        reply = await api.fetch(gen_id)
        assert reply.json["status"] == "error" and "x-aimlapi-usd-spent" not in reply.headers
        [row] = (await api.logs()).json["data"]
        assert row["status"] == "succeeded" and row["inference_id"] == gen_id
        assert row["cost"] == {"usd": 0.0, "credits": 0}


async def test_a_restarted_simulator_logs_the_same_rows(tmp_path: Path) -> None:
    faults = {"seed": 3, "generation_error": 0.5, "credits_for": 5}
    journaled = replace(with_faults(**faults), state_dir=tmp_path / "state")
    clock = FakeClock()
    async with running(journaled, clock) as first:
        for i in range(6):  # five generations, then a 403
            await first.create(crid=f"vb:j{i}:1:x")
        await first.create(BAD)
        clock.now += 10
        before = (await first.logs(params=[("limit", "100")])).json
        costs = costs_by_outcome(first, before["data"])
    assert costs == {"error": {0.0}, "completed": {3.2}}  # the seed gives both outcomes
    assert [r["status"] for r in before["data"]].count("failed") == 2
    async with running(journaled, clock) as second:
        after = (await second.logs(params=[("limit", "100")])).json
    assert after == before and before["pagination"]["total"] == 7


# -- odd statuses ----------------------------------------------------------------------------

ODD = with_faults(odd_statuses=1.0)


async def test_odd_statuses_only_while_running_then_the_real_completion() -> None:
    async with running(ODD, FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        seen: set[tuple[str, str]] = set()
        for _ in range(60):
            reply = await api.fetch(gen_id)
            video = reply.json["video"]
            assert not (video or {}).get("url"), reply.json  # never a URL before completion
            assert "x-aimlapi-usd-spent" not in reply.headers
            seen.add((reply.json["status"], "video" if video else "none"))
            api.clock.now += 9.9 / 60
        assert seen == {
            ("waiting", "none"),
            ("active", "none"),
            ("processing", "none"),
            ("completed", "none"),
            ("completed", "video"),
        }
        api.clock.now = api.sim.generations[gen_id].completes_at
        for _ in range(3):
            reply = await api.fetch(gen_id)
            assert reply.json["status"] == "completed" and reply.json["video"]["url"]
            assert reply.headers["x-aimlapi-usd-spent"] == "3.2"
        assert api.sim.stats.odd_statuses == 60


async def test_odd_statuses_never_hide_an_error() -> None:
    async with running(with_faults(odd_statuses=1.0, generation_error=1.0), FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        api.clock.now += 10
        assert (await api.fetch(gen_id)).json["status"] == "error"


async def test_odd_polls_still_count_as_polls_of_a_running_generation() -> None:
    async with running(ODD, FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        await api.fetch(gen_id)
        api.clock.now += 10
        await api.fetch(gen_id)
        [gen] = api.sim.generations.values()
        assert gen.polls == 2 and api.sim.stats.summary()["generations_detected"] == 1


# -- stalled polls ---------------------------------------------------------------------------


async def test_a_stalled_poll_is_answered_after_the_stall() -> None:
    async with running(with_faults(poll_stall=1.0, stall_s=0.3), FakeClock()) as api:
        gen_id = (await api.create()).json["id"]
        started = anyio.current_time()
        reply = await api.fetch(gen_id)
        assert reply.status == 200 and anyio.current_time() - started >= 0.3
        assert api.sim.stats.stalled_polls == 1 and api.sim.stats.polls == 1


async def test_a_stalled_poll_given_up_is_no_poll_and_does_not_hold_the_stop() -> None:
    # The client gave up waiting: the simulator must not count it as a poll that saw the
    # generation (its detection lag would be wrong), nor wait an hour to stop.
    with anyio.fail_after(10):
        async with running(with_faults(poll_stall=1.0, stall_s=3600), FakeClock()) as api:
            gen_id = (await api.create()).json["id"]
            api.clock.now += 10
            with pytest.raises(TimeoutError):
                url, params = api.sim.base_url + GENERATIONS, {"generation_id": gen_id}
                quick = aiohttp.ClientTimeout(total=0.2)
                await api.call("GET", url, f"Bearer {KEY}", params=params, timeout=quick)
            await anyio.sleep(0.1)  # the connection is seen closed
    assert api.sim.stats.stalled_polls == 1
    assert api.sim.stats.polls == 0 and api.sim.generations[gen_id].detected_at is None
