"""Keeps each label's consumer running exactly while this host can start a job for it.

The capacity ledger calls `poke()` after every reservation or release; one task then
brings every consumer in line (cancel when the label or host is full, qos + consume when
room appears), so a full label never blocks another and no host holds work it cannot
start (DESIGN.md "Capacity").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from aio_pika.abc import AbstractRobustConnection

from orchestrator.amqp import broker_cancellation_as_error
from orchestrator.capacity import CapacityLedger
from orchestrator.consumer import QueueConsumer, Settler
from orchestrator.imagemap import ImageMap
from orchestrator.intake import JobIntake
from orchestrator.logsetup import EventLogger
from orchestrator.topology import Topology

log = EventLogger("orchestrator.scheduler")

UNROUTABLE_PREFETCH = 16


class Scheduler:
    def __init__(
        self,
        *,
        image_map: ImageMap,
        ledger: CapacityLedger,
        intake: JobIntake,
        settler: Settler,
        topology: Topology,
    ) -> None:
        self._image_map = image_map
        self._ledger = ledger
        self._intake = intake
        self._settler = settler
        self._topology = topology
        self._consumers: dict[str, QueueConsumer] = {}
        self._unroutable: QueueConsumer | None = None
        self._connection: AbstractRobustConnection | None = None
        # Held while consumers are switched or added/removed, so a rebalance never sees
        # the set of consumers change under it.
        self._switching = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        for label in self._image_map.images:
            await self._add_consumer(label)
        self._unroutable = await QueueConsumer.open(
            connection, self._topology.unroutable_queue, self._intake.on_unroutable_message, self._settler
        )
        self._unroutable.free_slots = lambda: UNROUTABLE_PREFETCH
        await self._unroutable.resume()
        self._ledger.listeners.append(self.poke)
        self._task = asyncio.create_task(self._loop(), name="scheduler")
        self.poke()

    async def _add_consumer(self, label: str) -> None:
        if self._ledger.label_limit(label) <= 0:
            log.info("label.disabled", label=label, reason="capacity 0 in CAPACITY_MAP")
            return
        assert self._connection is not None
        consumer = await QueueConsumer.open(
            self._connection, self._topology.label_queue(label), self._intake.handler_for(label), self._settler
        )
        consumer.should_run = self._should_run_for(label)
        consumer.free_slots = functools.partial(self._ledger.free_slots, label)
        consumer.paused_itself = self.poke
        self._consumers[label] = consumer

    async def update_map(self, image_map: ImageMap) -> None:
        """A reloaded image map: consume new labels, stop consuming removed ones (their
        queued jobs stay in the broker for other hosts; deliveries being handled settle
        first), and size the others by their new defaults."""
        async with self._switching:
            self._image_map = image_map
            for label in [label for label in self._consumers if label not in image_map.images]:
                await self._consumers.pop(label).close()
                log.info("label.removed", label=label)
            for label in image_map.images:
                if label in self._consumers:
                    self._consumers[label].should_run = self._should_run_for(label)
                else:
                    await self._add_consumer(label)
        self.poke()

    def _should_run_for(self, label: str) -> Callable[[], bool]:
        size = self._image_map.default_resources(label)

        def should_run() -> bool:
            return not self._stopped and self._ledger.can_start(label, size.cpus, size.memory_mb)

        return should_run

    def requeued(self) -> int:
        return sum(consumer.requeued for consumer in self._consumers.values())

    def poke(self) -> None:
        self._dirty.set()

    def consuming(self) -> dict[str, bool]:
        return {label: consumer.running for label, consumer in self._consumers.items()}

    async def _loop(self) -> None:
        while not self._stopped:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                with broker_cancellation_as_error():
                    await self._rebalance()
            except Exception as exc:  # a channel mid-reconnect: try again on the next change
                log.warning("scheduler.rebalance_failed", error=str(exc))
                await asyncio.sleep(0.5)
                self._dirty.set()

    async def _rebalance(self) -> None:
        async with self._switching:
            await self._switch_consumers()

    async def _switch_consumers(self) -> None:
        # Pauses first: a full host must stop taking work before anything else happens.
        wanted = {label: consumer.should_run() for label, consumer in self._consumers.items()}
        for label, consumer in self._consumers.items():
            if consumer.running and not wanted[label]:
                await consumer.pause()
                log.debug("label.paused", label=label)
        for label, consumer in self._consumers.items():
            if wanted[label]:
                # Prefetch is what the label can start now, so the broker never hands
                # this host more than it can run at once.
                await consumer.resume()

    async def stop(self) -> None:
        """Stop taking work: cancel consumers and return undelivered work to the broker."""
        self._stopped = True
        self._dirty.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.poke in self._ledger.listeners:
            self._ledger.listeners.remove(self.poke)
        consumers = list(self._consumers.values())
        if self._unroutable is not None:
            consumers.append(self._unroutable)
        await asyncio.gather(*(c.close() for c in consumers), return_exceptions=True)
