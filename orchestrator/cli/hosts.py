"""`orchestrator hosts`: every host on the broker describes itself (labels, capacity, usage)."""

from __future__ import annotations

import argparse
import asyncio

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import Commands, add_answer_timeout, add_command, load_cli_settings
from orchestrator.core.config import DaemonSettings
from orchestrator.core.messages import ControlKind, ControlMessage, Heartbeat


def register(commands: Commands) -> None:
    hosts = add_command(
        commands,
        "hosts",
        cmd_hosts,
        help="the fleet: every host's labels, capacity and usage",
        description="Ask every host on the broker to describe itself and print the answers.",
    )
    add_answer_timeout(hosts, 2.0)
    hosts.add_argument("--json", action="store_true", help="one JSON heartbeat per line")


def cmd_hosts(args: argparse.Namespace) -> int:
    return asyncio.run(_hosts(load_cli_settings(args), args.answer_timeout, as_json=args.json))


async def _hosts(settings: DaemonSettings, answer_timeout: float, *, as_json: bool) -> int:
    question = ControlMessage(kind=ControlKind.DESCRIBE)
    bodies = await ask_hosts(settings, question, answer_timeout)
    beats = sorted((Heartbeat.model_validate_json(b) for b in bodies), key=lambda h: h.host)
    for beat in beats:
        if as_json:
            print(beat.model_dump_json())
            continue
        state = "draining" if beat.draining else "serving"
        warm = f" + {beat.warm} warm VMs" if beat.warm else ""
        node = f"broker node {beat.broker_node}, " if beat.broker_node else ""
        print(
            f"{beat.host}: {state}, {beat.running}/{beat.max_concurrency} jobs{warm}, "
            f"{beat.cpus_used}/{beat.cpus_total} vCPUs, {beat.memory_mb_used}/{beat.memory_mb_total} MiB, "
            f"{node}version {beat.version}, labels {', '.join(beat.labels)}"
        )
    if not as_json:
        print(f"{len(beats)} host(s) answered within {answer_timeout:g} s")
    return 0 if beats else 1
