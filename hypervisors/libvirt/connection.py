"""One libvirt connection with asyncio events, blocking calls off the loop, and reconnect.

libvirt's event loop is the official asyncio integration (`libvirtaio`), registered on
the running loop before the first `open()`: lifecycle events then arrive as plain
callbacks on the loop. libvirt accepts one event implementation per process, so a
second event loop in the same process cannot use libvirt (tests share one loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt
import libvirtaio

from hypervisors.base import BackendError

T = TypeVar("T")
LifecycleCallback = Callable[[str, int, int], None]

_registered_loop: asyncio.AbstractEventLoop | None = None
_register_lock = threading.Lock()

# libvirt prints every error to stderr by default; errors reach us as exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def ensure_event_loop_registered() -> None:
    global _registered_loop
    loop = asyncio.get_running_loop()
    with _register_lock:
        if _registered_loop is None:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _registered_loop = loop
        elif _registered_loop is not loop:
            raise BackendError("libvirt events are bound to another asyncio event loop in this process")


class LibvirtConnection:
    def __init__(self, uri: str, on_lifecycle: LifecycleCallback, *, reconnect_timeout_s: float = 30.0) -> None:
        self.uri = uri
        self.reconnect_timeout_s = reconnect_timeout_s
        self._on_lifecycle = on_lifecycle
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._reconnect_lock = asyncio.Lock()
        self.reconnects = 0

    async def open(self) -> None:
        ensure_event_loop_registered()
        try:
            conn = await asyncio.to_thread(libvirt.open, self.uri)
        except libvirt.libvirtError as exc:
            raise BackendError(
                f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()} (is libvirtd running?)"
            ) from None
        # Keepalive makes a dead libvirtd show up as a closed connection within seconds.
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(self._on_close, None)
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )
        self._conn = conn

    def _on_event(
        self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        self._on_lifecycle(domain.name(), event, detail)

    def _on_close(self, _conn: libvirt.virConnect, _reason: int, _opaque: object) -> None:
        self._conn = None

    async def _reconnect(self, broken: libvirt.virConnect | None) -> libvirt.virConnect:
        """Open a new connection, retrying with backoff while libvirtd is restarting."""
        async with self._reconnect_lock:
            if self._conn is not None and self._conn is not broken:
                return self._conn
            self._conn = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.reconnect_timeout_s
            delay = 0.2
            while True:
                try:
                    await self.open()
                    break
                except BackendError:
                    if loop.time() + delay > deadline:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self.reconnects += 1
            assert self._conn is not None
            return self._conn

    async def call(self, operation: Callable[[libvirt.virConnect], T]) -> T:
        """Run a blocking libvirt operation in a thread; reconnect once when libvirtd was
        restarted under us."""
        conn = self._conn or await self._reconnect(None)
        try:
            return await asyncio.to_thread(operation, conn)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_ERR_RPC,
                libvirt.VIR_ERR_NO_CONNECT,
                libvirt.VIR_ERR_INVALID_CONN,
            ):
                raise
            conn = await self._reconnect(conn)
            return await asyncio.to_thread(operation, conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._callback_id is not None:
                conn.domainEventDeregisterAny(self._callback_id)
            conn.unregisterCloseCallback()
            await asyncio.to_thread(conn.close)
        except libvirt.libvirtError:
            pass
