"""`orchestrator cancel JOB_ID`: ask every host to cancel a job and report what they answered."""

from __future__ import annotations

import argparse
import asyncio
import uuid

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import CLIError, Commands, add_command, load_cli_settings
from orchestrator.config import DaemonSettings
from orchestrator.messages import CancelOutcome, CancelReply, ControlKind, ControlMessage


def register(commands: Commands) -> None:
    cancel = add_command(
        commands, "cancel", cmd_cancel, help="cancel a job", description="Cancel a job: the host running it destroys its VM and publishes a cancelled result; a job still queued is dropped when a host takes it (cancels are remembered for a day)."
    )
    cancel.add_argument("job_id", help="the job's request_id")
    cancel.add_argument("--answer-timeout", type=float, default=3.0, help="seconds to wait for hosts to answer (default 3)")


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    try:
        job_id = uuid.UUID(args.job_id)
    except ValueError:
        raise CLIError(f"job_id: {args.job_id!r} is not a UUID (a job's request_id)") from None
    return asyncio.run(_cancel(settings, job_id, args.answer_timeout))


async def _cancel(settings: DaemonSettings, job_id: uuid.UUID, answer_timeout: float) -> int:
    question = ControlMessage(kind=ControlKind.CANCEL, request_id=job_id)
    bodies = await ask_hosts(settings, question, answer_timeout)
    replies = [CancelReply.model_validate_json(body) for body in bodies]
    for reply in replies:
        if reply.outcome is CancelOutcome.CANCELLING:
            print(f"job {job_id}: cancelling on {reply.host}; its VM is being destroyed and a cancelled result published")
            return 0
    for reply in replies:
        if reply.outcome is CancelOutcome.FINISHED:
            print(f"job {job_id}: already finished on {reply.host} ({reply.status.value if reply.status else 'done'}); nothing to cancel")
            return 1
    print(
        f"job {job_id}: not running on any of the {len(replies)} host(s) that answered; "
        "if it is still queued it will be dropped with a cancelled result when a host takes it"
    )
    return 0
