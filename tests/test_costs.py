"""Cost estimates and the budget: pure arithmetic over jobs."""

from __future__ import annotations

import pytest

from veobatch.costs import Budget, estimate_by_model, estimate_usd, usd_per_second, within_budget
from veobatch.jobs import Job

T2V = "google/veo-3.1-t2v"
FAST = "google/veo-3.1-t2v-fast"
R2V = "google/veo-3.1-reference-to-video"


def job(i: int, model: str = T2V, **fields: object) -> Job:
    return Job(f"j{i}", {"model": model, "prompt": "p", **fields}, i)


def test_prices_come_from_the_table_unless_overridden() -> None:
    assert usd_per_second(T2V, {}) == 0.40
    assert usd_per_second(FAST, {}) == 0.15
    assert usd_per_second(FAST, {FAST: 0.1}) == 0.1
    assert estimate_usd(job(0, duration=4), {}) == pytest.approx(1.60)
    assert estimate_usd(job(0), {}) == pytest.approx(3.20)  # the default duration, 8 s
    assert estimate_usd(job(0, R2V, image_urls=["u"]), {}) == pytest.approx(3.20)


def test_estimate_by_model_sums_jobs_seconds_and_dollars() -> None:
    jobs = [job(0, duration=4), job(1, FAST), job(2, duration=6)]
    rows = estimate_by_model(jobs, {FAST: 0.1})
    assert [(r.model, r.jobs, r.seconds) for r in rows] == [(T2V, 2, 10), (FAST, 1, 8)]
    assert rows[0].usd == pytest.approx(4.0) and rows[1].usd == pytest.approx(0.8)


def test_budget_reserves_refuses_and_releases() -> None:
    b = Budget(5.0)
    assert b.reserve(job(0))  # 3.20
    assert b.reserve(job(0))  # the same job again: already counted
    assert b.spent_usd == pytest.approx(3.2)
    assert not b.reserve(job(1))  # 6.40 > 5
    assert b.reserve(job(2, duration=4))  # 4.80 fits
    assert b.refused == ["j1"]
    b.release("j0")
    assert b.spent_usd == pytest.approx(1.6)
    assert b.reserve(job(1))  # room again after a release
    b.release("unknown")  # harmless


def test_a_risked_resubmission_reserves_again_and_releases_only_its_own() -> None:
    b = Budget(7.0)
    assert b.reserve(job(0))  # 3.20
    assert b.reserve(job(0), again=True)  # an earlier POST may exist: 6.40
    assert b.spent_usd == pytest.approx(6.4) and b.reservations == 2
    assert not b.reserve(job(0), again=True)  # 9.60 > 7
    assert b.refused == ["j0"]
    b.release("j0")  # the latest POST created nothing; the first may still be billed
    assert b.spent_usd == pytest.approx(3.2) and b.reservations == 1


def test_no_limit_takes_everything_and_zero_takes_nothing() -> None:
    jobs = [job(i) for i in range(5)]
    assert within_budget(jobs, {}, None) == (jobs, [])
    assert within_budget(jobs, {}, 0.0) == ([], jobs)


def test_within_budget_keeps_manifest_order_and_lets_cheaper_jobs_through() -> None:
    jobs = [job(0), job(1), job(2, FAST, duration=4), job(3)]
    taken, held = within_budget(jobs, {}, 7.0)
    assert [j.id for j in taken] == ["j0", "j1", "j2"]  # 3.20 + 3.20 + 0.60
    assert [j.id for j in held] == ["j3"]
