"""Catch-up benchmark: one pass over 100 repositories x 50 branches on a local fake GitHub,
in seconds and API calls.

The pass runs as an operator runs it beside the service, `orchestrator forge catch-up`,
in its own process (the fake forge is in this one, on loopback), on the real broker:

  first   the repositories' first pass: every head recorded, nothing run;
  steady  nothing moved: what a quiet forge costs every `catchup_interval_s`;
  moved   one branch moved in each repository: each commit's jobs file read, its job
          published with confirms, its `queued (caught up)` status set.

For each: the command's wall time (process start, broker connection and journal
included), the pass itself (first to last API call the forge saw), and the API calls by
kind. Figures only, no targets.

    .venv/bin/python bench/forge_catchup.py [--repos 100] [--branches 50] [--pulls 0]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
from aiohttp import web  # noqa: E402

from orchestrator.core.topology import Topology, delete_topology  # noqa: E402
from tests.support.fakeforge import FakeForge, Pull  # noqa: E402
from tests.support.fakeforge import github as fake_github  # noqa: E402
from tests.support.forgebridge import SECRET  # noqa: E402

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
JOBS = b"jobs:\n  test:\n    runs_on: bench\n    script: make test\n"


def sha(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def kind_of(method: str, path: str) -> str:
    """The API call's kind, for the breakdown."""
    parts = path.strip("/").split("/")  # repos, owner, name, [what, ...]
    if method == "POST":
        return "statuses"
    return parts[3] if len(parts) > 3 else "repository"


def write_config(directory: Path, api_url: str, repos: list[str]) -> Path:
    path = directory / "forge.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        state_dir: {directory / "forge-state"}
        forges:
          github:
            api_url: {api_url}
            token: {{env: BENCH_FORGE_TOKEN}}
            webhook_secret: {{env: BENCH_FORGE_SECRET}}
        repositories:
        """)
        + "".join(f"  - {{repo: {repo}, forge: github}}\n" for repo in repos)
    )
    return path


class Timed:
    """When the fake forge saw its first and last call since `reset`."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    def reset(self) -> None:
        self.first = self.last = None

    @web.middleware
    async def middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        try:
            return await handler(request)
        finally:
            self.last = time.perf_counter()


async def run_pass(config: Path, env: dict[str, str]) -> tuple[float, list[dict]]:
    """`orchestrator forge catch-up`: its wall time and its `catchup.pass` log events."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "forge",
        "catch-up",
        "--config",
        str(config),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"forge catch-up exited with {process.returncode}:\n{stderr.decode()[-2000:]}")
    events = []
    for line in stderr.decode().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "catchup.pass":
            events.append(event)
    return seconds, events


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", type=int, default=100)
    parser.add_argument("--branches", type=int, default=50)
    parser.add_argument("--pulls", type=int, default=0, help="open pull requests per repository")
    args = parser.parse_args()

    repos = [f"bench-org/repo{n:03d}" for n in range(args.repos)]
    fake = fake_github.install(FakeForge())
    timed = Timed()
    fake.app.middlewares.append(timed.middleware)
    await fake.start()
    for repo in repos:
        fake.branches[repo] = {f"branch{b:03d}": sha(f"{repo}/{b}/0") for b in range(args.branches)}
        fake.pulls[repo] = [
            Pull(
                number=n + 1,
                head_sha=sha(f"{repo}/pull/{n}"),
                base_branch="branch000",
                head_branch=f"feature{n}",
                head_repo=repo,
            )
            for n in range(args.pulls)
        ]
    prefix = f"bench-catchup-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    published = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp), fake.url, repos)
            env = {
                **os.environ,
                "AMQP_URL": AMQP_URL,
                "AMQP_PREFIX": prefix,
                "BENCH_FORGE_TOKEN": fake.token,
                "BENCH_FORGE_SECRET": SECRET,
                "LOG_FORMAT": "json",
            }
            rows = []
            for name in ("first", "steady", "moved"):
                if name == "moved":
                    jobs = await channel.get_exchange(topology.jobs, ensure=True)
                    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                    await queue.bind(jobs, routing_key="bench")

                    async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                        nonlocal published
                        published += 1
                        await message.ack()

                    await queue.consume(on_job)
                    for repo in repos:
                        moved = sha(f"{repo}/0/1")
                        fake.branches[repo]["branch000"] = moved
                        fake.files[(repo, moved, ".orchestrator.yaml")] = JOBS
                since = len(fake.calls)
                timed.reset()
                wall, events = await run_pass(config, env)
                assert len(events) == len(repos), f"{len(events)} repositories passed of {len(repos)}"
                calls = Counter(kind_of(c.method, c.path) for c in fake.calls[since:])
                span = (timed.last or 0) - (timed.first or 0)
                ran = sum(e["ran"] for e in events)
                if name == "moved":
                    async with asyncio.timeout(60):
                        while published < ran:
                            await asyncio.sleep(0.05)
                rows.append((name, wall, span, sum(calls.values()), calls, ran))
    finally:
        await delete_topology(channel, topology, [])
        await connection.close()
        await fake.close()

    heads = args.repos * (args.branches + args.pulls)
    print(
        f"catch-up pass over {args.repos} repositories x {args.branches} branches"
        + (f" + {args.pulls} open pull requests" if args.pulls else "")
        + f" ({heads} heads), fake GitHub on loopback"
    )
    for name, wall, span, total, calls, ran in rows:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(calls.items()))
        print(
            f"  {name:6}  command {wall:5.2f} s, pass {span:5.2f} s, {total:5d} API calls "
            f"({total / args.repos:.1f} per repository: {kinds}), ran {ran}"
        )
    print(f"  ({published} jobs published by the last pass arrived on the jobs exchange)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
