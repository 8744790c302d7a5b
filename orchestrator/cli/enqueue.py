"""`orchestrator enqueue`: publish one job request with publisher confirms, and with
`--wait` print its result and exit with the job's status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from orchestrator.cli.broker import on_any_node
from orchestrator.cli.common import (
    STATUS_EXIT_CODES,
    CLIError,
    Commands,
    add_command,
    load_cli_image_map,
    load_cli_settings,
    parse_seconds,
)
from orchestrator.cli.request import request_from_flags
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageMap, RequestRejected
from orchestrator.core.messages import MAX_SCRIPT_BYTES, JobRequest, JobResult, message_id_for


def register(commands: Commands) -> None:
    enqueue = add_command(
        commands,
        "enqueue",
        cmd_enqueue,
        help="publish a job request",
        description="Publish one job request (with publisher confirms).",
    )
    enqueue.add_argument("--repo", required=True, help="repository URL to check out")
    enqueue.add_argument("--commit", required=True, help="full commit SHA (40 or 64 hex digits)")
    enqueue.add_argument("--runs-on", help="label (default: the image map's default_label)")
    script = enqueue.add_mutually_exclusive_group()
    script.add_argument("--script", help="inline shell script to run in the VM")
    script.add_argument("--script-path", help="script inside the repository to run")
    script.add_argument(
        "--script-file",
        metavar="PATH",
        help=f"shell script to run in the VM, read from a UTF-8 file ('-': stdin; at most {MAX_SCRIPT_BYTES} bytes); "
        "for scripts too long for one command-line argument",
    )
    enqueue.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment for the job (repeatable)"
    )
    enqueue.add_argument("--size", help="size preset from the image map")
    enqueue.add_argument("--timeout", type=int, help="job timeout in seconds")
    enqueue.add_argument("--request-id", help="job id (default: a new UUID)")
    enqueue.add_argument(
        "--wait", action="store_true", help="wait for the result, print it, exit with the job's status"
    )
    enqueue.add_argument(
        "--wait-timeout",
        type=parse_seconds,
        default=3600,
        help="give up waiting after this many seconds (default 3600)",
    )


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    request = request_from_flags(args)
    routing_key = request.runs_on or ""
    # Check the label against the image map when there is one here, so a typo is
    # reported at once; without a local map the fleet answers with an error result.
    image_map: ImageMap | None = None
    if args.config is not None or settings.config.exists():
        image_map = load_cli_image_map(settings)
    if image_map is not None:
        try:
            routing_key = image_map.resolve(request.runs_on)
            image_map.resources_for(routing_key, request)
        except RequestRejected as exc:
            raise CLIError(str(exc)) from None
    return asyncio.run(_enqueue(args, settings, request, routing_key))


async def _enqueue(args: argparse.Namespace, settings: DaemonSettings, request: JobRequest, routing_key: str) -> int:
    from orchestrator.core.amqp import json_message
    from orchestrator.core.topology import Topology

    topology = Topology(settings.amqp_prefix)
    message_id = message_id_for(request.job_id, request.attempt)
    enqueued = False

    async def publish_and_wait(channel: Any, jobs: Any) -> int:
        # On the node this attempt has: a publish that its node did not confirm is
        # published again on the next (same message_id); a wait whose node is lost after
        # the confirm says so, since a result published meanwhile would be missed.
        nonlocal enqueued
        if enqueued:
            raise CLIError(
                f"job {request.job_id} is enqueued, but the broker node was lost while waiting for its result "
                "(see `orchestrator jobs` for it)",
                exit_code=3,
            )
        results_queue = None
        if args.wait:
            results = await channel.get_exchange(topology.results, ensure=False)
            results_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await results_queue.bind(results, routing_key=request.job_id)
        await jobs.publish(json_message(request, message_id=message_id), routing_key=routing_key)
        enqueued = True
        print(f"enqueued job {request.job_id} (routing key {routing_key!r})", file=sys.stderr)
        if results_queue is None:
            print(request.job_id)
            return 0
        try:
            async with asyncio.timeout(args.wait_timeout):
                async with results_queue.iterator() as messages:
                    async for message in messages:
                        async with message.process():
                            result = JobResult.model_validate_json(message.body)
                        _print_result(result)
                        return STATUS_EXIT_CODES[result.status]
        except TimeoutError:
            raise CLIError(
                f"no result for job {request.job_id} within {args.wait_timeout} s (it may still run)"
            ) from None
        return 3

    return await on_any_node(settings, topology.jobs, publish_and_wait)


def _print_result(result: JobResult) -> None:
    print(
        f"job {result.request_id}: {result.status.value} (exit code {result.exit_code}) on {result.host}: {result.summary}"
    )
    if result.console_tail:
        print("--- console tail ---")
        print(result.console_tail)
    print(result.model_dump_json(indent=2))
