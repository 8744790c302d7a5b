"""The daemon's HTTP endpoints (aiohttp, loopback by default).

- `GET /healthz`: the process is up.
- `GET /readyz`: 200 when the broker connection is open and the host takes work; 503
  with the reasons otherwise (broker away, draining). `broker_node` names the node.
- `GET /status`: capacity, running jobs, image preparation (state, bytes, progress).
- `GET /metrics`: Prometheus, from a registry of this app's own (no global state).
- `GET /jobs/{job_id}/log`: the job's console log as text with `\\n` line ends, streamed
  from the file (never read whole), with `Range` support so downloads resume.
- `GET /jobs/{job_id}/log/stream`: the same as server-sent events, one event per console
  line, live while the job runs, ending with an `end` event; `Last-Event-ID` resumes.
- `GET /jobs?state=&label=&since=&limit=`: this host's jobs, newest first; `GET
  /jobs/{job_id}`: one job (request without secrets, result, timings). JSON errors.
- `POST /drain`, `POST /resume`: take the host out of service and back (journaled).
- `GET /openapi.json`: the OpenAPI 3.1 document of every endpoint (`orchestrator/openapi.json`).
- The dashboard (`GET /`) and the fleet-wide endpoints it reads: `orchestrator.web.dashboard`.

With `HTTP_TOKEN` set, every endpoint but `/healthz` answers 401 without
`Authorization: Bearer <token>` or a session cookie from `POST /login`
(`orchestrator.web.sessions`); `GET /` then answers with the sign-in form. The app sees the
daemon only through `HostView` (and the fleet through `Fleet`): it reads, and it changes
nothing but draining states.

HTTP clients are not trusted, so what they can hold is bounded (`HttpLimits`, served by
`orchestrator.core.httpserver`): open connections, the time to send request headers, and
log streams at once (beyond that, 503 with `Retry-After`). Refusals are counted on
`/metrics` and logged at most once a minute with their count; none of it touches a job.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.core.fleet import Fleet
from orchestrator.core.httpserver import HttpLimits, HttpLoad, headers_arrived, serve_within_limits
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import Heartbeat
from orchestrator.web import dashboard
from orchestrator.web.hostview import HostView
from orchestrator.web.joblog import LogText
from orchestrator.web.logstream import stream_log
from orchestrator.web.sessions import Access

log = EventLogger("orchestrator.http")

# Read once at import: it is package data, and the app serves it as it is.
OPENAPI_DOCUMENT = resources.files(__package__).joinpath("openapi.json").read_bytes()


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
        yield GaugeMetricFamily(
            "orchestrator_broker_connected", "1 while the broker connection is open", value=float(m.broker_connected)
        )
        finished = CounterMetricFamily("orchestrator_jobs_finished", "Jobs finished on this host", labels=["status"])
        for status, count in sorted(m.finished_by_status.items()):
            finished.add_metric([status], count)
        yield finished
        yield CounterMetricFamily(
            "orchestrator_results_published", "Results confirmed by the broker", value=m.results_published
        )
        if m.state_dir_bytes is not None:
            yield GaugeMetricFamily(
                "orchestrator_state_dir_bytes", "Disk used under STATE_DIR", value=m.state_dir_bytes
            )
        if m.dlq_messages is not None:
            yield GaugeMetricFamily(
                "orchestrator_dlq_messages", "Messages in the dead-letter queue", value=m.dlq_messages
            )
        warm = GaugeMetricFamily("orchestrator_warm_vms", "Warm pool VMs no job has taken", labels=["label", "state"])
        for (label, state), count in sorted(m.warm_vms.items()):
            warm.add_metric([label, state], count)
        yield warm
        failed = CounterMetricFamily(
            "orchestrator_warm_failed", "Pool VMs that did not come up or died waiting", labels=["label"]
        )
        for label, count in sorted(m.warm_failed.items()):
            failed.add_metric([label], count)
        yield failed
        taken = CounterMetricFamily("orchestrator_warm_taken", "Jobs that took a warm pool VM", labels=["label"])
        for label, count in sorted(m.warm_taken.items()):
            taken.add_metric([label], count)
        yield taken
        yield CounterMetricFamily(
            "orchestrator_warm_fallbacks", "Jobs booted cold after their hand-off failed", value=m.warm_fallbacks
        )
        wanted = GaugeMetricFamily(
            "orchestrator_warm_wanted", "Ready pool VMs the image map asks for (warm.ready)", labels=["label"]
        )
        for label, count in sorted(m.warm_wanted.items()):
            wanted.add_metric([label], count)
        yield wanted


class _LoadCollector(Collector):
    def __init__(self, load: HttpLoad) -> None:
        self._load = load

    def collect(self) -> Any:
        load = self._load
        yield GaugeMetricFamily(
            "orchestrator_http_connections", "Open HTTP connections (HTTP_MAX_CONNECTIONS)", value=load.connections
        )
        yield GaugeMetricFamily(
            "orchestrator_http_streams", "Log streams being served (HTTP_MAX_STREAMS)", value=load.streams
        )
        refused = CounterMetricFamily(
            "orchestrator_http_refused", "Connections and log streams refused at their limit", labels=["setting"]
        )
        for refusals in (load.connections_refused, load.streams_refused):
            refused.add_metric([refusals.setting], refusals.total)
        yield refused


def draining_answer(beat: Heartbeat) -> dict[str, object]:
    return {"host": beat.host, "draining": beat.draining, "running": beat.running}


def _job_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["job_id"]))
    except ValueError:
        raise web.HTTPBadRequest(text="job_id must be a job's request_id (a UUID)\n") from None


async def _drain_in_thread(response: web.StreamResponse, chunks: Iterator[bytes]) -> None:
    """Write an iterator that reads files (blocking) without blocking the loop. When the
    client has gone (ConnectionResetError), a generator is closed first, so its file is
    closed now rather than whenever the last reference to it goes."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        try:
            await response.write(chunk)
        except ConnectionError:  # reset, or lost while a write waited (aiohttp raises both)
            if isinstance(chunks, Generator):
                chunks.close()  # no thread is reading it here: `next` has returned
            raise


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


def build_app(
    view: HostView,
    *,
    token: str | None,
    load: HttpLoad,
    metrics: CollectorRegistry | None = None,
    fleet: Fleet | None = None,
    public_url: str | None = None,
) -> web.Application:
    """The app; it counts its log streams in `load` and shows `load` on `/metrics`, and
    `metrics` there too (the daemon's histograms, which it records as things happen).
    The dashboard reads the rest of the fleet through `fleet` (503 without one)."""
    access = Access(token, public_url=public_url)
    registry = CollectorRegistry()
    registry.register(_ViewCollector(view))
    registry.register(_LoadCollector(load))
    if metrics is not None:
        registry.register(metrics)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "host": view.host_name})

    async def readyz(_: web.Request) -> web.Response:
        reasons = view.not_ready_reasons()
        body = {
            "ready": not reasons,
            "broker": "connected" if view.broker_connected else "disconnected",
            "broker_node": view.broker_node,
            "reasons": reasons,
        }
        return web.json_response(body, status=200 if not reasons else 503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(view.status())

    async def metrics_text(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_DOCUMENT, content_type="application/json")

    def log_file(request: web.Request) -> tuple[str, Path]:
        """The job's console; a job that runs here and has printed nothing yet has one
        to come (its VM may not have created the file yet)."""
        job_id = _job_id(request)
        path = view.console_path(job_id)
        if not path.is_file() and not view.job_running(job_id):
            raise web.HTTPNotFound(text=f"no log for job {job_id} on host {view.host_name}\n")
        return job_id, path

    async def job_log(request: web.Request) -> web.StreamResponse:
        _, path = log_file(request)
        text = LogText(path)
        try:
            extent = await asyncio.to_thread(text.measure)
        except FileNotFoundError:  # running, nothing printed yet
            return web.Response(text="", content_type="text/plain", charset="utf-8")
        wanted = _text_range(request, extent.text_size)
        start, stop = wanted or (0, extent.text_size)
        raw_start = await asyncio.to_thread(text.raw_offset, start, extent.raw_size) if start else 0
        response = web.StreamResponse(status=206 if wanted else 200, headers={"Accept-Ranges": "bytes"})
        response.content_type, response.charset = "text/plain", "utf-8"
        response.content_length = stop - start
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{extent.text_size}"
        await response.prepare(request)
        try:
            await _drain_in_thread(response, text.text(raw_start, extent.raw_size, limit=stop - start))
            await response.write_eof()
        except ConnectionError:  # reset, or lost while a write waited (aiohttp raises both)
            pass  # the client went away mid-download: nobody to answer, nothing to log
        return response

    async def job_log_stream(request: web.Request) -> web.StreamResponse:
        return await stream_log(request, view, load, _job_id(request))

    def json_error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def jobs(request: web.Request) -> web.Response:
        query = dashboard.jobs_query(request)
        if isinstance(query, web.Response):
            return query
        found = await view.jobs(query)
        return web.json_response({"host": view.host_name, "jobs": [job.model_dump(mode="json") for job in found]})

    async def job(request: web.Request) -> web.Response:
        try:
            job_id = str(uuid.UUID(request.match_info["job_id"]))
        except ValueError:
            return json_error(400, "job_id must be a job's request_id (a UUID)")
        detail = await view.job(job_id)
        if detail is None:
            return json_error(404, f"no job {job_id} on host {view.host_name}")
        return web.json_response(detail.model_dump(mode="json"))

    async def drain(_: web.Request) -> web.Response:
        return web.json_response(draining_answer(await view.set_draining(True)))

    async def resume(_: web.Request) -> web.Response:
        return web.json_response(draining_answer(await view.set_draining(False)))

    @web.middleware
    async def credentials(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/healthz" or (request.path == "/login" and request.method == "POST"):
            return await handler(request)
        reason = access.refusal(request)
        if reason is None:
            return await handler(request)
        if access.session(request) is not None or access.bearer(request):
            return web.json_response({"error": reason}, status=403)
        if request.path == "/" and request.method in ("GET", "HEAD"):
            return dashboard.login_page(status=401)  # a browser gets a way in
        return web.Response(status=401, text=reason + "\n")

    async def close_load(_: web.Application) -> None:
        load.close()

    app = web.Application(middlewares=[headers_arrived, credentials])
    app.on_cleanup.append(close_load)
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/status", status),
            web.get("/metrics", metrics_text),
            web.get("/jobs", jobs),
            web.get("/jobs/{job_id}", job),
            web.get("/jobs/{job_id}/log", job_log),
            web.get("/jobs/{job_id}/log/stream", job_log_stream),
            web.post("/drain", drain),
            web.post("/resume", resume),
            web.get("/openapi.json", openapi),
        ]
    )
    dashboard.add_routes(app, view=view, fleet=fleet, access=access, load=load)
    return app


async def start_http(
    view: HostView,
    listen: str,
    *,
    token: str | None,
    limits: HttpLimits | None = None,
    metrics: CollectorRegistry | None = None,
    fleet: Fleet | None = None,
    public_url: str | None = None,
) -> web.AppRunner:
    """Serve the daemon's API on `listen` within `limits`, with `metrics` on `/metrics`.
    Raises OSError when the address is taken."""
    load = HttpLoad(limits or HttpLimits())
    app = build_app(view, token=token, load=load, metrics=metrics, fleet=fleet, public_url=public_url)
    return await serve_within_limits(app, listen, load)
