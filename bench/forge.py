"""Forge bridge benchmark: webhooks per second and webhook -> job published latency.

(a) floor: a bare aiohttp handler, in its own process, that only checks the webhook's
    HMAC and answers 202.
(b) ours: `orchestrator forge` in its own process (journal commit before 202, the jobs
    file read from a local fake GitHub, the JobRequest published with confirms).

The same client drives both over loopback: throughput at saturation (`--concurrency` in
flight), then for ours the latency from the POST to the job arriving in a queue bound
to the jobs exchange, at half the measured capacity (paced, so no backlog builds).
Targets: >= 0.5x the floor's throughput, p99 < 20 ms.

    .venv/bin/python bench/forge.py [--webhooks 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from orchestrator.core.topology import Topology, delete_topology  # noqa: E402
from tests.support.fakeforge import FakeForge  # noqa: E402
from tests.support.fakeforge import github as fake_github  # noqa: E402
from tests.support.forgebridge import SECRET, write_config  # noqa: E402

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = "octo-org/widgets"
JOBS = b"jobs:\n  test:\n    runs_on: bench\n    script: make test\n"
Delivery = tuple[str, dict[str, str], bytes]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pushes(count: int, tag: str) -> list[Delivery]:
    template = json.loads(fake_github.fixture("push.branch"))
    out = []
    for n in range(count):
        sha = hashlib.sha1(f"bench-{tag}-{n}".encode()).hexdigest()
        body = json.dumps({**template, "after": sha}).encode()
        out.append((sha, fake_github.webhook_headers("push", body, SECRET, delivery=str(uuid.uuid4())), body))
    return out


async def drive(
    url: str, deliveries: list[Delivery], *, concurrency: int, pace_s: float = 0.0
) -> tuple[float, dict[str, float]]:
    """POST every delivery, `concurrency` in flight (or one every `pace_s`); the seconds
    taken and the time each was sent."""
    sent: dict[str, float] = {}
    pending = list(reversed(deliveries))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def post(sha: str, headers: dict[str, str], body: bytes) -> None:
            sent[sha] = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as response:
                assert response.status == 202, (response.status, await response.text())

        async def worker() -> None:
            while pending:
                await post(*pending.pop())

        started = time.perf_counter()
        if pace_s:
            posts = []
            for delivery in deliveries:
                posts.append(asyncio.create_task(post(*delivery)))
                await asyncio.sleep(pace_s)
            await asyncio.gather(*posts)
        else:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, sent


async def wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if process.returncode is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                async with http.get(url) as response:
                    if response.status in (200, 404, 405):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def serve_floor(port: int) -> None:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        given = request.headers.get("X-Hub-Signature-256", "").encode()
        wanted = b"sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(given, wanted):
            raise web.HTTPUnauthorized()
        return web.Response(status=202)

    app = web.Application(client_max_size=25 * 1024 * 1024)
    app.router.add_post("/hooks/github", hook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def floor(deliveries: list[Delivery], concurrency: int) -> float:
    port = free_port()
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve-floor", str(port))
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/hooks/github", process)
        seconds, _ = await drive(f"http://127.0.0.1:{port}/hooks/github", deliveries, concurrency=concurrency)
    finally:
        process.terminate()
        await process.wait()
    return len(deliveries) / seconds


async def ours(
    burst: list[Delivery], paced: list[Delivery], concurrency: int
) -> tuple[float, float, float, list[float]]:
    """Webhooks answered per second in the burst, answered and published per second,
    the paced rate used, and the paced latencies (ms)."""
    prefix = f"bench-forge-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    fake = await fake_github.install(FakeForge()).start()
    for sha, _, _ in burst + paced:
        fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS
    arrived: dict[str, float] = {}
    connection = await aio_pika.connect_robust(AMQP_URL)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), forge="github", kind="github", api_url=fake.url, repo=REPO)
        port = free_port()
        config.write_text(config.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}"))
        env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "AMQP_PREFIX": prefix,
            "TEST_FORGE_TOKEN": fake.token,
            "TEST_FORGE_SECRET": SECRET,
            "LOG_FORMAT": "json",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "forge",
            "--config",
            str(config),
            env=env,
            cwd=ROOT,
            stderr=asyncio.subprocess.DEVNULL,
        )
        channel = await connection.channel()
        try:
            await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
            jobs = await channel.get_exchange(topology.jobs, ensure=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(jobs, routing_key="bench")
            everything = asyncio.Event()

            async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                arrived[json.loads(message.body)["commit_sha"]] = time.perf_counter()
                await message.ack()
                if len(arrived) == len(burst) + len(paced):
                    everything.set()

            await queue.consume(on_job)
            url = f"http://127.0.0.1:{port}/hooks/github"
            started = time.perf_counter()
            answered_s, _ = await drive(url, burst, concurrency=concurrency)
            while len(arrived) < len(burst):
                await asyncio.sleep(0.01)
            capacity = len(burst) / (time.perf_counter() - started)  # answered and published
            answered = len(burst) / answered_s
            rate = capacity / 2
            _, sent = await drive(url, paced, concurrency=concurrency, pace_s=1 / rate)
            await asyncio.wait_for(everything.wait(), 120)
        finally:
            process.terminate()
            await process.wait()
            await fake.close()
            await delete_topology(channel, topology, [])
            await connection.close()
    latencies = [(arrived[sha] - sent[sha]) * 1000 for sha in sent]
    return answered, capacity, rate, latencies


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    floor_rate = await floor(pushes(args.webhooks, "floor"), args.concurrency)
    answered, capacity, rate, latencies = await ours(
        pushes(args.webhooks, "burst"), pushes(max(200, args.webhooks // 4), "paced"), args.concurrency
    )
    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    print(f"floor  bare HMAC-checking handler:          {floor_rate:8.0f} webhooks/s")
    print(
        f"ours   answered 202 (journaled), saturated:  {answered:8.0f} webhooks/s = {answered / floor_rate:.2f}x the floor (target >= 0.5x)"
    )
    print(
        f"ours   answered and published, saturated:   {capacity:8.0f} webhooks/s = {capacity / floor_rate:.2f}x the floor"
    )
    print(
        f"ours   webhook -> job published at {rate:4.0f}/s:  p50 {p50:5.1f} ms  p99 {p99:5.1f} ms (target p99 < 20 ms)"
    )
    print(
        f"       ({args.webhooks} pushes at {args.concurrency} in flight, then {len(latencies)} paced; servers in their own processes)"
    )
    return 0


if __name__ == "__main__":
    if "--serve-floor" in sys.argv:
        serve_floor(int(sys.argv[sys.argv.index("--serve-floor") + 1]))
    else:
        raise SystemExit(asyncio.run(main()))
