"""Start latency: job accepted → the job's first command, cold boot against a warm pool.

Real libvirt + QEMU (software emulation), the real broker, the daemon in this process,
on the tiny test image, or with --real on a real cloud image: Debian bookworm with
Debian's cloud-init (bench/realimage.py builds it once with debootstrap and caches it).
In one run, over --jobs jobs each (p50/p95 of the result's `timings.to_first_command_s`,
which the daemon measures from the guest's start line):
  floor  the noop backend: the daemon's own path (journal, ack, spec, console) with no VM;
  cold   the image booted per job (no `warm:`);
  warm   `warm: {ready: 1}`: each job is submitted once a pool VM is ready, so it takes one;
  restore `warm: {ready: 1, snapshot: true}`: the same, pool VMs restored from a template;
  burst  `warm: {ready: 2, snapshot: true}`: two jobs at once once both are ready, their
         refills held until the jobs' first commands (as the daemon does), then again
         with the refills started at once (`refill-at-once`): what a refill costs a
         hand-off under way;
and how long a pool VM takes to be ready: booted (boot → ready line) against restored
(restore → ready line), from the pool's own log.
Jobs run one at a time (but for the burst) so that boots do not compete for the CPU.
Run: .venv/bin/python bench/start_latency.py [--real]  (as root, after bash scripts/bootstrap-host.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import realimage

from hypervisors.base import BackendName
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobRequest, JobResult, JobStatus
from orchestrator.core.topology import Topology
from orchestrator.core.topology import delete_topology as delete_queues_and_exchanges
from orchestrator.host import warmpool
from orchestrator.host.daemon import Daemon


@dataclass(frozen=True)
class Image:
    """The image under test: its map (one label), where its files are, its name."""

    map_path: Path
    label: str
    image_dir: Path
    name: str
    memory_mb: int


TEST_IMAGE = Image(
    Path("/var/cache/orchestrator/test-image/image-map.yaml"),
    "demo",
    Path("/var/cache/orchestrator/test-image"),
    "test image",
    256,
)
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


POOL_READY = {"warm": 1, "restore": 1, "burst": 2, "refill-at-once": 2}


def write_map(directory: Path, image: Image, mode: str) -> Path:
    document = yaml.safe_load(image.map_path.read_text())
    entry = document["images"][image.label]
    if mode == "floor":
        entry = {"backend": "noop", "local_path": f"/nonexistent/{image.label}.img", "cpus": 1, "memory_mb": 256}
    if mode in POOL_READY:
        entry["warm"] = {"ready": POOL_READY[mode], "snapshot": mode != "warm"}
    document["images"] = {image.label: entry}
    document["default_label"] = image.label
    path = directory / f"map-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def pool_ready(daemon: Daemon, label: str) -> int:
    ready = daemon.pools.status().get(label, {}).get("ready", 0) if daemon.pools is not None else 0
    return ready if isinstance(ready, int) else 0


async def run_jobs(mode: str, jobs: int, network: str, ready_times: ReadyTimes, image: Image) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    state = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))  # short: job ports are unix sockets
    map_path = write_map(state, image, mode)
    # The daemon holds a pool's refills until a taken VM's job has begun; refill-at-once
    # measures what that saves a hand-off.
    warmpool.HAND_OFF_FIRST_S = 0.0 if mode == "refill-at-once" else 10.0
    settings = DaemonSettings(
        amqp_url=AMQP_URL,
        amqp_prefix=prefix,
        config=map_path,
        state_dir=state / "state",
        backend=BackendName.NOOP if mode == "floor" else BackendName.LIBVIRT,
        max_concurrency=3,
        host_cpus=4,
        host_memory_mb=4 * image.memory_mb,
        host_name="bench",
        http_listen="off",
        heartbeat_s=3600,
        libvirt_domain_type="qemu",
        libvirt_network=None if network == "none" else network,
        orchestrator_id=prefix,
        image_dir=image.image_dir,
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
        at_once = 2 if mode in ("burst", "refill-at-once") else 1
        async with queue.iterator() as results:
            for _ in range(0, jobs, at_once):
                if mode in POOL_READY:
                    while pool_ready(daemon, image.label) < POOL_READY[mode]:
                        ready_times.ready.clear()
                        await asyncio.wait_for(ready_times.ready.wait(), timeout=900)
                requests = [
                    JobRequest(
                        request_id=uuid.uuid4(),
                        runs_on=image.label,
                        repo_url="https://example.invalid/bench.git",
                        commit_sha=SHA,
                        script="echo first command",
                    )
                    for _ in range(at_once)
                ]
                for request in requests:
                    await jobs_exchange.publish(
                        aio_pika.Message(request.model_dump_json().encode()), routing_key=image.label
                    )
                waiting = {request.request_id for request in requests}
                async for message in results:
                    async with message.process():
                        result = JobResult.model_validate_json(message.body)
                    if result.request_id not in waiting:
                        continue
                    waiting.discard(result.request_id)
                    if result.status is not JobStatus.SUCCEEDED or "to_first_command_s" not in result.timings:
                        raise SystemExit(f"{mode}: job {result.request_id} {result.status.value}: {result.summary}")
                    latencies.append(result.timings["to_first_command_s"])
                    if not waiting:
                        break
    finally:
        await connection.close()
        await daemon.stop()
        await delete_topology(topology, image.label)
    return latencies


async def delete_topology(topology: Topology, label: str) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await delete_queues_and_exchanges(await connection.channel(), topology, [label])
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="jobs per mode (default: 20, with --real 8)")
    parser.add_argument("--real", action="store_true", help="Debian bookworm with cloud-init instead of the test image")
    parser.add_argument("--modes", default="floor,cold,warm,restore,burst,refill-at-once")
    parser.add_argument("--network", default="none", help="libvirt network for the VMs (default: none, no NIC)")
    args = parser.parse_args()
    jobs = args.jobs or (8 if args.real else 20)
    if args.real:
        map_path = realimage.build()
        image = Image(map_path, "bookworm", map_path.parent, "Debian bookworm, Debian's cloud-init", 1024)
    else:
        root = Path(__file__).resolve().parent.parent
        subprocess.run(
            [sys.executable, str(root / "examples" / "test-image" / "build.py"), str(TEST_IMAGE.image_dir)], check=True
        )
        image = TEST_IMAGE
    logging.basicConfig(level=logging.WARNING)
    ready_times = ReadyTimes()
    pool_log = logging.getLogger("orchestrator.host.warmpool")
    pool_log.addHandler(ready_times)
    pool_log.setLevel(logging.INFO)
    pool_log.propagate = False
    modes = args.modes.split(",")
    figures: dict[str, list[float]] = {}
    for mode in modes:
        figures[mode] = await run_jobs(mode, jobs, args.network, ready_times, image)
        print(f"{mode:15s} {fmt(figures[mode])}", flush=True)
    print(f"job accepted -> first command, {jobs} jobs each ({image.name}, QEMU software emulation)")
    cold = figures.get("cold")
    names = {
        "floor": "floor (noop backend, no VM)",
        "cold": "cold boot",
        "warm": "warm pool (booted)",
        "restore": "snapshot restore",
        "burst": "restore, 2 at once",
        "refill-at-once": "same, refill at once",
    }
    for mode, values in figures.items():
        line = f"{names[mode] + ':':30s}{fmt(values)}"
        if cold and mode not in ("floor", "cold"):
            line += f"   = {pct(cold, 0.5) / pct(values, 0.5):.0f}x faster than cold at p50, {pct(cold, 0.95) / pct(values, 0.95):.0f}x at p95"
        print(line)
    booted, restored = ready_times.boot_s, ready_times.restore_s
    if booted:
        print(f"{'pool VM boot -> ready:':30s}{fmt(booted)}   over {len(booted)} pool VMs (a refill)")
    if restored:
        print(
            f"{'pool VM restore -> ready:':30s}{fmt(restored)}   over {len(restored)} pool VMs"
            + (f" = {pct(booted, 0.5) / pct(restored, 0.5):.1f}x faster than boot at p50" if booted else "")
        )


if __name__ == "__main__":
    asyncio.run(main())
