"""Serving an aiohttp app to clients that are not trusted: what they may hold is bounded.

`serve_within_limits` serves the host daemon's API and the forge bridge's receiver alike
(`HttpLimits`): open connections (beyond the cap a new one is closed as soon as it is
accepted, so its descriptor is released at once), the time a connection may take to
send its request headers and may sit idle between requests, and log streams at once
(counted by the app in `HttpLoad`). Refusals are counted and logged at most once a
minute with their count (`RefusalLog`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from orchestrator.core.logsetup import EventLogger

log = EventLogger("orchestrator.http")

REFUSAL_LOG_WINDOW_S = 60.0


@dataclass(frozen=True)
class HttpLimits:
    """What HTTP clients may hold: `HTTP_MAX_CONNECTIONS`, `HTTP_HEADER_TIMEOUT_S` (to send a
    request's headers, counted from the connection's start or its last response, so it
    also ends idle keep-alive connections) and `HTTP_MAX_STREAMS`."""

    max_connections: int = 256
    header_timeout_s: float = 10.0
    max_streams: int = 64


class RefusalLog:
    """The refusals of one limit: counted for `/metrics`, and logged as one event naming
    the limit and its setting, the first at once, then at most one line per window with
    the count since the last line (a flood of refusals is a few lines, not a flood)."""

    def __init__(self, event: str, *, setting: str, limit: int, window_s: float = REFUSAL_LOG_WINDOW_S) -> None:
        self.event, self.setting, self.limit, self.window_s = event, setting, limit, window_s
        self.total = 0
        self._unlogged = 0
        self._window: asyncio.TimerHandle | None = None

    def note(self) -> None:
        self.total += 1
        self._unlogged += 1
        if self._window is None:
            self._window_over()

    def _emit(self) -> bool:
        if not self._unlogged:
            return False
        log.warning(self.event, count=self._unlogged, window_s=self.window_s, limit=self.limit, setting=self.setting)
        self._unlogged = 0
        return True

    def _window_over(self) -> None:
        # A window with refusals logs them and opens the next one; a quiet window ends
        # the series, so the next refusal is logged at once again.
        if self._emit():
            self._window = asyncio.get_running_loop().call_later(self.window_s, self._window_over)
        else:
            self._window = None

    def close(self) -> None:
        """Log what is still unlogged (at shutdown)."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        self._emit()


class HttpLoad:
    """What HTTP clients hold now and what they were refused, counted by the app itself."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.streams = 0
        self.connections_refused = RefusalLog(
            "http.connections_refused", setting="HTTP_MAX_CONNECTIONS", limit=limits.max_connections
        )
        self.streams_refused = RefusalLog("http.streams_refused", setting="HTTP_MAX_STREAMS", limit=limits.max_streams)

    def close(self) -> None:
        self.connections_refused.close()
        self.streams_refused.close()


class _Refused(asyncio.Protocol):
    """A connection beyond `HTTP_MAX_CONNECTIONS`: closed as soon as it is made, so its
    descriptor is released at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()  # nothing was written: the socket is closed on the loop's next turn


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's own protocol inside, told everything the
    transport says, plus a header deadline and a callback when the connection is gone."""

    def __init__(self, handler: asyncio.Protocol, *, header_timeout_s: float, on_lost: Callable[[], None]) -> None:
        self._handler = handler
        self._header_timeout_s = header_timeout_s
        self._on_lost = on_lost
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiohttp's keep-alive timer covers the time after each response; before the
        # first request only recent aiohttp versions arm it, so the first is ours.
        self._deadline = asyncio.get_running_loop().call_later(self._header_timeout_s, transport.close)
        self._handler.connection_made(transport)

    def headers_received(self) -> None:
        """A request has arrived: from now on aiohttp's keep-alive timer is in charge."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._on_lost()
        self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class _Gate:
    """The listening socket's protocol factory: at most `max_connections` open at once,
    each wrapped in a `_Connection` around a protocol from `make_handler` (aiohttp's)."""

    def __init__(self, make_handler: Callable[[], asyncio.Protocol], load: HttpLoad) -> None:
        self._make_handler = make_handler
        self._load = load

    def __call__(self) -> asyncio.Protocol:
        load = self._load
        # Counted here, when asyncio accepts, not in connection_made: one accept burst
        # creates many protocols before any of them is connected.
        if load.connections >= load.limits.max_connections:
            load.connections_refused.note()
            return _Refused()
        load.connections += 1
        return _Connection(self._make_handler(), header_timeout_s=load.limits.header_timeout_s, on_lost=self._lost)

    def _lost(self) -> None:
        self._load.connections -= 1


class _GatedSite(web.BaseSite):
    """aiohttp's `TCPSite`, but connections go through a `_Gate` first."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, gate: _Gate) -> None:
        super().__init__(runner)
        self._host, self._port, self._gate = host, port, gate

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(self._gate, self._host, self._port)


@web.middleware
async def headers_arrived(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tells the connection its request's headers came (ends its header deadline). An
    app served with `serve_within_limits` must have it first among its middlewares."""
    connection = request.transport.get_protocol() if request.transport is not None else None
    if isinstance(connection, _Connection):
        connection.headers_received()
    return await handler(request)


async def serve_within_limits(app: web.Application, listen: str, load: HttpLoad) -> web.AppRunner:
    """Serve `app` on `listen` (`host:port`) holding at most `load.limits`: the daemon's
    API and the forge bridge's receiver alike. Raises OSError when the address is taken."""
    address, _, port = listen.rpartition(":")
    # aiohttp's keep-alive timer closes a connection that has not sent its next request's
    # headers this long after its last response, whether idle or sending them slowly.
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=load.limits.header_timeout_s)
    await runner.setup()
    assert runner.server is not None
    try:
        site = _GatedSite(runner, address, int(port), _Gate(runner.server, load))
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's (only) site listens on (for `listen` port 0)."""
    site = next(iter(runner.sites))
    return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
