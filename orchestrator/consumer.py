"""Queue consumers and the one place where a delivery is acked, dead-lettered or requeued.

Each job queue has its own channel and consumer. A consumer runs only while the capacity
ledger says its label can start a job now (DESIGN.md "Capacity"): when the label or the
host fills up it is cancelled, and any delivery that arrives before the broker confirms
the cancel is requeued, so work this host cannot start goes to other hosts at once.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from orchestrator.amqp import BROKER_ERRORS, ConfirmedPublisher, broker_cancellation_as_error, describe_error
from orchestrator.logsetup import EventLogger
from orchestrator.topology import REASON_HEADER, Topology

log = EventLogger("orchestrator.consumer")

SETTLE_TIMEOUT_S = 10.0  # an ack or nack is a frame written, not a round trip: seconds mean the channel is gone


class Verdict(str, enum.Enum):
    START = "start"  # journaled: ack, then run the job
    ANSWERED = "answered"  # a result was stored instead of running it: ack
    FORWARDED = "forwarded"  # re-published elsewhere with confirms: ack
    DUPLICATE = "duplicate"  # this host already has the job: ack and drop
    DEAD_LETTER = "dead_letter"  # malformed: to the DLQ with the reason
    REQUEUE = "requeue"  # cannot start it now: back to the queue for any host
    RETURNED = "returned"  # its channel closed first: the broker has it back, nothing to settle


@dataclass
class Decision:
    verdict: Verdict
    reason: str = ""
    job_id: str | None = None
    after_ack: Callable[[], None] | None = field(default=None, repr=False)


Handler = Callable[[AbstractIncomingMessage], Awaitable[Decision]]


def delivery_channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a message came on is still open: once it closes, the broker
    has the message back (an ack can no longer reach it)."""
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


class Settler:
    """Owns every ack, reject and nack of job deliveries (and nothing else does)."""

    def __init__(self, publisher: ConfirmedPublisher, topology: Topology) -> None:
        self._publisher = publisher
        self._topology = topology

    async def settle(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        verdict = decision.verdict
        try:
            with broker_cancellation_as_error():
                await self._settle(message, decision)
        except Exception as exc:
            # The channel is gone: the broker returns the message to the queue by itself,
            # and a redelivery of a journaled job is recognised as a duplicate.
            log.warning("delivery.settle_failed", verdict=verdict.value, job_id=decision.job_id, error=describe_error(exc))
        # A journaled job is this host's from now on, acked or not: run it.
        if decision.after_ack is not None:
            decision.after_ack()

    async def _settle(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        verdict = decision.verdict
        if verdict is Verdict.RETURNED:
            return
        if verdict is Verdict.REQUEUE:
            # Rare by design (DESIGN.md "Capacity"), and each counts toward the
            # delivery limit: worth a line.
            log.info("delivery.requeued", job_id=decision.job_id, reason=decision.reason)
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await message.nack(requeue=True)
        elif verdict is Verdict.DEAD_LETTER:
            await self._dead_letter(message, decision.reason)
        else:
            # Bounded: on a channel that a broker node took down with it, the frame
            # may wait for a writer that is gone, and the job would never start.
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await message.ack()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:4000]
        headers["x-orchestrator-original-routing-key"] = message.routing_key or ""
        try:
            await self._publisher.publish(
                self._topology.dlx,
                message.routing_key or "",
                aio_pika.Message(
                    body=message.body,
                    headers=headers,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id,
                ),
            )
        except Exception as exc:
            # Could not add our reason: let the broker dead-letter it (x-death headers).
            log.warning("delivery.dead_letter_publish_failed", error=str(exc))
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await message.reject(requeue=False)
            return
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            await message.ack()


class QueueConsumer:
    """One queue on its own channel, with pause (cancel) and resume (qos + consume)."""

    def __init__(self, name: str, channel: AbstractChannel, queue: AbstractQueue, handler: Handler, settler: Settler) -> None:
        self.name = name
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._settler = settler
        self._tag: str | None = None
        self._prefetch = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._switch = asyncio.Lock()
        # capacity hooks, set by the scheduler (defaults: always room, for the unroutable queue)
        self.should_run: Callable[[], bool] = lambda: True
        self.free_slots: Callable[[], int] = lambda: 1
        # called after this consumer paused itself, so the scheduler resumes it when
        # there is still room (a pause may come after the scheduler last looked)
        self.paused_itself: Callable[[], None] = lambda: None
        self.requeued = 0
        self._unacked: Counter[str] = Counter()

    @classmethod
    async def open(
        cls,
        connection: AbstractRobustConnection,
        queue_name: str,
        handler: Handler,
        settler: Settler,
    ) -> QueueConsumer:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.get_queue(queue_name, ensure=False)
        return cls(queue_name, channel, queue, handler, settler)

    @property
    def running(self) -> bool:
        return self._tag is not None

    async def resume(self) -> None:
        """Consume with prefetch = what the label can start now (set only here: a qos
        round trip per job would cost more than it saves). Capacity is checked again
        under the lock: it may have filled up since the caller looked."""
        async with self._switch:
            if self._tag is not None or not self.should_run():
                return
            prefetch = max(1, self.free_slots())
            if prefetch != self._prefetch:
                await self._channel.set_qos(prefetch_count=prefetch)
                self._prefetch = prefetch
            self._tag = await self._queue.consume(self._on_message)

    async def pause(self) -> None:
        async with self._switch:
            tag, self._tag = self._tag, None
            if tag is not None and not self._channel.is_closed:
                await self._queue.cancel(tag)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika runs this callback in a task of the channel's, and cancels it when the
        # channel closes (a broker node going down). A delivery journaled here must still
        # reach the runner, or the job would stay accepted, never run, its capacity held
        # and other hosts taking it for this one's: the work runs in a task of its own.
        work = asyncio.ensure_future(self._process(message))
        self._in_flight.add(work)
        work.add_done_callback(self._in_flight.discard)
        await asyncio.shield(work)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        # Prefetch windows are per consumer (quorum queues have no channel-wide qos):
        # count deliveries not yet settled per consumer tag.
        tag = message.consumer_tag or ""
        self._unacked[tag] += 1
        counted = True
        try:
            try:
                with broker_cancellation_as_error():
                    decision = await self._handler(message)
            except BROKER_ERRORS as exc:
                # The broker went away while the message was handled (asking the fleet):
                # nothing was journaled; back to the queue, never to the dead letters.
                log.warning("delivery.handler_interrupted", queue=self.name, error=describe_error(exc))
                decision = Decision(Verdict.REQUEUE, reason=f"broker connection lost while handling: {describe_error(exc)}")
            except Exception as exc:  # a bug in handling one message must not stop intake
                log.error("delivery.handler_failed", queue=self.name, error=repr(exc), exc_info=True)
                decision = Decision(Verdict.DEAD_LETTER, reason=f"internal error while handling: {exc!r}")
            if decision.verdict is Verdict.REQUEUE:
                self.requeued += 1
            if self._window_would_overflow(tag):
                try:
                    async with asyncio.timeout(SETTLE_TIMEOUT_S):
                        await self.pause()
                except Exception as exc:  # the channel is gone; settle as well as we can
                    log.warning("consumer.pause_failed", queue=self.name, error=str(exc))
                self.paused_itself()
            self._uncount(tag)
            counted = False
            await self._settler.settle(message, decision)
        finally:
            if counted:
                self._uncount(tag)

    def _uncount(self, tag: str) -> None:
        self._unacked[tag] -= 1
        if not self._unacked[tag]:
            del self._unacked[tag]

    def _window_would_overflow(self, tag: str) -> bool:
        """Whether settling this delivery could let the broker send one we cannot start.

        Settling frees a slot of its consumer's prefetch window: the broker may then
        have up to `prefetch` minus that consumer's other unacked deliveries on their
        way, and each needs a free slot. If not all would fit, cancel first (the broker
        sends nothing after cancel-ok): on a quorum queue every requeue counts toward
        the delivery limit. A delivery of an already cancelled consumer opens nothing."""
        if self._tag is None:
            return self._switch.locked()  # a pause is under way: wait for its cancel-ok
        if tag != self._tag:
            return False
        others_unacked = self._unacked[tag] - 1
        return self.free_slots() + others_unacked < self._prefetch

    async def close(self) -> None:
        """Stop consuming, let deliveries being handled settle, and close the channel so
        the broker requeues anything still unacked."""
        try:
            await self.pause()
        except Exception as exc:
            log.warning("consumer.cancel_failed", queue=self.name, error=str(exc))
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if not self._channel.is_closed:
            await self._channel.close()
