"""`orchestrator cancel JOB_ID`: ask every host to cancel a job and report what they answered."""

from __future__ import annotations

import argparse
import asyncio
import uuid

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import Commands, add_answer_timeout, add_command, load_cli_settings, parse_job_id
from orchestrator.core.config import DaemonSettings
from orchestrator.core.messages import CancelOutcome, CancelReply, ControlKind, ControlMessage


def register(commands: Commands) -> None:
    cancel = add_command(
        commands,
        "cancel",
        cmd_cancel,
        help="cancel a job",
        description="Cancel a job: the host running it destroys its VM and publishes a cancelled result; a job still queued is dropped when a host takes it (cancels are remembered for a day).",
    )
    cancel.add_argument("job_id", type=parse_job_id, help="the job's request_id")
    add_answer_timeout(cancel, 3.0)


def cmd_cancel(args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(load_cli_settings(args), args.job_id, args.answer_timeout))


async def _cancel(settings: DaemonSettings, job_id: uuid.UUID, answer_timeout: float) -> int:
    question = ControlMessage(kind=ControlKind.CANCEL, request_id=job_id)
    bodies = await ask_hosts(settings, question, answer_timeout)
    replies = [CancelReply.model_validate_json(body) for body in bodies]
    for reply in replies:
        if reply.outcome is CancelOutcome.CANCELLING:
            print(
                f"job {job_id}: cancelling on {reply.host}; its VM is being destroyed and a cancelled result published"
            )
            return 0
    for reply in replies:
        if reply.outcome is CancelOutcome.FINISHED:
            print(
                f"job {job_id}: already finished on {reply.host} ({reply.status.value if reply.status else 'done'}); nothing to cancel"
            )
            return 1
    print(
        f"job {job_id}: not running on any of the {len(replies)} host(s) that answered; "
        "if it is still queued it will be dropped with a cancelled result when a host takes it"
    )
    return 0
