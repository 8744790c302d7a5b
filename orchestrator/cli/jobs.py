"""`orchestrator jobs`: running and recent jobs across the fleet, as a table."""

from __future__ import annotations

import argparse
import asyncio
import typing
from datetime import datetime

from pydantic import ValidationError

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import CLIError, Commands, add_answer_timeout, add_command, load_cli_settings
from orchestrator.core.config import DaemonSettings
from orchestrator.core.messages import (
    ControlKind,
    ControlMessage,
    JobsQuery,
    JobsReply,
    JobStateName,
    JobSummary,
    now_utc,
)

STATES = typing.get_args(JobStateName)


def register(commands: Commands) -> None:
    jobs = add_command(
        commands,
        "jobs",
        cmd_jobs,
        help="running and recent jobs across the fleet",
        description="Ask every host (or those named) for its jobs and print them newest first.",
    )
    jobs.add_argument("--host", action="append", metavar="HOST", help="only this host; repeat for more")
    jobs.add_argument("--state", choices=STATES, help="only jobs in this state (running: a VM runs the job now)")
    jobs.add_argument("--label", help="only jobs of this label")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many per host (1-1000, default 50)")
    add_answer_timeout(jobs, 3.0)
    jobs.add_argument("--json", action="store_true", help="one JSON job per line")


def cmd_jobs(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    try:
        query = JobsQuery(state=args.state, label=args.label, limit=args.limit)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise CLIError(f"--{error['loc'][0]}: {error['msg']}") from None
    return asyncio.run(_jobs(settings, query, args))


async def _jobs(settings: DaemonSettings, query: JobsQuery, args: argparse.Namespace) -> int:
    question = ControlMessage(kind=ControlKind.JOBS, hosts=args.host, jobs=query)
    replies = [JobsReply.model_validate_json(body) for body in await ask_hosts(settings, question, args.answer_timeout)]
    jobs = sorted((job for reply in replies for job in reply.jobs), key=_newest_first)
    if args.json:
        for job in jobs:
            print(job.model_dump_json())
        return 0
    rows: list[tuple[str, ...]] = [("HOST", "JOB", "LABEL", "STATE", "STATUS", "ATTEMPT", "ACCEPTED", "TOOK", "VM")]
    rows += [_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"{len(jobs)} job(s) from {len(replies)} host(s)")
    return 0


def _newest_first(job: JobSummary) -> float:
    return -(job.accepted_at.timestamp() if job.accepted_at else 0.0)


def _row(job: JobSummary) -> tuple[str, ...]:
    end = job.finished_at or (now_utc() if job.state in ("accepted", "running") else None)
    took = _duration((end - job.accepted_at).total_seconds()) if end and job.accepted_at else "-"
    return (
        job.host,
        str(job.job_id),
        job.label or "-",
        job.state,
        job.status.value if job.status else "-",
        str(job.attempt),
        _clock(job.accepted_at),
        took,
        ("warm " if job.warm else "") + (job.vm or "-"),
    )


def _clock(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
