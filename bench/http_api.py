"""The HTTP API under a dashboard's load, against the same daemon without HTTP clients.

One noop daemon in a child process (its own event loop, as in production), the real
broker. First 1,000 jobs fill its journal. Then, in one run, two phases of --seconds
each with noop jobs arriving at --rate jobs/s:
  quiet      no HTTP client;
  dashboard  --clients dashboards, each as the page does it: a log stream (SSE, through
             /fleet/jobs/<id>/log/stream) open on a running job whose console grows by a
             line every 100 ms, and /fleet and /fleet/jobs?limit=50 polled every 2 s.
Measured: dispatch latency (the result's timings.queued_s: publish -> accepted), the
daemon's event-loop lag (its own orchestrator_event_loop_lag_seconds histogram, sampled
every 0.5 s, p99 interpolated within its buckets), and, by one prober asking once a
second in both phases, /jobs and /metrics latency.
Targets: dispatch p99 with the dashboard within 1.2x of quiet, event-loop lag p99 < 20 ms.
Run: .venv/bin/python bench/http_api.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.core.messages import JobRequest, JobResult
from orchestrator.core.topology import Topology, delete_topology

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SHA = "0" * 40
MAP = """\
default_label: bench
images:
  bench: {backend: noop, local_path: /nonexistent/bench.img, cpus: 1, memory_mb: 64}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def ms(value: float) -> str:
    return f"{value * 1000:7.1f} ms"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lag_buckets(metrics_text: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the event-loop lag histogram."""
    found = []
    for match in re.finditer(r'^orchestrator_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', metrics_text, re.M):
        found.append((float("inf") if match.group(1) == "+Inf" else float(match.group(1)), float(match.group(2))))
    return found


def quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> tuple[float, int]:
    """The q-quantile of what the histogram recorded between two scrapes (linear within a
    bucket, as PromQL's histogram_quantile), and how many samples that was."""
    counts = [(bound, a - b) for (bound, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return float("nan"), 0
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower, int(total)
            share = (rank - below) / max(cumulative - below, 1e-9)
            return lower + (bound - lower) * share, int(total)
        lower, below = bound, cumulative
    return lower, int(total)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.topology = Topology(self.prefix)
        self.state = Path(tempfile.mkdtemp(prefix="bench-http-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.results: dict[uuid.UUID, JobResult] = {}
        self.arrived = asyncio.Condition()

    async def run(self) -> None:
        map_path = self.state / "map.yaml"
        map_path.write_text(MAP)
        env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "AMQP_PREFIX": self.prefix,
            "ORCH_CONFIG": str(map_path),
            "STATE_DIR": str(self.state / "state"),
            "ORCH_BACKEND": "noop",
            "MAX_CONCURRENCY": "64",
            "HOST_CPUS": "64",
            "HOST_MEMORY_MB": "65536",
            "HOST_NAME": "bench",
            "HTTP_LISTEN": f"127.0.0.1:{self.port}",
            "LOG_LEVEL": "WARNING",
            "HTTP_MAX_STREAMS": str(self.args.clients + 8),
            "DRAIN_TIMEOUT_S": "1",
        }
        daemon = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            env=env,
            cwd=ROOT,
            stderr=asyncio.subprocess.DEVNULL,
        )
        connection = await aio_pika.connect_robust(AMQP_URL)
        try:
            await self._wait_ready()
            channel = await connection.channel()
            self.jobs = await channel.get_exchange(self.topology.jobs)
            results = await channel.declare_exchange(self.topology.results, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(results, routing_key="#")
            await queue.consume(self._on_result, no_ack=True)
            progress("filling the journal with 1000 jobs")
            await self._fill(1000)
            progress("phase: quiet")
            quiet = await self._phase(clients=0)
            progress(f"phase: dashboard, {self.args.clients} clients")
            dashboard = await self._phase(clients=self.args.clients)
            self._report(quiet, dashboard)
        finally:
            daemon.terminate()
            await daemon.wait()
            await delete_topology(await connection.channel(), self.topology, ["bench"])
            await connection.close()

    async def _wait_ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"{self.base}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise SystemExit("the daemon did not become ready")

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        result = JobResult.model_validate_json(message.body)
        async with self.arrived:
            self.results[result.request_id] = result
            self.arrived.notify_all()

    async def _submit(self, **env: str) -> uuid.UUID:
        request = JobRequest(
            request_id=uuid.uuid4(),
            runs_on="bench",
            repo_url="https://example.invalid/b.git",
            commit_sha=SHA,
            script="true",
            env=env,
            timeout_s=3600,
        )
        await self.jobs.publish(aio_pika.Message(request.model_dump_json().encode()), routing_key="bench")
        return request.request_id

    async def _wait_for(self, ids: list[uuid.UUID], timeout_s: float = 120) -> None:
        async with asyncio.timeout(timeout_s), self.arrived:
            await self.arrived.wait_for(lambda: all(i in self.results for i in ids))

    async def _fill(self, count: int) -> None:
        ids = [await self._submit() for _ in range(count)]
        await self._wait_for(ids)

    async def _scrape(self, http: aiohttp.ClientSession) -> str:
        async with http.get(f"{self.base}/metrics") as response:
            return await response.text()

    async def _phase(self, *, clients: int) -> dict[str, object]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            streamed = await self._submit(
                NOOP_OUTPUT="started", NOOP_DURATION_S="3600"
            )  # a running job whose console grows
            console = self.state / "state" / "logs" / f"{streamed}.console"
            while not console.exists():
                await asyncio.sleep(0.05)
            stop = asyncio.Event()
            writer = asyncio.create_task(self._grow(console, stop))
            api_latency: dict[str, list[float]] = {"/jobs": [], "/metrics": []}
            sse_lines = [0]
            tasks = [asyncio.create_task(self._dashboard(http, streamed, stop, sse_lines)) for _ in range(clients)]
            tasks.append(asyncio.create_task(self._prober(http, stop, api_latency)))
            await asyncio.sleep(1.0 if clients else 0)  # the streams open before the clock starts
            before = lag_buckets(await self._scrape(http))
            ids = []
            start = time.monotonic()
            for n in range(int(self.args.rate * self.args.seconds)):
                await asyncio.sleep(max(0.0, start + n / self.args.rate - time.monotonic()))
                ids.append(await self._submit())
            await self._wait_for(ids)
            after = lag_buckets(await self._scrape(http))
            stop.set()
            await asyncio.gather(writer, *tasks, return_exceptions=True)
        dispatch = [self.results[i].timings["queued_s"] for i in ids]
        lag_p99, lag_samples = quantile(before, after, 0.99)
        return {
            "dispatch": dispatch,
            "lag_p99": lag_p99,
            "lag_samples": lag_samples,
            "api": api_latency,
            "sse_lines": sse_lines[0],
            "jobs": len(ids),
        }

    async def _grow(self, console: Path, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            with console.open("ab") as out:
                out.write(f"line {n} of a running job, as its guest prints it\r\n".encode())
            n += 1
            await asyncio.sleep(0.1)

    async def _dashboard(
        self, http: aiohttp.ClientSession, job: uuid.UUID, stop: asyncio.Event, lines: list[int]
    ) -> None:
        async def stream() -> None:
            async with http.get(f"{self.base}/fleet/jobs/{job}/log/stream") as response:
                async for raw in response.content:
                    if raw.startswith(b"data: "):
                        lines[0] += 1
                    if stop.is_set():
                        return

        reader = asyncio.create_task(stream())
        while not stop.is_set():
            for path in ("/fleet", "/fleet/jobs?limit=50"):
                async with http.get(f"{self.base}{path}") as response:
                    await response.read()
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except TimeoutError:
                pass
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    async def _prober(self, http: aiohttp.ClientSession, stop: asyncio.Event, latency: dict[str, list[float]]) -> None:
        while not stop.is_set():
            for path in ("/jobs", "/metrics"):
                began = time.monotonic()
                async with http.get(f"{self.base}{path}") as response:
                    await response.read()
                latency[path].append(time.monotonic() - began)
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def _report(self, quiet: dict, dashboard: dict) -> None:
        a = self.args
        print(
            f"noop daemon in a child process, 1000 jobs in its journal, {a.rate:g} jobs/s for {a.seconds:g} s per phase"
        )
        for name, phase in (("quiet (no HTTP clients)", quiet), (f"dashboard ({a.clients} SSE + polling)", dashboard)):
            d = phase["dispatch"]
            print(
                f"{name:34} dispatch p50 {ms(pct(d, 0.5))}  p99 {ms(pct(d, 0.99))}   "
                f"event-loop lag p99 {ms(phase['lag_p99'])} ({phase['lag_samples']} samples)"
            )
        for path in ("/jobs", "/metrics"):
            print(
                f"  {path:9} "
                + "   ".join(
                    f"{name} p50 {ms(pct(phase['api'][path], 0.5))}  p99 {ms(pct(phase['api'][path], 0.99))}"
                    for name, phase in (("quiet", quiet), ("dashboard", dashboard))
                )
            )
        print(f"  SSE lines delivered to the dashboards: {dashboard['sse_lines']}")
        ratio = pct(dashboard["dispatch"], 0.99) / max(pct(quiet["dispatch"], 0.99), 1e-6)
        print(
            f"dispatch p99 with the dashboard = {ratio:.2f}x quiet (target <= 1.2x); "
            f"event-loop lag p99 {dashboard['lag_p99'] * 1000:.1f} ms (target < 20 ms)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    # SIGTERM/SIGINT cancel the run, so its daemon is stopped and its queues deleted.
    run = asyncio.current_task()
    assert run is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, run.cancel)
    await Bench(args).run()


if __name__ == "__main__":
    asyncio.run(main())
