"""`orchestrator logs JOB_ID [--follow]`: find the host that ran (or runs) a job and print
its log, following it live while the job runs.

The log is read from that host's HTTP API at its `PUBLIC_URL` (the host says where), with
`HTTP_TOKEN` as the bearer token when set. Following uses the log's event stream and,
when the connection drops, resumes after the last line it printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from orchestrator.cli.broker import ask_hosts
from orchestrator.cli.common import CLIError, Commands, add_answer_timeout, add_command, load_cli_settings, parse_job_id
from orchestrator.core.config import DaemonSettings
from orchestrator.core.messages import ControlKind, ControlMessage, JobLocation

RECONNECTS = 5
RECONNECT_WAIT_S = 1.0


def register(commands: Commands) -> None:
    logs = add_command(
        commands,
        "logs",
        cmd_logs,
        help="print a job's log (from the host that ran it)",
        description=__doc__.split("\n\n")[1],
    )
    logs.add_argument("job_id", type=parse_job_id, help="the job's request_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing while the job runs")
    add_answer_timeout(logs, 3.0)


def cmd_logs(args: argparse.Namespace) -> int:
    return asyncio.run(
        _logs(load_cli_settings(args), args.job_id, follow=args.follow, answer_timeout=args.answer_timeout)
    )


async def _logs(settings: DaemonSettings, job_id: uuid.UUID, *, follow: bool, answer_timeout: float) -> int:
    answers = await ask_hosts(settings, ControlMessage(kind=ControlKind.LOCATE, request_id=job_id), answer_timeout)
    located = [JobLocation.model_validate_json(body) for body in answers if body.strip() != b"null"]
    if not located:
        raise CLIError(
            f"job {job_id}: no host that answered within {answer_timeout:g} s has run it (queued, or its host is down)",
            exit_code=1,
        )
    # The host running it now, else any that has its log (a handed-back job ran on several).
    location = sorted(located, key=lambda found: not found.running)[0]
    if location.log_url is None:
        raise CLIError(
            f"job {job_id} is on host {location.host}, which has no PUBLIC_URL: set PUBLIC_URL there to read logs from elsewhere"
        )
    import aiohttp

    headers = {"Authorization": f"Bearer {settings.http_token}"} if settings.http_token else {}
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
    ) as http:
        try:
            if follow:
                await _follow(http, location.log_url + "/stream")
            else:
                await _print_all(http, location.log_url)
        except aiohttp.ClientError as exc:
            raise CLIError(f"cannot read the log at {location.log_url}: {exc}", exit_code=1) from None
    return 0


async def _print_all(http: object, url: str) -> None:
    async with http.get(url) as response:  # type: ignore[attr-defined]
        _check(response, url)
        async for chunk in response.content.iter_chunked(64 * 1024):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


async def _follow(http: object, url: str) -> None:
    """Print the stream's lines until its `end` event; resume after a dropped connection."""
    import aiohttp

    last_id: str | None = None
    for attempt in range(RECONNECTS + 1):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with http.get(url, headers=headers) as response:  # type: ignore[attr-defined]
                _check(response, url)
                event = ""
                async for raw in response.content:
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    if line.startswith("id: "):
                        last_id = line[4:]
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event != "end":
                        print(line[6:], flush=True)
                    elif not line:
                        if event == "end":
                            return
                        event = ""
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionResetError):
            pass
        if attempt < RECONNECTS:
            await asyncio.sleep(RECONNECT_WAIT_S)
    raise CLIError(f"the log stream at {url} kept dropping ({RECONNECTS} reconnects)", exit_code=1)


def _check(response: object, url: str) -> None:
    status = response.status  # type: ignore[attr-defined]
    if status == 401:
        raise CLIError(f"{url}: 401: set HTTP_TOKEN to the hosts' token")
    if status != 200:
        raise CLIError(f"{url}: HTTP {status}", exit_code=1)
