"""Plain-text views of a run, a plan and a ledger: what cron mails and what `status` prints.

Pure functions from values to lines, so every view is tested without a terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .costs import estimate_by_model, estimate_usd, within_budget
from .jobs import Job
from .ledger import STATUSES, JobState
from .logfmt import one_line
from .outcome import RunExtras
from .runner import RunReport, lookup_cause
from .scheduler import CATEGORIES, Action, JobPlan, category, pays_for_request, plan_job


def run_summary(report: RunReport, total_jobs: int, extras: RunExtras | None = None) -> list[str]:
    """What cron mails: counts, then only what needs attention, then where things are."""
    extras = extras or RunExtras()
    c = report.counts
    gone = f" ({len(report.gone)} of them gone)" if report.gone else ""
    head = (
        f"veobatch: {jobs(total_jobs)}: {c.get('done', 0)} done{gone}, "
        f"{c.get('failed', 0)} failed, "
        f"{len(report.uncertain)} uncertain, {len(report.pending)} not finished"
        + (f", {len(report.over_budget)} held back" if report.over_budget else "")
        + f" ({report.submitted} submitted this run, {report.polls} polls, "
        f"{report.elapsed_s:.1f}s)"
    )
    lines = [head]
    if report.interrupted:
        lines.append("interrupted: run the same command again to resume")
    if report.adopted:
        lines.append(recovered_line(report.adopted, report.adopted_unrecorded))
    if report.risked_duplicates:
        lines.append(
            f"resubmitted {report.risked_duplicates} uncertain jobs: up to "
            f"{report.risked_duplicates} possible duplicate charges"
        )
    if report.auth_error or report.gave_up:
        lines.append(f"stopped submitting: {report.auth_error or report.gave_up}")
    if report.recovered_tail:
        lines.append(f"ledger: a torn last record was cut and kept in {report.recovered_tail}")
    lines.extend(_listing("failed", [f"{jid}: {e.kind}: {e.message}" for jid, e in report.failed]))
    lines.extend(
        _listing(
            "uncertain (may have been created and billed; a rerun looks them up in the usage "
            "logs again; --resubmit-uncertain submits them again at the risk of paying twice)",
            [f"{jid}: {_why_uncertain(report.states.get(jid))}" for jid in report.uncertain],
        )
    )
    lines.extend(_listing("not finished", report.pending))
    lines.extend(gone_lines(report))
    lines.extend(
        _listing(
            "videos that differ from their request",
            [f"{jid}: {'; '.join(flags)}" for jid, flags in extras.flagged],
        )
    )
    lines.extend(spend_lines(report))
    lines.append(f"output: {report.out_dir} (results.json, ledger.jsonl)")
    if extras.report_file is not None:
        lines.append(f"report: {extras.report_file}")
    # An API's words (an error message, a 403's body) must not forge a line of cron's mail.
    return [one_line(line) for line in lines]


def gone_lines(report: RunReport) -> list[str]:
    """Done jobs whose file is missing: not fetched again this run (asked again next run),
    and gone (left as they are): those found so this run listed, the others only counted, for
    an archive emptied every night would otherwise fill cron's mail with the same ids."""
    lines = _listing(
        "videos delivered earlier whose file is missing, not fetched again (no failure;"
        " the next run tries again, at no charge)",
        [f"{jid}: {why}" for jid, why in report.not_refetched],
    )
    lines.extend(
        _listing(
            "videos gone: delivered earlier, their files since moved or deleted, and the API no"
            " longer has them (no failure; left as they are, never polled again; --retry-failed"
            " generates them anew, a new charge)",
            [f"{jid}: {why}" for jid, why in report.gone_now],
        )
    )
    if earlier := len(report.gone) - len(report.gone_now):
        lines.append(
            f"{earlier} more video{'s' * (earlier != 1)} gone since earlier runs (files moved or"
            " deleted, no longer at the API): left as they are (`veobatch status` lists them)"
        )
    return lines


def recovered_line(adopted: int, unrecorded: int) -> str:
    """Generations the usage logs gave back, and why their ids were not on record: an answer
    lost in transit, or a POST whose outcome no record holds (the run that sent it stopped
    before writing its answer down: a crash, a full disk), which is no loss in transit."""
    lost = adopted - unrecorded
    unsaid = (
        "ids not on record: the run that sent them stopped before recording the answers,"
        " in a crash or on a failed ledger write"
    )
    if not unrecorded:
        why = "answers lost in transit"
    elif not lost:
        why = f"their {unsaid}"
    else:
        why = f"{lost} answer{'s' * (lost != 1)} lost in transit; {unrecorded} {unsaid}"
    return f"recovered {adopted} generations from the usage logs ({why})"


WEBHOOK_LIST_LIMIT = 100
"""Ids listed per kind in a webhook body: 20,000 held-back jobs made a 191 KB body that chat
webhooks refuse (Slack takes 40,000 characters of text); `results.json` has them all."""


def summary_doc(
    report: RunReport, total_jobs: int, extras: RunExtras | None = None
) -> dict[str, Any]:
    """The run summary as JSON (for webhooks): the same facts as :func:`run_summary`.

    Each list holds at most :data:`WEBHOOK_LIST_LIMIT` entries; its ``*_count`` field is whole."""
    extras = extras or RunExtras()
    lists: dict[str, list[Any]] = {
        "over_budget": list(report.over_budget),
        "failed": [{"id": jid, "kind": e.kind, "message": e.message} for jid, e in report.failed],
        "uncertain": list(report.uncertain),
        "not_finished": list(report.pending),
        "flagged": [{"id": jid, "flags": flags} for jid, flags in extras.flagged],
        "not_refetched": [{"id": jid, "message": why} for jid, why in report.not_refetched],
        "gone": list(report.gone),
    }
    doc: dict[str, Any] = {
        "event": "veobatch.run.finished",
        "exit_code": report.exit_code,
        "interrupted": report.interrupted,
        "out_dir": str(report.out_dir),
        "report": str(extras.report_file) if extras.report_file else None,
        "total": total_jobs,
        "counts": {s: report.counts.get(s, 0) for s in STATUSES},
        "submitted": report.submitted,
        "polls": report.polls,
        "elapsed_s": round(report.elapsed_s, 1),
        "generations_created": extras.generations,
        "spend_usd_estimate": round(report.estimated_usd, 2),
        "spend_usd_reported": round(report.reported_usd, 2),
        "spend_reported_jobs": report.reported_jobs,
        "cost_limit_usd": report.cost_limit_usd,
    }
    for name, items in lists.items():
        doc[name] = items[:WEBHOOK_LIST_LIMIT]
        doc[f"{name}_count"] = len(items)
    doc.update(
        adopted=report.adopted,
        adopted_unrecorded=report.adopted_unrecorded,
        risked_duplicates=report.risked_duplicates,
        auth_error=report.auth_error,
        gave_up=report.gave_up,
    )
    return doc


def abort_doc(
    manifest: str, out_dir: Path, exit_code: int, error_line: str, *, interrupted: bool
) -> dict[str, Any]:
    """A run that ended early (exit 2, 3 or 75) as a webhook body: no summary, just why.
    (Exit 75 is also a directory another run holds: that is not an interruption.)"""
    error = error_line.removeprefix("veobatch: ")
    return {
        "text": f"veobatch: {manifest}: run aborted (exit {exit_code}): {error}",
        "event": "veobatch.run.aborted",
        "exit_code": exit_code,
        "interrupted": interrupted,
        "manifest": manifest,
        "out_dir": str(out_dir),
        "error": error,
    }


def jobs(n: int) -> str:
    return f"{n} job" + "s" * (n != 1)


def _why_uncertain(state: JobState | None) -> str:
    """What is known of an uncertain job: the look-up's own words, when it got that far."""
    if state is not None and state.status == "uncertain" and state.error is not None:
        return state.error.message
    return "sent, and the run stopped before the usage logs settled it"


def _listing(title: str, items: Sequence[str], limit: int = 20) -> list[str]:
    if not items:
        return []
    out = [f"{title}: {len(items)}"]
    out.extend(f"  {item}" for item in items[:limit])
    if len(items) > limit:
        out.append(f"  ... and {len(items) - limit} more (see results.json)")
    return out


def plan_rows(plans: Iterable[JobPlan]) -> list[tuple[str, str, str, str, str]]:
    return [
        (p.job.id, p.job.model.removeprefix("google/"), category(p), p.action.value, p.reason)
        for p in plans
    ]


def plan_summary(
    plans: Sequence[JobPlan],
    prices: Mapping[str, float] | None = None,
    limit_usd: float | None = None,
) -> list[str]:
    """What a run would do: jobs by standing and by action, then the spend it would commit."""
    prices = prices or {}
    kinds = Counter(category(p) for p in plans)
    counts = Counter(p.action for p in plans)
    to_pay = [p.job for p in plans if pays_for_request(p)]
    taken, held = within_budget(to_pay, prices, limit_usd)
    usd = sum(estimate_usd(j, prices) for j in taken)
    lines = [
        f"{jobs(len(plans))}: " + ", ".join(f"{kinds[k]} {k}" for k in CATEGORIES if kinds[k]),
        "actions: " + ", ".join(f"{counts[a]} {a.value}" for a in Action if counts[a]),
        f"would submit {len(taken)} generation{'' if len(taken) == 1 else 's'}, "
        f"about ${usd:,.2f} (estimated; see below)",
    ]
    if to_pay:
        lines.extend(cost_table(to_pay, prices))
    else:
        lines[-1] = "would submit nothing: no cost"
    if limit_usd is not None:
        if held:
            held_usd = sum(estimate_usd(j, prices) for j in held)
            lines.append(
                f"cost limit ${limit_usd:,.2f}: {len(held)} job{'' if len(held) == 1 else 's'} "
                f"(about ${held_usd:,.2f}) held back: {', '.join(j.id for j in held[:5])}"
                + (" ..." if len(held) > 5 else "")
            )
        else:
            lines.append(f"cost limit ${limit_usd:,.2f}: everything fits")
    return lines


def cost_table(jobs: Iterable[Job], prices: Mapping[str, float]) -> list[str]:
    """Per model: jobs, seconds of video, price per second (* when overridden) and dollars."""
    rows = estimate_by_model(jobs, prices)
    width = max(len(r.model.removeprefix("google/")) for r in rows)
    width = max(width, len("model"))
    lines = [
        "estimated cost (the API publishes no prices; override them in settings.prices):",
        f"  {'model':<{width}}  {'jobs':>6}  {'video s':>8}  {'$/s':>6}  {'est. $':>10}",
    ]
    for r in rows:
        mark = "*" if r.model in prices else " "
        lines.append(
            f"  {r.model.removeprefix('google/'):<{width}}  {r.jobs:>6}  {r.seconds:>8}  "
            f"{r.usd_per_second:>5.2f}{mark}  {r.usd:>10,.2f}"
        )
    total_jobs = sum(r.jobs for r in rows)
    total_s = sum(r.seconds for r in rows)
    total = sum(r.usd for r in rows)
    lines.append(f"  {'total':<{width}}  {total_jobs:>6}  {total_s:>8}  {'':>6}  {total:>10,.2f}")
    return lines


def spend_lines(report: RunReport) -> list[str]:
    """Estimated against reported spend, and what the cost limit held back."""
    lines = []
    if report.estimated_jobs or report.reported_jobs:
        n = report.estimated_jobs
        line = (
            # Every create that may be billed, answered or not: the first line's "submitted"
            # counts only answered ones, so a lost answer recovered from the logs is here only.
            f"spend: about ${report.estimated_usd:,.2f} estimated for {n} "
            f"create{'' if n == 1 else 's'} this run that may be billed"
        )
        if report.reported_jobs:
            line += (
                f"; the API reported ${report.reported_usd:,.2f} for {report.reported_jobs} of them"
            )
        lines.append(line)
    if report.over_budget:
        limit = report.cost_limit_usd or 0.0
        lines.extend(
            _listing(
                f"held back by the cost limit of ${limit:,.2f} (raise --max-cost to submit them)",
                report.over_budget,
            )
        )
    return lines


def status_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for job in results.get("jobs", []):
        err = job.get("error") or {}
        detail = f"{err.get('kind')}: {err.get('message')}" if err else (job.get("file") or "")
        if job.get("flags"):
            detail += f" (differs: {'; '.join(job['flags'])})"
        # Tab-separated lines for grep and cut: an API value must not break one in two.
        rows.append(
            (
                one_line(str(job.get("id"))),
                one_line(str(job.get("status"))),
                one_line(str(job.get("model") or "").removeprefix("google/")),
                one_line(str(job.get("generation_id") or "")),
                one_line(detail),
            )
        )
    return rows


_RERUN_WORD = {
    Action.SKIP: "skip",
    Action.SUBMIT: "submit",
    Action.POLL: "poll",
    Action.DOWNLOAD: "download",
    Action.REFETCH: "refetch",
    Action.HOLD_FAILED: "hold",
    Action.LOOKUP: "lookup",
    Action.BLOCKED: "blocked",
    Action.GONE: "gone",
}


def rerun_action(
    state: JobState,
    out_dir: Path,
    *,
    retry_failed: bool = False,
    resubmit_uncertain: bool = False,
) -> tuple[str, str]:
    """What a rerun of the same manifest would do with this job: :func:`plan_job`'s answer,
    assuming the job's request is unchanged (``status`` has no manifest to compare with)."""
    stand_in = Job(state.id, {})  # unread: with no key on the state, nothing compares it
    plan = plan_job(stand_in, replace(state, key=None), out_dir, retry_failed=retry_failed)
    reason = plan.reason
    if plan.action is Action.LOOKUP and state.status == "uncertain":
        if lookup_cause(state) != "no_answer":  # absence from the logs is proof for these
            reason += (
                "; if absent from its key's usage logs once they show a later request (or an"
                " hour after it was made): submitted again"
            )
        else:
            reason += (
                "; if still absent: resubmit (may pay twice)"
                if resubmit_uncertain
                else "; if still absent: left uncertain (see --resubmit-uncertain)"
            )
    return _RERUN_WORD[plan.action], reason


def rerun_rows(
    results: Mapping[str, Any],
    states: Mapping[str, JobState],
    out_dir: Path,
    *,
    retry_failed: bool = False,
    resubmit_uncertain: bool = False,
) -> list[tuple[str, str]]:
    """(action, reason) for each job of a results document, in its order."""
    rows = []
    for job in results.get("jobs", []):
        jid = str(job.get("id"))
        rows.append(
            rerun_action(
                states.get(jid) or JobState(jid),
                out_dir,
                retry_failed=retry_failed,
                resubmit_uncertain=resubmit_uncertain,
            )
        )
    return rows


def rerun_summary(reruns: Sequence[tuple[str, str]]) -> str:
    counts = Counter(action for action, _ in reruns)
    order = [w for w in _RERUN_WORD.values() if counts[w]]
    return "a rerun would: " + (", ".join(f"{counts[w]} {w}" for w in order) or "nothing")


def status_counts(results: Mapping[str, Any]) -> str:
    summary = results.get("summary", {})
    parts = [f"{summary.get(s, 0)} {s}" for s in STATUSES if summary.get(s)]
    return f"{jobs(summary.get('total', 0))}: " + (", ".join(parts) or "none")
