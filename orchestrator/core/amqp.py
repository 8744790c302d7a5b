"""Connections and publishing: confirmed publishes for what must not be lost (results,
re-published jobs, dead letters) and fire-and-forget for events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import tenacity
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pydantic import BaseModel
from yarl import URL

from orchestrator.core.config import split_amqp_urls
from orchestrator.core.logsetup import EventLogger

log = EventLogger("orchestrator.core.amqp")


RECONNECT_INITIAL_S = 1.0
RECONNECT_MAX_S = 8.0


def node_of(url: str | URL) -> str:
    """`host:port` of a broker URL: what logs and `/readyz` name, never the credentials."""
    parsed = URL(str(url))
    port = parsed.explicit_port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host}:{port}"


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over several broker nodes.

    Each (re)connection attempt tries the nodes in turn, starting with the one after the
    node it last tried: the first connection goes to the first node that answers, and a
    lost node is left for the next that answers. Once connected, aio-pika restores the
    channels, QoS and consumers on that node as it would on one. A round in which no node
    answers is followed by a pause that doubles, from `reconnect_interval` up to
    `RECONNECT_MAX_S`; a connection resets it.

    Only the connection attempt is ours: it is aio-pika's `RobustConnection.__connect_transport`
    (name-mangled, so overriding it is overriding `_RobustConnection__connect_transport`),
    called by its reconnection loop for every attempt. `tests/cluster/test_cluster_units.py`
    checks that aio-pika still has it.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self._urls = [URL(url) for url in urls]
        self._next = 0
        super().__init__(self._urls[0], **kwargs)
        self._initial_interval = self.reconnect_interval

    @property
    def node(self) -> str | None:
        """`host:port` of the node this connection is on; None while it is not connected."""
        if self.is_closed or not self.connected.is_set():
            return None
        return node_of(self.url)

    async def _RobustConnection__connect_transport(self) -> None:
        errors: list[str] = []
        for _ in self._urls:
            index, self._next = self._next, (self._next + 1) % len(self._urls)
            self.url = self._urls[index]
            try:
                await super()._RobustConnection__connect_transport()  # type: ignore[misc]
            except CONNECTION_EXCEPTIONS as exc:
                errors.append(f"{node_of(self.url)}: {describe_error(exc)}")
                if len(self._urls) > 1:
                    log.warning("broker.node_unavailable", node=node_of(self.url), error=describe_error(exc))
                last = exc
                continue
            self.reconnect_interval = self._initial_interval
            log.info("broker.connected", node=node_of(self.url))
            return
        self.reconnect_interval = min(self.reconnect_interval * 2, max(RECONNECT_MAX_S, self._initial_interval))
        if len(self._urls) > 1:
            raise aio_pika.exceptions.AMQPConnectionError(f"no broker node answered ({'; '.join(errors)})") from last
        raise last


if not hasattr(aio_pika.RobustConnection, "_RobustConnection__connect_transport"):
    raise ImportError(
        "aio-pika no longer has RobustConnection.__connect_transport: FailoverConnection needs another hook"
    )


async def connect(url: str, *, name: str) -> FailoverConnection:
    """A robust connection to the first node of `url` (one URL, or several
    comma-separated) that answers: aio-pika reconnects and restores channels, QoS and
    consumers, on the next node that answers when one is lost. Losing and regaining it
    is logged here, with the node (aiormq's own lines are muted)."""
    connection = FailoverConnection(
        split_amqp_urls(url),
        client_properties={"connection_name": name},
        heartbeat=30,
        reconnect_interval=RECONNECT_INITIAL_S,
    )
    await connection.connect(timeout=10)

    def lost(_connection: object, exc: BaseException | None = None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):  # not our own close()
            log.warning("broker.connection_lost", node=node_of(connection.url), error=describe_error(exc))

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(lambda _conn: log.info("broker.reconnected", node=node_of(connection.url)))
    return connection


async def connect_with_retry(url: str, *, name: str, timeout_s: float, masked_url: str) -> FailoverConnection:
    """The first connection, retried with backoff for `timeout_s` (under systemd the
    broker may come up after us); each failed attempt is logged. Raises the last error."""
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_before_delay(timeout_s),
        wait=tenacity.wait_exponential(multiplier=0.25, max=5),
        retry=tenacity.retry_if_exception_type((OSError, asyncio.TimeoutError)),  # AMQPConnectionError is an OSError
        before_sleep=lambda state: log.warning(
            "broker.connect_failed",
            url=masked_url,
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2),
            error=describe_error(state.outcome.exception() if state.outcome is not None else None),
        ),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await connect(url, name=name)
    raise AssertionError("unreachable: tenacity re-raises the last error")


# What a broker operation raises when its connection or channel is gone: aiormq's errors
# (its ChannelInvalidStateError is a RuntimeError), socket errors, and ours below.
BROKER_ERRORS = (aio_pika.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


class BrokerOperationCancelled(ConnectionError):
    """A broker operation that aiormq cancelled because its connection or channel closed."""


@contextlib.contextmanager
def broker_cancellation_as_error() -> Iterator[None]:
    """aiormq cancels what waits on a connection or channel it loses (confirms, RPCs, its
    own tasks), so the awaiting task sees a `CancelledError` nobody asked for: left to
    propagate, it ends a retry loop or skips a job's hand-over as if the task had been
    stopped. Inside this block it is a `BrokerOperationCancelled` (a ConnectionError), for
    the usual broker-error paths; a real cancellation of the task itself passes through."""
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        reason = exc.args[0] if exc.args else None
        raise BrokerOperationCancelled(
            f"the broker connection closed mid-operation ({describe_error(reason) if isinstance(reason, BaseException) else reason or 'cancelled'})"
        ) from None


async def wait_uncancelled(operation: Awaitable[object], timeout_s: float) -> None:
    """Wait up to `timeout_s` for a broker RPC without ever cancelling it. aiormq answers a cancelled RPC by closing its channel, and a publish on that
    channel before aio-pika has reopened it is a connection error (CHANNEL_ERROR
    "expected 'channel.open'") that takes the host's whole connection down, and the acks
    of its jobs with it. Past the timeout the operation goes on by itself; its error, if
    any (its channel closed meanwhile), is dropped."""
    task = asyncio.ensure_future(operation)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), timeout_s)


def describe_error(exc: BaseException | None) -> str:
    """An exception as one short line (aiormq's often have an empty str())."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip().replace("\n", " ")
    return text or type(exc).__name__


def json_message(
    model: BaseModel | bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    persistent: bool = True,
) -> aio_pika.Message:
    body = model if isinstance(model, bytes) else model.model_dump_json().encode()
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        headers=dict(headers or {}),
        message_id=message_id,
    )


class ConfirmedPublisher:
    """Publishes on a channel with publisher confirms: `publish` returns only once the
    broker has taken responsibility for the message, and raises otherwise."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> ConfirmedPublisher:
        return cls(await connection.channel(publisher_confirms=True))

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, *, timeout_s: float = 30
    ) -> None:
        with broker_cancellation_as_error():
            target = await self._exchange(exchange)
            await target.publish(message, routing_key=routing_key, timeout=timeout_s)


class EventPublisher:
    """Best-effort events: a lost event costs a dashboard update, never a job."""

    def __init__(self, channel: AbstractChannel, exchange: str) -> None:
        self._channel = channel
        self._exchange_name = exchange
        self._exchange: AbstractExchange | None = None

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, exchange: str) -> EventPublisher:
        return cls(await connection.channel(publisher_confirms=False), exchange)

    async def emit(self, routing_key: str, event: BaseModel) -> None:
        try:
            with broker_cancellation_as_error():
                if self._exchange is None:
                    self._exchange = await self._channel.get_exchange(self._exchange_name, ensure=False)
                await self._exchange.publish(
                    json_message(event, persistent=False), routing_key=routing_key, mandatory=False
                )
        except Exception as exc:  # events are advisory: never let one fail a job
            log.warning("event.publish_failed", routing_key=routing_key, error=str(exc))
