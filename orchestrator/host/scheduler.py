"""Decides which label consumers run, and with how many claims (DESIGN.md "Capacity").

The host's window (`orchestrator.host.window`) lets a consumer run only with claims: room
promised to the deliveries it may be sent. After every change of room (`poke()`, from
the window) one task brings the consumers in line: consumers that may not run (draining,
stopping) are cancelled, and paused ones get claims. Room goes first to the labels that
have waited longest for it, one claim each in turn; when there is not room for every
label that wants some, the queues are asked how many jobs they hold and the fullest
goes first, while a consumer holding claims on an empty queue gives them back. So a
label with a backlog never waits behind one with nothing to do, and a full label never
blocks another.
"""

from __future__ import annotations

import asyncio
import time

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator.core.amqp import broker_cancellation_as_error, describe_error
from orchestrator.core.imagemap import ImageMap
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.topology import Topology
from orchestrator.host.capacity import Reservation
from orchestrator.host.consumer import QueueConsumer, Settler
from orchestrator.host.intake import JobIntake
from orchestrator.host.window import ConsumerClaims, HostWindow

log = EventLogger("orchestrator.host.scheduler")

UNROUTABLE_PREFETCH = 16
# While a label waits for room, the queues are asked again this often (besides every
# change of room): a job arriving in an empty queue is seen, and idle claims move to it.
STARVED_POLL_S = 1.0
DEPTH_TTL_S = 0.5  # queue depths asked for are reused this long
MAX_PREFETCH = 16  # claims a label's consumer resumes with, at most


class Scheduler:
    def __init__(
        self,
        *,
        image_map: ImageMap,
        window: HostWindow,
        intake: JobIntake,
        settler: Settler,
        topology: Topology,
    ) -> None:
        self._image_map = image_map
        self._window = window
        self._ledger = window.ledger
        self._intake = intake
        self._settler = settler
        self._topology = topology
        self._consumers: dict[str, QueueConsumer] = {}
        self._unroutable: QueueConsumer | None = None
        self._connection: AbstractRobustConnection | None = None
        self._depth_channel: AbstractChannel | None = None
        self._depths: dict[str, int | None] = {}
        self._depths_at = 0.0
        self._served_at: dict[str, float] = {}  # when each label last got claims
        self._starved = False  # a label with work waits for room
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
            connection,
            self._topology.unroutable_queue,
            self._intake.on_unroutable_message,
            self._settler,
            prefetch=UNROUTABLE_PREFETCH,
        )
        await self._unroutable.resume()
        self._window.listeners.append(self.poke)
        self._task = asyncio.create_task(self._loop(), name="scheduler")
        self.poke()

    async def _add_consumer(self, label: str) -> None:
        if self._ledger.label_limit(label) <= 0:
            log.info("label.disabled", label=label, reason="capacity 0 in CAPACITY_MAP")
            return
        assert self._connection is not None
        consumer = await QueueConsumer.open(
            self._connection,
            self._topology.label_queue(label),
            self._intake.handler_for(label),
            self._settler,
            ConsumerClaims(self._window, label),
        )
        consumer.should_run = self._should_run
        consumer.paused_itself = self.poke
        self._consumers[label] = consumer

    async def update_map(self, image_map: ImageMap) -> None:
        """A reloaded image map: consume new labels, stop consuming removed ones (their
        queued jobs stay in the broker for other hosts; deliveries being handled settle
        first). Claims are sized by each label's new default from the next one on."""
        async with self._switching:
            self._image_map = image_map
            for label in [label for label in self._consumers if label not in image_map.images]:
                await self._consumers.pop(label).close()
                log.info("label.removed", label=label)
            for label in image_map.images:
                if label not in self._consumers:
                    await self._add_consumer(label)
        self.poke()

    def _should_run(self) -> bool:
        return not self._stopped and not self._ledger.draining

    def requeued(self) -> int:
        """Deliveries handed back to the broker (on purpose, or with a closed channel)."""
        return sum(consumer.requeued for consumer in self._consumers.values())

    def poke(self) -> None:
        self._dirty.set()

    def consuming(self) -> dict[str, bool]:
        return {label: consumer.running for label, consumer in self._consumers.items()}

    async def _loop(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._dirty.wait(), STARVED_POLL_S if self._starved else None)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                with broker_cancellation_as_error():
                    await self._rebalance()
            except Exception as exc:  # a channel mid-reconnect: try again on the next change
                log.warning("scheduler.rebalance_failed", error=describe_error(exc))
                await asyncio.sleep(0.5)
                self._dirty.set()

    async def _rebalance(self) -> None:
        async with self._switching:
            await self._switch_consumers()

    async def _switch_consumers(self) -> None:
        # Pauses first: a host that may not take work stops before anything else happens.
        for label, consumer in self._consumers.items():
            if consumer.running and not consumer.should_run():
                await consumer.pause()
                log.debug("label.paused", label=label)
        if self._window.held:
            # A held delivery needs room its claim does not cover: idle claims go back
            # (all of them once it has waited HELD_FIRST_AFTER_S), and the queues are
            # asked again each STARVED_POLL_S until it has started.
            await self._take_back_idle_claims(await self._queue_depths(), everyone=self._window.held_first())
        paused = [
            label for label, consumer in self._consumers.items() if consumer.should_run() and not consumer.running
        ]
        if not paused:
            self._starved = bool(self._window.held)
            return
        if not self._window.held:
            # Claims in turns, the label that waited longest first. When every label got
            # one there is room for all: each keeps half of what it got (a prefetch
            # window to take a burst in, journaled in one group commit), and the other
            # half stays unclaimed for the claims running consumers renew at each ack.
            grants = self._grant(sorted(paused, key=self._waited_order), {label: MAX_PREFETCH for label in paused})
            if all(grants.values()):
                for claims in grants.values():
                    for claim in claims[max(1, len(claims) // 2) :]:
                        self._window.release(claim)
                    del claims[max(1, len(claims) // 2) :]
                self._starved = False
                await self._resume(grants)
                return
            for claims in grants.values():
                for claim in claims:
                    self._window.release(claim)
        # Contested (or a delivery is held): ask the queues, and give the room to those
        # with work, fullest first; labels with none get what is left, unless a held
        # delivery waits for it.
        depths = await self._queue_depths()
        with_work = [label for label in paused if depths.get(label) != 0]  # unknown counts as work
        if with_work:
            await self._take_back_idle_claims(depths)
        order = sorted(with_work, key=lambda label: (-(depths.get(label) or 1), self._waited_order(label)))
        if not self._window.held:
            order += sorted((label for label in paused if label not in with_work), key=self._waited_order)
        caps = {label: max(1, depths.get(label) or 1) for label in order}
        grants = self._grant(order, caps)
        # Until every label that wants room has some, the queues are asked again each
        # STARVED_POLL_S: a job arriving in one that was empty must be seen.
        self._starved = any(not grants.get(label) for label in paused) or bool(self._window.held)
        await self._resume(grants)

    def _waited_order(self, label: str) -> float:
        return self._served_at.get(label, 0.0)

    def _grant(self, order: list[str], caps: dict[str, int]) -> dict[str, list[Reservation]]:
        """Claims in turns, one per label per turn in `order`, each label up to its cap
        or until the window has no room for it (another label's size may still fit)."""
        grants: dict[str, list[Reservation]] = {label: [] for label in order}
        turn = list(order)
        while turn:
            for label in list(turn):
                claim = self._window.claim(label) if len(grants[label]) < caps[label] else None
                if claim is None:
                    turn.remove(label)
                else:
                    grants[label].append(claim)
        return grants

    async def _resume(self, grants: dict[str, list[Reservation]]) -> None:
        for label, claims in grants.items():
            if not claims:
                continue
            self._served_at[label] = time.monotonic()
            await self._consumers[label].resume(claims)

    async def _take_back_idle_claims(self, depths: dict[str, int | None], *, everyone: bool = False) -> None:
        """Consumers give back the claims of their empty slots (a cancel: the deliveries
        they hold keep theirs), so the room goes to a label with work or a held
        delivery: those on empty queues, or `everyone`."""
        for label, consumer in self._consumers.items():
            claims = consumer.claims
            if consumer.running and claims is not None and claims.free and (everyone or depths.get(label) == 0):
                await consumer.pause()
                log.debug("label.claims_taken_back", label=label)

    async def _queue_depths(self) -> dict[str, int | None]:
        """Ready messages per label queue (None: the broker did not say), reused for
        `DEPTH_TTL_S`."""
        if time.monotonic() - self._depths_at < DEPTH_TTL_S and set(self._depths) >= set(self._consumers):
            return self._depths
        assert self._connection is not None
        depths: dict[str, int | None] = {}
        for label in self._consumers:
            try:
                if self._depth_channel is None or self._depth_channel.is_closed:
                    self._depth_channel = await self._connection.channel()
                # On the underlying channel: a robust channel would keep every passive
                # declare, to repeat it after a reconnection.
                underlay = await self._depth_channel.get_underlay_channel()
                declared = await underlay.queue_declare(self._topology.label_queue(label), passive=True)
                depths[label] = declared.message_count
            except Exception as exc:
                log.debug("scheduler.depth_unknown", label=label, error=describe_error(exc))
                depths[label] = None
        self._depths, self._depths_at = depths, time.monotonic()
        return depths

    async def stop(self) -> None:
        """Stop taking work: held deliveries are handed back, consumers cancelled, and
        undelivered work stays in the broker."""
        self._stopped = True
        self._window.close()
        self._dirty.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.poke in self._window.listeners:
            self._window.listeners.remove(self.poke)
        consumers = list(self._consumers.values())
        if self._unroutable is not None:
            consumers.append(self._unroutable)
        await asyncio.gather(*(c.close() for c in consumers), return_exceptions=True)
        if self._depth_channel is not None and not self._depth_channel.is_closed:
            await self._depth_channel.close()
