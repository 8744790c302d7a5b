"""RabbitMQ names and their idempotent declaration (see DESIGN.md "The flow of one job").

All names live under a prefix (`ci` by default), so several fleets or test runs can
share one broker. Declaring twice is harmless; declaring with other arguments than an
existing queue has fails, so every host must use the same `delivery_limit` and
`quorum_size`.

Every queue is a quorum queue with `x-quorum-initial-group-size` = `quorum_size`
(DESIGN.md "Broker cluster"). RabbitMQ gives a new queue min(quorum_size, cluster nodes)
members, so the argument stays the same on every host whatever the cluster's size (a
cap computed here from the nodes each host sees would differ between hosts, and an
argument that differs is PRECONDITION_FAILED). A queue keeps the members it was
declared with: nodes added later join it with `rabbitmq-queues grow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from orchestrator.core.imagemap import ImageMap
from orchestrator.core.logsetup import EventLogger

log = EventLogger("orchestrator.core.topology")

REASON_HEADER = "x-orchestrator-reason"
REROUTED_HEADER = "x-orchestrator-rerouted"
# On a dead letter of ours whose request must get no error result (its request_id names
# another job: a result would end that job's status).
NO_RESULT_HEADER = "x-orchestrator-no-result"


@dataclass(frozen=True)
class Topology:
    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def unroutable_exchange(self) -> str:
        return f"{self.prefix}.jobs.unroutable"

    @property
    def unroutable_queue(self) -> str:
        return f"{self.prefix}.jobs.unroutable"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def results_queue(self) -> str:
        return f"{self.prefix}.results"

    @property
    def forge_status_queue(self) -> str:
        """The forge bridge's own queue of results and job events, for commit statuses."""
        return f"{self.prefix}.forge.status"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.jobs.dlq"

    @property
    def dead_letters_queue(self) -> str:
        """Dead letters again (the DLX is a fanout), for the hosts to answer each with an
        error result (`orchestrator.host.deadletters`); the DLQ keeps its copy."""
        return f"{self.prefix}.jobs.dead-letters"

    def label_queue(self, label: str) -> str:
        return f"{self.prefix}.jobs.{label}"

    def exchanges(self) -> list[str]:
        return [self.jobs, self.unroutable_exchange, self.results, self.events, self.control, self.dlx]


@dataclass
class DeclaredTopology:
    channel: AbstractChannel
    jobs: AbstractExchange
    results: AbstractExchange
    events: AbstractExchange
    control: AbstractExchange
    dlx: AbstractExchange
    label_queues: dict[str, AbstractQueue]
    unroutable: AbstractQueue
    dlq: AbstractQueue


def quorum_queue_arguments(quorum_size: int, **extra: Any) -> dict[str, Any]:
    """The arguments of one of our quorum queues: replicated on `quorum_size` nodes (at
    most the cluster's), plus `extra` (e.g. `{"x-delivery-limit": 50}`). Anything that
    declares one of our queues declares it with these, or the broker refuses it."""
    return {"x-queue-type": "quorum", "x-quorum-initial-group-size": quorum_size, **extra}


def job_queue_arguments(topology: Topology, *, delivery_limit: int, quorum_size: int) -> dict[str, Any]:
    # Quorum queues: replicated, and their delivery limit stops a message that keeps
    # killing consumers from looping forever (it goes to the DLQ instead).
    return quorum_queue_arguments(
        quorum_size, **{"x-dead-letter-exchange": topology.dlx, "x-delivery-limit": delivery_limit}
    )


async def _declare_dlq(
    connection: AbstractConnection, channel: AbstractChannel, topology: Topology, max_length: int, quorum_size: int
) -> AbstractQueue:
    """The dead-letter queue, bounded: beyond `max_length` messages the oldest are
    dropped. A DLQ declared earlier without the bound (or with another) cannot be
    changed by a declare: it is used as it is, and the log says how to bound it."""
    arguments = quorum_queue_arguments(quorum_size, **{"x-max-length": max_length, "x-overflow": "drop-head"})
    probe = await connection.channel()  # a refused declare closes its channel
    try:
        await probe.declare_queue(topology.dlq, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "dlq.bound_not_applied",
            queue=topology.dlq,
            max_length=max_length,
            error=str(exc),
            fix=f"rabbitmqctl set_policy --apply-to queues orchestrator-dlq '^{topology.dlq}$' "
            f"'{{\"max-length\":{max_length}}}' (or delete the queue so it is declared bounded)",
        )
    finally:
        if not probe.is_closed:
            await probe.close()
    return await channel.declare_queue(topology.dlq, passive=True)


async def declare_topology(
    connection: AbstractConnection,
    topology: Topology,
    image_map: ImageMap | None,
    *,
    delivery_limit: int,
    dlq_max_length: int,
    quorum_size: int,
) -> DeclaredTopology:
    """Declare everything on a channel of `connection`; the caller closes
    `DeclaredTopology.channel` when it no longer needs the objects. Without an image map
    (the forge bridge) no label queue is declared: only hosts know their labels."""
    channel = await connection.channel(publisher_confirms=True)
    dlx = await channel.declare_exchange(topology.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await _declare_dlq(connection, channel, topology, dlq_max_length, quorum_size)
    await dlq.bind(dlx, routing_key="")
    dead_letters = await channel.declare_queue(
        topology.dead_letters_queue,
        durable=True,
        arguments=quorum_queue_arguments(quorum_size, **{"x-max-length": dlq_max_length, "x-overflow": "drop-head"}),
    )
    await dead_letters.bind(dlx, routing_key="")
    unroutable_exchange = await channel.declare_exchange(
        topology.unroutable_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    jobs = await channel.declare_exchange(
        topology.jobs,
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments={"alternate-exchange": topology.unroutable_exchange},
    )
    queue_args = job_queue_arguments(topology, delivery_limit=delivery_limit, quorum_size=quorum_size)
    unroutable = await channel.declare_queue(topology.unroutable_queue, durable=True, arguments=queue_args)
    await unroutable.bind(unroutable_exchange, routing_key="")
    label_queues: dict[str, AbstractQueue] = {}
    for label in image_map.images if image_map is not None else {}:
        assert image_map is not None
        queue = await channel.declare_queue(topology.label_queue(label), durable=True, arguments=queue_args)
        for key in image_map.routing_keys(label):
            await queue.bind(jobs, routing_key=key)
        label_queues[label] = queue
    results = await channel.declare_exchange(topology.results, aio_pika.ExchangeType.TOPIC, durable=True)
    # Results wait here for the forge integration even while it is down; `enqueue --wait`
    # binds its own exclusive queue beside it.
    results_queue = await channel.declare_queue(
        topology.results_queue, durable=True, arguments=quorum_queue_arguments(quorum_size)
    )
    await results_queue.bind(results, routing_key="#")
    events = await channel.declare_exchange(topology.events, aio_pika.ExchangeType.TOPIC, durable=True)
    control = await channel.declare_exchange(topology.control, aio_pika.ExchangeType.FANOUT, durable=True)
    return DeclaredTopology(channel, jobs, results, events, control, dlx, label_queues, unroutable, dlq)


async def delete_topology(channel: AbstractChannel, topology: Topology, labels: list[str]) -> None:
    """Remove everything `declare_topology` made (tests and benchmarks clean up with it)."""
    for name in [topology.label_queue(label) for label in labels] + [
        topology.unroutable_queue,
        topology.dlq,
        topology.dead_letters_queue,
        topology.results_queue,
        topology.forge_status_queue,
    ]:
        await channel.queue_delete(name)
    for name in topology.exchanges():
        await channel.exchange_delete(name)
