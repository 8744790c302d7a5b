"""The daemon's HTTP endpoints (aiohttp, loopback by default).

- `GET /healthz`: the process is up.
- `GET /readyz`: 200 when the broker connection is open and the host takes work; 503
  with the reason otherwise (broker away, draining).
- `GET /status`: capacity, running jobs, image preparation (state, bytes, progress).
- `GET /metrics`: Prometheus, from a registry of this daemon's own (no global state).
- `GET /jobs/{job_id}/log`: the job's console log (text); `.../log/stream`: the same as
  server-sent events, live while the job runs, ending with an `end` event.

With `HTTP_TOKEN` set, every endpoint but `/healthz` needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.console import ConsoleFollower
from orchestrator.runner import console_path

if TYPE_CHECKING:
    from orchestrator.daemon import Daemon


class DaemonCollector(Collector):
    """Reads the daemon's state at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Any:
        d = self._daemon
        running = GaugeMetricFamily("orchestrator_jobs_running", "Jobs with a VM on this host", labels=["label"])
        for label in d.image_map.images:
            running.add_metric([label], d.ledger.running_for(label))
        yield running
        yield GaugeMetricFamily("orchestrator_max_concurrency", "MAX_CONCURRENCY", value=d.ledger.max_concurrency)
        yield GaugeMetricFamily("orchestrator_cpus_used", "vCPUs held by running VMs", value=d.ledger.cpus_used)
        yield GaugeMetricFamily("orchestrator_memory_mb_used", "MiB held by running VMs", value=d.ledger.memory_mb_used)
        yield GaugeMetricFamily("orchestrator_broker_connected", "1 while the broker connection is open", value=float(d.broker_connected))
        finished = CounterMetricFamily("orchestrator_jobs_finished", "Jobs finished on this host", labels=["status"])
        if d.runner is not None:
            for status, count in d.runner.finished.items():
                finished.add_metric([status], count)
        yield finished
        if d.outbox is not None:
            yield CounterMetricFamily("orchestrator_results_published", "Results confirmed by the broker", value=d.outbox.published)


def build_app(daemon: Daemon) -> web.Application:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "host": daemon.settings.host_name})

    async def readyz(_: web.Request) -> web.Response:
        reasons = []
        if not daemon.broker_connected:
            reasons.append("broker connection is down (reconnecting)")
        if daemon.ledger.draining:
            reasons.append("host is draining")
        body = {"ready": not reasons, "broker": "connected" if daemon.broker_connected else "disconnected", "reasons": reasons}
        return web.json_response(body, status=200 if not reasons else 503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    def log_path(request: web.Request) -> Any:
        try:
            job_id = str(uuid.UUID(request.match_info["job_id"]))
        except ValueError:
            raise web.HTTPBadRequest(text="job_id must be a job's request_id (a UUID)\n") from None
        path = console_path(daemon.settings, job_id)
        if not path.exists():
            raise web.HTTPNotFound(text=f"no log for job {job_id} on host {daemon.settings.host_name}\n")
        return job_id, path

    async def job_log(request: web.Request) -> web.Response:
        _, path = log_path(request)
        body = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def job_log_stream(request: web.Request) -> web.StreamResponse:
        job_id, path = log_path(request)
        follower = ConsoleFollower(path)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        while True:
            running = daemon.runner is not None and job_id in daemon.runner.running
            before = follower.offset
            await follower.poll()
            if follower.offset > before:
                text = follower.text_since(before)
                await response.write("".join(f"data: {line}\n" for line in text.split("\n")).encode() + b"\n")
            if not running:
                await response.write(b"event: end\ndata: \n\n")
                return response
            await asyncio.sleep(0.5)

    @web.middleware
    async def bearer_token(request: web.Request, handler: Any) -> web.StreamResponse:
        token = daemon.settings.http_token
        if token and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise web.HTTPUnauthorized(text="send Authorization: Bearer <HTTP_TOKEN>\n")
        return await handler(request)

    app = web.Application(middlewares=[bearer_token])
    app.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/status", status),
        web.get("/metrics", metrics), web.get("/jobs/{job_id}/log", job_log),
        web.get("/jobs/{job_id}/log/stream", job_log_stream),
    ])
    return app


async def start_http(daemon: Daemon, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
