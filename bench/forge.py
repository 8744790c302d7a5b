"""Forge bridge benchmark: webhooks per second and webhook -> job published latency.

(a) floor: a bare aiohttp handler that only checks the webhook's HMAC and answers 202.
(b) ours: the bridge (journal commit before 202, jobs file read from a local fake
    GitHub, JobRequest published with confirms) with latency measured from the POST to
    the job arriving in a queue bound to the jobs exchange.

Both are driven by the same client with the same concurrency over loopback; the ratio
of throughputs and our p50/p99 are printed. Targets: >= 0.5x the floor, p99 < 20 ms.

    .venv/bin/python bench/forge.py [--webhooks 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
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

from tests.fakeforge import FakeForge  # noqa: E402
from tests.fakeforge import github as fake_github  # noqa: E402
from tests.forgebridge import SECRET, start_bridge, write_config  # noqa: E402
from orchestrator.topology import Topology, delete_topology  # noqa: E402

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REPO = "octo-org/widgets"
JOBS = b"jobs:\n  test:\n    runs_on: bench\n    script: make test\n"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def pushes(count: int) -> list[tuple[str, dict[str, str], bytes]]:
    template = json.loads(fake_github.fixture("push.branch"))
    out = []
    for n in range(count):
        sha = hashlib.sha1(f"bench-{n}".encode()).hexdigest()
        payload = {**template, "after": sha}
        body = json.dumps(payload).encode()
        out.append((sha, fake_github.webhook_headers("push", body, SECRET, delivery=str(uuid.uuid4())), body))
    return out


async def drive(url: str, deliveries: list[tuple[str, dict[str, str], bytes]], concurrency: int) -> tuple[float, dict[str, float]]:
    """POST every delivery with `concurrency` in flight; seconds taken and send time per sha."""
    sent: dict[str, float] = {}
    queue: asyncio.Queue[tuple[str, dict[str, str], bytes]] = asyncio.Queue()
    for item in deliveries:
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            while not queue.empty():
                sha, headers, body = queue.get_nowait()
                sent[sha] = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as response:
                    assert response.status == 202, (response.status, await response.text())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, sent


async def floor(deliveries: list[tuple[str, dict[str, str], bytes]], concurrency: int) -> float:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        given = request.headers.get("X-Hub-Signature-256", "").encode()
        wanted = b"sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(given, wanted):
            raise web.HTTPUnauthorized()
        return web.Response(status=202)

    app = web.Application(client_max_size=25 * 1024 * 1024)
    app.router.add_post("/hooks/github", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        seconds, _ = await drive(f"http://127.0.0.1:{port}/hooks/github", deliveries, concurrency)
    finally:
        await runner.cleanup()
    return len(deliveries) / seconds


async def ours(deliveries: list[tuple[str, dict[str, str], bytes]], concurrency: int) -> tuple[float, list[float]]:
    prefix = f"bench-forge-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    fake = await fake_github.install(FakeForge()).start()
    for sha, _, _ in deliveries:
        fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS
    arrived: dict[str, float] = {}
    done = asyncio.Event()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), forge="github", kind="github", api_url=fake.url, repo=REPO)
        bridge = await start_bridge(prefix, Path(tmp), fake, config, forge="github")
        connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await connection.channel()
        jobs = await channel.get_exchange(topology.jobs, ensure=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(jobs, routing_key="bench")

        async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived[json.loads(message.body)["commit_sha"]] = time.perf_counter()
            await message.ack()
            if len(arrived) == len(deliveries):
                done.set()

        await queue.consume(on_job)
        try:
            answered_s, sent = await drive(f"http://127.0.0.1:{bridge.bridge.port}/hooks/github", deliveries, concurrency)
            await asyncio.wait_for(done.wait(), 120)
        finally:
            await bridge.bridge.stop()
            await fake.close()
            await delete_topology(channel, topology, [])
            await connection.close()
    latencies = [(arrived[sha] - sent[sha]) * 1000 for sha in sent]
    return len(deliveries) / answered_s, latencies


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    deliveries = pushes(args.webhooks)
    floor_rate = await floor(deliveries, args.concurrency)
    rate, latencies = await ours(deliveries, args.concurrency)
    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    print(f"floor  bare HMAC-checking handler:   {floor_rate:8.0f} webhooks/s")
    print(f"ours   journal + 202, then jobs file + publish with confirms:")
    print(f"       webhooks answered:            {rate:8.0f} webhooks/s = {rate / floor_rate:.2f}x the floor (target >= 0.5x)")
    print(f"       webhook -> job published:     p50 {p50:6.1f} ms  p99 {p99:6.1f} ms (target p99 < 20 ms)")
    print(f"       ({args.webhooks} pushes, {args.concurrency} in flight, loopback, fake GitHub for the jobs file)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
