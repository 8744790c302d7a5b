"""Queue consumers and the one place where a delivery is acked, dead-lettered or requeued.

Each job queue has its own channel and consumer. A label's consumer runs only with the
claims the host's window gave it (`orchestrator.host.window`, DESIGN.md "Capacity"): its
prefetch is the number of claims, every delivery carries one, and before the ack that
reopens a slot it claims room for the next delivery or cancels first. So work this host
cannot start stays in the broker for other hosts, and nothing is requeued for want of
room. The requeues that remain are counted by reason (`RequeueReason`).
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from orchestrator.core.amqp import BROKER_ERRORS, ConfirmedPublisher, broker_cancellation_as_error, describe_error
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.topology import NO_RESULT_HEADER, REASON_HEADER, Topology
from orchestrator.host.capacity import Reservation
from orchestrator.host.window import Claimed, ConsumerClaims

log = EventLogger("orchestrator.host.consumer")

SETTLE_TIMEOUT_S = 10.0  # an ack or nack is a frame written, not a round trip: seconds mean the channel is gone


class Verdict(str, enum.Enum):
    START = "start"  # journaled: ack, then run the job
    ANSWERED = "answered"  # a result was stored instead of running it: ack
    FORWARDED = "forwarded"  # re-published elsewhere with confirms: ack
    DUPLICATE = "duplicate"  # this host already has the job: ack and drop
    DEAD_LETTER = "dead_letter"  # malformed: to the DLQ with the reason
    REQUEUE = "requeue"  # handed back on purpose (a `RequeueReason`): back to the queue for any host
    RETURNED = "returned"  # its channel closed first: the broker has it back, nothing to settle


class RequeueReason(str, enum.Enum):
    """Why a delivery went back to its queue: each counts toward the delivery limit, so
    each is counted (`orchestrator_requeues_total{reason}`). Want of room is not one."""

    STOPPING = "stopping"  # the daemon stops while the delivery was held
    DRAINING = "draining"  # the host began to drain while the delivery was held
    LABEL_REMOVED = "label_removed"  # a reloaded image map no longer serves its label
    BROKER_LOST = "broker_lost"  # the connection went while it was handled (nothing journaled)
    ATTEMPT_HELD = "attempt_held"  # an earlier attempt of the job still runs here
    HELD_TOO_LONG = "held_too_long"  # held past MAX_HOLD_S without room for its size
    CHANNEL_CLOSED = "channel_closed"  # its channel closed before it was settled: the broker took it back


@dataclass
class Decision:
    verdict: Verdict
    reason: str = ""
    job_id: str | None = None
    after_ack: Callable[[], None] | None = field(default=None, repr=False)
    requeue_reason: RequeueReason | None = None  # for REQUEUE and RETURNED
    # For DEAD_LETTER: whether the dead letter still owes its publisher an error result
    # (a well-formed request does; a request_id reused for another job must not).
    result_owed: bool = True


Handler = Callable[[AbstractIncomingMessage, Claimed], Awaitable[Decision]]
RequeueCounter = Callable[[RequeueReason], None]


def _no_count(_reason: RequeueReason) -> None:
    pass


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How often the broker delivered this message before (a quorum queue's
    `x-delivery-count`: requeues and deliveries whose channel closed un-settled)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def delivery_channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a message came on is still open: once it closes, the broker
    has the message back (an ack can no longer reach it)."""
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


class Settler:
    """Owns every ack, reject and nack of job deliveries (and nothing else does)."""

    def __init__(
        self, publisher: ConfirmedPublisher, topology: Topology, *, count_requeue: RequeueCounter = _no_count
    ) -> None:
        self._publisher = publisher
        self._topology = topology
        self._count_requeue = count_requeue

    async def settle(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        verdict = decision.verdict
        try:
            with broker_cancellation_as_error():
                await self._settle(message, decision)
        except Exception as exc:
            # The channel is gone: the broker returns the message to the queue by itself,
            # and a redelivery of a journaled job is recognised as a duplicate.
            log.warning(
                "delivery.settle_failed", verdict=verdict.value, job_id=decision.job_id, error=describe_error(exc)
            )
        # A journaled job is this host's from now on, acked or not: run it.
        if decision.after_ack is not None:
            decision.after_ack()

    async def _settle(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        verdict = decision.verdict
        if verdict is Verdict.RETURNED:
            self._count_requeue(decision.requeue_reason or RequeueReason.CHANNEL_CLOSED)
            return
        if verdict is Verdict.REQUEUE:
            # Rare by design (DESIGN.md "Capacity"), and each counts toward the
            # delivery limit: worth a line and a count.
            why = decision.requeue_reason or RequeueReason.BROKER_LOST
            log.info(
                "delivery.requeued",
                job_id=decision.job_id,
                reason=decision.reason,
                reason_code=why.value,
                delivery_count=delivery_count(message),
            )
            self._count_requeue(why)
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await message.nack(requeue=True)
        elif verdict is Verdict.DEAD_LETTER:
            await self._dead_letter(message, decision.reason, result_owed=decision.result_owed)
        else:
            # Bounded: on a channel that a broker node took down with it, the frame
            # may wait for a writer that is gone, and the job would never start.
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await message.ack()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, *, result_owed: bool) -> None:
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:4000]
        if not result_owed:
            headers[NO_RESULT_HEADER] = 1
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
    """One queue on its own channel, with pause (cancel) and resume (qos + consume).

    A label's consumer carries the `ConsumerClaims` of its window; the unroutable and
    dead-letter queues' consumers have none and run with a fixed prefetch."""

    def __init__(
        self,
        name: str,
        channel: AbstractChannel,
        queue: AbstractQueue,
        handler: Handler,
        settler: Settler,
        claims: ConsumerClaims | None = None,
        *,
        prefetch: int = 1,
    ) -> None:
        self.name = name
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._settler = settler
        self.claims = claims
        self._tag: str | None = None
        self._fixed_prefetch = prefetch
        self._prefetch = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._switch = asyncio.Lock()
        # set by the scheduler (default: always, for the queues that claim no room)
        self.should_run: Callable[[], bool] = lambda: True
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
        claims: ConsumerClaims | None = None,
        *,
        prefetch: int = 1,
    ) -> QueueConsumer:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.get_queue(queue_name, ensure=False)
        return cls(queue_name, channel, queue, handler, settler, claims, prefetch=prefetch)

    @property
    def running(self) -> bool:
        return self._tag is not None

    async def resume(self, claims: list[Reservation] | None = None) -> bool:
        """Consume: a label's consumer with prefetch = the claims given (released here
        when it does not start), the others with their fixed prefetch. Whether it now
        consumes."""
        async with self._switch:
            if self._tag is not None or not self.should_run() or (self.claims is not None and not claims):
                if self.claims is not None:
                    for claim in claims or []:
                        self.claims.window.release(claim)
                return self._tag is not None
            prefetch = len(claims) if self.claims is not None and claims else self._fixed_prefetch
            # Our own tag, known before the first delivery can arrive with it.
            tag = f"{self.name}.{uuid.uuid4().hex[:12]}"
            if self.claims is not None:
                self.claims.grant(claims or [], tag)
            try:
                if prefetch != self._prefetch:
                    await self._channel.set_qos(prefetch_count=prefetch)
                    self._prefetch = prefetch
                self._tag = await self._queue.consume(self._on_message, consumer_tag=tag)
            except BaseException:
                if self.claims is not None:
                    self.claims.release_all()
                raise
            return True

    async def pause(self) -> None:
        """Cancel, and once the broker confirmed it (it sends nothing after cancel-ok),
        release the claims of the empty slots."""
        async with self._switch:
            tag, self._tag = self._tag, None
            try:
                if tag is not None and not self._channel.is_closed:
                    await self._queue.cancel(tag)
            finally:
                if self.claims is not None and tag is not None:
                    self.claims.release_all()

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
        claimed = Claimed(self.claims.take(tag) if self.claims is not None else None)
        try:
            try:
                with broker_cancellation_as_error():
                    decision = await self._handler(message, claimed)
            except BROKER_ERRORS as exc:
                # The broker went away while the message was handled (asking the fleet):
                # nothing was journaled; back to the queue, never to the dead letters.
                log.warning("delivery.handler_interrupted", queue=self.name, error=describe_error(exc))
                decision = Decision(
                    Verdict.REQUEUE,
                    reason=f"broker connection lost while handling: {describe_error(exc)}",
                    requeue_reason=RequeueReason.BROKER_LOST,
                )
            except Exception as exc:  # a bug in handling one message must not stop intake
                log.error("delivery.handler_failed", queue=self.name, error=repr(exc), exc_info=True)
                decision = Decision(Verdict.DEAD_LETTER, reason=f"internal error while handling: {exc!r}")
            if decision.verdict in (Verdict.REQUEUE, Verdict.RETURNED):
                self.requeued += 1
            if self.claims is not None:
                await self._keep_window(tag, claimed)
            self._uncount(tag)
            counted = False
            await self._settler.settle(message, decision)
        finally:
            if counted:
                self._uncount(tag)
            if self.claims is not None and claimed.reservation is not None:
                self.claims.window.release(claimed.reservation)  # an error on the way: nothing promised any more
                claimed.reservation = None

    async def _keep_window(self, tag: str, claimed: Claimed) -> None:
        """Before a delivery is settled: its slot reopens with the settle, so the window
        keeps a claim for it (the delivery's own if its job did not use it, else a new
        one), or the consumer cancels first and nothing more is sent."""
        assert self.claims is not None
        returned, claimed.reservation = claimed.reservation, None
        if tag == self.claims.tag and self._tag != tag:
            async with self._switch:  # a pause of this tag is under way: settle after its cancel-ok
                pass
        if tag != self.claims.tag or self._tag != tag:
            self.claims.window.release(returned)  # its window is closed: nothing reopens
            return
        if self.claims.refill(returned, self._prefetch - (self._unacked[tag] - 1)):
            return
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await self.pause()
        except Exception as exc:  # the channel is gone; settle as well as we can
            log.warning("consumer.pause_failed", queue=self.name, error=str(exc))
            self.claims.release_all()
        self.paused_itself()

    def _uncount(self, tag: str) -> None:
        self._unacked[tag] -= 1
        if not self._unacked[tag]:
            del self._unacked[tag]

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
