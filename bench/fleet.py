"""Fleet benchmark: many noop daemons on one broker node and on a three-node cluster.

For each broker (the single node at --single-url, then the cluster that
scripts/rabbitmq-cluster.sh starts, or --cluster-urls):
(a) floor: raw aio-pika on a replicated quorum queue (x-quorum-initial-group-size 3):
    publish with confirms + consume/ack rate, and publish->consume latency of paced
    messages;
(b) the fleet: --hosts daemons (child processes, noop backend, MAX_CONCURRENCY
    --concurrency each, each connected to a node in turn) over --labels labels;
    --jobs zero-length jobs published at once (with confirms), jobs/s from the first
    publish to the last result; then --paced jobs at half that rate (open loop),
    publish -> start latency p50/p99 from the jobs' `started` events; once with the
    default limits (each label may take every slot) and once with --split-capacity's
    label limits that add up to MAX_CONCURRENCY.
Prints each figure and its ratio to the floor on the same broker, the default limits'
rate against the split one (the host's window makes them equal: target >= 0.9x, with no
requeue), the requeues by reason and the redelivery checks, and cluster/single.
Run: .venv/bin/python bench/fleet.py   (as root: it starts and removes the local cluster;
--single-only skips the cluster)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.core.amqp import connect  # noqa: E402
from orchestrator.core.imagemap import parse_image_map  # noqa: E402
from orchestrator.core.messages import JobEvent, JobRequest  # noqa: E402
from orchestrator.core.topology import Topology, declare_topology, delete_topology, quorum_queue_arguments  # noqa: E402
from tests.support.daemonproc import DaemonProcess  # noqa: E402

SCRIPT = ROOT / "scripts" / "rabbitmq-cluster.sh"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Figures:
    rate: float
    p50_ms: float
    p99_ms: float
    requeued: int = 0  # deliveries handed back to the broker (any reason: none is for want of room)
    redelivery_checks: int = 0  # redelivered requests asked about across the fleet first
    broker_errors: int = 0  # connections lost and acks that failed (none expected here)


async def raw_floor(urls: str, n: int, paced: int) -> Figures:
    """Publish `n` with confirms and consume them (prefetch 64), as one client does."""
    connection = await connect(urls, name="bench-raw")
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(
            f"bench-raw-{uuid.uuid4().hex[:8]}", durable=True, arguments=quorum_queue_arguments(3)
        )
        body = (
            JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40).model_dump_json().encode()
        )
        got = 0
        done = asyncio.Event()
        sent: dict[str, float] = {}
        latencies: list[float] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await message.ack()
            if message.message_id in sent:
                latencies.append(time.perf_counter() - sent[message.message_id])
            got += 1
            if got == n or len(latencies) == paced:
                done.set()

        tag = await queue.consume(on_message)
        t0 = time.perf_counter()
        for start in range(0, n, 500):  # confirms in windows of 500
            await asyncio.gather(
                *[
                    channel.default_exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=queue.name)
                    for _ in range(min(500, n - start))
                ]
            )
        await done.wait()
        rate = n / (time.perf_counter() - t0)
        done.clear()
        for i in range(paced):
            sent[str(i)] = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=2, message_id=str(i)), routing_key=queue.name
            )
            await asyncio.sleep(0.005)
        await done.wait()
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return Figures(rate, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000)


def image_map_text(labels: list[str]) -> str:
    return f"default_label: {labels[0]}\nimages:\n" + "".join(
        f"  {label}: {{backend: noop, local_path: /nonexistent/{label}.img, cpus: 1, memory_mb: 64}}\n"
        for label in labels
    )


async def fleet_run(
    urls: list[str], *, hosts: int, concurrency: int, labels: int, jobs: int, paced: int, split: bool = False
) -> Figures:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    names = [f"l{i}" for i in range(labels)]
    topology = Topology(prefix)
    with tempfile.TemporaryDirectory() as state:
        map_path = Path(state) / "map.yaml"
        map_path.write_text(image_map_text(names))
        client = await connect(",".join(urls), name="bench-client")
        channel = await client.channel(publisher_confirms=True)
        declared = await declare_topology(
            client,
            topology,
            parse_image_map(image_map_text(names), filename="map", base_dir=Path(state)),
            delivery_limit=50,
            dlq_max_length=100_000,
            quorum_size=3,
        )
        results_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results_queue.bind(declared.results, routing_key="#")
        events_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events_queue.bind(declared.events, routing_key="job.started.*")
        finished = 0
        target = jobs
        all_in = asyncio.Event()
        started_at: dict[str, float] = {}

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal finished
            await message.ack()
            finished += 1
            if finished == target:
                all_in.set()

        async def on_started(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            event = JobEvent.model_validate_json(message.body)
            started_at[str(event.request_id)] = event.at.timestamp()

        await results_queue.consume(on_result)
        await events_queue.consume(on_started)

        daemons = []
        for i in range(hosts):
            order = urls[i % len(urls) :] + urls[: i % len(urls)]  # each host on a node in turn
            env = {
                "AMQP_URL": ",".join(order),
                "AMQP_PREFIX": prefix,
                "ORCH_CONFIG": str(map_path),
                "STATE_DIR": f"{state}/h{i}",
                "HOST_NAME": f"h{i:02d}",
                "ORCH_BACKEND": "noop",
                "MAX_CONCURRENCY": str(concurrency),
                "HOST_CPUS": "4096",
                "HOST_MEMORY_MB": str(1 << 30),
                "HTTP_LISTEN": "off",
                "HEARTBEAT_S": "3600",
                "QUORUM_SIZE": "3",
            }
            if split:  # label limits that add up to MAX_CONCURRENCY: no requeue for want of room
                env["CAPACITY_MAP"] = ",".join(f"{label}={concurrency // labels}" for label in names)
            daemons.append(DaemonProcess(env))
        await asyncio.gather(*(d.start(timeout_s=180) for d in daemons))
        try:

            def request(n: int) -> tuple[JobRequest, str]:
                label = names[n % labels]
                return JobRequest(
                    request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40, runs_on=label
                ), label

            burst = [request(n) for n in range(jobs)]
            t0 = time.perf_counter()
            for start in range(0, jobs, 500):
                await asyncio.gather(
                    *[
                        declared.jobs.publish(
                            aio_pika.Message(j.model_dump_json().encode(), delivery_mode=2), routing_key=label
                        )
                        for j, label in burst[start : start + 500]
                    ]
                )
            await all_in.wait()
            rate = jobs / (time.perf_counter() - t0)

            all_in.clear()
            finished, target = 0, paced
            published_at: dict[str, float] = {}
            interval = 2.0 / rate
            for n in range(paced):
                job, label = request(n)
                published_at[job.job_id] = time.time()
                await declared.jobs.publish(
                    aio_pika.Message(job.model_dump_json().encode(), delivery_mode=2), routing_key=label
                )
                await asyncio.sleep(interval)
            await all_in.wait()
            await asyncio.sleep(0.5)  # the last started events trail their results by a hair
            latencies = [started_at[k] - t for k, t in published_at.items() if k in started_at]
        finally:
            await asyncio.gather(*(d.stop() for d in daemons))
            requeued = sum(len(d.events("delivery.requeued")) + len(d.events("job.returned")) for d in daemons)
            checks = sum(len(d.events("job.redelivery_checked")) for d in daemons)
            broker_errors = sum(
                len(d.events("broker.connection_lost")) + len(d.events("delivery.settle_failed")) for d in daemons
            )
            await delete_topology(channel, topology, names)
            await client.close()
    return Figures(rate, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000, requeued, checks, broker_errors)


def report(name: str, floor: Figures, fleet: Figures) -> None:
    print(
        f"{name}: floor raw aio-pika publish+consume {floor.rate:7.0f} msg/s   "
        f"publish->consume p50 {floor.p50_ms:.2f} ms  p99 {floor.p99_ms:.2f} ms"
    )
    print(
        f"{name}: fleet {fleet.rate:7.0f} jobs/s ({fleet.rate / floor.rate:.2f}x raw)   publish->start "
        f"p50 {fleet.p50_ms:.2f} ms ({fleet.p50_ms / floor.p50_ms:.1f}x raw)  p99 {fleet.p99_ms:.2f} ms "
        f"({fleet.p99_ms / floor.p99_ms:.1f}x raw)"
    )
    print(
        f"{name}: {fleet.requeued} deliveries requeued, {fleet.redelivery_checks} redeliveries "
        f"checked with the fleet, {fleet.broker_errors} broker errors"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument(
        "--cluster-urls", help="a running cluster's AMQP_URL (default: start the local one, remove it after)"
    )
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=300)
    parser.add_argument("--raw", type=int, default=5000)
    parser.add_argument("--single-only", action="store_true", help="the single node only (no cluster)")
    args = parser.parse_args()
    print(
        f"{args.hosts} noop daemons x MAX_CONCURRENCY {args.concurrency}, {args.labels} labels, {args.jobs} jobs "
        f"(+{args.paced} paced), {os.cpu_count()} CPUs"
    )
    single_floor = await raw_floor(args.single_url, args.raw, args.paced)
    print(f"single node: floor {single_floor.rate:.0f} msg/s", flush=True)
    run = dict(hosts=args.hosts, concurrency=args.concurrency, labels=args.labels, jobs=args.jobs, paced=args.paced)
    split = await fleet_run([args.single_url], **run, split=True)
    report("single node, label limits adding up to MAX_CONCURRENCY", single_floor, split)
    single = (single_floor, await fleet_run([args.single_url], **run))
    report("single node, default limits (each label may take every slot)", *single)
    print(
        f"default limits / split limits: {single[1].rate / split.rate:.2f}x jobs/s (target >= 0.9x), "
        f"requeues {single[1].requeued} vs {split.requeued}, redelivery checks {single[1].redelivery_checks} "
        f"vs {split.redelivery_checks}",
        flush=True,
    )
    if args.single_only:
        print(f"(run at {datetime.now().isoformat(timespec='seconds')})")
        return
    started_cluster = args.cluster_urls is None
    if started_cluster:
        subprocess.run(["bash", str(SCRIPT), "up"], check=True)
        args.cluster_urls = subprocess.run(
            ["bash", str(SCRIPT), "urls"], check=True, capture_output=True, text=True
        ).stdout.strip()
    try:
        urls = [u for u in args.cluster_urls.split(",") if u]
        cluster = (await raw_floor(args.cluster_urls, args.raw, args.paced), await fleet_run(urls, **run))
    finally:
        if started_cluster:
            subprocess.run(["bash", str(SCRIPT), "down"], check=True)
    report("3-node cluster", *cluster)
    print(
        f"cluster / single: floor {cluster[0].rate / single[0].rate:.2f}x, fleet jobs/s {cluster[1].rate / single[1].rate:.2f}x, "
        f"publish->start p50 {cluster[1].p50_ms / single[1].p50_ms:.2f}x  p99 {cluster[1].p99_ms / single[1].p99_ms:.2f}x"
    )
    print(f"(run at {datetime.now().isoformat(timespec='seconds')})")


if __name__ == "__main__":
    asyncio.run(main())
