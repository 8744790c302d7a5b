"""`orchestrator drain` / `orchestrator resume`: take hosts out of service and back.

Over the control exchange: the hosts named (or all) stop taking work (queued jobs stay
in the broker for other hosts), let their running jobs finish and destroy their idle
warm VMs; `--wait` returns once they run nothing. The state is journaled on each host,
so a restarted daemon stays drained until `resume`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import (
    CLIError,
    Commands,
    add_answer_timeout,
    add_command,
    load_cli_settings,
    parse_seconds,
)
from orchestrator.core.config import DaemonSettings
from orchestrator.core.messages import ControlKind, ControlMessage, Heartbeat

WAIT_POLL_S = 1.0


def register(commands: Commands) -> None:
    for name, kind, what in (
        ("drain", ControlKind.DRAIN, "take hosts out of service: no new jobs, running ones finish"),
        ("resume", ControlKind.RESUME, "put drained hosts back in service"),
    ):
        command = add_command(commands, name, cmd_drain_or_resume, help=what, description=__doc__.split("\n\n")[1])
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--host", action="append", metavar="HOST", help="a host (HOST_NAME); repeat for more")
        which.add_argument("--all", action="store_true", help="every host on the broker")
        add_answer_timeout(command, 3.0)
        if kind is ControlKind.DRAIN:
            command.add_argument("--wait", action="store_true", help="return once the hosts run nothing")
            command.add_argument(
                "--wait-timeout", type=parse_seconds, default=None, help="give up waiting after this many seconds"
            )
        command.set_defaults(kind=kind)


def cmd_drain_or_resume(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    return asyncio.run(_drain_or_resume(settings, args))


async def _drain_or_resume(settings: DaemonSettings, args: argparse.Namespace) -> int:
    hosts = None if args.all else sorted(set(args.host))
    bodies = await ask_hosts(settings, ControlMessage(kind=args.kind, hosts=hosts), args.answer_timeout)
    beats = {beat.host: beat for beat in (Heartbeat.model_validate_json(body) for body in bodies)}
    missing = sorted(set(hosts or ()) - set(beats))
    for beat in sorted(beats.values(), key=lambda b: b.host):
        print(f"{beat.host}: {'draining' if beat.draining else 'serving'}, {beat.running} job(s) running")
    if missing:
        raise CLIError(
            f"no answer from {', '.join(missing)} within {args.answer_timeout:g} s (check HOST_NAME, or the host is down)",
            exit_code=1,
        )
    if not beats:
        raise CLIError("no host answered", exit_code=1)
    if getattr(args, "wait", False):
        await _wait_until_idle(settings, sorted(beats), args.answer_timeout, args.wait_timeout)
    return 0


async def _wait_until_idle(
    settings: DaemonSettings, hosts: list[str], answer_timeout: float, wait_timeout: float | None
) -> None:
    deadline = time.monotonic() + wait_timeout if wait_timeout is not None else None
    while True:
        bodies = await ask_hosts(settings, ControlMessage(kind=ControlKind.DESCRIBE), answer_timeout)
        busy = {
            b.host: b.running
            for b in (Heartbeat.model_validate_json(body) for body in bodies)
            if b.host in hosts and b.running
        }
        if not busy:
            print(f"{', '.join(hosts)}: drained, nothing running")
            return
        if deadline is not None and time.monotonic() > deadline:
            shown = ", ".join(f"{host} ({n})" for host, n in sorted(busy.items()))
            raise CLIError(f"still running jobs after {wait_timeout:g} s: {shown}", exit_code=1)
        await asyncio.sleep(WAIT_POLL_S)
