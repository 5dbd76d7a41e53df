"""What a batch will cost, and a budget that refuses to submit beyond a limit.

Pure: the API publishes no prices, so estimates are price per second of video times duration from
the catalogue's table (third-party figures), overridable per model in ``settings.prices``.
The real charge, where the API reports one (``x-aimlapi-usd-spent``), is recorded in the
ledger and shown beside the estimate, never used to predict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .catalogue import get_model
from .jobs import Job


def usd_per_second(model: str, prices: Mapping[str, float]) -> float:
    if model in prices:
        return prices[model]
    spec = get_model(model)
    return spec.usd_per_second if spec else 0.0


def estimate_usd(job: Job, prices: Mapping[str, float]) -> float:
    return usd_per_second(job.model, prices) * job.duration_s


@dataclass(frozen=True)
class ModelCost:
    model: str
    jobs: int
    seconds: int  # of video
    usd_per_second: float
    usd: float


def estimate_by_model(jobs: Iterable[Job], prices: Mapping[str, float]) -> list[ModelCost]:
    """One line per model, in first-seen order: how many jobs, seconds and dollars."""
    counts: dict[str, list[int]] = {}
    for job in jobs:
        entry = counts.setdefault(job.model, [0, 0])
        entry[0] += 1
        entry[1] += job.duration_s
    out = []
    for model, (n, seconds) in counts.items():
        rate = usd_per_second(model, prices)
        out.append(ModelCost(model, n, seconds, rate, rate * seconds))
    return out


@dataclass
class Budget:
    """Estimated spend of this run's submissions against ``limit_usd`` (None: no limit).

    A job's estimate is reserved before its intent is recorded and given back only when the
    API certainly created nothing or the generation ended in error (neither is billed). A job
    resubmitted while an earlier POST of it may exist (a risked duplicate) reserves again: each
    such POST may be billed.
    """

    limit_usd: float | None
    prices: Mapping[str, float] = field(default_factory=dict)
    # Per job, one estimate per POST that may be billed, oldest first.
    reserved: dict[str, list[float]] = field(default_factory=dict)
    spent_usd: float = 0.0  # the sum of ``reserved``, kept as it changes
    # Refused job ids, in the order refused; a dict so that a membership test stays cheap
    # when thousands are refused.
    _refused: dict[str, None] = field(default_factory=dict, repr=False)

    @property
    def refused(self) -> list[str]:
        return list(self._refused)

    @property
    def reservations(self) -> int:
        """Submissions behind ``spent_usd``: risked duplicates count once each."""
        return sum(len(held) for held in self.reserved.values())

    def was_refused(self, job_id: str) -> bool:
        return job_id in self._refused

    def reserve(self, job: Job, *, again: bool = False) -> bool:
        """True when the job may be submitted; a refusal is remembered for the summary.

        A job already reserved keeps its reservation unless ``again``: a POST that may add a
        second billed generation must fit under the limit too.
        """
        if job.id in self.reserved and not again:
            return True
        usd = estimate_usd(job, self.prices)
        if self.limit_usd is not None and self.spent_usd + usd > self.limit_usd + 1e-9:
            self._refused[job.id] = None
            return False
        self.reserved.setdefault(job.id, []).append(usd)
        self.spent_usd += usd
        return True

    def estimate(self, job: Job) -> float:
        """The job's estimate: the one reserved for it, so what is recorded is what counts."""
        held = self.reserved.get(job.id)
        return held[-1] if held else estimate_usd(job, self.prices)

    def release(self, job_id: str) -> None:
        """Give back the latest reservation: earlier POSTs of the job may still be billed."""
        held = self.reserved.get(job_id)
        if not held:
            return
        self.spent_usd -= held.pop()
        if not held:
            del self.reserved[job_id]


def within_budget(
    jobs: Iterable[Job], prices: Mapping[str, float], limit_usd: float | None
) -> tuple[list[Job], list[Job]]:
    """(submitted, held back): what a run with this limit would do, in manifest order."""
    budget = Budget(limit_usd, prices)
    taken: list[Job] = []
    held: list[Job] = []
    for job in jobs:
        (taken if budget.reserve(job) else held).append(job)
    return taken, held
