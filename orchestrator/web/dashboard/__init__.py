"""The dashboard: one page (`GET /`, with `/dashboard/app.js` and `/dashboard/style.css`,
package data served as they are: no build step, nothing from elsewhere) and the
endpoints it reads, which any daemon answers for the whole fleet:

- `GET /fleet`: every host from its heartbeats (`orchestrator.core.fleet`), with when it
  was last heard from and whether it is `unreachable`.
- `GET /fleet/jobs?state=&label=&since=&limit=`: every reachable host's jobs, newest
  first, asked over the control exchange (`orchestrator jobs`) and kept for
  `FLEET_JOBS_CACHE_S`, so many dashboards cost the fleet one question.
- `POST /fleet/hosts/{host}/drain`, `.../resume`: as `orchestrator drain --host`.
- `GET /fleet/jobs/{job_id}/log/stream`: a job's console as server-sent events, from
  whichever host has it: served here when this host has it, else read from the owning
  host's `PUBLIC_URL` with `HTTP_TOKEN` and passed on, so a browser needs one origin and
  one cookie.
- `POST /login` (the token, as a form field or JSON, for a session cookie), `POST /logout`.

Errors are JSON `{"error": ...}` naming the parameter (400), the unknown (404), or the
fleet that did not answer (503, 504).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from orchestrator.core.fleet import Fleet, FleetJobs, FleetUnavailable
from orchestrator.core.httpserver import HttpLoad, RefusalLog
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import Heartbeat, JobsQuery
from orchestrator.web.logstream import (
    SSE_KEEPALIVE_S,
    SSE_POLL_S,
    STREAM_RETRY_AFTER_S,
    has_log,
    refuse_stream,
    stream_log,
)
from orchestrator.web.sessions import Access

if TYPE_CHECKING:
    from pathlib import Path


log = EventLogger("orchestrator.web.dashboard")

FLEET_JOBS_CACHE_S = 2.0
FLEET_JOBS_CACHED_QUERIES = 32
FLEET_JOBS_DEFAULT_LIMIT = 50
LOGIN_MAX_BYTES = 8192
PROXY_CONNECT_TIMEOUT_S = 5.0
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # as HOST_NAME allows

_FILES = resources.files(__package__)
ASSETS = {
    "/dashboard/app.js": (_FILES.joinpath("app.js").read_bytes(), "text/javascript"),
    "/dashboard/style.css": (_FILES.joinpath("style.css").read_bytes(), "text/css"),
}
INDEX = _FILES.joinpath("index.html").read_bytes()
LOGIN = _FILES.joinpath("login.html").read_text()

# The page runs only its own script and style, talks only to this host, and is never framed
# (its buttons drain hosts).
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
LOGIN_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "same-origin",
}


class HostView(Protocol):
    """What the dashboard needs of this daemon."""

    @property
    def host_name(self) -> str: ...

    def job_running(self, job_id: str) -> bool: ...

    def console_path(self, job_id: str) -> Path: ...

    async def set_draining(self, draining: bool) -> Heartbeat: ...


def login_page(*, status: int, error: str | None = None) -> web.Response:
    """The sign-in form (self-contained: the 401 of `GET /` is this page). `error` is
    one of this module's fixed messages, never anything a client sent."""
    shown = f'<p class="error" role="alert">{error}</p>' if error else ""
    return web.Response(
        status=status,
        text=LOGIN.replace("<!--error-->", shown),
        content_type="text/html",
        charset="utf-8",
        headers={**PAGE_HEADERS, "Content-Security-Policy": LOGIN_POLICY},
    )


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _job_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["job_id"]))
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "job_id must be a job's request_id (a UUID)"}),
            content_type="application/json",
        ) from None


def _host(request: web.Request) -> str:
    host = request.match_info["host"]
    if not HOST_NAME.match(host):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "host must be a HOST_NAME (letters, digits, '.', '_', '-'; at most 63)"}),
            content_type="application/json",
        )
    return host


def jobs_query(request: web.Request, *, default_limit: int | None = None) -> JobsQuery | web.Response:
    """The query string as a `JobsQuery`, or the 400 naming what is wrong with it."""
    unknown = sorted(set(request.query) - set(JobsQuery.model_fields))
    if unknown:
        return json_error(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(JobsQuery.model_fields)}")
    given: dict[str, Any] = dict(request.query)
    if default_limit is not None:
        given.setdefault("limit", default_limit)
    try:
        return JobsQuery.model_validate(given)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return json_error(400, f"{where}: {error['msg']}")


@dataclass
class _Cached:
    expires: float
    answer: asyncio.Future[FleetJobs]


class FleetJobsCache:
    """The fleet's answer to a jobs query, shared for `ttl_s` by every request asking the
    same (those that come while it is being asked wait for the same answer)."""

    def __init__(
        self, fleet: Fleet, *, ttl_s: float = FLEET_JOBS_CACHE_S, size: int = FLEET_JOBS_CACHED_QUERIES
    ) -> None:
        self._fleet, self._ttl_s, self._size = fleet, ttl_s, size
        self._entries: dict[str, _Cached] = {}

    async def jobs(self, query: JobsQuery) -> FleetJobs:
        loop = asyncio.get_running_loop()
        key = query.model_dump_json()
        entry = self._entries.get(key)
        if entry is None or entry.expires < loop.time() or (entry.answer.done() and entry.answer.exception()):
            entry = _Cached(loop.time() + self._ttl_s, asyncio.ensure_future(self._fleet.jobs(query)))
            self._entries.pop(key, None)
            self._entries[key] = entry
            while len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]
        # Shielded: a client that goes away does not cancel the answer others wait for.
        return await asyncio.shield(entry.answer)


def add_routes(app: web.Application, *, view: HostView, fleet: Fleet | None, access: Access, load: HttpLoad) -> None:
    """The dashboard's page and endpoints on `app` (whose middleware checks credentials)."""

    cache = FleetJobsCache(fleet) if fleet is not None else None
    # A guesser's attempts are a line a minute with their count, not a line each.
    refused_logins = RefusalLog("http.login_refused", setting="HTTP_TOKEN", limit=0)
    client: dict[str, aiohttp.ClientSession] = {}  # made on first use, closed with the app

    def the_fleet() -> Fleet:
        if fleet is None:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "this daemon has no fleet view (not connected to the broker)"}),
                content_type="application/json",
            )
        return fleet

    async def index(_: web.Request) -> web.Response:
        return web.Response(
            body=INDEX,
            content_type="text/html",
            charset="utf-8",
            headers={**PAGE_HEADERS, "Content-Security-Policy": PAGE_POLICY},
        )

    async def asset(request: web.Request) -> web.Response:
        body, content_type = ASSETS[request.path]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)

    async def login(request: web.Request) -> web.Response:
        as_form = request.content_type != "application/json"
        if access.open:
            raise web.HTTPSeeOther("/")  # nothing to sign in to
        if "Origin" in request.headers and not access.same_origin(request):
            return json_error(403, "sign in from this host's own page (Origin)")
        raw = await request.content.read(LOGIN_MAX_BYTES + 1)
        if len(raw) > LOGIN_MAX_BYTES:
            return json_error(400, f"token: the request body is over {LOGIN_MAX_BYTES} bytes")
        try:
            if as_form:
                given = parse_qs(raw.decode("utf-8"), max_num_fields=8).get("token", [None])[0]
            else:
                document = json.loads(raw)
                given = document.get("token") if isinstance(document, dict) else None
        except (ValueError, UnicodeDecodeError):
            return json_error(400, "token: send a form field or a JSON object with a token")
        if not isinstance(given, str) or not given or not access.token_matches(given):
            refused_logins.note()
            if as_form:
                return login_page(status=401, error="That is not this fleet's token.")
            return json_error(401, "token: wrong or missing")
        response = web.Response(status=303, headers={"Location": "/"})
        access.sign_in(response)
        log.info("http.login", remote=request.remote, sessions=len(access.sessions))
        return response

    async def logout(request: web.Request) -> web.Response:
        response = web.Response(status=303, headers={"Location": "/"})
        access.sign_out(request, response)
        return response

    async def hosts(_: web.Request) -> web.Response:
        found = the_fleet()
        return web.json_response(
            {
                "host": view.host_name,
                "unreachable_after_s": found.unreachable_after_s,
                "hosts": [host.model_dump(mode="json") for host in found.hosts()],
            }
        )

    async def jobs(request: web.Request) -> web.Response:
        query = jobs_query(request, default_limit=FLEET_JOBS_DEFAULT_LIMIT)
        if isinstance(query, web.Response):
            return query
        the_fleet()
        assert cache is not None
        try:
            answer = await cache.jobs(query)
        except FleetUnavailable as exc:
            return json_error(503, str(exc), **{"Retry-After": "2"})
        found = sorted(
            (job for reply in answer.replies for job in reply.jobs),
            key=lambda job: -(job.accepted_at.timestamp() if job.accepted_at else 0.0),
        )
        return web.json_response(
            {
                "jobs": [job.model_dump(mode="json") for job in found],
                "hosts": sorted(reply.host for reply in answer.replies),
                "silent": answer.silent,
            }
        )

    async def set_draining(request: web.Request, *, draining: bool) -> web.Response:
        host = _host(request)
        if host == view.host_name:
            beat: Heartbeat | None = await view.set_draining(draining)
        else:
            found = the_fleet()
            if not found.knows(host):
                return json_error(404, f"host: no host {host} has sent a heartbeat")
            try:
                beat = await found.set_draining(host, draining=draining)
            except FleetUnavailable as exc:
                return json_error(503, str(exc), **{"Retry-After": "2"})
        if beat is None:
            return json_error(504, f"host {host} did not answer (it may be down)")
        return web.json_response({"host": beat.host, "draining": beat.draining, "running": beat.running})

    async def drain(request: web.Request) -> web.Response:
        return await set_draining(request, draining=True)

    async def resume(request: web.Request) -> web.Response:
        return await set_draining(request, draining=False)

    async def log_stream(request: web.Request) -> web.StreamResponse:
        job_id = _job_id(request)
        if view.job_running(job_id):
            return await stream_log(request, view, load, job_id)
        try:
            located = await the_fleet().locate(job_id)
        except FleetUnavailable as exc:
            return json_error(503, str(exc), **{"Retry-After": "2"})
        elsewhere = [found for found in located if found.host != view.host_name]
        here = await asyncio.to_thread(has_log, view, job_id)
        if here and not (elsewhere and elsewhere[0].running):
            return await stream_log(request, view, load, job_id)
        if not elsewhere:
            return json_error(404, f"job_id: no host has a log of job {job_id} (queued, unknown, or its host is down)")
        owner = elsewhere[0]
        if owner.log_url is None:
            return json_error(
                404, f"job {job_id} is on host {owner.host}, which has no PUBLIC_URL to read its log from"
            )
        return await proxy_stream(request, f"{owner.log_url}/stream", owner.host)

    async def proxy_stream(request: web.Request, url: str, host: str) -> web.StreamResponse:
        """The owning host's event stream, passed on as it comes."""
        refuse_stream(load)
        if "session" not in client:
            client["session"] = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=PROXY_CONNECT_TIMEOUT_S,
                    sock_read=3 * SSE_KEEPALIVE_S,
                )
            )
        headers = {"Authorization": f"Bearer {access.token}"} if access.token else {}
        if "Last-Event-ID" in request.headers:
            headers["Last-Event-ID"] = request.headers["Last-Event-ID"]
        load.streams += 1
        try:
            async with client["session"].get(url, headers=headers, allow_redirects=False) as upstream:
                if upstream.status != 200:
                    status = {404: 404, 503: 503}.get(upstream.status, 502)
                    extra = {"Retry-After": str(STREAM_RETRY_AFTER_S)} if status == 503 else {}
                    return json_error(
                        status, f"host {host} answered {upstream.status} for the log of this job", **extra
                    )
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                try:
                    while request.transport is not None and not request.transport.is_closing():
                        try:
                            # Bounded waits, so a browser that left is noticed between the
                            # upstream's events (its keep-alives come only every 15 s).
                            chunk = await asyncio.wait_for(upstream.content.readany(), timeout=SSE_POLL_S)
                        except aiohttp.ClientError:
                            raise
                        except TimeoutError:
                            continue
                        if not chunk:
                            break
                        await response.write(chunk)
                except ConnectionError:  # reset, or lost while a write waited (aiohttp raises both)
                    pass  # the browser went away: the stream is over
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # Cut upstream: the browser's EventSource reconnects with Last-Event-ID.
                    log.warning("http.proxy_stream_cut", host=host, error=str(exc) or type(exc).__name__)
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            return json_error(502, f"cannot read the log from host {host}: {str(exc) or type(exc).__name__}")
        finally:
            load.streams -= 1

    async def close_client(_: web.Application) -> None:
        refused_logins.close()
        if "session" in client:
            await client["session"].close()

    app.on_cleanup.append(close_client)
    app.add_routes(
        [
            web.get("/", index),
            *(web.get(path, asset) for path in ASSETS),
            web.post("/login", login),
            web.post("/logout", logout),
            web.get("/fleet", hosts),
            web.get("/fleet/jobs", jobs),
            web.post("/fleet/hosts/{host}/drain", drain),
            web.post("/fleet/hosts/{host}/resume", resume),
            web.get("/fleet/jobs/{job_id}/log/stream", log_stream),
        ]
    )
