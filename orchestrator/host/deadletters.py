"""Every dead-lettered job request ends with one `error` result saying why.

A well-formed request can reach the dead-letter exchange without any host having
answered it: the broker dead-letters a message past its queue's delivery limit (hosts
that kept dying on it, requeues), a consumer's reject, or our own dead letter after an
internal error while handling it. Without a result its commit status would wait forever
and `enqueue --wait` until it gives up. The dead-letter exchange is a fanout: the DLQ
keeps every copy for the operator, and a second queue, `<prefix>.jobs.dead-letters`, is
consumed by every host (each message by one of them) to publish that result.

The result is the same whichever host publishes it and however often (its `completed_at`
is the moment of the dead-lettering, and no host is named), with the message id
`<job id>/<attempt>`: a host that dies between the publish and the ack publishes the
same bytes again, which consumers drop as a copy. Nothing is answered for a malformed
message (it names no job a status waits for), for our dead letter of a request whose id
was reused for another job, or for a job another host holds (it publishes its own).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from orchestrator.core.amqp import ConfirmedPublisher, json_message
from orchestrator.core.fleet import FleetUnavailable
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import JobResult, JobStatus, message_id_for
from orchestrator.core.requestbody import MalformedRequest, parse_request
from orchestrator.core.topology import NO_RESULT_HEADER, REASON_HEADER, Topology
from orchestrator.host.consumer import Decision, QueueConsumer, Settler, Verdict
from orchestrator.host.handback import HolderOf
from orchestrator.host.window import Claimed

log = EventLogger("orchestrator.host.deadletters")

PREFETCH = 8
SHOWN_REASON_CHARS = 500


def _last_death(headers: Mapping[str, object]) -> dict[str, object]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]  # the broker keeps them most recent first
    return {}


def describe_death(headers: Mapping[str, object], *, delivery_limit: int) -> str:
    """Why a request was dead-lettered, for its result's summary."""
    ours = headers.get(REASON_HEADER)
    if isinstance(ours, bytes):
        ours = ours.decode(errors="replace")
    if isinstance(ours, str) and ours:
        return f"dead-lettered: {ours[:SHOWN_REASON_CHARS]}"
    death = _last_death(headers)
    reason = death.get("reason") or headers.get("x-first-death-reason")
    queue = death.get("queue") or headers.get("x-first-death-queue") or "its queue"
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if isinstance(queue, bytes):
        queue = queue.decode(errors="replace")
    if reason == "delivery_limit":
        return (
            f"dead-lettered after {delivery_limit + 1} deliveries: queue {queue} reached its delivery limit "
            f"(DELIVERY_LIMIT {delivery_limit}) without a host settling the request; hosts that died or "
            "lost their broker connection while holding it are the usual cause (see their logs)"
        )
    if reason == "rejected":
        return f"dead-lettered: rejected by a consumer of queue {queue}"
    return f"dead-lettered from queue {queue}: {reason or 'no reason given'}"


def _dead_at(headers: Mapping[str, object]) -> datetime.datetime:
    """When the broker dead-lettered it: the same on every host that reads it."""
    at = _last_death(headers).get("time")
    if isinstance(at, datetime.datetime):
        return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromtimestamp(0, datetime.UTC)


class DeadLetterAnswerer:
    def __init__(
        self,
        *,
        topology: Topology,
        publisher: ConfirmedPublisher,
        settler: Settler,
        holder_of: HolderOf,
        delivery_limit: int,
        max_message_bytes: int,
        answered: Callable[[], None] = lambda: None,
    ) -> None:
        self._topology = topology
        self._publisher = publisher
        self._settler = settler
        self._holder_of = holder_of
        self._delivery_limit = delivery_limit
        self._max_message_bytes = max_message_bytes
        self._answered = answered
        self._consumer: QueueConsumer | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._consumer = await QueueConsumer.open(
            connection, self._topology.dead_letters_queue, self._on_dead_letter, self._settler, prefetch=PREFETCH
        )
        await self._consumer.resume()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.close()

    async def _on_dead_letter(self, message: AbstractIncomingMessage, _claimed: Claimed) -> Decision:
        headers = dict(message.headers or {})
        if headers.get(NO_RESULT_HEADER):
            return Decision(Verdict.ANSWERED, reason="owes no result")
        try:
            request = parse_request(message.body, max_bytes=self._max_message_bytes)
        except MalformedRequest:
            return Decision(Verdict.ANSWERED, reason="malformed: no job to answer for (the DLQ keeps it)")
        job_id = request.job_id
        try:
            holder = await self._holder_of(job_id, request.attempt)
        except FleetUnavailable:
            holder = None  # a result is owed either way; a holder's own result has the same id
        if holder is not None and holder.state != "checking":
            log.info("dead_letter.held_elsewhere", job_id=job_id, holder=holder.host, holder_state=holder.state)
            return Decision(Verdict.ANSWERED, reason=f"held by {holder.host}", job_id=job_id)
        summary = describe_death(headers, delivery_limit=self._delivery_limit)
        label = message.routing_key or request.runs_on
        result = JobResult.for_request(
            request,
            status=JobStatus.ERROR,
            summary=summary,
            label=label or None,
            completed_at=_dead_at(headers),
        )
        await self._publisher.publish(
            self._topology.results,
            job_id,
            json_message(result, message_id=message_id_for(job_id, request.attempt)),
            timeout_s=10,
        )
        self._answered()
        log.warning("dead_letter.answered", job_id=job_id, label=label, attempt=request.attempt, summary=summary)
        return Decision(Verdict.ANSWERED, reason=summary, job_id=job_id)
