"""Start latency: job accepted → the job's first command, cold boot against a warm pool.

Real libvirt + QEMU (software emulation), the tiny test image, the real broker, the daemon
in this process. In one run, over --jobs jobs each (p50/p95 of the result's
`timings.to_first_command_s`, which the daemon measures from the guest's start line):
  floor  the noop backend: the daemon's own path (journal, ack, spec, console) with no VM;
  cold   the test image booted per job (no `warm:`);
  warm   `warm: {ready: 1}`: each job is submitted once a pool VM is ready, so it takes one;
  restore `warm: {ready: 1, snapshot: true}`: the same, pool VMs restored from a template;
and how long a pool VM takes to be ready: booted (boot → ready line) against restored
(restore → ready line), from the pool's own log.
Jobs run one at a time so that boots do not compete for the CPU.
Run: .venv/bin/python bench/start_latency.py  (after bash scripts/bootstrap-host.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import uuid
from pathlib import Path

import aio_pika
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisors.base import BackendName  # noqa: E402
from orchestrator.config import DaemonSettings  # noqa: E402
from orchestrator.daemon import Daemon  # noqa: E402
from orchestrator.imagemap import load_image_map  # noqa: E402
from orchestrator.messages import JobRequest, JobResult, JobStatus  # noqa: E402
from orchestrator.topology import Topology  # noqa: E402
from orchestrator.topology import delete_topology as delete_queues_and_exchanges  # noqa: E402

IMAGE = Path("/var/cache/orchestrator/test-image")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SHA = "0" * 40


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:8.1f} ms  p95 {pct(values, 0.95) * 1000:8.1f} ms"


class ReadyTimes(logging.Handler):
    """The pool's `pool.vm_ready` events: how long each pool VM took to boot."""

    def __init__(self) -> None:
        super().__init__()
        self.boot_s: list[float] = []
        self.restore_s: list[float] = []
        self.ready = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "pool.vm_ready":
            fields = record.fields  # type: ignore[attr-defined]
            (self.restore_s if fields["restored"] else self.boot_s).append(fields["boot_s"])
            self.ready.set()


def write_map(directory: Path, *, warm: bool, noop: bool, snapshot: bool) -> Path:
    document = yaml.safe_load((IMAGE / "image-map.yaml").read_text())
    demo = document["images"]["demo"]
    if noop:
        demo = {"backend": "noop", "local_path": "/nonexistent/demo.img", "cpus": 1, "memory_mb": 256}
    if warm:
        demo["warm"] = {"ready": 1, "snapshot": snapshot}
    document["images"] = {"demo": demo}
    path = directory / f"map-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def run_jobs(mode: str, jobs: int, network: str, ready_times: ReadyTimes) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    state = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))  # short: job ports are unix sockets
    map_path = write_map(state, warm=mode in ("warm", "restore"), noop=mode == "floor", snapshot=mode == "restore")
    settings = DaemonSettings(
        amqp_url=AMQP_URL, amqp_prefix=prefix, config=map_path, state_dir=state / "state",
        backend=BackendName.NOOP if mode == "floor" else BackendName.LIBVIRT, max_concurrency=2, host_cpus=4,
        host_memory_mb=2048, host_name="bench", http_listen="off", heartbeat_s=3600, libvirt_domain_type="qemu",
        libvirt_network=None if network == "none" else network, orchestrator_id=prefix, image_dir=IMAGE,
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    topology = Topology(prefix)
    connection = await aio_pika.connect_robust(AMQP_URL)
    latencies: list[float] = []
    try:
        channel = await connection.channel()
        results_exchange = await channel.declare_exchange(topology.results, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(results_exchange, routing_key="#")
        jobs_exchange = await channel.get_exchange(topology.jobs)
        async with queue.iterator() as results:
            for _ in range(jobs):
                if mode in ("warm", "restore"):
                    while daemon.pools.status().get("demo", {}).get("ready", 0) < 1:
                        ready_times.ready.clear()
                        await asyncio.wait_for(ready_times.ready.wait(), timeout=300)
                request = JobRequest(
                    request_id=uuid.uuid4(), runs_on="demo", repo_url="https://example.invalid/bench.git", commit_sha=SHA,
                    script="echo first command",
                )
                await jobs_exchange.publish(aio_pika.Message(request.model_dump_json().encode()), routing_key="demo")
                async for message in results:
                    async with message.process():
                        result = JobResult.model_validate_json(message.body)
                    if result.request_id == request.request_id:
                        break
                if result.status is not JobStatus.SUCCEEDED or "to_first_command_s" not in result.timings:
                    raise SystemExit(f"{mode}: job {result.request_id} {result.status.value}: {result.summary}")
                latencies.append(result.timings["to_first_command_s"])
    finally:
        await connection.close()
        await daemon.stop()
        await delete_topology(topology)
    return latencies


async def delete_topology(topology: Topology) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await delete_queues_and_exchanges(await connection.channel(), topology, ["demo"])
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--network", default="none", help="libvirt network for the VMs (default: none, no NIC)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ready_times = ReadyTimes()
    pool_log = logging.getLogger("orchestrator.warmpool")
    pool_log.addHandler(ready_times)
    pool_log.setLevel(logging.INFO)
    pool_log.propagate = False
    floor = await run_jobs("floor", args.jobs, args.network, ready_times)
    cold = await run_jobs("cold", args.jobs, args.network, ready_times)
    warm = await run_jobs("warm", args.jobs, args.network, ready_times)
    restore = await run_jobs("restore", args.jobs, args.network, ready_times)
    print(f"job accepted -> first command, {args.jobs} jobs each, one at a time (test image, QEMU software emulation)")
    print(f"floor (noop backend, no VM):  {fmt(floor)}")
    print(f"cold boot:                    {fmt(cold)}")
    print(f"warm pool:                    {fmt(warm)}   = {pct(cold, 0.5) / pct(warm, 0.5):.0f}x faster than cold at p50, "
          f"{pct(warm, 0.95) / max(pct(floor, 0.95), 1e-6):.1f}x the floor at p95")
    print(f"snapshot restore:             {fmt(restore)}   = {pct(cold, 0.5) / pct(restore, 0.5):.0f}x faster than cold at p50")
    booted, restored = ready_times.boot_s, ready_times.restore_s
    print(f"pool VM boot -> ready:        {fmt(booted)}   over {len(booted)} pool VMs (a refill)")
    print(f"pool VM restore -> ready:     {fmt(restored)}   over {len(restored)} pool VMs "
          f"= {pct(booted, 0.5) / pct(restored, 0.5):.1f}x faster than boot at p50")


if __name__ == "__main__":
    asyncio.run(main())
