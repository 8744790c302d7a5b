"""A local stand-in for a forge's REST API (GitHub, Forgejo/Gitea, GitLab cannot run
here): exactly the documented endpoints the bridge uses, the auth header each forge
checks, its status codes and JSON, every call recorded, and failures on demand.

`FakeForge` holds the state and the failure injection; each forge's module
(`tests/support/fakeforge/github.py`, `forgejo.py`, `gitlab.py`) adds that forge's routes and
auth rule with `install(fake)`. Tests set state directly (`fake.files[...] = ...`,
`fake.branches[...]`) and read what the bridge did (`fake.statuses`, `fake.calls`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it came (`time.monotonic()`)


@dataclass(frozen=True)
class RecordedStatus:
    """A commit status as the forge stored it (its own state names)."""

    repo: str  # owner/name (GitLab: the project's path_with_namespace)
    sha: str
    state: str
    context: str
    description: str
    target_url: str | None


@dataclass
class Failure:
    status: int = 500
    retry_after: str | None = None  # the Retry-After header, e.g. "1"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. rate-limit reset headers
    reset: bool = False  # drop the connection instead of answering
    path_prefix: str = ""  # only calls whose path starts with this
    query: dict[str, str] = field(default_factory=dict)  # and whose query has these (e.g. {"page": "2"})

    def matches(self, request: web.Request) -> bool:
        return request.path.startswith(self.path_prefix) and all(
            request.query.get(k) == v for k, v in self.query.items()
        )


@dataclass
class Pause:
    """Calls that match wait, before they are handled, until `release()` (a test orders
    two clients' calls this way)."""

    path_prefix: str = ""
    body_contains: bytes = b""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set once a call is held
    held: int = 0  # calls held so far
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, request: web.Request, body: bytes) -> bool:
        return not self._released.is_set() and request.path.startswith(self.path_prefix) and self.body_contains in body

    async def hold(self) -> None:
        self.held += 1
        self.arrived.set()
        await self._released.wait()

    def release(self) -> None:
        self._released.set()


@dataclass
class Pull:
    number: int
    head_sha: str
    base_branch: str
    head_branch: str
    head_repo: str  # owner/name the head branch lives in (another one for a fork)
    state: str = "open"


class FakeForge:
    def __init__(self, *, token: str = "forge-token") -> None:
        self.token = token
        self.calls: list[Call] = []
        self.files: dict[tuple[str, str, str], bytes] = {}  # (owner/name, sha, path) -> bytes
        self.statuses: list[RecordedStatus] = []
        self.branches: dict[str, dict[str, str]] = {}  # owner/name -> branch -> head sha
        self.pulls: dict[str, list[Pull]] = {}  # owner/name -> pull requests
        self.project_ids: dict[str, int] = {}  # GitLab: owner/name -> numeric id
        self.hooks: dict[str, list[dict[str, Any]]] = {}  # GitLab: owner/name -> hooks
        self.per_page_default = 30
        self.failures: deque[Failure] = deque()
        self.pauses: list[Pause] = []
        self.authorized: Callable[[web.Request], bool] = lambda _request: True
        self.app = web.Application(middlewares=[self._middleware])
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.status_changed = asyncio.Event()  # set on every stored status (tests wait on it)

    # --- what tests use ---------------------------------------------------------------
    def fail_next(self, count: int = 1, **failure: Any) -> None:
        """The next `count` API calls (matching `path_prefix` and `query`) fail as described."""
        for _ in range(count):
            self.failures.append(Failure(**failure))

    def pause(self, *, path_prefix: str = "", body_contains: bytes = b"") -> Pause:
        """Hold every call matching `path_prefix` and `body_contains` until the pause is released."""
        pause = Pause(path_prefix, body_contains)
        self.pauses.append(pause)
        return pause

    def statuses_for(self, sha: str, context: str | None = None) -> list[str]:
        return [s.state for s in self.statuses if s.sha == sha and (context is None or s.context == context)]

    def record_status(self, status: RecordedStatus) -> None:
        self.statuses.append(status)
        self.status_changed.set()

    async def wait_for_statuses(self, sha: str, context: str, count: int, timeout_s: float = 30) -> list[str]:
        """The states set for (`sha`, `context`) once there are `count` of them."""
        async with asyncio.timeout(timeout_s):
            while len(self.statuses_for(sha, context)) < count:
                self.status_changed.clear()
                await self.status_changed.wait()
        return self.statuses_for(sha, context)

    async def wait_for_state(self, sha: str, context: str, state: str, timeout_s: float = 30) -> list[str]:
        """The states set for (`sha`, `context`) once `state` is among them (the bridge
        sends only the newest status of a context, so a count can skip steps)."""
        async with asyncio.timeout(timeout_s):
            while state not in self.statuses_for(sha, context):
                self.status_changed.clear()
                await self.status_changed.wait()
        return self.statuses_for(sha, context)

    def project_id(self, repo: str) -> int:
        return self.project_ids.setdefault(repo, 1000 + len(self.project_ids))

    def repo_of_project(self, project: str) -> str | None:
        """GitLab addresses a project by numeric id or URL-encoded path."""
        if project.isdigit():
            return next((name for name, pid in self.project_ids.items() if pid == int(project)), None)
        return project if project in self.project_ids or project in self.branches else None

    # --- serving ----------------------------------------------------------------------
    async def start(self) -> FakeForge:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(Call(request.method, request.path, dict(request.query), dict(request.headers), body))
        for pause in self.pauses:
            if pause.matches(request, body):
                await pause.hold()
        failure = next((f for f in self.failures if f.matches(request)), None)
        if failure is not None:
            self.failures.remove(failure)
            if failure.reset:
                assert request.transport is not None
                request.transport.abort()
                raise web.HTTPInternalServerError()  # never sent: the connection is gone
            headers = dict(failure.headers)
            if failure.retry_after is not None:
                headers["Retry-After"] = failure.retry_after
            return web.json_response(
                {"message": f"injected failure {failure.status}"}, status=failure.status, headers=headers
            )
        if not self.authorized(request):
            return web.json_response({"message": "Bad credentials"}, status=401)
        return await handler(request)
