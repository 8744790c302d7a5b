"""The daemon's HTTP endpoints (aiohttp, loopback by default).

- `GET /healthz`: the process is up.
- `GET /readyz`: 200 when the broker connection is open and the host takes work; 503
  with the reasons otherwise (broker away, draining).
- `GET /status`: capacity, running jobs, image preparation (state, bytes, progress).
- `GET /metrics`: Prometheus, from a registry of this app's own (no global state).
- `GET /jobs/{job_id}/log`: the job's console log as text with `\\n` line ends, streamed
  from the file (never read whole), with `Range` support so downloads resume.
- `GET /jobs/{job_id}/log/stream`: the same as server-sent events, one event per console
  line, live while the job runs, ending with an `end` event; `Last-Event-ID` resumes.

With `HTTP_TOKEN` set, every endpoint but `/healthz` needs `Authorization: Bearer <token>`.
The app sees the daemon only through `HostView`: it reads, it never changes anything.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.joblog import LineFollower, LogText

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """The numbers `/metrics` shows, read from the daemon at scrape time."""

    running_by_label: Mapping[str, int]
    max_concurrency: int
    cpus_used: int
    memory_mb_used: int
    broker_connected: bool
    finished_by_status: Mapping[str, int]
    results_published: int
    state_dir_bytes: int | None  # measured once a minute; None before the first time
    dlq_messages: int | None


class HostView(Protocol):
    """What the HTTP layer may know about the daemon (read-only)."""

    @property
    def host_name(self) -> str: ...

    @property
    def broker_connected(self) -> bool: ...

    def not_ready_reasons(self) -> list[str]: ...

    def status(self) -> dict[str, object]: ...

    def job_running(self, job_id: str) -> bool: ...

    def console_path(self, job_id: str) -> Path: ...

    def metrics(self) -> MetricsSnapshot: ...


class _ViewCollector(Collector):
    def __init__(self, view: HostView) -> None:
        self._view = view

    def collect(self) -> Any:
        m = self._view.metrics()
        running = GaugeMetricFamily("orchestrator_jobs_running", "Jobs with a VM on this host", labels=["label"])
        for label, count in sorted(m.running_by_label.items()):
            running.add_metric([label], count)
        yield running
        yield GaugeMetricFamily("orchestrator_max_concurrency", "MAX_CONCURRENCY", value=m.max_concurrency)
        yield GaugeMetricFamily("orchestrator_cpus_used", "vCPUs held by running VMs", value=m.cpus_used)
        yield GaugeMetricFamily("orchestrator_memory_mb_used", "MiB held by running VMs", value=m.memory_mb_used)
        yield GaugeMetricFamily("orchestrator_broker_connected", "1 while the broker connection is open", value=float(m.broker_connected))
        finished = CounterMetricFamily("orchestrator_jobs_finished", "Jobs finished on this host", labels=["status"])
        for status, count in sorted(m.finished_by_status.items()):
            finished.add_metric([status], count)
        yield finished
        yield CounterMetricFamily("orchestrator_results_published", "Results confirmed by the broker", value=m.results_published)
        if m.state_dir_bytes is not None:
            yield GaugeMetricFamily("orchestrator_state_dir_bytes", "Disk used under STATE_DIR", value=m.state_dir_bytes)
        if m.dlq_messages is not None:
            yield GaugeMetricFamily("orchestrator_dlq_messages", "Messages in the dead-letter queue", value=m.dlq_messages)


def _job_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["job_id"]))
    except ValueError:
        raise web.HTTPBadRequest(text="job_id must be a job's request_id (a UUID)\n") from None


async def _drain_in_thread(response: web.StreamResponse, chunks: Iterator[bytes]) -> None:
    """Write an iterator that reads files (blocking) without blocking the loop."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        await response.write(chunk)


def _text_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The `Range` asked for as [start, end) of the text, None for the whole text.
    Raises 416 for a range that starts past the end."""
    try:
        wanted = request.http_range
    except ValueError:
        return None  # a malformed or multi-range header: send everything (RFC 9110 allows it)
    if wanted.start is None and wanted.stop is None:
        return None
    start = wanted.start if wanted.start is not None else 0
    stop = size if wanted.stop is None else min(wanted.stop, size)
    if start < 0:  # `bytes=-N`: the last N bytes
        start, stop = max(0, size + start), size
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def build_app(view: HostView, *, token: str | None) -> web.Application:
    registry = CollectorRegistry()
    registry.register(_ViewCollector(view))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "host": view.host_name})

    async def readyz(_: web.Request) -> web.Response:
        reasons = view.not_ready_reasons()
        body = {"ready": not reasons, "broker": "connected" if view.broker_connected else "disconnected", "reasons": reasons}
        return web.json_response(body, status=200 if not reasons else 503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(view.status())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    def log_file(request: web.Request) -> tuple[str, Path]:
        job_id = _job_id(request)
        path = view.console_path(job_id)
        if not path.is_file():
            raise web.HTTPNotFound(text=f"no log for job {job_id} on host {view.host_name}\n")
        return job_id, path

    async def job_log(request: web.Request) -> web.StreamResponse:
        _, path = log_file(request)
        text = LogText(path)
        extent = await asyncio.to_thread(text.measure)
        wanted = _text_range(request, extent.text_size)
        start, stop = wanted or (0, extent.text_size)
        raw_start = await asyncio.to_thread(text.raw_offset, start, extent.raw_size) if start else 0
        response = web.StreamResponse(status=206 if wanted else 200, headers={"Accept-Ranges": "bytes"})
        response.content_type, response.charset = "text/plain", "utf-8"
        response.content_length = stop - start
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{extent.text_size}"
        await response.prepare(request)
        await _drain_in_thread(response, text.text(raw_start, extent.raw_size, limit=stop - start))
        await response.write_eof()
        return response

    async def job_log_stream(request: web.Request) -> web.StreamResponse:
        job_id, path = log_file(request)
        resume = request.headers.get("Last-Event-ID", "")
        offset = int(resume) if resume.isdigit() and len(resume) < 20 else 0
        follower = LineFollower(path, min(offset, path.stat().st_size))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while request.transport is not None and not request.transport.is_closing():
            running = view.job_running(job_id)
            lines = await asyncio.to_thread(follower.read_lines if running else follower.finish)
            if lines:
                # One event per line; the id (a file offset) rides on the last one.
                events = "".join(f"data: {line}\n\n" for line in lines[:-1])
                events += f"id: {follower.offset}\ndata: {lines[-1]}\n\n"
                await response.write(events.encode())
                quiet_since = loop.time()
            if not running:
                await response.write(b"event: end\ndata: \n\n")
                break
            if not lines:
                if loop.time() - quiet_since > SSE_KEEPALIVE_S:
                    await response.write(b": keep-alive\n\n")  # finds a peer that went away
                    quiet_since = loop.time()
                await asyncio.sleep(SSE_POLL_S)
        return response

    @web.middleware
    async def bearer_token(request: web.Request, handler: Any) -> web.StreamResponse:
        if token and request.path != "/healthz":
            # Header values arrive as str with undecodable bytes kept as surrogates:
            # encode them back the same way, so any byte sequence is just a wrong token.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                raise web.HTTPUnauthorized(text="send Authorization: Bearer <HTTP_TOKEN>\n")
        return await handler(request)

    app = web.Application(middlewares=[bearer_token])
    app.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/status", status),
        web.get("/metrics", metrics), web.get("/jobs/{job_id}/log", job_log),
        web.get("/jobs/{job_id}/log/stream", job_log_stream),
    ])
    return app


async def start_http(view: HostView, listen: str, *, token: str | None) -> web.AppRunner:
    """Serve on `listen` (`host:port`). Raises OSError when the address is taken."""
    address, _, port = listen.rpartition(":")
    runner = web.AppRunner(build_app(view, token=token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, int(port)).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
