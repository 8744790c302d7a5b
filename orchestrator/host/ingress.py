"""Where the reference orchestrator's integration publishes, mapped onto our topology.

The reference integration publishes each request to its exchange (`AMQP_EXCHANGE`,
`solstice.jobs` by default) with a fixed routing key (`AMQP_ROUTING_KEY`,
`jobrequest.v1`), for its queue (`AMQP_QUEUE`). Here requests wait in one queue per
label, so (see `orchestrator.core.reference` for the settings):

- `AMQP_QUEUE` set: that queue is consumed as an ingress (declared and bound to the
  exchange with the key when it does not exist yet). Each request is re-published to
  `<prefix>.jobs` with its `runs_on` (or the default label) as routing key, as the
  unroutable queue's requests are; one whose label is unknown gets an `error` result.
  A reference fleet still consuming the queue competes for it: each request runs once.
- `AMQP_EXCHANGE` set to another exchange than `<prefix>.jobs`, without `AMQP_QUEUE`:
  it is bound into `<prefix>.jobs` with the key (an exchange-to-exchange binding), so
  its requests take our path (the key names no label queue: the unroutable queue).
- Neither (or `AMQP_EXCHANGE` is `<prefix>.jobs`): the integration publishes to
  `<prefix>.jobs` already (on a broker the reference never used, `AMQP_PREFIX=solstice`
  gives its exchange name), and the unroutable queue re-publishes its requests.

A reference fleet's exchange already declared (without our alternate exchange) is
bound into ours rather than declared again: a declare with other arguments would be
refused by the broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator.core.config import DaemonSettings
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.topology import Topology, job_queue_arguments
from orchestrator.host.consumer import Handler, QueueConsumer, Settler

log = EventLogger("orchestrator.host.ingress")

PREFETCH = 16  # re-publishing takes no room: as the unroutable queue's consumer


class ReferenceIngress:
    def __init__(self, *, settings: DaemonSettings, topology: Topology, handler: Handler, settler: Settler) -> None:
        self._settings = settings
        self._topology = topology
        self._handler = handler
        self._settler = settler
        self._consumer: QueueConsumer | None = None

    @property
    def needed(self) -> bool:
        return self._settings.amqp_queue is not None or self._settings.amqp_exchange is not None

    async def start(self, connection: AbstractRobustConnection) -> None:
        s = self._settings
        if not self.needed:
            return
        source = s.amqp_exchange or self._topology.jobs
        if s.amqp_exchange is not None:
            await _ensure_exchange(connection, s.amqp_exchange)
        if s.amqp_queue is not None:
            await _ensure_queue(connection, s.amqp_queue, self._topology, s)
        channel = await connection.channel()
        try:
            if s.amqp_queue is not None:
                queue = await channel.get_queue(s.amqp_queue, ensure=False)
                await queue.bind(source, routing_key=s.amqp_routing_key)
                log.info("ingress.queue", queue=s.amqp_queue, exchange=source, routing_key=s.amqp_routing_key)
            else:
                jobs = await channel.get_exchange(self._topology.jobs, ensure=False)
                await jobs.bind(source, routing_key=s.amqp_routing_key)
                log.info(
                    "ingress.exchange_bound", exchange=source, into=self._topology.jobs, routing_key=s.amqp_routing_key
                )
        finally:
            await channel.close()
        if s.amqp_queue is not None:
            self._consumer = await QueueConsumer.open(
                connection, s.amqp_queue, self._handler, self._settler, prefetch=PREFETCH
            )
            await self._consumer.resume()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.close()


async def _exists(
    connection: AbstractRobustConnection, declare: Callable[[AbstractChannel], Awaitable[object]]
) -> bool:
    """Whether a passive declare finds it (on a channel of its own: a miss closes it)."""
    probe = await connection.channel()
    try:
        await declare(probe)
        return True
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not probe.is_closed:
            await probe.close()


async def _ensure_exchange(connection: AbstractRobustConnection, name: str) -> None:
    """The reference's exchange as it is, or a durable direct one (what the reference
    declared) when it does not exist yet."""
    if await _exists(connection, lambda channel: channel.declare_exchange(name, passive=True)):
        return
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
    finally:
        await channel.close()
    log.info("ingress.exchange_declared", exchange=name)


async def _ensure_queue(
    connection: AbstractRobustConnection, name: str, topology: Topology, settings: DaemonSettings
) -> None:
    """The reference's queue as it is (its arguments are the reference's), or one of ours
    (a quorum queue with our dead-lettering and delivery limit) when it does not exist."""
    if await _exists(connection, lambda channel: channel.declare_queue(name, passive=True)):
        return
    channel = await connection.channel()
    try:
        await channel.declare_queue(
            name,
            durable=True,
            arguments=job_queue_arguments(
                topology, delivery_limit=settings.delivery_limit, quorum_size=settings.quorum_size
            ),
        )
    finally:
        await channel.close()
    log.info("ingress.queue_declared", queue=name)
