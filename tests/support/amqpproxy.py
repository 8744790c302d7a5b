"""A TCP proxy between a client under test and RabbitMQ, for real broker faults.

It reads the AMQP 0-9-1 frames the client sends (the 8-byte protocol header first, then
frames: type 1 byte, channel 2, size 4, payload, frame-end 0xCE; a method frame's
payload starts with class-id and method-id, 2 bytes each) and forwards them one by one;
what the broker sends is copied as it comes. Faults:

- `cut_at(method)`: the next time a client sends `method`, every connection is cut
  (both sockets closed) and that frame never reaches the broker. One-shot.
- `down()`: cut every connection and refuse (close at once) new ones until `up()`.
- `hold_at(method, seconds)`: the next time a client sends `method`, that frame and
  everything after it on its connection reach the broker `seconds` later (a slow broker
  or network, in order). One-shot.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_HEADER = struct.Struct("!BHI")
FRAME_END = 0xCE
METHOD_FRAME = 1

Method = tuple[int, int]  # (class-id, method-id)
BASIC_PUBLISH: Method = (60, 40)
BASIC_ACK: Method = (60, 80)
BASIC_CANCEL: Method = (60, 30)


@dataclass(eq=False)  # kept in a set by identity
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def cut(self) -> None:
        for writer in (self.client, self.upstream):
            writer.close()
        for pump in self.pumps:
            if pump is not asyncio.current_task():
                pump.cancel()


class AmqpProxy:
    """Listens on 127.0.0.1:`port` and forwards to `upstream`; `url` is for the client."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0  # accepted and forwarded, over the proxy's life
        self.is_down = False
        self._armed: tuple[Method, asyncio.Event] | None = None
        self._hold: tuple[Method, float, asyncio.Event] | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> AmqpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut_at(self, method: Method) -> asyncio.Event:
        """Arm: cut every connection when a client next sends `method`, dropping that
        frame. The event is set once it has happened."""
        happened = asyncio.Event()
        self._armed = (method, happened)
        return happened

    def hold_at(self, method: Method, seconds: float) -> asyncio.Event:
        """Arm: hold a client's connection for `seconds` when it next sends `method`. The
        event is set once the held frame has gone on to the broker."""
        passed = asyncio.Event()
        self._hold = (method, seconds, passed)
        return passed

    def down(self) -> None:
        self.is_down = True
        self._cut_all()

    def up(self) -> None:
        self.is_down = False

    def _cut_all(self) -> None:
        for link in list(self._links):
            link.cut()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._client_to_broker(reader, link)),
            asyncio.create_task(self._copy(up_reader, writer, link)),
        ]
        outcomes = await asyncio.gather(*link.pumps, return_exceptions=True)
        self._links.discard(link)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # a frame the proxy could not read: asyncio logs it

    async def _client_to_broker(self, reader: asyncio.StreamReader, link: _Link) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            try:
                link.upstream.write(await reader.readexactly(len(PROTOCOL_HEADER)))
                while True:
                    header = await reader.readexactly(FRAME_HEADER.size)
                    kind, _channel, size = FRAME_HEADER.unpack(header)
                    rest = await reader.readexactly(size + 1)  # payload and frame-end
                    if rest[-1] != FRAME_END:
                        raise ValueError(f"AMQP frame without frame-end 0xCE: {header + rest[:16]!r}")
                    method = struct.unpack("!HH", rest[:4]) if kind == METHOD_FRAME else None
                    if method is not None and self._trips(method):
                        self._cut_all()
                        return
                    held = self._held(method)
                    if held is not None:
                        await asyncio.sleep(held[0])  # nothing later on this connection passes it
                    link.upstream.write(header + rest)
                    await link.upstream.drain()
                    if held is not None:
                        held[1].set()
            finally:
                link.cut()

    def _trips(self, method: Method) -> bool:
        if self._armed is None or self._armed[0] != method:
            return False
        self._armed[1].set()
        self._armed = None
        return True

    def _held(self, method: Method | None) -> tuple[float, asyncio.Event] | None:
        if method is None or self._hold is None or self._hold[0] != method:
            return None
        _, seconds, passed = self._hold
        self._hold = None
        return seconds, passed

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(OSError):
            try:
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
            finally:
                link.cut()
