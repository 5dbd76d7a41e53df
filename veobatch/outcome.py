"""What the operator is told about a finished run beyond :class:`~veobatch.runner.RunReport`:
how many generations it created, the videos that differ from their request, where the report is.

Computed from the ledger after the run, so the runner itself stays unaware of these views.
Pure: :func:`run_extras`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import Job
from .ledger import JobState

CLOCK_SLACK_S = 1.0  # ledger times are rounded to the millisecond; the run start is not


@dataclass(frozen=True)
class RunExtras:
    generations: int = 0  # created during this run (submitted, or adopted from the logs)
    flagged: list[tuple[str, list[str]]] = field(default_factory=list)
    report_file: Path | None = None


def run_extras(
    states: Mapping[str, JobState],
    jobs: Sequence[Job],
    started_wall: float,
    report_file: Path | None = None,
) -> RunExtras:
    generations, flagged = 0, []
    for job in jobs:
        st = states.get(job.id)
        if st is None:
            continue
        created = st.submitted_at is not None and st.submitted_at >= started_wall - CLOCK_SLACK_S
        if created and st.generation_id:
            generations += 1
        if st.status == "done" and st.flags:
            flagged.append((job.id, list(st.flags)))
    return RunExtras(generations, flagged, report_file)
