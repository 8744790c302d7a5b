"""Hostile HTTP clients against a daemon (noop backend) in a child process with
RLIMIT_NOFILE 1024 and the default HTTP limits.

For (a) no load, (b) 2,000 connections that never send a byte, held open, and (c) 500
log streams opened at once on a running job, held while the jobs run, then dropped
without a goodbye: enqueue->result p50/p99 of 200 paced zero-length jobs, /healthz
p50/p99 on a keep-alive connection opened before the load, the daemon's descriptors
and RSS before, at their peak during, and 10 s after. Then the daemon's RSS while a
client downloads a job's 1 GiB log whole.

Checks: every job succeeds under each load, p99 within 2x of (a), descriptors back
within 20 of the baseline 10 s after, RSS growth serving the 1 GiB log < 50 MB.
Run: .venv/bin/python bench/hostile.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.core.config import Settings
from orchestrator.core.imagemap import parse_image_map
from orchestrator.core.messages import JobRequest, JobResult, JobStatus
from orchestrator.core.topology import Topology, declare_topology, delete_topology
from tests.support.daemonproc import DaemonProcess
from tests.support.procstat import PeakUse, Use, ensure_own_descriptors, use_of, with_limits
from tests.support.rawhttp import Connection, close_all, closed_by_peer, metric, open_idle, request_head, scrape
from tests.web.test_httpapi import free_port

MAP = """\
default_label: bench
images:
  bench: {backend: noop, local_path: /nonexistent, cpus: 1, memory_mb: 64}
"""
FD_LIMIT = 1024
MB = 1_000_000
LINE = b"%08d a console line of a job that prints a lot, as a guest would over its serial port\r\n"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nan for no values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Jobs:
    """Publishes jobs and times each from publish to its result."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, jobs: aio_pika.abc.AbstractExchange) -> None:
        self._channel, self._jobs = channel, jobs
        self.sent: dict[str, float] = {}
        self.results: dict[str, tuple[float, JobResult]] = {}
        self._arrived = asyncio.Event()

    async def listen(self, results: aio_pika.abc.AbstractExchange) -> None:
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(results, routing_key="#")
        await queue.consume(self._on_result, no_ack=True)

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        result = JobResult.model_validate_json(message.body)
        self.results[str(result.request_id)] = (time.perf_counter(), result)
        self._arrived.set()

    async def submit(self, **env: str) -> str:
        request = JobRequest(
            request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40, runs_on="bench", env=env
        )
        self.sent[request.job_id] = time.perf_counter()
        await self._jobs.publish(
            aio_pika.Message(request.model_dump_json().encode(), delivery_mode=2), routing_key="bench"
        )
        return request.job_id

    async def wait(self, job_ids: list[str], timeout_s: float) -> list[JobResult]:
        async with asyncio.timeout(timeout_s):
            while any(j not in self.results for j in job_ids):
                self._arrived.clear()
                await self._arrived.wait()
        return [self.results[j][1] for j in job_ids]

    def latencies_ms(self, job_ids: list[str]) -> list[float]:
        return [(self.results[j][0] - self.sent[j]) * 1000 for j in job_ids]


async def healthz_probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> tuple[list[float], int]:
    """/healthz latencies (ms) every 10 ms until `stop`, and how many failed."""
    latencies, failures = [], 0
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with http.get(url) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok:
            latencies.append((time.perf_counter() - t0) * 1000)
        else:
            failures += 1
        await asyncio.sleep(0.01)
    return latencies, failures


@dataclass
class Phase:
    name: str
    before: Use
    peak: Use
    after: Use
    jobs_ms: list[float]
    failed_jobs: int
    healthz_ms: list[float]
    healthz_failures: int
    note: str


Load = Callable[[], Awaitable[tuple[Callable[[], object], str]]]


async def run_phase(name: str, pid: int, jobs: Jobs, base: str, load: Load, count: int) -> Phase:
    """Put `load` on, run `count` jobs paced at 50/s with /healthz probed meanwhile, take
    the load off, wait 10 s."""
    before = use_of(pid)
    peak = PeakUse(pid)
    # The /healthz client: one keep-alive connection, opened before the load (as a
    # monitoring agent holds one; a new connection may meet the connection cap).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        await (await http.get(f"{base}/healthz")).read()
        take_off, note = await load()
        stop = asyncio.Event()
        probe = asyncio.create_task(healthz_probe(http, f"{base}/healthz", stop))
        try:
            ids = []
            for _ in range(count):
                ids.append(await jobs.submit())
                await asyncio.sleep(0.02)
            results = await jobs.wait(ids, timeout_s=60)
        finally:
            stop.set()
            healthz_ms, healthz_failures = await probe
            during = await peak.stop()
    take_off()
    await asyncio.sleep(10)
    return Phase(
        name,
        before,
        during,
        use_of(pid),
        jobs.latencies_ms(ids),
        sum(r.status is not JobStatus.SUCCEEDED for r in results),
        healthz_ms,
        healthz_failures,
        note,
    )


def idle_load(port: int, count: int) -> Load:
    async def put_on() -> tuple[Callable[[], object], str]:
        idle = await open_idle(port, count)
        await asyncio.sleep(0.2)
        held = sum(not closed_by_peer(c) for c in idle)
        note = f"{held} of {count} idle connections held by the daemon, the rest closed at once"
        # The client never lets go before the 10 s are over: the daemon's header timeout
        # must end them by itself.
        return lambda: asyncio.get_running_loop().call_later(10.5, close_all, idle), note

    return put_on


def stream_load(port: int, job_id: str, count: int) -> Load:
    async def put_on() -> tuple[Callable[[], object], str]:
        async def one() -> tuple[int, Connection | None]:
            try:
                status, _, connection = await request_head(port, f"/jobs/{job_id}/log/stream")
                return status, connection
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return 0, None  # refused at the connection cap

        opened = await asyncio.gather(*[one() for _ in range(count)])
        connections = [c for _, c in opened if c is not None]
        statuses = [s for s, _ in opened]
        note = (
            f"{statuses.count(200)} streams served, {statuses.count(503)} answered 503, "
            f"{statuses.count(0)} connections closed at the cap"
        )
        return lambda: close_all(connections), note

    return put_on


async def no_load() -> tuple[Callable[[], object], str]:
    return lambda: None, ""


@asynccontextmanager
async def daemon_and_broker(url: str, state: Path, port: int) -> AsyncIterator[tuple[DaemonProcess, Jobs]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    config = state / "map.yaml"
    config.write_text(MAP)
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    defaults = Settings.model_fields  # the daemon declares with its defaults: so must we
    declared = await declare_topology(
        connection,
        topology,
        parse_image_map(MAP, filename="map", base_dir=state),
        delivery_limit=defaults["delivery_limit"].default,
        dlq_max_length=defaults["dlq_max_length"].default,
        quorum_size=defaults["quorum_size"].default,
    )
    await declared.channel.close()
    jobs = Jobs(channel, await channel.get_exchange(topology.jobs))
    await jobs.listen(await channel.get_exchange(topology.results))
    env = {
        "AMQP_URL": url,
        "AMQP_PREFIX": prefix,
        "ORCH_CONFIG": str(config),
        "STATE_DIR": str(state / "state"),
        "ORCH_BACKEND": "noop",
        "HOST_NAME": "bench",
        "HOST_CPUS": "64",
        "HOST_MEMORY_MB": "65536",
        "MAX_CONCURRENCY": "8",
        "HEARTBEAT_S": "3600",
        "DRAIN_TIMEOUT_S": "1",
        "HTTP_LISTEN": f"127.0.0.1:{port}",
    }
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(FD_LIMIT, FD_LIMIT))).start()
    try:
        yield daemon, jobs
    finally:
        await daemon.stop()
        await delete_topology(channel, topology, ["bench"])
        await connection.close()


async def serve_big_log(
    pid: int, jobs: Jobs, base: str, console_dir: Path, size: int
) -> tuple[int, int, int, int, float, bool]:
    """A job whose console grows past `size` bytes while it runs, then downloaded whole:
    (RSS before, peak RSS during, bytes of text expected, bytes received, seconds,
    whether the job succeeded)."""
    job_id = await jobs.submit(NOOP_OUTPUT="start", NOOP_DURATION_S="8")
    console = console_dir / f"{job_id}.console"
    while not console.exists():
        await asyncio.sleep(0.05)
    lines_per_block = 10_000
    block = b"".join(LINE % i for i in range(lines_per_block))
    blocks = -(-size // len(block))
    with console.open("ab") as out:  # the guest printing a lot, CRLF as a serial port writes it
        for _ in range(blocks):
            out.write(block)
    [result] = await jobs.wait([job_id], timeout_s=60)
    expected = console.stat().st_size - blocks * lines_per_block  # each CRLF is served as LF
    before = use_of(pid).rss_bytes
    peak = PeakUse(pid, interval_s=0.05)
    received = 0
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.get(f"{base}/jobs/{job_id}/log") as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
    seconds = time.perf_counter() - t0
    during = await peak.stop()
    return before, during.rss_bytes, expected, received, seconds, result.status is JobStatus.SUCCEEDED


def show(phase: Phase) -> None:
    j, h = phase.jobs_ms, phase.healthz_ms
    print(
        f"{phase.name:28} jobs p50 {pct(j, 0.5):6.1f} ms  p99 {pct(j, 0.99):6.1f} ms  failed {phase.failed_jobs}   "
        f"/healthz p50 {pct(h, 0.5):5.2f} ms  p99 {pct(h, 0.99):6.2f} ms ({len(h)} ok, {phase.healthz_failures} failed)"
    )
    print(
        f"{'':28} fds {phase.before.fds} -> peak {phase.peak.fds} -> {phase.after.fds} 10 s after   "
        f"RSS {phase.before.rss_bytes / MB:.0f} -> peak {phase.peak.rss_bytes / MB:.0f} -> {phase.after.rss_bytes / MB:.0f} MB"
        + (f"   ({phase.note})" if phase.note else "")
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--log-bytes", type=int, default=1 << 30)
    args = parser.parse_args()
    if not ensure_own_descriptors(args.idle + args.streams + 500):
        print(f"this process cannot hold {args.idle} connections: raise its hard RLIMIT_NOFILE")
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        async with daemon_and_broker(args.amqp_url, state, port) as (daemon, jobs):
            assert daemon.process is not None
            pid = daemon.process.pid
            await jobs.wait([await jobs.submit() for _ in range(20)], timeout_s=30)  # warm-up
            watched = await jobs.submit(NOOP_OUTPUT="watched", NOOP_DURATION_S="600")  # what the streams follow
            phases = [
                await run_phase("(a) no load", pid, jobs, base, no_load, args.jobs),
                await run_phase(
                    f"(b) {args.idle} idle connections", pid, jobs, base, idle_load(port, args.idle), args.jobs
                ),
                await run_phase(
                    f"(c) {args.streams} streams dropped",
                    pid,
                    jobs,
                    base,
                    stream_load(port, watched, args.streams),
                    args.jobs,
                ),
            ]
            metrics = await scrape(port)
            big = await serve_big_log(pid, jobs, base, state / "state" / "logs", args.log_bytes)
        refusal_lines = len(daemon.events("http.connections_refused")) + len(daemon.events("http.streams_refused"))
        tracebacks = sum("Traceback" in line for line in daemon.lines)

    for phase in phases:
        show(phase)
    rss_before, rss_peak, expected, received, seconds, big_ok = big
    big_log = f"{args.log_bytes / 2**30:.2f} GiB log"
    print(
        f"{big_log} download: RSS {rss_before / MB:.0f} -> peak {rss_peak / MB:.0f} MB "
        f"(+{(rss_peak - rss_before) / MB:.1f} MB), {received / MB:.0f} MB in {seconds:.1f} s ({received / MB / seconds:.0f} MB/s)"
    )
    refused = {
        setting: int(metric(metrics, "orchestrator_http_refused_total", f'{{setting="{setting}"}}'))
        for setting in ("HTTP_MAX_CONNECTIONS", "HTTP_MAX_STREAMS")
    }
    print(
        f"refused (from /metrics): {refused}; refusal log lines: {refusal_lines}; tracebacks in the log: {tracebacks}"
    )

    floor = phases[0]
    checks = [(f"{p.name}: every job succeeded", p.failed_jobs == 0) for p in phases]
    checks += [
        (
            f"{p.name}: p99 {pct(p.jobs_ms, 0.99):.1f} ms within 2x of no load ({pct(floor.jobs_ms, 0.99):.1f} ms)",
            pct(p.jobs_ms, 0.99) <= 2 * pct(floor.jobs_ms, 0.99),
        )
        for p in phases[1:]
    ]
    checks += [
        (
            f"{p.name}: descriptors 10 s after {p.after.fds} within 20 of the baseline {floor.before.fds}",
            p.after.fds <= floor.before.fds + 20,
        )
        for p in phases
    ]
    checks += [
        (f"{big_log}: RSS growth {(rss_peak - rss_before) / MB:.1f} MB < 50 MB", rss_peak - rss_before < 50 * MB),
        (f"{big_log}: all {expected} bytes of its text received, its job succeeded", received == expected and big_ok),
        ("no tracebacks in the daemon's log", tracebacks == 0),
    ]
    for text, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
