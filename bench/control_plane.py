"""Control-plane benchmark: the daemon's dispatch against raw aio-pika on the same broker.

(a) floor: raw aio-pika consume+ack rate (quorum queue, prefetch 64) and publish→consume
    latency of paced messages;
(b) the daemon with the noop backend and zero-length jobs at concurrency 1, 8, 64:
    throughput (a pre-published burst, to the last result) and publish→backend-start
    latency of paced jobs (open loop at half the measured throughput).
Prints each figure and its ratio to (a). Run: .venv/bin/python bench/control_plane.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisors.base import BackendName, VmSpec
from hypervisors.noop import NoopHypervisor
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import parse_image_map
from orchestrator.core.messages import JobRequest
from orchestrator.core.topology import Topology, declare_topology, delete_topology
from orchestrator.host.daemon import Daemon

MAP = """\
default_label: bench
images:
  bench: {backend: noop, local_path: /nonexistent, cpus: 1, memory_mb: 64}
"""


class Counting:
    """An acking consumer callback that sets `done` after `target` messages."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()

    def expect(self, target: int) -> None:
        self.target, self.count = target, 0
        self.done.clear()

    async def __call__(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        self.count += 1
        if self.count == self.target:
            self.done.set()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_floor(url: str, n: int) -> tuple[float, float, float]:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(
            f"bench-raw-{uuid.uuid4().hex[:8]}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        body = (
            JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40).model_dump_json().encode()
        )
        await asyncio.gather(
            *[
                channel.default_exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=queue.name)
                for _ in range(n)
            ]
        )
        consumed = Counting(n)
        t0 = time.perf_counter()
        tag = await queue.consume(consumed)
        await consumed.done.wait()
        rate = n / (time.perf_counter() - t0)
        await queue.cancel(tag)

        latencies: list[float] = []
        sent: dict[str, float] = {}
        arrived = asyncio.Event()
        paced = 300

        async def on_timed(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            latencies.append(time.perf_counter() - sent[message.message_id])
            if len(latencies) == paced:
                arrived.set()

        await queue.consume(on_timed)
        for i in range(paced):
            sent[str(i)] = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=2, message_id=str(i)), routing_key=queue.name
            )
            await asyncio.sleep(0.005)
        await arrived.wait()
        await queue.delete(if_unused=False, if_empty=False)
    return rate, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000


class Probe(NoopHypervisor):
    def __init__(self) -> None:
        super().__init__()
        self.started_at: dict[str, float] = {}

    async def start(self, spec: VmSpec) -> None:
        self.started_at[spec.job_id] = time.perf_counter()
        await super().start(spec)


async def daemon_run(url: str, concurrency: int, burst: int, paced: int) -> tuple[float, float, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    with tempfile.TemporaryDirectory() as state:
        image_map = parse_image_map(MAP, filename="bench-map", base_dir=Path(state))
        settings = DaemonSettings(
            amqp_url=url,
            amqp_prefix=prefix,
            state_dir=Path(state),
            backend=BackendName.NOOP,
            max_concurrency=concurrency,
            host_cpus=4096,
            host_memory_mb=1 << 30,
            heartbeat_s=3600,
            host_name="bench",
        )
        connection = await aio_pika.connect_robust(url)
        channel = await connection.channel(publisher_confirms=True)
        declared = await declare_topology(
            connection,
            topology,
            image_map,
            delivery_limit=settings.delivery_limit,
            dlq_max_length=settings.dlq_max_length,
            quorum_size=settings.quorum_size,
        )
        results_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results_queue.bind(declared.results, routing_key="#")
        results = Counting(burst)
        await results_queue.consume(results)

        def job() -> JobRequest:
            return JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40, runs_on="bench")

        jobs = [job() for _ in range(burst)]
        await asyncio.gather(
            *[
                declared.jobs.publish(
                    aio_pika.Message(j.model_dump_json().encode(), delivery_mode=2), routing_key="bench"
                )
                for j in jobs
            ]
        )
        probe = Probe()
        daemon = Daemon(settings, image_map, backends={BackendName.NOOP: probe})
        t0 = time.perf_counter()
        await daemon.start()
        await results.done.wait()
        throughput = burst / (time.perf_counter() - t0)

        # Paced, open loop at half the throughput: latency without self-inflicted queueing.
        results.expect(paced)
        interval = 2.0 / throughput
        sent: dict[str, float] = {}
        for _ in range(paced):
            j = job()
            sent[j.job_id] = time.perf_counter()
            await declared.jobs.publish(
                aio_pika.Message(j.model_dump_json().encode(), delivery_mode=2), routing_key="bench"
            )
            await asyncio.sleep(interval)
        await results.done.wait()
        latencies = [probe.started_at[k] - t for k, t in sent.items()]
        await daemon.stop()
        await delete_topology(channel, topology, ["bench"])
        await connection.close()
    return throughput, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=300)
    args = parser.parse_args()
    raw_rate, raw_p50, raw_p99 = await raw_floor(args.amqp_url, 5000)
    print(
        f"floor  raw aio-pika consume+ack: {raw_rate:8.0f} msg/s   publish->consume p50 {raw_p50:.2f} ms  p99 {raw_p99:.2f} ms"
    )
    for concurrency in (1, 8, 64):
        burst = args.burst if concurrency > 1 else args.burst // 4
        rate, p50, p99 = await daemon_run(args.amqp_url, concurrency, burst, args.paced)
        print(
            f"daemon concurrency {concurrency:3}: {rate:8.0f} jobs/s ({rate / raw_rate:.2f}x raw)   "
            f"publish->start p50 {p50:.2f} ms ({p50 / raw_p50:.1f}x raw)  p99 {p99:.2f} ms ({p99 / raw_p99:.1f}x raw)"
        )


if __name__ == "__main__":
    asyncio.run(main())
