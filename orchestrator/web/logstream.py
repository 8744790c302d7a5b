"""A job's console as server-sent events (`/jobs/{job_id}/log/stream`, and the dashboard's
`/fleet/jobs/{job_id}/log/stream` when the job is on this host): one event per line,
live while the job runs, ending with an `end` event; `Last-Event-ID` resumes. At most
`HTTP_MAX_STREAMS` are served at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from orchestrator.core.httpserver import HttpLoad
from orchestrator.web.joblog import LineFollower

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
STREAM_RETRY_AFTER_S = 10


class LogSource(Protocol):
    """Where a host keeps its jobs' consoles."""

    @property
    def host_name(self) -> str: ...

    def job_running(self, job_id: str) -> bool: ...

    def console_path(self, job_id: str) -> Path: ...


def has_log(source: LogSource, job_id: str) -> bool:
    """This host has the job's log, or will have (it runs the job)."""
    return source.job_running(job_id) or source.console_path(job_id).is_file()


def refuse_stream(load: HttpLoad) -> None:
    """Raise 503 when `HTTP_MAX_STREAMS` log streams are being served already."""
    if load.streams >= load.limits.max_streams:
        load.streams_refused.note()
        raise web.HTTPServiceUnavailable(
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
            text=f"too many log streams: {load.streams} being served, HTTP_MAX_STREAMS is {load.limits.max_streams}; retry later\n",
        )


async def stream_log(request: web.Request, view: LogSource, load: HttpLoad, job_id: str) -> web.StreamResponse:
    """This host's console of `job_id` as server-sent events (`/jobs/{job_id}/log/stream`);
    404 when this host has no log of it."""
    refuse_stream(load)
    path = view.console_path(job_id)
    if not has_log(view, job_id):
        raise web.HTTPNotFound(text=f"no log for job {job_id} on host {view.host_name}\n")
    resume = request.headers.get("Last-Event-ID", "")
    # isdigit alone passes "²", which int() refuses: ASCII digits only.
    offset = int(resume) if resume.isascii() and resume.isdigit() and len(resume) < 20 else 0
    size = path.stat().st_size if path.is_file() else 0
    follower = LineFollower(path, min(offset, size))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    load.streams += 1
    try:
        await response.prepare(request)
        await _send_events(request, response, follower, lambda: view.job_running(job_id))
    except ConnectionError:  # reset, or lost while a write waited (aiohttp raises both)
        pass  # the client went away while we wrote: the stream is over, nothing to log
    finally:
        load.streams -= 1
    return response


async def _send_events(
    request: web.Request, response: web.StreamResponse, follower: LineFollower, running: Callable[[], bool]
) -> None:
    """Send the console's lines as events until the job has ended and every line is sent
    (then an `end` event), or until the client goes away (checked before every read, so
    a stream nobody reads ends within one poll)."""
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while request.transport is not None and not request.transport.is_closing():
        ended = not running()
        before = follower.offset
        # Read by chunk even once the job has ended, so a huge log is never held whole.
        lines = await asyncio.to_thread(follower.read_marked_lines, final=ended)
        if lines:
            # One event per line, each with its id (the file offset after it): a client
            # cut anywhere resumes after the last line it got (Last-Event-ID).
            await response.write("".join(f"id: {end}\ndata: {line}\n\n" for line, end in lines).encode())
            quiet_since = loop.time()
        elif ended and follower.offset == before:
            await response.write(b"event: end\ndata: \n\n")
            return
        elif loop.time() - quiet_since > SSE_KEEPALIVE_S:
            await response.write(b": keep-alive\n\n")  # finds a peer that went away
            quiet_since = loop.time()
        if not ended and not lines:
            await asyncio.sleep(SSE_POLL_S)
