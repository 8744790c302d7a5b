"""Connections and publishing: confirmed publishes for what must not be lost (results,
re-published jobs, dead letters) and fire-and-forget for events."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aio_pika
import tenacity
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from pydantic import BaseModel

from orchestrator.logsetup import EventLogger

log = EventLogger("orchestrator.amqp")


async def connect(url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection: aio-pika reconnects and restores channels, QoS and consumers.
    Losing and regaining it is logged here, once each (aiormq's own lines are muted)."""
    connection = await aio_pika.connect_robust(
        url, client_properties={"connection_name": name}, heartbeat=30, reconnect_interval=1, timeout=10
    )
    def lost(_connection: object, exc: BaseException | None = None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):  # not our own close()
            log.warning("broker.connection_lost", error=describe_error(exc))

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(lambda _conn: log.info("broker.reconnected"))
    return connection


async def connect_with_retry(url: str, *, name: str, timeout_s: float, masked_url: str) -> AbstractRobustConnection:
    """The first connection, retried with backoff for `timeout_s` (under systemd the
    broker may come up after us); each failed attempt is logged. Raises the last error."""
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_before_delay(timeout_s),
        wait=tenacity.wait_exponential(multiplier=0.25, max=5),
        retry=tenacity.retry_if_exception_type((OSError, asyncio.TimeoutError)),
        before_sleep=lambda state: log.warning(
            "broker.connect_failed", url=masked_url, attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2), error=describe_error(state.outcome.exception()),
        ),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await connect(url, name=name)
    raise AssertionError("unreachable: tenacity re-raises the last error")


def describe_error(exc: BaseException | None) -> str:
    """An exception as one short line (aiormq's often have an empty str())."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip().replace("\n", " ")
    return text or type(exc).__name__


def json_message(
    model: BaseModel | bytes,
    *,
    headers: Mapping[str, object] | None = None,
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

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message, *, timeout_s: float = 30) -> None:
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
            if self._exchange is None:
                self._exchange = await self._channel.get_exchange(self._exchange_name, ensure=False)
            await self._exchange.publish(json_message(event, persistent=False), routing_key=routing_key, mandatory=False)
        except Exception as exc:  # events are advisory: never let one fail a job
            log.warning("event.publish_failed", routing_key=routing_key, error=str(exc))
