"""Plain-text views of a run, a plan and a ledger: what cron mails and what `status` prints.

Pure functions from values to lines, so every view is tested without a terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .catalogue import get_model
from .jobs import Job
from .ledger import STATUSES
from .runner import RunReport
from .scheduler import Action, JobPlan


def run_summary(report: RunReport, total_jobs: int) -> list[str]:
    c = report.counts
    head = (
        f"veobatch: {total_jobs} jobs: {c.get('done', 0)} done, {c.get('failed', 0)} failed, "
        f"{len(report.uncertain)} uncertain, {len(report.pending)} not finished "
        f"({report.submitted} submitted this run, {report.polls} polls, {report.elapsed_s:.1f}s)"
    )
    lines = [head]
    if report.interrupted:
        lines.append("interrupted: run the same command again to resume")
    if report.adopted:
        lines.append(
            f"recovered {report.adopted} generations from the usage logs (answers lost in transit)"
        )
    if report.risked_duplicates:
        lines.append(
            f"resubmitted {report.risked_duplicates} uncertain jobs: up to "
            f"{report.risked_duplicates} possible duplicate charges"
        )
    if report.auth_error:
        lines.append(f"stopped submitting: the API refused the key: {report.auth_error}")
    if report.recovered_tail:
        lines.append(f"ledger: a torn last record was cut and kept in {report.recovered_tail}")
    lines.extend(_listing("failed", [f"{jid}: {e.kind}: {e.message}" for jid, e in report.failed]))
    lines.extend(
        _listing(
            "uncertain (may have been created and billed; not in the usage logs; resubmit "
            "with --resubmit-uncertain at the risk of paying twice)",
            report.uncertain,
        )
    )
    lines.extend(_listing("not finished", report.pending))
    lines.append(f"output: {report.out_dir} (results.json, ledger.jsonl)")
    return lines


def _listing(title: str, items: Sequence[str], limit: int = 20) -> list[str]:
    if not items:
        return []
    out = [f"{title}: {len(items)}"]
    out.extend(f"  {item}" for item in items[:limit])
    if len(items) > limit:
        out.append(f"  ... and {len(items) - limit} more (see results.json)")
    return out


def estimated_usd(job: Job) -> float:
    spec = get_model(job.model)
    return spec.usd_per_second * job.duration_s if spec else 0.0


def plan_rows(plans: Iterable[JobPlan]) -> list[tuple[str, str, str, str]]:
    return [
        (p.job.id, p.job.model.removeprefix("google/"), p.action.value, p.reason) for p in plans
    ]


def plan_summary(plans: Sequence[JobPlan]) -> list[str]:
    counts = Counter(p.action for p in plans)
    to_pay = [p.job for p in plans if p.action is Action.SUBMIT]
    usd = sum(estimated_usd(j) for j in to_pay)
    parts = [f"{counts[a]} {a.value}" for a in Action if counts[a]]
    return [
        f"{len(plans)} jobs: " + ", ".join(parts),
        f"would submit {len(to_pay)} generation{'' if len(to_pay) == 1 else 's'}, "
        f"about ${usd:,.2f} at list prices",
    ]


def status_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for job in results.get("jobs", []):
        err = job.get("error") or {}
        detail = f"{err.get('kind')}: {err.get('message')}" if err else (job.get("file") or "")
        rows.append(
            (
                str(job.get("id")),
                str(job.get("status")),
                str(job.get("model") or "").removeprefix("google/"),
                str(job.get("generation_id") or ""),
                detail,
            )
        )
    return rows


def status_counts(results: Mapping[str, Any]) -> str:
    summary = results.get("summary", {})
    parts = [f"{summary.get(s, 0)} {s}" for s in STATUSES if summary.get(s)]
    return f"{summary.get('total', 0)} jobs: " + (", ".join(parts) or "none")
